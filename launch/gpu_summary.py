"""One markdown line per preset for launch/gpu_bench.sh's summary, from a result JSON.

    python launch/gpu_summary.py smoke <bench.json>   # measured peak against the planner's
    python launch/gpu_summary.py timed <bench.json>   # ours against the original-style baseline
    python launch/gpu_summary.py check <gpu_check.json>

Lines rather than a table: the summary is appended to after every preset, and a run cut short
must still read well.
"""

from __future__ import annotations

import json
import sys


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _failed(m: dict) -> str:
    if m.get("status") == "oom":
        return f"out of memory at micro-batch {m.get('oom_batch_sizes')}"
    return f"{m.get('status', 'missing')}: {str(m.get('error', ''))[:300]}"


def smoke_line(run: dict) -> str:
    m = run["ours"]
    head = f"- {run['preset']} (AC {run['activation_checkpoint']}, compile {str(run['compile']).lower()})"
    if m.get("status") != "ok":
        return f"{head}: {_failed(m)}"
    planned = m.get("planned_allocated_gib")
    error = "" if not planned else f" ({100 * (planned / m['peak_memory_gib'] - 1):+.1f}%)"
    reserved = f" (reserved {m['peak_reserved_gib']:.1f})" if "peak_reserved_gib" in m else ""
    return (f"{head}: ok at micro-batch {m['local_batch_size']}, peak {m['peak_memory_gib']:.1f} GiB{reserved}, planner "
            f"{'n/a' if planned is None else f'{planned:.1f} GiB'}{error}; SDPA {m.get('sdpa_kernel')}; "
            f"graphs {m['graphs_compiled_in_warmup']} + {m['graphs_compiled_in_timed_steps']} recompiled, "
            f"breaks {m['graph_breaks']}; loss {m['final_loss']:.3f}")


def timed_line(run: dict) -> str:
    m, b = run["ours"], run.get("baseline") or {}
    head = f"- {run['preset']}"
    ours = (_failed(m) if m.get("status") != "ok" else
            f"ours {m['tokens_per_second']:,.0f} tok/s ({_pct(m['mfu'])} MFU, batch {m['local_batch_size']}, "
            f"{m['peak_memory_gib']:.1f} GiB, {m['step_time_ms']:.0f} ms/step, SDPA {m.get('sdpa_kernel')})")
    if not b:
        return f"{head}: {ours}; no baseline"
    base = (_failed(b) if b.get("status") != "ok" else
            f"HF {b['tokens_per_second']:,.0f} tok/s ({_pct(b['mfu'])} MFU, batch {b['local_batch_size']}, "
            f"{b['peak_memory_gib']:.1f} GiB, SDPA {b.get('sdpa_kernel')})")
    speedup = f"; speed-up {run['speedup']:.2f}x" if run.get("speedup") else ""
    return f"{head}: {ours}; {base}{speedup}"


def check_lines(results: dict) -> list[str]:
    lines = []
    for preset, e in results["presets"].items():
        if e["exit_code"] != 0:
            lines.append(f"- {preset}: trainer exited with {e['exit_code']}")
        else:
            lines.append(f"- {preset}: {e['tokens_per_second_per_gpu']:,.0f} tok/s/GPU, MFU {_pct(e['mfu'])}, "
                         f"peak {e['peak_memory_gib']:.1f} GiB, {e['step_time_s']:.3f} s/step")
    return lines


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("smoke", "timed", "check"):
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    kind, path = argv
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        print(f"- {path}: no result ({e})")
        return
    if kind == "check":
        print("\n".join(check_lines(results)))
        return
    for run in results.get("runs", []):
        print(smoke_line(run) if kind == "smoke" else timed_line(run))


if __name__ == "__main__":
    main(sys.argv[1:])
