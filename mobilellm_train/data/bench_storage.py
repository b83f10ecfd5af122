"""Benchmark of the data path at scale on real storage: start-up cost, cold-read bytes, memory, rewind.

    python -m mobilellm_train.data.bench_storage --folder /scratch/virtual-1t          # 4000 x 250M tokens
    python -m mobilellm_train.data.bench_storage --folder /tmp/v --shard-tokens 5e6 --num-shards 64

It builds a "virtual" dataset (unless --folder already holds one): one real shard of --shard-tokens
random uint16 tokens, written with ShardWriter, hard-linked --num-shards times and listed in one
manifest (4000 links of a 250M-token shard are 1T tokens in the disk space of one shard), with the
verification record the writer's hashes allow. Then, for rank --rank of --world-size at
--local-batch-size x --seq-len:

* start-up: CPU seconds of build_token_loader with the default checks (verify_checksums on), and of
  the first batch; and, for comparison, the CPU seconds sha256 takes per shard (what the old
  default, hashing this rank's share at every start, cost per shard);
* cold reads: storage bytes per window (/proc/self/io read_bytes, shard evicted from the page cache
  with posix_fadvise(DONTNEED) first) for a memory map as before, a map with MADV_RANDOM, pread
  without and with POSIX_FADV_RANDOM (what the loader does), and the loader's first batch;
* memory: file-backed RSS after reading --rss-windows windows through a kept memory map (as before)
  and through the loader's reader;
* rewind: seconds to move the loader --rewind-steps steps on by replaying batches and by skip_steps.

Figures depend on the storage; docs/PERFORMANCE.md has this VM's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import mmap
import os
import time

import numpy as np

from mobilellm_train.data.shards import (
    ShardWriter,
    file_sha256,
    is_dataset,
    read_manifest,
    record_verification,
    write_manifest,
)


def virtual_dataset(folder: str, shard_tokens: int, num_shards: int, vocab_size: int = 32000,
                    mean_doc_tokens: int = 800, seed: int = 0) -> str:
    """One shard of random tokens hard-linked num_shards times, one manifest listing all, and the
    verification record (the writer hashed every byte it wrote)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    with ShardWriter(folder, "shard-00000", "uint16") as writer:
        left = shard_tokens
        while left > 0:
            chunk = min(left, 1 << 24)
            tokens = rng.integers(3, vocab_size, chunk, dtype=np.uint16)
            ends = np.cumsum(rng.geometric(1 / mean_doc_tokens, size=chunk // mean_doc_tokens * 2 + 8))
            for doc in np.split(tokens, ends[ends < chunk]):
                if doc.size:
                    writer.add_document(doc)
            left -= chunk
        info = writer.finish()
    for k in range(1, num_shards):
        for ext in (".bin", ".idx"):
            os.link(os.path.join(folder, "shard-00000" + ext), os.path.join(folder, f"shard-{k:05d}{ext}"))
    shards = [dataclasses.replace(info, name=f"shard-{k:05d}") for k in range(num_shards)]
    write_manifest(folder, shards, "uint16", vocab_size, None)
    record_verification(read_manifest(folder), "hashed while writing")  # after the links: they move ctime
    return folder


def evict(path: str) -> None:
    """Drop a file's pages from the page cache (works on files this user owns; written data is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def storage_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (/proc/self/io read_bytes)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise OSError("/proc/self/io has no read_bytes")


def file_rss_bytes() -> int:
    """This process's file-backed resident memory (RssFile of /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no RssFile")


def read_windows(path: str, offsets: np.ndarray, window_tokens: int, mode: str) -> None:
    """Read uint16 windows at token offsets of one file: 'mmap' (as the loader did), 'mmap-random'
    (with MADV_RANDOM), 'pread' (plain), 'pread-random' (POSIX_FADV_RANDOM, as the loader does)."""
    with open(path, "rb") as f:
        if mode.startswith("mmap"):
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if mode == "mmap-random":
                m.madvise(mmap.MADV_RANDOM)
            arr = np.frombuffer(m, dtype=np.uint16)
            for o in offsets.tolist():
                np.array(arr[o : o + window_tokens])
            del arr
            m.close()
            return
        if mode == "pread-random":
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        buf = np.empty(window_tokens, dtype=np.uint16)
        for o in offsets.tolist():
            os.preadv(f.fileno(), [buf], o * 2)


def cold_read_bytes_per_window(path: str, window_tokens: int, num_windows: int, mode: str, seed: int = 0) -> float:
    """Storage bytes per window read at random window positions right after evicting the file."""
    n = os.path.getsize(path) // 2 // window_tokens
    offsets = np.random.default_rng(seed).choice(n, size=min(n, num_windows), replace=False) * window_tokens
    evict(path)
    before = storage_read_bytes()
    read_windows(path, offsets, window_tokens, mode)
    return (storage_read_bytes() - before) / len(offsets)


def _cpu() -> float:
    return time.process_time()


def main(argv: list[str] | None = None) -> None:
    from mobilellm_train.data.bench import machine_line
    from mobilellm_train.data.budget import data_budget
    from mobilellm_train.data.loader import build_token_loader

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", required=True, help="where the virtual dataset is (or is built)")
    p.add_argument("--shard-tokens", type=float, default=250e6)
    p.add_argument("--num-shards", type=int, default=4000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--local-batch-size", type=int, default=32)
    p.add_argument("--world-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=31)
    p.add_argument("--cold-windows", type=int, default=64)
    p.add_argument("--rss-windows", type=int, default=20000)
    p.add_argument("--rewind-steps", type=int, default=1000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"machine: {machine_line()}")
    if not is_dataset(args.folder):
        begin = time.perf_counter()
        virtual_dataset(args.folder, int(args.shard_tokens), args.num_shards)
        print(f"built {args.folder} in {time.perf_counter() - begin:.1f} s")
    m = read_manifest(args.folder)
    shard = os.path.join(args.folder, m.shards[0].name + ".bin")
    T, B, W = args.seq_len, args.local_batch_size, args.world_size
    print(f"dataset: {len(m.shards)} shards, {m.num_tokens:,} tokens; rank {args.rank} of {W}, batch {B} x {T}")

    evict(shard)
    cpu = _cpu()
    loader = build_token_loader(args.folder, T, B, B * W, args.rank, W, num_workers=0)
    start_cpu = _cpu() - cpu
    it = iter(loader)
    before, cpu = storage_read_bytes(), _cpu()
    batch = next(it)
    first_cpu, first_bytes = _cpu() - cpu, storage_read_bytes() - before
    batch_bytes = batch["input"].shape[0] * (T + 1) * 2
    print(f"start-up (default checks): {start_cpu:.2f} CPU-s for build_token_loader, {first_cpu:.3f} CPU-s "
          f"for the first batch; first batch read {first_bytes:,} bytes from storage for {batch_bytes:,} "
          f"bytes of windows ({first_bytes / batch_bytes:.1f}x)")
    it = iter(build_token_loader(args.folder, T, B, B * W, args.rank, W, num_workers=0, doc_mask=True))
    evict(shard)
    evict(shard[: -len(".bin")] + ".idx")
    before = storage_read_bytes()
    next(it)
    print(f"first batch with doc_mask (the .idx read too) after eviction: {storage_read_bytes() - before:,} bytes "
          f"({(storage_read_bytes() - before) / batch_bytes:.1f}x its windows)")
    cpu = _cpu()
    file_sha256(shard)
    print(f"sha256 of one {os.path.getsize(shard):,}-byte shard: {_cpu() - cpu:.2f} CPU-s (the old default "
          f"hashed {-(-len(m.shards) // W)} shards per rank at every start)")

    for mode in ("mmap", "mmap-random", "pread", "pread-random"):
        per = cold_read_bytes_per_window(shard, T + 1, args.cold_windows, mode)
        print(f"cold read, {mode}: {per:,.0f} storage bytes per {2 * (T + 1)}-byte window ({per / (2 * (T + 1)):.1f}x)")

    n = min(args.rss_windows, os.path.getsize(shard) // 2 // (T + 1))
    offsets = np.random.default_rng(1).choice(os.path.getsize(shard) // 2 // (T + 1), n, replace=False) * (T + 1)
    for mode in ("mmap", "pread-random"):
        with open(shard, "rb") as f:  # the kept map: as a loader worker held it before
            keep = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if mode == "mmap" else None
        rss0 = file_rss_bytes()
        if keep is not None:
            arr = np.frombuffer(keep, dtype=np.uint16)
            for o in offsets.tolist():
                np.array(arr[o : o + T + 1])
        else:
            read_windows(shard, offsets, T + 1, mode)
        print(f"file-backed RSS after reading {n} windows via {mode}: +{(file_rss_bytes() - rss0) / 2**20:.1f} MiB")
        if keep is not None:
            del arr
            keep.close()

    for how in ("replay", "skip_steps"):
        loader.load_state_dict({**loader.state_dict(), "samples_consumed": 0})
        begin = time.perf_counter()
        if how == "replay":
            it = iter(loader)
            for _ in range(args.rewind_steps * loader.accum_steps):
                next(it)
        else:
            loader.skip_steps(args.rewind_steps)
            it = iter(loader)
        next(it)
        print(f"rewind by {how} of {args.rewind_steps} steps, then one batch: {time.perf_counter() - begin:.2f} s")

    steps = 480_000
    b = data_budget(loader.sampler, steps, 1024)
    print(f"budget at {steps} steps x 1024: {b.samples[0]:,} samples for {b.windows[0]:,} windows; "
          f"first repeat at step {b.first_repeat_step}, {b.repeat_steps} steps repeat, "
          f"{b.tokens_missing[0]:,} tokens short")


if __name__ == "__main__":
    main()
