"""Benchmark of the token-shard loader: tokens/s that one data-parallel rank's loader delivers.

    python -m mobilellm_train.data.bench                                  # synthetic 200M tokens
    python -m mobilellm_train.data.bench --data /data/web --num-workers 0 2 --doc-mask
    python -m mobilellm_train.data.bench --seq-len 2048 --local-batch-size 32 --seconds 20

Without --data it writes a synthetic dataset (random uint16 ids in documents of random length)
to a temporary folder, removed afterwards. Every shard is read once before timing, so the figures
are for data in the page cache: what the loader's own CPU work allows, not what a disk allows.
For each --num-workers value it times the rank-0 loader of a --world-size run for --seconds and
prints tokens/s (wall clock) and tokens per CPU-second summed over the training process and its
loader workers: the "per core" figure, which unlike the first does not drop when other programs
share the cores. The machine, torch version and date are printed with them.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import resource
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch

from mobilellm_train.data.loader import build_token_loader
from mobilellm_train.data.shards import read_manifest, write_token_dataset


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    return (f"{_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, numpy {np.__version__}, "
            f"python {platform.python_version()}; {time.strftime('%Y-%m-%d')}")


def synthetic_dataset(folder: str, num_tokens: int, vocab_size: int = 32000, mean_doc_tokens: int = 800,
                      seed: int = 0) -> str:
    rng = np.random.default_rng(seed)

    def docs():
        left = num_tokens
        while left > 0:
            chunk = min(left, 1 << 24)
            tokens = rng.integers(3, vocab_size, chunk, dtype=np.uint16)
            lengths = rng.geometric(1 / mean_doc_tokens, size=chunk // mean_doc_tokens * 2 + 8)
            ends = np.cumsum(lengths)
            ends = np.concatenate((ends[ends < chunk], [chunk]))
            yield from np.split(tokens, ends[:-1])
            left -= chunk

    write_token_dataset(folder, docs(), vocab_size, tokens_per_shard=50_000_000)
    return folder


def warm_page_cache(folder: str) -> None:
    for s in read_manifest(folder).shards:
        for ext in (".bin", ".idx"):
            with open(os.path.join(folder, s.name + ext), "rb") as f:
                while f.read(64 << 20):
                    pass


def _cpu_seconds() -> tuple[float, float]:
    """(this process, its finished children): loader workers count once they have exited."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def time_loader(data: str, seq_len: int, local_batch_size: int, world_size: int, num_workers: int,
                doc_mask: bool, seconds: float) -> dict:
    """tokens/s (wall) over `seconds`, and tokens per CPU-second of all the loader's processes
    (the training process and its workers, start-up included): the second figure does not depend
    on what else the machine is running."""
    loader = build_token_loader(data, seq_len, local_batch_size, local_batch_size * world_size, 0, world_size,
                                seed=0, num_workers=num_workers, doc_mask=doc_mask, verify_checksums=False)
    own0, kids0 = _cpu_seconds()
    it = iter(loader)
    warmup_tokens = sum(next(it)["input"].numel() for _ in range(max(4, 2 * num_workers)))
    tokens = 0
    wall = time.perf_counter()
    while time.perf_counter() - wall < seconds:
        tokens += next(it)["input"].numel()
    wall = time.perf_counter() - wall
    del it
    gc.collect()  # the iterator's end shuts its workers down, so their CPU time is counted
    own1, kids1 = _cpu_seconds()
    cpu = (own1 - own0) + (kids1 - kids0)
    return {"tokens_per_s": tokens / wall, "tokens_per_cpu_s": (warmup_tokens + tokens) / cpu}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="", help="a prepared folder (or 'a:0.7,b:0.3'); default: synthetic data")
    p.add_argument("--num-tokens", type=float, default=2e8, help="size of the synthetic dataset")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--local-batch-size", type=int, default=8)
    p.add_argument("--world-size", type=int, default=8, help="data-parallel ranks (only rank 0 is timed)")
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--doc-mask", action="store_true", help="also produce position_ids")
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mobilellm_train.data.loader").setLevel(logging.ERROR)  # "checksums not verified"
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 on torch >= 2.12
    torch.set_num_threads(1)  # one core: the loader's work is numpy and copies, not torch ops

    tmp = None
    data = args.data
    if not data:
        tmp = tempfile.mkdtemp(prefix="mobilellm-bench-")
        data = os.path.join(tmp, "data")
        begin = time.perf_counter()
        synthetic_dataset(data, int(args.num_tokens))
        print(f"wrote {int(args.num_tokens):,} synthetic tokens to {data} in {time.perf_counter() - begin:.1f} s")
    try:
        if "," not in data and ":" not in data:
            warm_page_cache(data)
        print(f"machine: {machine_line()}")
        print(f"seq_len {args.seq_len}, local batch {args.local_batch_size}, rank 0 of {args.world_size}, "
              f"doc_mask {args.doc_mask}, data in the page cache")
        for num_workers in args.num_workers:
            r = time_loader(data, args.seq_len, args.local_batch_size, args.world_size, num_workers,
                            args.doc_mask, args.seconds)
            print(f"num_workers {num_workers}: {r['tokens_per_s'] / 1e6:.1f}M tokens/s per rank, "
                  f"{r['tokens_per_cpu_s'] / 1e6:.1f}M tokens per CPU-second (all loader processes)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
