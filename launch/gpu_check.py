"""GPU check: train the 125M and 1B presets for a few dozen steps on one GPU, with compile, and
report tokens/s per GPU, MFU and peak memory from the trainer's own metrics.jsonl.

    python launch/gpu_check.py --out gpu_check_results     # one GPU; about 5 minutes
    python launch/gpu_check.py --presets 125M 125M_ls --steps 60

The data is synthetic (uniform random token ids in the original JSONL layout), so the loss
means nothing here; only speed and memory are measured. Each preset runs at its TOML's
micro-batch with no gradient accumulation (global batch = micro-batch), so a step is one
forward and backward of the preset's per-GPU work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch

from mobilellm_train.config import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_synthetic_tokens(path: str, n_tokens: int, vocab: int = 32000, line_tokens: int = 2049) -> None:
    """Pre-chunked lines of 2049 random ids, as LLM360's amber-data-prep writes them."""
    os.makedirs(os.path.join(path, "1"), exist_ok=True)
    rng = random.Random(0)
    with open(os.path.join(path, "1", "synthetic.jsonl"), "w") as f:
        for _ in range(n_tokens // line_tokens + 1):
            f.write(json.dumps({"token_ids": [rng.randrange(vocab) for _ in range(line_tokens)]}) + "\n")


def summarize(metrics_path: str, skip_steps: int) -> dict:
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    timed = [r for r in records if r["step"] > skip_steps]
    return {
        "tokens_per_second_per_gpu": statistics.median(r["tokens_per_second"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed) if timed[0]["mfu"] is not None else None,
        "peak_memory_gib": max(r["peak_memory_gib"] for r in records),
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "steps_timed": timed[-1]["step"] - skip_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["125M", "1B"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the figures (compile, warm-up)")
    parser.add_argument("--out", default="gpu_check_results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")

    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "synthetic_tokens")
    write_synthetic_tokens(data, n_tokens=(args.steps + 5) * 32 * 2048)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = {
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "presets": {},
    }
    for preset in args.presets:
        toml = os.path.join(ROOT, "train_configs", f"{preset}.toml")
        with open(toml, "rb") as f:
            local_batch = tomllib.load(f)["training"]["local_batch_size"]
        run = os.path.join(args.out, f"run_{preset}")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "mobilellm_train.train", "--config", toml, "--data.path", data, "--job.dump_folder", run,
            "--training.steps", str(args.steps), "--training.global_batch_size", str(local_batch),
            "--checkpoint.enable", "false", "--metrics.log_freq", "5", "--metrics.enable_tensorboard", "false",
            "--lr_scheduler.warmup_steps", "5",
        ]
        print(" ".join(cmd), flush=True)
        begin = time.time()
        proc = subprocess.run(cmd, env=env, cwd=ROOT)
        entry = {"config": f"train_configs/{preset}.toml", "local_batch_size": local_batch, "seq_len": 2048,
                 "exit_code": proc.returncode, "wall_s": round(time.time() - begin, 1)}
        if proc.returncode == 0:
            entry.update(summarize(os.path.join(run, "metrics.jsonl"), args.warmup_steps))
        results["presets"][preset] = entry
        print(json.dumps({preset: entry}), flush=True)

    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{results['card']}, torch {results['torch']}, {results['date']}, seq 2048, bf16, compile on")
    print(f"{'preset':<10}{'batch':>6}{'tokens/s/GPU':>14}{'MFU':>8}{'peak GiB':>10}{'step s':>8}")
    for preset, e in results["presets"].items():
        if e["exit_code"] != 0:
            print(f"{preset:<10} failed with exit code {e['exit_code']}")
            continue
        mfu = "n/a" if e["mfu"] is None else f"{100 * e['mfu']:.1f}%"
        print(f"{preset:<10}{e['local_batch_size']:>6}{e['tokens_per_second_per_gpu']:>14,.0f}{mfu:>8}"
              f"{e['peak_memory_gib']:>10.1f}{e['step_time_s']:>8.3f}")


if __name__ == "__main__":
    main()
