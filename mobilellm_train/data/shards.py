"""Token shards: the on-disk format of prepared data, with its writer, manifest and reader.

A prepared dataset is one folder (``mobilellm-prepare`` writes it, see docs/DATA.md)::

    <dir>/manifest.json      written last, atomically: a folder without one is not a dataset
    <dir>/shard-00000.bin    token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    <dir>/shard-00000.idx    end offset of each document in the shard, raw little-endian int64
    <dir>/tokenizer.model    the SentencePiece model the data was made with, when there was one
    <dir>/verified.json      the record of the last full verification (optional)

A shard holds whole documents: its last .idx entry equals its token count. The manifest lists
every shard with its token and document counts, largest token id and the sha256 of both files
(sha256 rather than blake2b: with SHA-NI it is the faster one, see docs/DATA.md). After every
shard was hashed against it (``verify_dataset``, or the writer's hashes of what it wrote),
verified.json records each file's size, mtime, ctime and inode: a training start then checks
those with a stat per file instead of reading 2 TB. ``TokenStream`` is the concatenation of a
folder's shards, in manifest order, as one token sequence (the loader cuts it into windows); it
reads each window with one pread, so training parses no JSON and fetches only the pages it uses.

Writing is atomic per file (a temporary name, then ``os.replace``), so a killed run leaves
``*.tmp.<pid>`` files that no reader opens, never a half shard under a shard's name.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import mmap
import os
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mobilellm_train.errors import DataError, parse_json

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
VERIFIED_FILE = "verified.json"
VERIFIED_FORMAT = "mobilellm-verified-1"
TOKENIZER_FILE = "tokenizer.model"
FORMAT_NAME = "mobilellm-token-shards"
FORMAT_VERSION = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
INDEX_DTYPE = np.dtype("<i8")

_HASH_CHUNK_BYTES = 8 << 20
_WRITE_BUFFER_TOKENS = 4 << 20
# Open files a reading process keeps (descriptors, not maps: they hold no memory), at most a quarter
# of its open-file limit; past that it closes the least recently used. 4000 shards of a 1T-token
# dataset then stay open, so a random read costs no open() (a metadata round trip on Lustre or NFS).
MAX_OPEN_SHARDS = 8192
# Index maps are all dropped after this many lookups: a bound on the index pages a process maps.
IDX_RELEASE_LOOKUPS = 4096


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest token dtype that holds ids [0, vocab_size)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_file_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
    write_file_atomic(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


@dataclass
class ShardInfo:
    """One shard as the manifest records it."""

    name: str
    """File stem: <name>.bin and <name>.idx."""
    num_tokens: int
    num_documents: int
    max_token_id: int
    bin_sha256: str
    idx_sha256: str


class ShardWriter:
    """Streams documents into one shard; <name>.bin/.idx exist only once finish() returns.

    Use as a context manager: leaving the block by an exception removes the temporary files.
    The checksums are computed while writing, so finishing a shard never re-reads it.
    """

    def __init__(self, folder: str, name: str, dtype: str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.folder, self.name = folder, name
        self._dtype = DTYPES[dtype]
        self._max_id = np.iinfo(self._dtype).max
        suffix = f".tmp.{os.getpid()}"
        self._bin_tmp = os.path.join(folder, f"{name}.bin{suffix}")
        self._idx_tmp = os.path.join(folder, f"{name}.idx{suffix}")
        self._bin_file = self._idx_file = None
        self._bin_hash, self._idx_hash = hashlib.sha256(), hashlib.sha256()
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._doc_ends: list[int] = []
        self.num_tokens = 0
        self.num_documents = 0
        self.max_token_id = -1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document (an int array, already validated against the vocabulary)."""
        if tokens.size == 0:
            raise ValueError("a document must hold at least one token")
        top = int(tokens.max())
        if top > self._max_id or int(tokens.min()) < 0:
            raise ValueError(f"token ids must be in [0, {self._max_id}] for {self._dtype.name}; got {top}")
        self.max_token_id = max(self.max_token_id, top)
        self._pending.append(tokens)
        self._pending_tokens += tokens.size
        self.num_tokens += tokens.size
        self.num_documents += 1
        self._doc_ends.append(self.num_tokens)
        if self._pending_tokens >= _WRITE_BUFFER_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._bin_file is None:
            os.makedirs(self.folder, exist_ok=True)
            self._bin_file = open(self._bin_tmp, "wb")
            self._idx_file = open(self._idx_tmp, "wb")
        if self._pending:
            data = np.concatenate(self._pending).astype(self._dtype, copy=False).tobytes()
            self._bin_file.write(data)
            self._bin_hash.update(data)
            self._pending, self._pending_tokens = [], 0
        if self._doc_ends:
            data = np.asarray(self._doc_ends, dtype=INDEX_DTYPE).tobytes()
            self._idx_file.write(data)
            self._idx_hash.update(data)
            self._doc_ends = []

    def finish(self) -> ShardInfo | None:
        """Close and rename into place; None (and no files) when no document was added."""
        if self.num_documents == 0:
            self.abort()
            return None
        self._flush()
        for f in (self._bin_file, self._idx_file):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        # The .idx goes first: a .bin under its final name therefore always has its index.
        os.replace(self._idx_tmp, os.path.join(self.folder, f"{self.name}.idx"))
        os.replace(self._bin_tmp, os.path.join(self.folder, f"{self.name}.bin"))
        return ShardInfo(
            name=self.name,
            num_tokens=self.num_tokens,
            num_documents=self.num_documents,
            max_token_id=self.max_token_id,
            bin_sha256=self._bin_hash.hexdigest(),
            idx_sha256=self._idx_hash.hexdigest(),
        )

    def abort(self) -> None:
        for f in (self._bin_file, self._idx_file):
            if f is not None and not f.closed:
                f.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)


def tokenizer_info(path: str) -> dict:
    """What the manifest records of a SentencePiece model: sha256, vocab size, bos/eos ids."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise DataError(f"{path}: not a readable SentencePiece model ({e})") from None
    return {
        "sha256": file_sha256(path),
        "vocab_size": sp.get_piece_size(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
    }


def write_manifest(
    folder: str,
    shards: list[ShardInfo],
    dtype: str,
    vocab_size: int,
    tokenizer: dict | None,
    extra: dict | None = None,
) -> dict:
    """Write <folder>/manifest.json (atomically, as the last file) and return its content."""
    if not shards:
        raise DataError(f"{folder}: no tokens to write a dataset of")
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "num_tokens": sum(s.num_tokens for s in shards),
        "num_documents": sum(s.num_documents for s in shards),
        "max_token_id": max(s.max_token_id for s in shards),
        "tokenizer": tokenizer,
        "checksum": "sha256",
        "shards": [dataclasses.asdict(s) for s in shards],
        **(extra or {}),
    }
    write_json_atomic(os.path.join(folder, MANIFEST_FILE), manifest)
    return manifest


@dataclass
class Manifest:
    """A prepared dataset's manifest.json, checked for form when read."""

    folder: str
    dtype: str
    vocab_size: int
    num_tokens: int
    num_documents: int
    max_token_id: int
    tokenizer: dict | None
    shards: list[ShardInfo]
    raw: dict

    @property
    def path(self) -> str:
        return os.path.join(self.folder, MANIFEST_FILE)

    def fingerprint(self) -> str:
        """Identity of the data (not of where it lies): a hash of the shards' checksums."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.name}:{s.num_tokens}:{s.bin_sha256}:{s.idx_sha256};".encode())
        return h.hexdigest()[:16]


def is_dataset(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST_FILE))


def read_manifest(folder: str) -> Manifest:
    """Parse and check <folder>/manifest.json; a DataError names the file and the key at fault."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: data folder does not exist")
    if not os.path.isfile(path):
        stale = [n for n in os.listdir(folder) if n.endswith(".bin") or ".tmp." in n]
        hint = (
            " It holds shard files, so preparing it was interrupted or is still running; run the same "
            "mobilellm-prepare command again to finish it." if stale else ""
        )
        raise DataError(f"{path}: no manifest, so {folder} is not a prepared dataset.{hint}")
    try:
        with open(path, "rb") as f:
            raw = parse_json(f.read().decode("utf-8"))
    except ValueError as e:  # not UTF-8, not JSON, or nested too deeply to parse
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: not a {FORMAT_NAME} manifest (no \"format\": \"{FORMAT_NAME}\")")
    if raw.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: format version {raw.get('version')!r}; this code reads version {FORMAT_VERSION}")

    def get(obj: dict, key: str, typ, where: str):
        if key not in obj:
            raise DataError(f"{path}: missing key {where}{key!r}")
        value = obj[key]
        if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
            raise DataError(f"{path}: {where}{key!r} must be {typ.__name__}, got {value!r}")
        return value

    dtype = get(raw, "dtype", str, "")
    if dtype not in DTYPES:
        raise DataError(f"{path}: 'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shards = []
    names = set()
    for i, s in enumerate(get(raw, "shards", list, "")):
        where = f"shards[{i}]."
        if not isinstance(s, dict):
            raise DataError(f"{path}: shards[{i}] must be an object")
        info = ShardInfo(
            name=get(s, "name", str, where),
            num_tokens=get(s, "num_tokens", int, where),
            num_documents=get(s, "num_documents", int, where),
            max_token_id=get(s, "max_token_id", int, where),
            bin_sha256=get(s, "bin_sha256", str, where),
            idx_sha256=get(s, "idx_sha256", str, where),
        )
        if info.num_tokens <= 0 or info.num_documents <= 0 or os.sep in info.name or info.name in names:
            raise DataError(f"{path}: shards[{i}] ({info.name!r}) has no tokens, no documents or a bad/duplicate name")
        names.add(info.name)
        shards.append(info)
    if not shards:
        raise DataError(f"{path}: the manifest lists no shards")
    tokenizer = raw.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, dict):
        raise DataError(f"{path}: 'tokenizer' must be an object or null")
    manifest = Manifest(
        folder=folder,
        dtype=dtype,
        vocab_size=get(raw, "vocab_size", int, ""),
        num_tokens=get(raw, "num_tokens", int, ""),
        num_documents=get(raw, "num_documents", int, ""),
        max_token_id=get(raw, "max_token_id", int, ""),
        tokenizer=tokenizer,
        shards=shards,
        raw=raw,
    )
    if manifest.num_tokens != sum(s.num_tokens for s in shards):
        raise DataError(f"{path}: 'num_tokens' ({manifest.num_tokens}) is not the sum over its shards")
    return manifest


def check_shard_sizes(manifest: Manifest) -> dict[str, list[int]]:
    """Every shard file exists with the size the manifest implies (a stat per file, no reading).
    Returns each file's stat signature (see file_signature), keyed by file name."""
    itemsize = DTYPES[manifest.dtype].itemsize
    signatures = {}
    for s in manifest.shards:
        for ext, expected in ((".bin", s.num_tokens * itemsize), (".idx", s.num_documents * INDEX_DTYPE.itemsize)):
            file = os.path.join(manifest.folder, s.name + ext)
            try:
                st = os.stat(file)
            except OSError:
                raise DataError(f"{file}: missing (listed in {manifest.path})") from None
            if st.st_size != expected:
                raise DataError(
                    f"{file}: {st.st_size} bytes, but {manifest.path} implies {expected}; the file was truncated "
                    f"or replaced after preparing"
                )
            signatures[s.name + ext] = _signature(st)
    return signatures


def _verify_one(manifest: Manifest, s: ShardInfo) -> None:
    for ext, expected in ((".bin", s.bin_sha256), (".idx", s.idx_sha256)):
        file = os.path.join(manifest.folder, s.name + ext)
        actual = file_sha256(file)
        if actual != expected:
            raise DataError(
                f"{file}: sha256 {actual[:16]}... does not match {expected[:16]}... recorded in "
                f"{manifest.path}; the shard is corrupt or from another preparation. Prepare the data again "
                f"(or restore the file from a good copy), then run `mobilellm-prepare verify {manifest.folder}`"
            )
    ends = np.fromfile(os.path.join(manifest.folder, s.name + ".idx"), dtype=INDEX_DTYPE)
    if ends[-1] != s.num_tokens or (ends.size > 1 and not np.all(ends[1:] > ends[:-1])) or ends[0] <= 0:
        raise DataError(f"{manifest.folder}/{s.name}.idx: document ends are not increasing up to {s.num_tokens}")


def verify_shards(manifest: Manifest, shard_indices: Iterable[int] | None = None, workers: int = 1) -> float:
    """Recompute the sha256 of the given shards (default all) against the manifest, and check each
    index is increasing and ends at the shard's token count. Returns the seconds it took.
    workers > 1 hashes that many shards at once (hashlib releases the GIL: for parallel storage)."""
    begin = time.perf_counter()
    indices = list(range(len(manifest.shards)) if shard_indices is None else shard_indices)
    if workers <= 1 or len(indices) <= 1:
        for i in indices:
            _verify_one(manifest, manifest.shards[i])
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(indices))) as pool:
            list(pool.map(lambda i: _verify_one(manifest, manifest.shards[i]), indices))
    return time.perf_counter() - begin


# ---------------------------------------------------------------------------------------------
# The verification record: hash every byte once, then check at each start only that nothing changed.


def _signature(st: os.stat_result) -> list[int]:
    # A write changes size or mtime and ctime; ctime cannot be set back (utime, chmod and new hard
    # links all move it), and the inode changes when a file is replaced or copied.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def record_verification(manifest: Manifest, how: str) -> str:
    """Write <folder>/verified.json after every shard of the manifest was hashed against it (a full
    verify, or the writer's own hashes of the bytes it wrote): the manifest's fingerprint and each
    shard file's stat signature. Returns the record's path."""
    files = check_shard_sizes(manifest)
    record = {
        "format": VERIFIED_FORMAT,
        "fingerprint": manifest.fingerprint(),
        "how": how,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": os.uname().nodename,
        "files": files,
    }
    path = os.path.join(manifest.folder, VERIFIED_FILE)
    write_file_atomic(path, (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8"))
    return path


def verify_dataset(folder: str, workers: int = 1) -> dict:
    """The full check (`mobilellm-prepare verify`): sizes and sha256 of every shard, then the
    record that lets later starts skip the hashing. A summary dict for the command's output."""
    m = read_manifest(folder)
    check_shard_sizes(m)
    seconds = verify_shards(m, workers=workers)
    record = ""
    try:
        record = record_verification(m, "mobilellm-prepare verify")
    except OSError as e:
        logger.warning("%s: verified, but could not write %s (%s): training starts will hash the shards "
                       "again; ask the folder's owner to run the verify", folder, VERIFIED_FILE, e)
    return {"num_tokens": m.num_tokens, "num_documents": m.num_documents, "num_shards": len(m.shards),
            "dtype": m.dtype, "vocab_size": m.vocab_size, "verify_seconds": round(seconds, 2), "record": record}


def unverified_shards(manifest: Manifest, signatures: dict[str, list[int]]) -> tuple[list[int], str]:
    """Indices of the shards that verified.json does not vouch for (no record, another manifest, or a
    file whose stat signature changed since), and why, in words ("" when it vouches for all).
    signatures: check_shard_sizes' result. No file is read but the record."""
    path = os.path.join(manifest.folder, VERIFIED_FILE)
    everything = list(range(len(manifest.shards)))
    try:
        with open(path, "rb") as f:
            record = parse_json(f.read().decode("utf-8"))
    except FileNotFoundError:
        return everything, f"no {VERIFIED_FILE} (the data was never verified in full)"
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, not JSON, or nested too deeply
        return everything, f"{path} is unreadable ({e})"
    if not isinstance(record, dict) or record.get("format") != VERIFIED_FORMAT or not isinstance(
            record.get("files"), dict):
        return everything, f"{path} is not a verification record"
    if record.get("fingerprint") != manifest.fingerprint():
        return everything, f"{path} records another manifest"
    files = record["files"]
    changed = [i for i, s in enumerate(manifest.shards)
               if any(files.get(s.name + ext) != signatures[s.name + ext] for ext in (".bin", ".idx"))]
    if changed:
        return changed, (f"{len(changed)} shard(s) changed since the verification of {record.get('time', '?')} "
                         f"(first: {manifest.shards[changed[0]].name})")
    return [], ""


def check_tokenizer(manifest: Manifest, tokenizer_path: str) -> None:
    """The tokenizer a run uses must be the one the data was made with (compared by sha256)."""
    if not tokenizer_path:
        return
    recorded = manifest.tokenizer
    if recorded is None or "sha256" not in recorded:
        logger.warning(
            "%s records no tokenizer (converted from token ids), so it cannot be checked against %s",
            manifest.path, tokenizer_path,
        )
        return
    actual = file_sha256(tokenizer_path)
    if actual != recorded["sha256"]:
        raise DataError(
            f"tokenizer {tokenizer_path} (sha256 {actual[:16]}...) is not the one {manifest.folder} was "
            f"prepared with (sha256 {recorded['sha256'][:16]}... in {manifest.path}; that tokenizer is "
            f"saved as {os.path.join(manifest.folder, TOKENIZER_FILE)} when preparing had one)"
        )


def write_token_dataset(
    folder: str,
    documents: Iterable[np.ndarray],
    vocab_size: int,
    tokens_per_shard: int,
    tokenizer_path: str = "",
    extra: dict | None = None,
) -> Manifest:
    """A dataset from documents already tokenized (in memory): shards of about tokens_per_shard
    tokens (documents are not split), then the manifest. For small conversions, tests, benchmarks."""
    if is_dataset(folder):
        raise DataError(f"{folder}: already holds a prepared dataset; refusing to overwrite it")
    os.makedirs(folder, exist_ok=True)
    dtype = dtype_for_vocab(vocab_size)
    shards: list[ShardInfo] = []
    writer = None
    try:
        for doc in documents:
            doc = np.asarray(doc)
            if doc.size and (int(doc.min()) < 0 or int(doc.max()) >= vocab_size):
                raise DataError(f"document {sum(s.num_documents for s in shards)}: token id outside [0, {vocab_size})")
            if doc.size == 0:
                continue
            if writer is None:
                writer = ShardWriter(folder, f"shard-{len(shards):05d}", dtype)
            writer.add_document(doc)
            if writer.num_tokens >= tokens_per_shard:
                shards.append(writer.finish())
                writer = None
        if writer is not None:
            shards.append(writer.finish())
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    tokenizer = None
    if tokenizer_path:
        tokenizer = tokenizer_info(tokenizer_path)
        with open(tokenizer_path, "rb") as f:
            write_file_atomic(os.path.join(folder, TOKENIZER_FILE), f.read())
    write_manifest(folder, shards, dtype, vocab_size, tokenizer, extra)
    manifest = read_manifest(folder)
    record_verification(manifest, "hashed while writing")  # the writer hashed every byte it wrote
    return manifest


def _raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (often 1024 against far more); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


class TokenStream:
    """The shards of one dataset, in manifest order, as one token sequence.

    Token files are read with pread into a buffer, the descriptor advised POSIX_FADV_RANDOM: a cold
    window costs the pages it spans (8 KB for 2049 uint16 tokens), not the kernel's read-around
    window of a memory map (8 MB on a disk with 8 MB read-ahead), and a process holds no mapped
    data pages, so its RSS does not grow with what it read. Each process (loader workers each open
    their own) keeps at most MAX_OPEN_SHARDS descriptors. The .idx files (document starts, only with
    doc_mask) are memory-mapped with MADV_RANDOM and all unmapped every IDX_RELEASE_LOOKUPS lookups,
    which bounds the index pages a process keeps. Pickling drops the open files.

    signatures (check_shard_sizes' result at start-up): each file's stat signature must still match
    when it is opened, so a shard replaced or rewritten during the run stops it before it is read.
    """

    def __init__(self, manifest: Manifest, vocab_size: int | None = None,
                 signatures: dict[str, list[int]] | None = None):
        self.vocab_size = vocab_size  # every read checks its ids against it: a damaged shard never reaches the model
        self.folder = manifest.folder
        self.dtype = DTYPES[manifest.dtype]
        self.names = [s.name for s in manifest.shards]
        self.signatures = signatures
        counts = np.array([s.num_tokens for s in manifest.shards], dtype=np.int64)
        self.shard_starts = np.concatenate(([0], np.cumsum(counts)))
        self.num_tokens = int(self.shard_starts[-1])
        self._bins: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._idxs: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._idx_lookups = self._max_open = 0
        self._buf: np.ndarray | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_bins"], state["_idxs"], state["_max_open"] = collections.OrderedDict(), collections.OrderedDict(), 0
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close every open descriptor and map (reading again reopens them)."""
        for fd in getattr(self, "_bins", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)
        if hasattr(self, "_bins"):
            self._bins.clear(), self._idxs.clear()

    def _open_fd(self, shard: int, ext: str) -> int:
        if not self._max_open:
            self._max_open = max(2, min(MAX_OPEN_SHARDS, _raise_open_file_limit() // 4))
        if len(self._bins) + len(self._idxs) >= self._max_open:
            if self._bins and len(self._bins) >= len(self._idxs):
                os.close(self._bins.popitem(last=False)[1])
            else:
                self._idxs.popitem(last=False)  # dropping the array unmaps it
        file = os.path.join(self.folder, self.names[shard] + ext)
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            then = None if self.signatures is None else self.signatures[self.names[shard] + ext]
            if then is not None and (now := _signature(os.fstat(fd))) != then:
                raise DataError(f"{file}: changed since this run started (size, mtime, ctime, inode {then} then, "
                                f"{now} now); check what writes to the data folder, then run "
                                f"`mobilellm-prepare verify {self.folder}` before resuming")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _bin_fd(self, shard: int) -> int:
        fd = self._bins.get(shard)
        if fd is not None:
            self._bins.move_to_end(shard)
            return fd
        fd = self._open_fd(shard, ".bin")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead around each window
        self._bins[shard] = fd
        return fd

    def _idx(self, shard: int) -> np.ndarray:
        self._idx_lookups += 1
        if self._idx_lookups > IDX_RELEASE_LOOKUPS:
            self._idxs.clear()  # unmaps: the pages touched so far leave this process's RSS
            self._idx_lookups = 0
        arr = self._idxs.get(shard)
        if arr is not None:
            self._idxs.move_to_end(shard)
            return arr
        fd = self._open_fd(shard, ".idx")
        try:
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        if hasattr(m, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            m.madvise(mmap.MADV_RANDOM)  # a binary search touches a few pages, not a read-around each
        # A plain ndarray over the map: slicing an np.memmap costs several times more per call.
        arr = np.frombuffer(m, dtype=INDEX_DTYPE)
        self._idxs[shard] = arr
        return arr

    def read(self, start: int, out: np.ndarray) -> None:
        """Fill out (1-D, any int dtype) with tokens [start, start + len(out)) of the stream."""
        n = out.shape[0]
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        itemsize = self.dtype.itemsize
        if self._buf is None or self._buf.shape[0] < n:
            self._buf = np.empty(n, dtype=self.dtype)  # reused: out[...] = segment copies out of it
        done = 0
        while done < n:
            local = start + done - int(self.shard_starts[shard])
            take = min(n - done, int(self.shard_starts[shard + 1] - self.shard_starts[shard]) - local)
            segment = self._buf[:take]
            got = os.preadv(self._bin_fd(shard), [segment], local * itemsize) if take else 0
            if got != take * itemsize:
                raise DataError(
                    f"{self.folder}/{self.names[shard]}.bin: read {got} of {take * itemsize} bytes at byte "
                    f"{local * itemsize}: the file shrank after start-up; prepare the data again"
                )
            # One max over the window (microseconds): ids beyond the vocabulary would index past
            # the embedding (an IndexError on CPU, a device-side assert on a GPU).
            if self.vocab_size is not None and take and int(segment.max()) >= self.vocab_size:
                self._out_of_range(shard, local, segment)
            out[done : done + take] = segment
            done += take
            shard += 1

    def _out_of_range(self, shard: int, local: int, segment: np.ndarray) -> None:
        i = int(np.flatnonzero(segment >= self.vocab_size)[0])
        raise DataError(
            f"{self.folder}/{self.names[shard]}.bin: token id {int(segment[i])} at token {local + i} of the shard "
            f"is outside the model's vocabulary [0, {self.vocab_size}), though manifest.json records no such id: "
            f"the shard changed after it was prepared. Run `mobilellm-prepare verify {self.folder}` (or train with "
            "--data.verify_checksums true, which hashes shards changed since their verification) to find every "
            "damaged shard by its sha256, then prepare the data again"
        )

    def document_starts(self, start: int, length: int) -> np.ndarray:
        """Offsets o in (0, length) such that a document starts at stream position start + o."""
        stop = start + length
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        found = []
        while shard < len(self.names) and self.shard_starts[shard] < stop:
            base = int(self.shard_starts[shard])
            ends = self._idx(shard)
            # Document ends e with start < base + e < stop are the starts of the next documents;
            # a shard's last end is its boundary with the next shard, also a document start.
            lo = int(np.searchsorted(ends, start - base, side="right"))
            hi = int(np.searchsorted(ends, stop - base, side="left"))
            if hi > lo:
                found.append(np.asarray(ends[lo:hi]) + (base - start))
            shard += 1
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
