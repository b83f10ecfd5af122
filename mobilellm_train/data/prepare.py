"""mobilellm-prepare: tokenize your own data, or convert the original layout, into token shards.

    python -m mobilellm_train.data.prepare tokenizer --input raw/ --out tok.model --vocab-size 32000
    python -m mobilellm_train.data.prepare encode --input raw/ --tokenizer tok.model --out data/web --workers 16
    python -m mobilellm_train.data.prepare convert --layout nodes --input /data/tokens --out data/orig \
        --vocab-size 32000
    python -m mobilellm_train.data.prepare convert --layout amber --input amber/ --out data/amber \
        --tokenizer tok.model
    python -m mobilellm_train.data.prepare verify data/web

Inputs (``--input``, files, folders or globs): JSONL with a text field (``--text-field``), Parquet
with a text column (read with pyarrow in batches), plain text (one document per file, per line or
per blank-line-separated paragraph: ``--text-split``); ``.gz`` JSONL and text too. The output
folder is a dataset in the format of shards.py, plus ``<out>/val/`` for the held-out documents
(``--val-fraction``) and ``<out>/.progress/`` for the bookkeeping that makes a re-run resume.

How it runs: the inputs are cut into units of about ``--unit-bytes`` of input (byte ranges of a
JSONL or text file, on line boundaries; groups of Parquet row groups; a whole compressed file),
and unit i becomes ``shard-<i>`` in ``<out>`` (and in ``<out>/val``), written by one of
``--workers`` processes. A unit's shard files are renamed into place when complete and its
record ``.progress/unit-<i>.json`` is written after them; a re-run skips the units with a record,
so a killed run loses only its units in flight, and their temporary files (``*.tmp.<pid>``) are
deleted by the next run. ``manifest.json`` is written last, after every unit, and the trainer reads
no folder without one. A re-run with other settings (tokenizer, text field, BOS/EOS, ...) into the
same folder is refused, naming what differs; the units of an input file that changed since (its
size, or the units before it) are redone, with a warning.

Bad records (malformed JSON or UTF-8, a missing field, a value of the wrong type, a null Parquet
cell, a token id outside the vocabulary) stop the run naming the file and line (or Parquet row);
``--skip-bad N`` skips up to N of them over the whole run instead, each logged, counts in the
manifest. Empty files, empty folders, unreadable Parquet files and unknown file types stop the run
while planning, before any encoding.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mobilellm_train.errors import JSON_TOO_DEEP, BadLine, DataError
from mobilellm_train.data.shards import (
    MANIFEST_FILE,
    TOKENIZER_FILE,
    ShardInfo,
    ShardWriter,
    check_shard_sizes,
    dtype_for_vocab,
    is_dataset,
    read_manifest,
    tokenizer_info,
    verify_shards,
    write_file_atomic,
    write_json_atomic,
    write_manifest,
)

logger = logging.getLogger("mobilellm_train.prepare")

PROGRESS_DIR = ".progress"
VAL_DIR = "val"
_EXTENSIONS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl",
    ".parquet": "parquet",
    ".txt": "text", ".text": "text", ".md": "text", ".txt.gz": "text",
}
_UNSUPPORTED = (".zst", ".zstd", ".bz2", ".xz", ".lz4")
_ENCODE_BATCH_BYTES = 4 << 20
_PARQUET_BATCH_ROWS = 1024
_PROGRESS_EVERY_BYTES = 1 << 20
_MAX_SKIP_EXAMPLES = 20
_TMP_NAME = re.compile(r"^shard-\d+\.(bin|idx)\.tmp\.\d+$")


def parse_bytes(text: str) -> int:
    """'1G', '256M', '4096' -> bytes (binary multiples)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 256M, 1G)")
    value = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be at least one byte: {text!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Planning: input files -> units of work, checked before anything is encoded.


@dataclass(frozen=True)
class Unit:
    """One unit of work: a part of one input file, which becomes one shard (and one val shard)."""

    index: int
    path: str
    kind: str
    """jsonl | text | parquet (raw text), tokens (JSONL of token_ids)."""
    start: int
    """Byte offset (jsonl, text, tokens) or first row group (parquet)."""
    stop: int
    """Byte offset or row group after the last; -1: the whole (compressed) file."""
    file_bytes: int
    """The input file's size when planned: a re-run whose file changed is refused."""
    input_bytes: int
    """Input bytes this unit covers (for progress and ETA)."""
    split: str
    """train: documents go to train or, by --val-fraction, to val; val: all to val."""


def _kind_of(path: str, fmt: str) -> str | None:
    name = path.lower()
    if fmt != "auto":
        return fmt
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return _EXTENSIONS[ext]
    return None


def find_inputs(inputs: list[str], fmt: str) -> list[tuple[str, str]]:
    """(path, kind) of every input file, in a deterministic order; DataError on what cannot be read."""
    found: list[tuple[str, str]] = []
    for spec in inputs:
        if any(c in spec for c in "*?["):
            paths = sorted(glob.glob(spec, recursive=True))
            if not paths:
                raise DataError(f"--input {spec}: the pattern matches no file")
        elif os.path.isdir(spec):
            paths = []
            for dirpath, dirnames, filenames in os.walk(spec):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                paths += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith((".", "_"))]
            usable = [p for p in paths if _kind_of(p, fmt) is not None]
            if not usable:
                raise DataError(
                    f"{spec}: folder holds no input files (*.jsonl, *.json, *.parquet, *.txt, *.md, their .gz; "
                    f"found {len(paths)} other files)"
                )
            if len(usable) < len(paths):
                logger.info("%s: ignoring %d files of other types", spec, len(paths) - len(usable))
            paths = usable
        elif os.path.exists(spec):
            paths = [spec]
        else:
            raise DataError(f"--input {spec}: no such file or folder")
        for path in paths:
            if not os.path.isfile(path):
                continue
            if path.lower().endswith(_UNSUPPORTED):
                raise DataError(f"{path}: compressed with an unsupported codec; decompress it (or use .gz)")
            kind = _kind_of(path, fmt)
            if kind is None:
                raise DataError(f"{path}: unknown file type; name it .jsonl, .parquet or .txt, or pass --format")
            if os.path.getsize(path) == 0:
                raise DataError(f"{path}: empty file (0 bytes)")
            found.append((path, kind))
    return found


def _parquet_row_groups(path: str, text_field: str) -> list[tuple[int, int]]:
    """(rows, uncompressed bytes) per row group; a DataError when the file or column is unusable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable Parquet file ({e})") from None
    schema = meta.schema.to_arrow_schema()
    if text_field not in schema.names:
        columns = ", ".join(schema.names[:10])
        raise DataError(f"{path}: no column {text_field!r} (columns: {columns}); pass --text-field")
    typ = schema.field(text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
        raise DataError(f"{path}: column {text_field!r} has type {typ}, not string")
    return [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]


def plan_units(files: list[tuple[str, str, str]], unit_bytes: int, text_field: str, text_split: str) -> list[Unit]:
    """Cut (path, kind, split) inputs into units of about unit_bytes of input each."""
    units: list[Unit] = []

    def add(path, kind, start, stop, size, covered, split):
        units.append(Unit(len(units), path, kind, start, stop, size, covered, split))

    for path, kind, split in files:
        size = os.path.getsize(path)
        whole_file = path.lower().endswith(".gz") or (kind == "text" and text_split != "line")
        if kind == "parquet":
            groups = _parquet_row_groups(path, text_field)
            total = sum(b for _, b in groups) or 1
            first, acc = 0, 0
            for g, (_, nbytes) in enumerate(groups):
                acc += nbytes
                if acc >= unit_bytes or g == len(groups) - 1:
                    add(path, kind, first, g + 1, size, size * acc // total, split)
                    first, acc = g + 1, 0
            if not groups:
                raise DataError(f"{path}: Parquet file with no row groups")
        elif whole_file:
            add(path, kind, 0, -1, size, size, split)
        else:
            n = max(1, -(-size // unit_bytes))
            for k in range(n):
                start, stop = size * k // n, size * (k + 1) // n
                add(path, kind, start, stop, size, stop - start, split)
    return units


# ---------------------------------------------------------------------------------------------
# Reading one unit: records with their place in the input, or what is wrong with them.


class _Bad(Exception):
    pass


class _LineCounter:
    """Turns 'k-th line of this unit' into a file line number; counts earlier lines only on demand."""

    def __init__(self, path: str, start_byte: int):
        self.path, self.start_byte, self._first_line = path, start_byte, None

    def where(self, k: int) -> str:
        if self._first_line is None:
            self._first_line = 1
            if self.start_byte:
                with open(self.path, "rb") as f:
                    left, last = self.start_byte, b"\n"
                    while left > 0:
                        chunk = f.read(min(left, 1 << 24))
                        self._first_line += chunk.count(b"\n")
                        left, last = left - len(chunk), chunk[-1:]
                # A unit starting mid-line begins at the next line (see _unit_lines).
                self._first_line += last != b"\n"
        return f"{self.path}:{self._first_line + k}"


def _unit_lines(unit: Unit) -> Iterator[bytes]:
    """The lines whose first byte lies in [unit.start, unit.stop) (all, for a whole-file unit)."""
    if unit.stop < 0:
        opener = gzip.open if unit.path.lower().endswith(".gz") else open
        try:
            with opener(unit.path, "rb") as f:
                yield from f
        except (OSError, EOFError) as e:  # a corrupt or truncated .gz
            raise DataError(f"{unit.path}: cannot be read to the end ({e})") from None
        return
    with open(unit.path, "rb", buffering=1 << 20) as f:
        pos = unit.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b"\n":  # mid-line: that line belongs to the previous unit
                pos += len(f.readline())
        while pos < unit.stop:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            yield line


def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(f"invalid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line)") from None


def _json_text(line: bytes, field: str) -> str:
    if not line.strip():
        raise _Bad("empty line")
    try:
        obj = json.loads(_decode(line))
    except json.JSONDecodeError as e:
        raise _Bad(f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise _Bad(JSON_TOO_DEEP) from None
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object with key {field!r}, got {type(obj).__name__}")
    if field not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise _Bad(f"no key {field!r} (keys: {keys}); pass --text-field")
    text = obj[field]
    if not isinstance(text, str):
        raise _Bad(f"{field!r} must be a string, got {type(text).__name__} ({json.dumps(text)[:40]})")
    return text


def unit_records(unit: Unit, s: dict) -> Iterator[tuple[str | np.ndarray | _Bad, object, int]]:
    """(text or token ids or a _Bad, a key to name its place, input bytes read) for each record."""
    kind = unit.kind
    if kind == "tokens":
        # The token-id line parser lives beside the torch dataset: imported only when converting.
        from mobilellm_train.data.jsonl import parse_token_ids
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(unit.path)
        groups = list(range(unit.start, unit.stop))
        row = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
        bytes_per_row = unit.input_bytes / max(1, sum(pf.metadata.row_group(g).num_rows for g in groups))
        try:
            for batch in pf.iter_batches(_PARQUET_BATCH_ROWS, row_groups=groups, columns=[s["text_field"]]):
                for value in batch.column(0).to_pylist():
                    yield (value if isinstance(value, str) else _Bad("null text")), row, int(bytes_per_row)
                    row += 1
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{unit.path}: unreadable Parquet data near row {row} ({e})") from None
        return

    lines = _unit_lines(unit)
    if kind == "text" and s["text_split"] == "file":
        data = b"".join(lines)
        try:
            yield _decode(data), None, len(data)
        except _Bad as e:
            yield e, None, len(data)
        return
    if kind == "text" and s["text_split"] == "paragraph":
        paragraph: list[str] = []
        first, nbytes = 0, 0
        for k, line in enumerate(lines):
            nbytes += len(line)
            try:
                text = _decode(line)
            except _Bad as e:
                yield e, k, len(line)
                continue
            if text.strip():
                if not paragraph:
                    first = k
                paragraph.append(text)
            elif paragraph:
                yield "".join(paragraph).rstrip("\n"), first, nbytes
                paragraph, nbytes = [], 0
        if paragraph:
            yield "".join(paragraph).rstrip("\n"), first, nbytes
        return
    for k, line in enumerate(lines):
        try:
            if kind == "jsonl":
                value = _json_text(line, s["text_field"])
            elif kind == "text":
                value = _decode(line).rstrip("\r\n")
            else:
                try:
                    value = parse_token_ids(line, s["vocab_size"])
                except BadLine as e:
                    raise _Bad(str(e)) from None
        except _Bad as e:
            value = e
        yield value, k, len(line)


def _where(unit: Unit, key, lines: _LineCounter) -> str:
    if key is None:  # a whole file is the record
        return unit.path
    if unit.kind == "parquet":
        return f"{unit.path}: row {key} (counting from 0)"
    if unit.stop < 0:
        return f"{unit.path}:{key + 1}"
    return lines.where(key)


# ---------------------------------------------------------------------------------------------
# Running one unit (in a worker process): records -> documents -> shard files -> record file.

_worker: dict = {}


def _init_worker(settings: dict, counter) -> None:
    _worker.clear()
    _worker["counter"] = counter
    if settings.get("tokenizer"):
        import sentencepiece as spm

        _worker["sp"] = spm.SentencePieceProcessor(model_file=settings["tokenizer"])


def _add_progress(nbytes: int) -> None:
    counter = _worker.get("counter")
    if counter is not None:
        with counter.get_lock():
            counter.value += nbytes


def unit_record_path(out: str, index: int) -> str:
    return os.path.join(out, PROGRESS_DIR, f"unit-{index:05d}.json")


def run_unit(unit: Unit, s: dict) -> dict:
    """Encode one unit into <out>/shard-<i> (and <out>/val/shard-<i>); returns its record."""
    out = s["out"]
    name = f"shard-{unit.index:05d}"
    val_rng = np.random.default_rng([s["seed"], unit.index])
    val_fraction = 1.0 if unit.split == "val" else s["val_fraction"]
    lines = _LineCounter(unit.path, unit.start if unit.stop >= 0 else 0)
    skipped, skip_examples, empty = 0, [], 0
    pending_bytes = 0
    texts: list[str] = []
    text_bytes = 0
    carry = np.zeros(0, dtype=np.int64)  # eos-split documents continue across lines
    eos_id = s.get("eos_id")

    val_folder = os.path.join(out, VAL_DIR)
    with ShardWriter(out, name, s["dtype"]) as train, ShardWriter(val_folder, name, s["dtype"]) as val:

        def emit(doc: np.ndarray) -> None:
            (val if val_fraction > 0 and val_rng.random() < val_fraction else train).add_document(doc)

        def encode_pending() -> None:
            nonlocal texts, text_bytes
            if texts:
                for ids in _worker["sp"].encode(texts, add_bos=s["bos"], add_eos=s["eos"], num_threads=1):
                    emit(np.asarray(ids, dtype=np.int64))
                texts, text_bytes = [], 0

        for value, key, nbytes in unit_records(unit, s):
            pending_bytes += nbytes
            if pending_bytes >= _PROGRESS_EVERY_BYTES:
                _add_progress(pending_bytes)
                pending_bytes = 0
            if isinstance(value, _Bad):
                where = f"{_where(unit, key, lines)}: {value}"
                if skipped >= s["skip_bad"]:
                    budget = f" (the --skip-bad budget of {s['skip_bad']} is used up)" if s["skip_bad"] else ""
                    raise DataError(f"{where}{budget}; pass --skip-bad N to skip up to N bad records")
                skipped += 1
                if len(skip_examples) < _MAX_SKIP_EXAMPLES:
                    skip_examples.append(where)
                continue
            if isinstance(value, str):
                if not value:
                    empty += 1
                    continue
                texts.append(value)
                text_bytes += len(value)
                if text_bytes >= _ENCODE_BATCH_BYTES:
                    encode_pending()
            elif s["doc_boundary"] == "line":
                emit(value)
            else:
                # A document ends after each EOS; what follows the last one continues on the next line.
                ends = np.flatnonzero(value == eos_id) + 1
                starts = np.concatenate(([0], ends))
                for a, b in zip(starts[:-1], ends):
                    emit(np.concatenate((carry, value[a:b])) if carry.size else value[a:b])
                    carry = carry[:0]
                if starts[-1] < value.size:
                    carry = np.concatenate((carry, value[starts[-1]:]))
        encode_pending()
        if carry.size:
            emit(carry)  # the unit's end ends its last document
        _add_progress(pending_bytes)
        record = {
            "unit": dataclasses.asdict(unit),
            "train": _info_dict(train.finish()),
            "val": _info_dict(val.finish()),
            "records_skipped": skipped,
            "skip_examples": skip_examples,
            "empty_documents": empty,
        }
    write_json_atomic(unit_record_path(out, unit.index), record)
    return record


def _info_dict(info: ShardInfo | None) -> dict | None:
    return None if info is None else dataclasses.asdict(info)


def _run_unit_in_worker(args: tuple[Unit, dict]) -> dict:
    return run_unit(*args)


# ---------------------------------------------------------------------------------------------
# The run: check the output folder, skip finished units, encode the rest in parallel, manifests.


def byte_unit(num_bytes: float) -> tuple[float, str]:
    """The decimal unit a byte count reads best in: (1e9, "GB") for 3.2e9, (1e3, "kB") for 4500."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if num_bytes >= scale:
            return scale, unit
    return 1.0, "B"


def format_bytes(num_bytes: float) -> str:
    """'15.3 MB', '2.10 GB', '512 B'."""
    scale, unit = byte_unit(num_bytes)
    return f"{num_bytes:.0f} B" if scale == 1.0 else f"{num_bytes / scale:.3g} {unit}"


class Progress:
    """A progress line on stderr (bytes, rate, units, ETA); redrawn on a terminal, else every 30 s."""

    def __init__(self, label: str, total_bytes: int, total_units: int, counter):
        self.label, self.total_bytes, self.total_units, self.counter = label, total_bytes, total_units, counter
        self.units_done = 0
        self.begin = time.perf_counter()
        self.start_bytes = 0
        self.tty = sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self.start_bytes = self.counter.value
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.5 if self.tty else 30.0):
            self.draw()

    def line(self) -> str:
        done = self.counter.value
        seconds = time.perf_counter() - self.begin
        rate = (done - self.start_bytes) / seconds if seconds > 0 else 0.0
        left = self.total_bytes - done
        eta = f"{int(left / rate) // 60}m{int(left / rate) % 60:02d}s" if rate > 0 and left > 0 else "--"
        pct = 100.0 * done / max(1, self.total_bytes)
        scale, unit = byte_unit(self.total_bytes)  # both figures in the total's unit: easy to compare
        return (f"[{self.label}] {pct:5.1f}% {done / scale:.2f}/{self.total_bytes / scale:.2f} {unit} "
                f"{format_bytes(rate)}/s, shards {self.units_done}/{self.total_units}, ETA {eta}")

    def draw(self) -> None:
        if self.tty:
            print("\r" + self.line(), end="", file=sys.stderr, flush=True)
        else:
            print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.draw()
        if self.tty:
            print(file=sys.stderr)


def _check_out_folder(out: str, settings: dict) -> None:
    """Refuse a folder that is not ours or was made with other settings; clear temporary files."""
    progress = os.path.join(out, PROGRESS_DIR)
    settings_file = os.path.join(progress, "settings.json")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(settings_file):
        raise DataError(f"{out}: exists, is not empty and is not a mobilellm-prepare output; choose a new --out")
    if os.path.isfile(settings_file):
        with open(settings_file) as f:
            saved = json.load(f)
        # Where the output and the tokenizer lie may change, what they are (the sha256) may not; the
        # skip budget changes no finished shard.
        keys = sorted((set(saved) | set(settings)) - {"out", "tokenizer", "skip_bad"})
        diff = {k: (saved.get(k), settings.get(k)) for k in keys if saved.get(k) != settings.get(k)}
        finished = [n for n in os.listdir(progress) if n.startswith("unit-") and n.endswith(".json")]
        if diff and not finished:
            # An earlier run that finished no shard (it failed on its first records, say) pins nothing.
            logger.info("%s: an earlier run with other settings finished no shard; starting afresh", out)
        elif diff:
            what = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise DataError(
                f"{out}: prepared earlier with other settings ({what}); rerun with the same ones to finish it, "
                f"or choose a new --out"
            )
    os.makedirs(progress, exist_ok=True)
    for folder in (out, os.path.join(out, VAL_DIR)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if _TMP_NAME.match(name):
                    os.remove(os.path.join(folder, name))  # left by a killed run; never a finished shard
    write_json_atomic(settings_file, settings)


def _finished_record(out: str, unit: Unit) -> dict | None:
    """The record of a unit a previous run finished, if its files are all still there."""
    path = unit_record_path(out, unit.index)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if Unit(**record["unit"]) != unit:
        # The input changed (or an earlier input did, shifting the units): this one is redone.
        logger.warning("%s: changed since an earlier run prepared shard %d from it; redoing that shard",
                       unit.path, unit.index)
        os.remove(path)
        return None
    for folder, info in ((out, record["train"]), (os.path.join(out, VAL_DIR), record["val"])):
        if info and not all(os.path.isfile(os.path.join(folder, info["name"] + ext)) for ext in (".bin", ".idx")):
            return None
    return record


def run_prepare(units: list[Unit], settings: dict, workers: int, label: str, extra: dict) -> dict:
    """Encode every unfinished unit and write the manifests; returns a summary."""
    out = settings["out"]
    _check_out_folder(out, settings)
    total_bytes = sum(u.input_bytes for u in units)
    records: dict[int, dict] = {}
    todo = []
    for u in units:
        rec = _finished_record(out, u)
        if rec is None:
            todo.append(u)
        else:
            records[u.index] = rec
    if records:
        logger.info("%s: %d of %d shards already finished by an earlier run; skipping them",
                    out, len(records), len(units))
    if not todo and is_dataset(out):
        m = read_manifest(out)
        logger.info("%s: already prepared (%d tokens in %d shards); nothing to do", out, m.num_tokens, len(m.shards))
        return {"train": {"num_tokens": m.num_tokens, "num_documents": m.num_documents, "num_shards": len(m.shards)},
                "seconds": 0.0, "records_skipped": m.raw.get("records_skipped", 0)}
    for folder in (out, os.path.join(out, VAL_DIR)):
        # Shards are about to change: until the new manifest is written, the folder is no dataset.
        if is_dataset(folder):
            os.remove(os.path.join(folder, MANIFEST_FILE))
    counter = mp.Value("q", sum(u.input_bytes for u in units if u.index in records))
    progress = Progress(label, total_bytes, len(units), counter)
    progress.units_done = len(records)
    skipped = sum(r["records_skipped"] for r in records.values())

    def finished(rec: dict) -> None:
        nonlocal skipped
        records[rec["unit"]["index"]] = rec
        progress.units_done += 1
        for where in rec["skip_examples"]:
            logger.warning("skipped bad record %s", where)
        if rec["records_skipped"] > len(rec["skip_examples"]):
            logger.warning("... and %d more in that shard", rec["records_skipped"] - len(rec["skip_examples"]))
        skipped += rec["records_skipped"]
        if skipped > settings["skip_bad"]:
            raise DataError(
                f"{skipped} bad records skipped in all, more than --skip-bad {settings['skip_bad']} "
                f"(see the warnings above for where)"
            )

    begin = time.perf_counter()
    if workers <= 1 or len(todo) <= 1:
        _init_worker(settings, counter)
        progress.start()
        try:
            for u in todo:
                finished(run_unit(u, settings))
        finally:
            progress.close()
    else:
        # The pool forks before the progress thread starts: no thread is copied into the workers.
        with mp.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(settings, counter)) as pool:
            progress.start()
            try:
                for rec in pool.imap_unordered(_run_unit_in_worker, [(u, settings) for u in todo]):
                    finished(rec)
            finally:
                progress.close()
                pool.terminate()
    seconds = time.perf_counter() - begin
    if skipped > settings["skip_bad"]:  # all counted in finished units of earlier runs
        raise DataError(f"{out}: {skipped} bad records were skipped, more than --skip-bad {settings['skip_bad']}")

    ordered = [records[u.index] for u in units]
    summary = {}
    tokenizer = settings.get("tokenizer_info")
    for split, folder in (("train", out), ("val", os.path.join(out, VAL_DIR))):
        shards = [ShardInfo(**r[split]) for r in ordered if r[split]]
        if not shards:
            if split == "train":
                raise DataError(f"{out}: the inputs gave no training documents")
            continue
        if settings.get("tokenizer"):
            with open(settings["tokenizer"], "rb") as f:
                write_file_atomic(os.path.join(folder, TOKENIZER_FILE), f.read())
        manifest = write_manifest(folder, shards, settings["dtype"], settings["vocab_size"], tokenizer, {
            "split": split,
            "records_skipped": sum(r["records_skipped"] for r in ordered),
            "empty_documents_dropped": sum(r["empty_documents"] for r in ordered),
            "sources": sorted({(u.path, u.file_bytes) for u in units}),
            "prepare": {**extra, "settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "python": platform.python_version(), "numpy": np.__version__},
        })
        summary[split] = {k: manifest[k] for k in ("num_tokens", "num_documents", "max_token_id")}
        summary[split]["num_shards"] = len(shards)
    summary["seconds"] = round(seconds, 2)
    summary["records_skipped"] = skipped
    logger.info("%s: done in %.1f s: %s", out, seconds, json.dumps(summary))
    return summary


def _base_settings(args, vocab_size: int, kind: str) -> dict:
    return {
        "out": os.path.abspath(args.out),
        "command": kind,
        "vocab_size": vocab_size,
        "dtype": dtype_for_vocab(vocab_size),
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "skip_bad": args.skip_bad,
        "unit_bytes": args.unit_bytes,
    }


# ---------------------------------------------------------------------------------------------
# Subcommands.


def cmd_encode(args) -> dict:
    info = tokenizer_info(args.tokenizer)
    files = find_inputs(args.input, args.format)
    settings = {
        **_base_settings(args, info["vocab_size"], "encode"),
        "tokenizer": os.path.abspath(args.tokenizer),
        "tokenizer_info": info,
        "text_field": args.text_field,
        "text_split": args.text_split,
        "bos": args.bos,
        "eos": args.eos,
        "doc_boundary": "line",
    }
    if args.bos and info["bos_id"] < 0 or args.eos and info["eos_id"] < 0:
        raise DataError(f"{args.tokenizer}: has no BOS/EOS piece; pass --no-bos / --no-eos")
    units = plan_units([(p, k, "train") for p, k in files], args.unit_bytes, args.text_field, args.text_split)
    logger.info("encoding %d files (%s) in %d units with %d workers into %s",
                len(files), format_bytes(sum(u.input_bytes for u in units)), len(units), args.workers, args.out)
    return run_prepare(units, settings, args.workers, "encode", {"command": "encode", "inputs": args.input})


def cmd_convert(args) -> dict:
    from mobilellm_train.data.jsonl import find_node_folders, list_jsonl_files

    if bool(args.vocab_size) == bool(args.tokenizer):
        raise DataError("convert needs exactly one of --vocab-size and --tokenizer")
    info = tokenizer_info(args.tokenizer) if args.tokenizer else None
    vocab_size = info["vocab_size"] if info else args.vocab_size
    eos_id = info["eos_id"] if info else args.eos_id
    root = args.input
    if args.layout == "nodes":
        files = [(f, "tokens", "train") for folder in find_node_folders(root) for f in list_jsonl_files(folder)]
        boundary = args.doc_boundary or "line"
    else:
        train_dir = os.path.join(root, "train")
        train_root = train_dir if os.path.isdir(train_dir) else root
        if not os.path.isdir(train_root):
            raise DataError(f"{root}: no such folder")
        files = [(f, "tokens", "train") for f in list_jsonl_files(train_root)]
        valid_dir = os.path.join(root, "valid")
        if os.path.isdir(valid_dir):
            files += [(f, "tokens", "val") for f in list_jsonl_files(valid_dir)]
        boundary = args.doc_boundary or "eos"
    if boundary == "eos" and eos_id < 0:
        raise DataError("--doc-boundary eos needs an EOS id (--eos-id or a tokenizer with one)")
    settings = {
        **_base_settings(args, vocab_size, f"convert-{args.layout}"),
        "tokenizer": os.path.abspath(args.tokenizer) if args.tokenizer else "",
        "tokenizer_info": info,
        "doc_boundary": boundary,
        "eos_id": eos_id,
    }
    units = plan_units(files, args.unit_bytes, "", "line")
    logger.info("converting %d files (%s layout, documents end at each %s) in %d units into %s",
                len(files), args.layout, "line" if boundary == "line" else f"EOS ({eos_id})", len(units), args.out)
    return run_prepare(units, settings, args.workers, "convert", {"command": "convert", "inputs": [root]})


def _sample_texts(args) -> Iterator[str]:
    """Documents from every unit of the input, each unit's first sample_bytes / units bytes."""
    files = find_inputs(args.input, args.format)
    units = plan_units([(p, k, "train") for p, k in files], args.unit_bytes, args.text_field, args.text_split)
    per_unit = max(1, args.sample_bytes // len(units))
    s = {"text_field": args.text_field, "text_split": args.text_split}
    skipped = 0
    for unit in units:
        taken = 0
        lines = _LineCounter(unit.path, unit.start if unit.stop >= 0 else 0)
        for value, key, _ in unit_records(unit, s):
            if isinstance(value, _Bad):
                skipped += 1
                if skipped > args.skip_bad:
                    where = _where(unit, key, lines)
                    raise DataError(f"{where}: {value}; pass --skip-bad N to skip up to N bad records")
                logger.warning("skipped bad record %s: %s", _where(unit, key, lines), value)
                continue
            yield value
            taken += len(value)
            if taken >= per_unit:
                break


def cmd_tokenizer(args) -> dict:
    import sentencepiece as spm

    if os.path.exists(args.out):
        raise DataError(f"{args.out}: exists; refusing to overwrite it (choose another --out)")
    begin = time.perf_counter()
    sentences = []
    sample_bytes = 0
    for doc in _sample_texts(args):
        sample_bytes += len(doc)
        sentences += [line for line in doc.split("\n") if line.strip()]
    if not sentences:
        raise DataError(f"{args.input}: no text to train a tokenizer on")
    logger.info("training a %s tokenizer of %d pieces on %d lines (%.1f MB sampled)",
                args.model_type, args.vocab_size, len(sentences), sample_bytes / 1e6)
    spm.set_random_generator_seed(args.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=args.model_type,
            vocab_size=args.vocab_size,
            byte_fallback=args.byte_fallback,
            # Llama-2 ids, as MobileLLM's tokenizer (docs/REFERENCE.md): unk 0, bos 1, eos 2, no pad.
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            # Keep text as it is (whitespace, newlines via byte fallback): decode(encode(x)) == x.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=args.character_coverage,
            max_sentence_length=1 << 16,
            num_threads=max(1, args.workers),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}") from None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_file_atomic(args.out, model.getvalue())
    summary = {**tokenizer_info(args.out), "lines": len(sentences), "sample_bytes": sample_bytes,
               "seconds": round(time.perf_counter() - begin, 2)}
    logger.info("wrote %s: %s", args.out, json.dumps(summary))
    return summary


def cmd_verify(args) -> dict:
    summary = {}
    for folder in (args.folder, os.path.join(args.folder, VAL_DIR)):
        if folder != args.folder and not is_dataset(folder):
            continue
        m = read_manifest(folder)
        check_shard_sizes(m)
        seconds = verify_shards(m)
        summary[folder] = {"num_tokens": m.num_tokens, "num_documents": m.num_documents, "num_shards": len(m.shards),
                           "dtype": m.dtype, "vocab_size": m.vocab_size, "verify_seconds": round(seconds, 2)}
        logger.info("%s: %d shards, %d tokens, %d documents: sizes and sha256 match %s", folder, len(m.shards),
                    m.num_tokens, m.num_documents, MANIFEST_FILE)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobilellm-prepare", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add_run_options(q, default_unit: str) -> None:
        q.add_argument("--out", required=True, help="output dataset folder (created; an unfinished one is resumed)")
        q.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="worker processes (default: all cores)")
        q.add_argument("--unit-bytes", type=parse_bytes, default=parse_bytes(default_unit),
                       help=f"input bytes per shard, e.g. 256M (default {default_unit})")
        q.add_argument("--val-fraction", type=float, default=0.0,
                       help="fraction of documents held out into <out>/val (default 0)")
        q.add_argument("--seed", type=int, default=0, help="seed of the held-out selection")
        q.add_argument("--skip-bad", type=int, default=0,
                       help="skip up to N bad records (each logged); 0 stops at the first")

    def add_text_options(q) -> None:
        q.add_argument("--input", nargs="+", required=True, help="files, folders or glob patterns")
        q.add_argument("--format", choices=["auto", "jsonl", "parquet", "text"], default="auto",
                       help="input format; auto goes by file extension")
        q.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
        q.add_argument("--text-split", choices=["file", "line", "paragraph"], default="file",
                       help="plain text: one document per file, per line, or per blank-line-separated paragraph")

    q = sub.add_parser("tokenizer", help="train a SentencePiece model on a sample of the corpus")
    add_text_options(q)
    q.add_argument("--out", required=True, help="the .model file to write (must not exist)")
    q.add_argument("--vocab-size", type=int, default=32000)
    q.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    q.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--character-coverage", type=float, default=0.9995)
    q.add_argument("--sample-bytes", type=parse_bytes, default=parse_bytes("1G"),
                   help="text to train on, taken evenly from all of the input (default 1G)")
    q.add_argument("--unit-bytes", type=parse_bytes, default=parse_bytes("1G"), help=argparse.SUPPRESS)
    q.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="SentencePiece training threads")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--skip-bad", type=int, default=0, help="skip up to N bad records (each logged)")

    q = sub.add_parser("encode", help="tokenize JSONL / Parquet / text into token shards")
    add_text_options(q)
    add_run_options(q, "1G")
    q.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    q.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True, help="begin each document with BOS")
    q.add_argument("--eos", action=argparse.BooleanOptionalAction, default=True, help="end each document with EOS")

    q = sub.add_parser("convert", help="convert the original token-id JSONL layout into token shards")
    q.add_argument("--layout", choices=["nodes", "amber"], required=True,
                   help="nodes: basepath/<node>/*.jsonl, a document per line; amber: LLM360 amber-data-prep "
                        "output, <input>/train/*.jsonl (+ valid/ -> val), 2049-token chunks of EOS-ended documents")
    q.add_argument("--input", required=True, help="basepath (nodes) or the amber output folder")
    add_run_options(q, "1G")
    q.add_argument("--vocab-size", type=int, default=0, help="vocabulary size (or give --tokenizer)")
    q.add_argument("--tokenizer", default="", help="the SentencePiece model the ids come from (recorded and checked)")
    q.add_argument("--doc-boundary", choices=["line", "eos"], default=None,
                   help="where documents end: after each line (nodes default) or after each EOS (amber default)")
    q.add_argument("--eos-id", type=int, default=2, help="EOS id for --doc-boundary eos without --tokenizer")

    q = sub.add_parser("verify", help="check a prepared folder's files against its manifest (sizes, sha256)")
    q.add_argument("folder")
    return p


def run(argv: list[str]) -> dict:
    """Run one subcommand; returns its summary, raises DataError on bad input."""
    args = build_parser().parse_args(argv)
    if args.command != "verify":
        if args.workers < 1 or args.skip_bad < 0:
            raise DataError("--workers must be >= 1 and --skip-bad >= 0")
        if not 0 <= getattr(args, "val_fraction", 0.0) < 1:
            raise DataError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    commands = {"tokenizer": cmd_tokenizer, "encode": cmd_encode, "convert": cmd_convert, "verify": cmd_verify}
    return commands[args.command](args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        run(sys.argv[1:] if argv is None else argv)
    except DataError as e:
        logger.error("%s", e)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
