"""The rows of launch/gpu_bench.sh's summary table, from a result JSON.

    python launch/gpu_summary.py header                       # the table's header
    python launch/gpu_summary.py row <bench.json> PRESET WALL_S AT_S [STATUS]
    python launch/gpu_summary.py check <gpu_check.json>       # the whole trainer (gpu_bench.sh tests)

`row` prints one table row per preset: our trainer's measured peak against the planner's, the
compile (first warm-up step) seconds, recompiles and graph breaks, throughput, and the
original-style baseline beside it. Without a usable result (the process timed out or failed
before writing one) the row says so, with STATUS (what the script saw) and, in the `compile s`
column, "> WALL_S": the process ran that long without finishing its warm-up. WALL_S is the
preset's process time, AT_S the script's clock when the row was written ("setup s" is the
process's time before our first step: imports, process group, model). The table is appended to
row by row, so a run cut short still reads well.
"""

from __future__ import annotations

import json
import sys

COLUMNS = ("preset", "status", "compile s", "recompiles", "breaks", "setup s", "wall s", "row at s", "batch", "peak GiB", "planner GiB",
           "tok/s", "MFU", "ms/step", "SDPA", "HF batch", "HF tok/s", "speed-up")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ").replace("`", "'")


def _failed(m: dict) -> str:
    if m.get("status") == "oom":
        return f"out of memory at micro-batch {m.get('oom_batch_sizes')}"
    return f"{m.get('status', 'missing')}: {str(m.get('error', ''))[:160]}"


def header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def _row(cells: list) -> str:
    cells = [_cell(c) for c in cells] + ["-"] * (len(COLUMNS) - len(cells))
    return "| " + " | ".join(cells) + " |"


def missing_row(preset: str, wall_s: str, at_s: str, status: str) -> str:
    return _row([preset, status or "no result", f"> {wall_s}", "-", "-", "-", wall_s, at_s])


def run_row(run: dict, wall_s: str, at_s: str, status: str = "") -> str:
    m, b = run["ours"], run.get("baseline") or {}
    warm = m.get("compile_s")
    compile_s = f"{warm:.1f}" if warm is not None else f"> {wall_s}"
    done = "ok" if not status or status == "ok" else f"ok, then {status}"
    if m.get("status") != "ok":
        return _row([run["preset"], _failed(m) + (f" ({status})" if status and status != "ok" else ""), compile_s,
                     "-", "-", run.get("started_s", "-"), wall_s, at_s])
    planned = m.get("planned_allocated_gib")
    planner = "n/a" if planned is None else f"{planned:.1f} ({100 * (planned / m['peak_memory_gib'] - 1):+.0f}%)"
    if not b:
        hf_batch, hf, speedup = "-", "not run" if status and status != "ok" else "no baseline", "-"
    elif b.get("status") != "ok":
        hf_batch, hf, speedup = b.get("local_batch_size", "-"), _failed(b), "-"
    else:
        hf_batch, hf = b["local_batch_size"], f"{b['tokens_per_second']:,.0f} ({_pct(b['mfu'])} MFU)"
        speedup = f"{run['speedup']:.2f}x" if run.get("speedup") else "-"
    oom = f", OOM at {m['oom_batch_sizes']}" if m.get("oom_batch_sizes") else ""
    return _row([
        run["preset"], done + oom, compile_s, m["graphs_compiled_in_timed_steps"], m["graph_breaks"],
        run.get("started_s", "-"), wall_s, at_s, m["local_batch_size"], f"{m['peak_memory_gib']:.1f}", planner,
        f"{m['tokens_per_second']:,.0f}", _pct(m["mfu"]), f"{m['step_time_ms']:.0f}", m.get("sdpa_kernel"),
        hf_batch, hf, speedup,
    ])


def check_lines(results: dict) -> list[str]:
    lines = []
    for preset, e in results["presets"].items():
        if e["exit_code"] != 0:
            lines.append(f"- {preset}: trainer exited with {e['exit_code']}")
        else:
            lines.append(f"- {preset}: {e['tokens_per_second_per_gpu']:,.0f} tok/s/GPU, MFU {_pct(e['mfu'])}, "
                         f"peak {e['peak_memory_gib']:.1f} GiB, {e['step_time_s']:.3f} s/step")
    return lines


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> None:
    if argv[:1] == ["header"]:
        print(header())
    elif argv[:1] == ["row"] and len(argv) in (5, 6):
        path, preset, wall_s, at_s = argv[1:5]
        status = argv[5] if len(argv) == 6 else ""
        results = _load(path)
        runs = (results or {}).get("runs") or []
        print(run_row(runs[0], wall_s, at_s, status) if runs else missing_row(preset, wall_s, at_s, status))
    elif argv[:1] == ["check"] and len(argv) == 2:
        results = _load(argv[1])
        print("\n".join(check_lines(results)) if results else "- gpu_check.json: no result")
    else:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
