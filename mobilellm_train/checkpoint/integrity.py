"""Checkpoint integrity: manifests of file sizes and CRC-32s, written on save and checked
before a load.

Each rank writes `__<rank>_manifest.json` for the shards it wrote; the coordinator copies the
tokenizer in and writes `__metadata_manifest.json` for it and `.metadata`, just before `.metadata`
marks the step complete (`ChecksummedWriter`). `verify_checkpoint` checks every file a load or
export reads: names confined to plain names of the step folder, no links, sizes before reads,
every malformed manifest a CheckpointError naming it. `verify_on_all_ranks` splits that work over
the ranks. Separate from safe loading (which refuses code) and from the checkpointer (which
decides when to verify): what a manifest covers and how it is checked is all here.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import stat
import time
import zlib

import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata

from mobilellm_train.checkpoint.folders import permission_error
from mobilellm_train.checkpoint.safe_load import read_metadata
from mobilellm_train.data.shards import TOKENIZER_FILE
from mobilellm_train.errors import CheckpointAccessError, CheckpointError, parse_json

logger = logging.getLogger("mobilellm_train")

MANIFEST_GLOB = "__*_manifest.json"
# The coordinator's manifest: `.metadata` and the files copied in beside the shards (tokenizer).
METADATA_MANIFEST = "__metadata_manifest.json"
_MANIFEST_MAX_BYTES = 64 << 20
_CHUNK_BYTES = 8 << 20
_LINK = "is a symbolic link; links inside a step folder are not followed (copy the file in instead)"


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def _entry(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "crc32": f"{file_crc32(path):08x}"}


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _copy_synced(source: str, dest: str) -> None:
    """Copy `source` to `dest` whole or not at all (a full disk leaves no truncated `dest`)."""
    try:
        with open(source, "rb") as src, open(dest + ".tmp", "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK_BYTES)
            out.flush()
            os.fsync(out.fileno())
        os.replace(dest + ".tmp", dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(dest + ".tmp")
        raise


class _MetadataHookFileSystem(FileSystem):
    """DCP's file system, calling `before_metadata(tmp)` just before the index is renamed to
    `.metadata`: its checksum is on disk before the file that marks the step complete."""

    def __init__(self, before_metadata):
        super().__init__()
        self.before_metadata = before_metadata

    def rename(self, path, new_path) -> None:
        if os.path.basename(str(new_path)) == ".metadata":
            self.before_metadata(str(path))
        super().rename(path, new_path)


class ChecksummedWriter(FileSystemWriter):
    """DCP's filesystem writer that records the size and CRC-32 of every file of the step.

    Each rank lists the shards it wrote in `__<rank>_manifest.json` (in write_data, that is in the
    background writer of an async save). The coordinator then copies `extra_files` (name ->
    source: the tokenizer) into the step and lists them and `.metadata` in `__metadata_manifest.json`,
    written before `.metadata` appears: a complete step always has every checksum, and a failed
    copy (a full disk) fails the save before the step is marked complete. CRC-32 (zlib) reads
    about 1 GB/s per core, the fastest check in the standard library; it catches flipped bits and
    truncation, not deliberate edits (the manifest sits beside the data).
    """

    def __init__(self, path: str, extra_files: dict[str, str] | None = None):
        super().__init__(path)
        self.fs = _MetadataHookFileSystem(self._before_metadata)
        self.extra_files = dict(extra_files or {})
        self.checksum_seconds = 0.0
        self.checksum_bytes = 0
        self._coordinator_files: dict[str, dict] = {}

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        results = future.wait()  # FileSystemWriter writes synchronously; the future is done
        begin = time.perf_counter()
        files = {}
        for name in sorted({r.storage_data.relative_path for r in results}):
            files[name] = _entry(os.path.join(str(self.path), name))
        self.checksum_bytes = sum(f["bytes"] for f in files.values())
        manifest = os.path.join(str(self.path), f"{plan.storage_data.prefix}manifest.json")
        _write_json(manifest, {"format": 1, "algorithm": "crc32", "files": files})
        self.checksum_seconds = time.perf_counter() - begin
        return future

    def finish(self, metadata, results) -> None:
        self._coordinator_files = {}
        for name, source in sorted(self.extra_files.items()):
            dest = os.path.join(str(self.path), name)
            _copy_synced(source, dest)
            self._coordinator_files[name] = _entry(dest)
        super().finish(metadata, results)
        if ".metadata" not in self._coordinator_files:  # a DCP that wrote it another way
            self._before_metadata(os.path.join(str(self.path), ".metadata"))

    def _before_metadata(self, index_file: str) -> None:
        self._coordinator_files[".metadata"] = _entry(index_file)
        _write_json(os.path.join(str(self.path), METADATA_MANIFEST),
                    {"format": 1, "algorithm": "crc32", "files": self._coordinator_files})


def _plain_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name
            and name == os.path.basename(name))


def _read_manifest(manifest: str) -> dict[str, dict]:
    """The entries of one manifest; every defect is a CheckpointError naming it."""
    try:
        st = os.lstat(manifest)
        if stat.S_ISLNK(st.st_mode):
            raise CheckpointError(f"{manifest} {_LINK}")
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MANIFEST_MAX_BYTES:
            raise CheckpointError(f"{manifest} is not a checksum manifest (not a regular file of at most "
                                  f"{_MANIFEST_MAX_BYTES:,} bytes)")
        fd = os.open(manifest, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            entries = parse_json(f.read(_MANIFEST_MAX_BYTES + 1))["files"]
        if not isinstance(entries, dict):
            raise TypeError(f"'files' is a {type(entries).__name__}")
        expected = {}
        for name, entry in entries.items():
            if not _plain_name(name):
                raise ValueError(f"{name[:200]!r} is not a file name of this folder")
            size, crc = entry["bytes"], entry["crc32"]
            if type(size) is not int or size < 0 or not isinstance(crc, str) or not re.fullmatch(r"[0-9a-f]{8}", crc):
                raise ValueError(f"the entry of {name!r} is not a size and a CRC-32")
            expected[name] = {"bytes": size, "crc32": crc}
        return expected
    except CheckpointError:
        raise
    except PermissionError:
        raise permission_error(manifest) from None
    except Exception as e:  # crafted JSON raises nearly anything
        raise CheckpointError(f"{manifest} is damaged ({type(e).__name__}: {str(e)[:300]})") from None


def _check_file(file: str, want: dict) -> int:
    """Compare one file with its manifest entry: never through a link, size first."""
    try:
        st = os.lstat(file)
        if stat.S_ISLNK(st.st_mode):
            raise CheckpointError(f"{file} {_LINK}")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{file} is not a regular file (its manifest lists it)")
        if st.st_size != want["bytes"]:
            raise CheckpointError(f"{file} is damaged: {st.st_size} bytes, {want['bytes']} when written (truncated?)")
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
        crc = 0
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                crc = zlib.crc32(chunk, crc)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing (its manifest lists it)") from None
    except PermissionError:
        raise permission_error(file) from None
    except OSError as e:
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {e})") from None
    if f"{crc:08x}" != want["crc32"]:
        raise CheckpointError(
            f"{file} is damaged: its CRC-32 is {crc:08x}, {want['crc32']} when written; the data changed on disk"
        )
    return st.st_size


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
        expected.update(_read_manifest(manifest))
    read = {info.relative_path for info in metadata.storage_data.values()} | {".metadata"}
    if os.path.lexists(os.path.join(path, TOKENIZER_FILE)):
        read.add(TOKENIZER_FILE)  # export and eval read it
    unlisted = read - set(expected)
    older = {".metadata", TOKENIZER_FILE}
    if unlisted and unlisted <= older and not os.path.lexists(os.path.join(path, METADATA_MANIFEST)):
        # Written before .metadata and the tokenizer were checksummed: its shards are checked, and
        # damage that the load meets still falls back at resume (resume.py).
        logger.warning("%s was written before %s had checksums (no %s): only its shards are verified",
                       path, " and ".join(sorted(unlisted)), METADATA_MANIFEST)
        unlisted = set()
    for name in sorted(unlisted):
        raise CheckpointError(
            f"{os.path.join(path, name)} has no checksum in any manifest of {path} (a step written before "
            f"{name} was checksummed, or damaged). --checkpoint.verify false (--no-verify for the tools) "
            "loads it unchecked."
        )
    if TOKENIZER_FILE not in read:  # optional: a tool given --tokenizer reads none from the step
        expected.pop(TOKENIZER_FILE, None)
    return sum(_check_file(os.path.join(path, name), expected[name]) for name in sorted(expected)[rank::world_size])


def read_verified_index(path: str) -> Metadata:
    """A step's `.metadata`, read only once it matches its checksum in __metadata_manifest.json:
    for what is read from a step before it is loaded (the model's vocabulary), so that damage there
    falls back like damage the load meets. A step of the earlier layout (no such manifest) is read
    unchecked, as verify_checkpoint does."""
    manifest = os.path.join(path, METADATA_MANIFEST)
    if os.path.lexists(manifest):
        want = _read_manifest(manifest).get(".metadata")
        if want is None:
            raise CheckpointError(f"{manifest} has no checksum of .metadata")
        _check_file(os.path.join(path, ".metadata"), want)
    return read_metadata(path)


def verify_on_all_ranks(path: str, rank: int) -> None:
    """Check a step folder against its checksums, the files split over the ranks (collective when
    a process group is up). Raises the same CheckpointError on every rank if any file does not match."""
    begin = time.perf_counter()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    problem, checked = None, 0
    try:
        checked = verify_checkpoint(path, rank, world_size)
    except CheckpointError as e:
        problem = (isinstance(e, CheckpointAccessError), str(e))
    if world_size > 1:
        problems: list = [None] * world_size
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        access, text = problem
        raise (CheckpointAccessError if access else CheckpointError)(text)
    logger.info("verified %s against its checksums (%.2f GB on this rank) in %.1fs",
                path, checked / 1e9, time.perf_counter() - begin)
