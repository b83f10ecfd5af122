"""Cached teacher logits: the teacher's top-K ids and log-probabilities for every token of a
prepared dataset, in shards aligned with the data's own, as `mobilellm-prepare teacher-logits`
writes them and the training loader reads them beside the tokens (docs/DATA.md, the format)::

    <dir>/manifest.json       written last: K, dtypes, seq_len, doc_mask, the teacher, the data it
                              belongs to (its fingerprint), every shard's rows and sha256
    <dir>/shard-00000.ids     int32 [rows, K], little-endian: the teacher's K most likely next
                              tokens, most likely first
    <dir>/shard-00000.lp      float16 (or float32) [rows, K]: their log-probabilities at
                              temperature 1 over the whole vocabulary
    <dir>/verified.json       as a dataset's: each file's stat once every byte was hashed
    <dir>/val/                the same for the data's val/, when it has one

Cache shard i has one row per token of data shard i, so row p of the concatenated shards belongs
to stream position p: what the teacher predicts for token p + 1, seeing the inputs of the training
window that holds p (windows [w (T + 1), (w + 1) (T + 1)), T = seq_len; with doc_mask only the
tokens of p's document in it), exactly as the trainer's teacher would. The values depend on seq_len
and doc_mask, which the manifest records (a run with others is refused), and on nothing else: any
window order, rank count or resume finds them by position. The rows no window reads as an input
(each window's last token, the tail after the last whole window) hold ids -1 and log-probability 0.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mobilellm_train.data.shards import (
    MANIFEST_FILE,
    VERIFIED_FILE,
    VERIFIED_FORMAT,
    Manifest,
    _signature,
    file_sha256,
    write_file_atomic,
    write_json_atomic,
)
from mobilellm_train.errors import DataError

logger = logging.getLogger(__name__)

FORMAT_NAME = "mobilellm-teacher-logits"
FORMAT_VERSION = 1
ID_DTYPE = np.dtype("<i4")
LOGPROB_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
SUFFIXES = (".ids", ".lp")
# Open descriptors a reading process keeps, both files of a shard counted: beyond, the oldest close.
MAX_OPEN_FILES = 2048


def bytes_per_token(top_k: int, logprob_dtype: str) -> int:
    """Storage per token: K int32 ids and K log-probabilities (K=16 at fp16: 96 bytes)."""
    return top_k * (ID_DTYPE.itemsize + LOGPROB_DTYPES[logprob_dtype].itemsize)


def is_teacher_logits(folder: str) -> bool:
    path = os.path.join(folder, MANIFEST_FILE)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8")).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class CacheShard:
    """One cache shard as the manifest records it: <name>.ids and <name>.lp."""

    name: str
    num_rows: int
    ids_sha256: str
    lp_sha256: str


@dataclass
class CacheManifest:
    folder: str
    top_k: int
    logprob_dtype: str
    seq_len: int
    doc_mask: bool
    vocab_size: int
    """The teacher's vocabulary: a student distilled from this cache must have the same."""
    data_fingerprint: str
    tokenizer_sha256: str | None
    teacher: dict
    shards: list[CacheShard]

    @property
    def path(self) -> str:
        return os.path.join(self.folder, MANIFEST_FILE)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.name}:{s.num_rows}:{s.ids_sha256}:{s.lp_sha256};".encode())
        return h.hexdigest()[:16]

    def file_sizes(self, shard: CacheShard) -> dict[str, int]:
        k = self.top_k
        return {shard.name + ".ids": shard.num_rows * k * ID_DTYPE.itemsize,
                shard.name + ".lp": shard.num_rows * k * LOGPROB_DTYPES[self.logprob_dtype].itemsize}


def write_cache_manifest(folder: str, settings: dict, shards: list[CacheShard]) -> CacheManifest:
    """<folder>/manifest.json from the run's settings (top_k, logprob_dtype, seq_len, doc_mask,
    vocab_size, data_fingerprint, tokenizer_sha256, teacher) and its shards; written last."""
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **settings, "checksum": "sha256",
                "num_rows": sum(s.num_rows for s in shards), "shards": [dataclasses.asdict(s) for s in shards]}
    write_json_atomic(os.path.join(folder, MANIFEST_FILE), manifest)
    return read_cache_manifest(folder)


def read_cache_manifest(folder: str) -> CacheManifest:
    """Parse and check <folder>/manifest.json; a DataError names the file and the key at fault."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        unfinished = os.path.isdir(os.path.join(folder, ".progress"))
        raise DataError(f"{path}: no manifest, so {folder} is not a finished teacher-logits cache"
                        + ("; it was interrupted: run the same mobilellm-prepare teacher-logits command again to "
                           "finish it" if unfinished else ""))
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path}: not readable JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: not a {FORMAT_NAME} manifest (a cache of mobilellm-prepare teacher-logits)")
    if raw.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: format version {raw.get('version')!r}; this code reads version {FORMAT_VERSION}")

    def get(obj: dict, key: str, typ, where: str = ""):
        value = obj.get(key)
        if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
            raise DataError(f"{path}: {where}{key!r} must be {getattr(typ, '__name__', typ)}, got {value!r}")
        return value

    shards, names = [], set()
    for i, s in enumerate(get(raw, "shards", list)):
        if not isinstance(s, dict):
            raise DataError(f"{path}: shards[{i}] must be an object")
        where = f"shards[{i}]."
        shard = CacheShard(get(s, "name", str, where), get(s, "num_rows", int, where), get(s, "ids_sha256", str, where),
                           get(s, "lp_sha256", str, where))
        if shard.num_rows <= 0 or os.sep in shard.name or shard.name in names or shard.name.startswith("."):
            raise DataError(f"{path}: shards[{i}] ({shard.name!r}) has no rows or a bad or duplicate name")
        names.add(shard.name)
        shards.append(shard)
    m = CacheManifest(folder, get(raw, "top_k", int), get(raw, "logprob_dtype", str), get(raw, "seq_len", int),
                      get(raw, "doc_mask", bool), get(raw, "vocab_size", int), get(raw, "data_fingerprint", str),
                      raw.get("tokenizer_sha256") if isinstance(raw.get("tokenizer_sha256"), str) else None,
                      get(raw, "teacher", dict), shards)
    if m.logprob_dtype not in LOGPROB_DTYPES or m.top_k < 1 or m.seq_len < 1 or not shards or m.vocab_size < m.top_k:
        raise DataError(f"{path}: logprob_dtype must be one of {', '.join(LOGPROB_DTYPES)}, top_k, seq_len and "
                        f"vocab_size >= top_k positive, shards not empty")
    return m


class CacheShardWriter:
    """Streams the rows of one cache shard, in order; <name>.ids/.lp exist only once finish()
    returns (rows not written hold the sentinel). The sha256 of both files is computed while
    writing. As a context manager, leaving by an exception removes the temporary files."""

    def __init__(self, folder: str, name: str, num_rows: int, top_k: int, logprob_dtype: str):
        self.folder, self.name, self.num_rows, self.top_k = folder, name, num_rows, top_k
        self.dtypes = (ID_DTYPE, LOGPROB_DTYPES[logprob_dtype])
        self.tmp = [os.path.join(folder, f"{name}{ext}.tmp.{os.getpid()}") for ext in SUFFIXES]
        self.files = [open(p, "wb") for p in self.tmp]
        self.hashes = [hashlib.sha256(), hashlib.sha256()]
        self.rows_done = 0

    def __enter__(self) -> CacheShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _append(self, ids: np.ndarray, logprobs: np.ndarray) -> None:
        for f, h, dtype, values in zip(self.files, self.hashes, self.dtypes, (ids, logprobs)):
            data = np.ascontiguousarray(values, dtype=dtype).tobytes()
            f.write(data)
            h.update(data)
        self.rows_done += ids.shape[0]

    def _pad_to(self, row: int) -> None:
        while self.rows_done < row:
            n = min(row - self.rows_done, 1 << 16)
            self._append(np.full((n, self.top_k), -1), np.zeros((n, self.top_k)))

    def write(self, first_row: int, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """Rows [first_row, first_row + len(ids)); first_row at or after every row written so far."""
        if first_row < self.rows_done or first_row + ids.shape[0] > self.num_rows or ids.shape != logprobs.shape:
            raise ValueError(f"{self.name}: rows [{first_row}, {first_row + ids.shape[0]}) out of order or range "
                             f"(written {self.rows_done} of {self.num_rows})")
        self._pad_to(first_row)
        self._append(ids, logprobs)

    def finish(self) -> CacheShard:
        self._pad_to(self.num_rows)
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, ext in zip(self.tmp, SUFFIXES):
            os.replace(tmp, os.path.join(self.folder, self.name + ext))
        return CacheShard(self.name, self.num_rows, *(h.hexdigest() for h in self.hashes))

    def abort(self) -> None:
        for f, path in zip(self.files, self.tmp):
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


# ---------------------------------------------------------------------------------------------
# Checks: sizes at every start, sha256 once (recorded in verified.json, as for a dataset).


def check_cache_sizes(m: CacheManifest) -> dict[str, list[int]]:
    """Every file exists with the size the manifest implies; each file's stat signature."""
    signatures = {}
    for s in m.shards:
        for name, expected in m.file_sizes(s).items():
            file = os.path.join(m.folder, name)
            try:
                st = os.stat(file)
            except OSError:
                raise DataError(f"{file}: missing (listed in {m.path})") from None
            if st.st_size != expected:
                raise DataError(f"{file}: {st.st_size} bytes, but {m.path} implies {expected}; the file was truncated "
                                "or replaced after it was written")
            signatures[name] = _signature(st)
    return signatures


def verify_cache_shards(m: CacheManifest, indices: Iterable[int] | None = None) -> float:
    """sha256 of the given shards' files (default all) against the manifest; seconds taken."""
    begin = time.perf_counter()
    for i in range(len(m.shards)) if indices is None else indices:
        s = m.shards[i]
        for ext, expected in zip(SUFFIXES, (s.ids_sha256, s.lp_sha256)):
            file = os.path.join(m.folder, s.name + ext)
            if (actual := file_sha256(file)) != expected:
                raise DataError(f"{file}: sha256 {actual[:16]}... does not match {expected[:16]}... recorded in "
                                f"{m.path}; the cache is damaged: make it again with mobilellm-prepare teacher-logits")
    return time.perf_counter() - begin


def record_cache_verification(m: CacheManifest, how: str) -> str:
    """verified.json after every shard was hashed against the manifest (as shards.record_verification)."""
    record = {"format": VERIFIED_FORMAT, "fingerprint": m.fingerprint(), "how": how,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": os.uname().nodename, "files": check_cache_sizes(m)}
    path = os.path.join(m.folder, VERIFIED_FILE)
    write_file_atomic(path, (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8"))
    return path


def verify_teacher_logits(folder: str) -> dict:
    """The full check of a cache (`mobilellm-prepare verify`): sizes and sha256 of every file, then
    verified.json; a summary for the command's output."""
    m = read_cache_manifest(folder)
    check_cache_sizes(m)
    seconds = verify_cache_shards(m)
    return {"num_rows": sum(s.num_rows for s in m.shards), "num_shards": len(m.shards), "top_k": m.top_k,
            "verify_seconds": round(seconds, 2), "record": record_cache_verification(m, "mobilellm-prepare verify")}


def unverified_cache_shards(m: CacheManifest, signatures: dict[str, list[int]]) -> list[int]:
    """The shards verified.json does not vouch for (no record, another manifest, a changed file)."""
    try:
        with open(os.path.join(m.folder, VERIFIED_FILE), "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
        files = record["files"] if record.get("fingerprint") == m.fingerprint() else {}
    except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
        files = {}
    return [i for i, s in enumerate(m.shards) if any(files.get(n) != signatures[n] for n in m.file_sizes(s))]


def open_teacher_logits(folder: str, data: Manifest, seq_len: int, doc_mask: bool, vocab_size: int | None,
                        verify_checksums: bool, dp_rank: int = 0, dp_world_size: int = 1) -> TeacherLogitsStream:
    """The cache `folder` for the dataset `data`, checked before training: made for this data
    (its fingerprint and shards), this seq_len and doc_mask, every file of its size, and (verify)
    each shard as verified.json recorded it, unvouched ones hashed now, split over the ranks."""
    m = read_cache_manifest(folder)
    if m.data_fingerprint != data.fingerprint() or [(s.name, s.num_rows) for s in m.shards] != [
            (s.name, s.num_tokens) for s in data.shards]:
        raise DataError(f"{m.path}: made for other data (fingerprint {m.data_fingerprint}) than {data.folder} "
                        f"(fingerprint {data.fingerprint()}); make the cache for this data with mobilellm-prepare "
                        "teacher-logits")
    if (m.seq_len, m.doc_mask) != (seq_len, doc_mask):
        raise DataError(f"{m.path}: made for seq_len {m.seq_len}, doc_mask {str(m.doc_mask).lower()}; this run has "
                        f"seq_len {seq_len}, doc_mask {str(doc_mask).lower()}: the teacher's values depend on the "
                        "window it saw, so make the cache again with --seq-len/--doc-mask as the run trains")
    if vocab_size is not None and m.vocab_size > vocab_size:
        raise DataError(f"{m.path}: the teacher's vocabulary ({m.vocab_size}) exceeds the model's ({vocab_size})")
    signatures = check_cache_sizes(m)
    if verify_checksums:
        todo = unverified_cache_shards(m, signatures)
        mine = [i for i in todo if i % dp_world_size == dp_rank]
        if todo:
            seconds = verify_cache_shards(m, mine)
            logger.warning(
                "%s: %d of %d shards not vouched for by %s; hashed this rank's %d in %.1f s (`mobilellm-prepare "
                "verify %s` records a full verification)", folder, len(todo), len(m.shards), VERIFIED_FILE, len(mine),
                seconds, folder)
    return TeacherLogitsStream(m, vocab_size, signatures if verify_checksums else None)


class TeacherLogitsStream:
    """A cache's shards, in manifest order, as one sequence of rows: `read(start, ids, logprobs)`
    fills [n, K] arrays with rows [start, start + n) by pread (two per shard touched), checking
    the rows are real values (not the sentinel) and the ids within the vocabulary. Pickling drops
    the open files (each loader worker opens its own)."""

    def __init__(self, manifest: CacheManifest, vocab_size: int | None, signatures: dict | None):
        self.folder, self.top_k = manifest.folder, manifest.top_k
        self.dtypes = (ID_DTYPE, LOGPROB_DTYPES[manifest.logprob_dtype])
        self.names = [s.name for s in manifest.shards]
        self.row_starts = np.concatenate(([0], np.cumsum([s.num_rows for s in manifest.shards])))
        self.vocab_size = vocab_size if vocab_size is not None else manifest.vocab_size
        self.signatures = signatures
        self._fds: collections.OrderedDict[tuple[int, str], int] = collections.OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": collections.OrderedDict()}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _fd(self, shard: int, ext: str) -> int:
        fd = self._fds.get((shard, ext))
        if fd is not None:
            self._fds.move_to_end((shard, ext))
            return fd
        if len(self._fds) >= MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        file = os.path.join(self.folder, self.names[shard] + ext)
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        then = None if self.signatures is None else self.signatures[self.names[shard] + ext]
        if then is not None and _signature(os.fstat(fd)) != then:
            os.close(fd)
            raise DataError(f"{file}: changed since this run started; check what writes to {self.folder}")
        self._fds[(shard, ext)] = fd
        return fd

    def read(self, start: int, ids: np.ndarray, logprobs: np.ndarray) -> None:
        n = ids.shape[0]
        shard = int(np.searchsorted(self.row_starts, start, side="right")) - 1
        done = 0
        while done < n:
            local = start + done - int(self.row_starts[shard])
            take = min(n - done, int(self.row_starts[shard + 1] - self.row_starts[shard]) - local)
            for ext, out, dtype in zip(SUFFIXES, (ids, logprobs), self.dtypes):
                got = os.preadv(self._fd(shard, ext), [out[done:done + take]], local * self.top_k * dtype.itemsize)
                if got != take * self.top_k * dtype.itemsize:
                    raise DataError(f"{self.folder}/{self.names[shard]}{ext}: file shorter than its manifest says "
                                    "(it shrank after start-up)")
            done += take
            shard += 1
        if n and (int(ids[:, 0].min()) < 0 or int(ids.max()) >= self.vocab_size):
            bad = "holds no values (a window's last token: made for another seq_len?)" if int(ids[:, 0].min()) < 0 \
                else f"holds an id outside the vocabulary [0, {self.vocab_size})"
            raise DataError(f"{self.folder}: a row in [{start}, {start + n}) {bad}; the cache is damaged or does "
                            f"not fit this data: run `mobilellm-prepare verify {self.folder}`")
