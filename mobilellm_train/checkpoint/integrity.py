"""Checkpoint integrity: per-rank manifests of file sizes and CRC-32s, written on save and
checked before a load.

Each rank writes `__<rank>_manifest.json`, the size and CRC-32 of every file it wrote, before
`.metadata` marks the step complete (`ChecksummedWriter`); `verify_checkpoint` checks a step
folder's files against them, and `verify_on_all_ranks` splits that work over the ranks. Separate
from safe loading (which refuses code) and from the checkpointer (which decides when to verify):
what a manifest covers and how it is checked is all here.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
import zlib

import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from mobilellm_train.checkpoint.folders import permission_error
from mobilellm_train.checkpoint.safe_load import read_metadata
from mobilellm_train.errors import CheckpointError

logger = logging.getLogger("mobilellm_train")

MANIFEST_GLOB = "__*_manifest.json"
_CHUNK_BYTES = 8 << 20


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


class ChecksummedWriter(FileSystemWriter):
    """DCP's filesystem writer that records the size and CRC-32 of every file this rank wrote in
    `__<rank>_manifest.json`.

    It runs inside write_data, that is in the background writer of an async save, and before the
    coordinator writes `.metadata`: a complete step always has its manifests. CRC-32 (zlib) reads
    about 1 GB/s per core, the fastest check in the standard library; it catches flipped bits and
    truncation, not deliberate edits (the manifest sits beside the data).
    """

    def __init__(self, path: str):
        super().__init__(path)
        self.checksum_seconds = 0.0
        self.checksum_bytes = 0

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        results = future.wait()  # FileSystemWriter writes synchronously; the future is done
        begin = time.perf_counter()
        files = {}
        for name in sorted({r.storage_data.relative_path for r in results}):
            full = os.path.join(str(self.path), name)
            files[name] = {"bytes": os.path.getsize(full), "crc32": f"{file_crc32(full):08x}"}
        self.checksum_bytes = sum(f["bytes"] for f in files.values())
        manifest = os.path.join(str(self.path), f"{plan.storage_data.prefix}manifest.json")
        with open(manifest + ".tmp", "w") as f:
            json.dump({"format": 1, "algorithm": "crc32", "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(manifest + ".tmp", manifest)
        self.checksum_seconds = time.perf_counter() - begin
        return future


def verify_checkpoint(path: str, rank: int = 0, world_size: int = 1) -> int:
    """Check a step folder's files against its manifests; this rank checks every world_size-th
    file. Raises CheckpointError naming the first bad file; returns the bytes checked."""
    metadata = read_metadata(path)
    manifests = sorted(glob.glob(os.path.join(glob.escape(path), MANIFEST_GLOB)))
    if not manifests:
        raise CheckpointError(
            f"{path} has no checksum manifests ({MANIFEST_GLOB}): it was written by an older version or "
            "they were removed, so it cannot be verified. Set --checkpoint.verify false (or pass "
            "--no-verify to export, eval and generate) to load it unchecked."
        )
    expected: dict[str, dict] = {}
    for manifest in manifests:
        try:
            with open(manifest) as f:
                entries = json.load(f)["files"]
            for name, entry in entries.items():
                expected[name] = {"bytes": int(entry["bytes"]), "crc32": str(entry["crc32"])}
        except PermissionError:
            raise permission_error(manifest) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{manifest} is damaged ({type(e).__name__}: {e})") from None
    for name in sorted({info.relative_path for info in metadata.storage_data.values()} - set(expected)):
        raise CheckpointError(f"{os.path.join(path, name)} has no checksum in any manifest of {path}")
    checked = 0
    for name in sorted(expected)[rank::world_size]:
        file, want = os.path.join(path, name), expected[name]
        try:
            size = os.path.getsize(file)
            crc = f"{file_crc32(file):08x}" if size == want["bytes"] else None
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing (its manifest lists it)") from None
        except PermissionError:
            raise permission_error(file) from None
        if size != want["bytes"]:
            raise CheckpointError(f"{file} is damaged: {size} bytes, {want['bytes']} when written (truncated?)")
        if crc != want["crc32"]:
            raise CheckpointError(
                f"{file} is damaged: its CRC-32 is {crc}, {want['crc32']} when written; the data changed on disk"
            )
        checked += size
    return checked


def verify_on_all_ranks(path: str, rank: int) -> None:
    """Check a step folder against its checksums, the files split over the ranks (collective when
    a process group is up). Raises the same CheckpointError on every rank if any file does not match."""
    begin = time.perf_counter()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    problem, checked = "", 0
    try:
        checked = verify_checkpoint(path, rank, world_size)
    except CheckpointError as e:
        problem = str(e)
    if world_size > 1:
        problems: list = [None] * world_size
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), "")
    if problem:
        raise CheckpointError(problem)
    logger.info("verified %s against its checksums (%.2f GB on this rank) in %.1fs",
                path, checked / 1e9, time.perf_counter() - begin)
