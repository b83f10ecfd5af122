"""The inputs of mobilellm-prepare: finding the files, cutting them into units, reading their records.

Inputs (``--input``, files, folders or globs): JSONL with a text field (``--text-field``, or a comma
list of fields: the first one a record has), Parquet with a text column (read with pyarrow in
batches), plain text (one document per file, per line or per blank-line-separated paragraph:
``--text-split``); ``.jsonl.gz``, ``.json.gz`` and ``.txt.gz`` too; for convert, JSONL lines of
token ids. A folder's files of other names are skipped (counted in the log; ``--format`` reads
them all as one format). Empty (0-byte) files are skipped with a warning. Empty folders,
unreadable Parquet files and unknown file types named on the command line stop the run while
planning (`find_inputs`, `plan_units`), before any encoding.

A unit is about ``--unit-bytes`` of input: a piece of a large input (a byte range of a JSONL or
text file, on line boundaries, or a group of Parquet row groups), or several small files (or the
ends of large ones) packed together; a compressed file or one text document is never cut.
`piece_records` yields the records of a piece, a bad one (malformed JSON or UTF-8, a missing
field, a value of the wrong type, a null Parquet cell, a token id outside the vocabulary) as a
`BadRecord` that `record_place` names by file and line (or Parquet row).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mobilellm_train.errors import JSON_TOO_DEEP, BadLine, DataError

logger = logging.getLogger("mobilellm_train.prepare")

_EXTENSIONS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl",
    ".parquet": "parquet",
    ".txt": "text", ".text": "text", ".md": "text", ".txt.gz": "text",
}
_UNSUPPORTED = (".zst", ".zstd", ".bz2", ".xz", ".lz4")
# The names a folder's files are read by (--format auto), for the messages that name them.
EXTENSIONS_IN_WORDS = ".jsonl, .json, .parquet, .txt, .text, .md, and .jsonl.gz, .json.gz, .txt.gz"
_PARQUET_BATCH_ROWS = 1024


# ---------------------------------------------------------------------------------------------
# Planning: input files -> units of work, checked before anything is encoded.


@dataclass(frozen=True)
class Piece:
    """A part of one input file: a byte range, a group of Parquet row groups or the whole file."""

    path: str
    kind: str
    """jsonl | text | parquet (raw text), tokens (JSONL of token_ids)."""
    start: int
    """Byte offset (jsonl, text, tokens) or first row group (parquet)."""
    stop: int
    """Byte offset or row group after the last; -1: the whole (compressed) file."""
    file_bytes: int
    """The input file's size when planned: a re-run whose file changed redoes this piece's unit."""
    input_bytes: int
    """Input bytes this piece covers (for packing, progress and ETA)."""


@dataclass(frozen=True)
class Unit:
    """One unit of work, which becomes one shard (and one val shard): a piece of a large input
    file, or several small files (or pieces) packed together, in input order."""

    index: int
    pieces: tuple[Piece, ...]
    split: str
    """train: documents go to train or, by --val-fraction, to val; val: all to val."""

    @property
    def input_bytes(self) -> int:
        return sum(p.input_bytes for p in self.pieces)

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(p.path for p in self.pieces))

    def to_dict(self) -> dict:
        """The unit as its record stores it (a piece as a list: a unit can hold thousands)."""
        return {"index": self.index, "split": self.split,
                "pieces": [[p.path, p.kind, p.start, p.stop, p.file_bytes, p.input_bytes] for p in self.pieces]}

    @classmethod
    def from_dict(cls, d) -> Unit | None:
        """The unit of a record; None for a record of another form (an older mobilellm-prepare)."""
        try:
            return cls(d["index"], tuple(Piece(*p) for p in d["pieces"]), d["split"])
        except (KeyError, TypeError):
            return None


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
    empty: list[str] = []
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
                    f"{spec}: folder holds no input files ({EXTENSIONS_IN_WORDS}; found {len(paths)} other "
                    "files: --format jsonl|text|parquet reads every file as that format)"
                )
            if len(usable) < len(paths):
                logger.info("%s: ignoring %d files of other names (read: %s; --format jsonl|text|parquet reads "
                            "every file as that format)", spec, len(paths) - len(usable), EXTENSIONS_IN_WORDS)
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
                empty.append(path)
                continue
            found.append((path, kind))
    if empty and not found:
        raise DataError(f"{empty[0]}: empty file (0 bytes)" + (f", and so are the other {len(empty) - 1} inputs"
                                                             if len(empty) > 1 else "; nothing to read"))
    for path in empty[:10]:
        logger.warning("%s: empty file (0 bytes); skipping it", path)
    if len(empty) > 10:
        logger.warning("... and %d more empty files, skipped too", len(empty) - 10)
    return found


def text_fields(spec: str) -> list[str]:
    """--text-field 'text' or 'text,content' -> the fields to look for, in order."""
    return [f.strip() for f in spec.split(",") if f.strip()] or [spec]


def _in_words(fields: list[str]) -> str:
    return " or ".join(repr(f) for f in fields)


def _parquet_column(path: str, schema, text_field: str) -> str:
    """The first of the --text-field names that is a column of the file; a DataError if none is."""
    fields = text_fields(text_field)
    column = next((f for f in fields if f in schema.names), None)
    if column is None:
        columns = ", ".join(schema.names[:10])
        raise DataError(f"{path}: no column {_in_words(fields)} (columns: {columns}); pass --text-field")
    return column


def _parquet_row_groups(path: str, text_field: str) -> list[tuple[int, int]]:
    """(rows, uncompressed bytes) per row group; a DataError when the file or column is unusable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable Parquet file ({e})") from None
    schema = meta.schema.to_arrow_schema()
    column = _parquet_column(path, schema, text_field)
    typ = schema.field(column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
        raise DataError(f"{path}: column {column!r} has type {typ}, not string")
    return [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]


def plan_pieces(path: str, kind: str, unit_bytes: int, text_field: str, text_split: str) -> list[Piece]:
    """Cut one input file into pieces of at most about unit_bytes (a file that cannot be cut, a
    compressed one or one text document, is one piece)."""
    size = os.path.getsize(path)
    whole_file = path.lower().endswith(".gz") or (kind == "text" and text_split != "line")
    if kind == "parquet":
        groups = _parquet_row_groups(path, text_field)
        if not groups:
            raise DataError(f"{path}: Parquet file with no row groups")
        total = sum(b for _, b in groups) or 1
        pieces, first, acc = [], 0, 0
        for g, (_, nbytes) in enumerate(groups):
            acc += nbytes
            if acc >= unit_bytes or g == len(groups) - 1:
                pieces.append(Piece(path, kind, first, g + 1, size, size * acc // total))
                first, acc = g + 1, 0
        return pieces
    if whole_file:
        return [Piece(path, kind, 0, -1, size, size)]
    n = max(1, -(-size // unit_bytes))
    return [Piece(path, kind, size * k // n, size * (k + 1) // n, size, size * (k + 1) // n - size * k // n)
            for k in range(n)]


def plan_units(files: list[tuple[str, str, str]], unit_bytes: int, text_field: str, text_split: str) -> list[Unit]:
    """Cut (path, kind, split) inputs into units of about unit_bytes of input each.

    A large file is cut into pieces of at most about unit_bytes; consecutive pieces (small files
    and the ends of large ones) of one split are packed, in input order, into a unit until it
    holds about unit_bytes: a piece joins the open unit while that brings the unit nearer to
    unit_bytes (the unit plus half the piece stays within it). The plan depends only on the
    inputs' order and sizes and on unit_bytes, so a re-run makes the same units.
    """
    units: list[Unit] = []
    open_pieces: list[Piece] = []
    open_bytes, open_split = 0, ""

    def close() -> None:
        nonlocal open_pieces, open_bytes
        if open_pieces:
            units.append(Unit(len(units), tuple(open_pieces), open_split))
        open_pieces, open_bytes = [], 0

    for path, kind, split in files:
        for piece in plan_pieces(path, kind, unit_bytes, text_field, text_split):
            if open_pieces and (split != open_split or open_bytes + piece.input_bytes / 2 > unit_bytes):
                close()
            open_pieces.append(piece)
            open_bytes += piece.input_bytes
            open_split = split
            if open_bytes >= unit_bytes:
                close()
    close()
    return units


# ---------------------------------------------------------------------------------------------
# Reading one piece: records with their place in the input, or what is wrong with them.


class BadRecord(Exception):
    """A record that cannot be used; the message says what is wrong with it, record_place where it is."""


class LineCounter:
    """Turns 'k-th line of this piece' into a file line number; counts earlier lines only on demand."""

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
                # A piece starting mid-line begins at the next line (see _piece_lines).
                self._first_line += last != b"\n"
        return f"{self.path}:{self._first_line + k}"


def _is_gz(piece: Piece) -> bool:
    return piece.stop < 0 and piece.path.lower().endswith(".gz")


def _piece_lines(piece: Piece, raw=None) -> Iterator[bytes]:
    """The lines whose first byte lies in [piece.start, piece.stop) (all, for a whole-file piece;
    a .gz piece is decompressed from `raw`, the open file)."""
    if piece.stop < 0:
        try:
            with (gzip.GzipFile(fileobj=raw, mode="rb") if raw is not None else open(piece.path, "rb")) as f:
                yield from f
        except (OSError, EOFError) as e:  # a corrupt or truncated .gz
            raise DataError(f"{piece.path}: cannot be read to the end ({e})") from None
        return
    with open(piece.path, "rb", buffering=1 << 20) as f:
        pos = piece.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b"\n":  # mid-line: that line belongs to the previous piece
                pos += len(f.readline())
        while pos < piece.stop:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            yield line


def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(f"invalid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line)") from None


def _json_text(line: bytes, text_field: str) -> str:
    """The text of a JSONL record: the first of the --text-field keys (a comma list) it has."""
    if not line.strip():
        raise BadRecord("empty line")
    try:
        obj = json.loads(_decode(line))
    except json.JSONDecodeError as e:
        raise BadRecord(f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise BadRecord(JSON_TOO_DEEP) from None
    fields = text_fields(text_field)
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object with key {_in_words(fields)}, got {type(obj).__name__}")
    field = next((f for f in fields if f in obj), None)
    if field is None:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise BadRecord(f"no key {_in_words(fields)} (keys: {keys}); pass --text-field (a comma list takes the "
                        "first key a record has)")
    text = obj[field]
    if not isinstance(text, str):
        raise BadRecord(f"{field!r} must be a string, got {type(text).__name__} ({json.dumps(text)[:40]})")
    return text


def piece_records(piece: Piece, s: dict) -> Iterator[tuple[str | np.ndarray | BadRecord, object, int]]:
    """(text or token ids or a BadRecord, a key to name its place, input bytes read) for each record.
    The bytes are bytes of the file as planned: for a .gz input the compressed bytes read so far,
    so that progress, measured against the files' sizes, ends at 100%."""
    if not _is_gz(piece):
        yield from _records(piece, s, _piece_lines(piece))
        return
    with open(piece.path, "rb") as raw:
        done = 0
        for value, key, _ in _records(piece, s, _piece_lines(piece, raw)):
            now = raw.tell()
            yield value, key, now - done
            done = now


def _records(piece: Piece, s: dict, lines: Iterator[bytes]):
    """piece_records, reading `lines` (the piece's raw lines) for every kind but Parquet."""
    kind = piece.kind
    if kind == "tokens":
        # The token-id line parser lives beside the torch dataset: imported only when converting.
        from mobilellm_train.data.jsonl import parse_token_ids
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(piece.path)
        column = _parquet_column(piece.path, pf.schema_arrow, s["text_field"])
        groups = list(range(piece.start, piece.stop))
        row = sum(pf.metadata.row_group(g).num_rows for g in range(piece.start))
        bytes_per_row = piece.input_bytes / max(1, sum(pf.metadata.row_group(g).num_rows for g in groups))
        try:
            for batch in pf.iter_batches(_PARQUET_BATCH_ROWS, row_groups=groups, columns=[column]):
                for value in batch.column(0).to_pylist():
                    yield (value if isinstance(value, str) else BadRecord("null text")), row, int(bytes_per_row)
                    row += 1
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{piece.path}: unreadable Parquet data near row {row} ({e})") from None
        return

    if kind == "text" and s["text_split"] == "file":
        data = b"".join(lines)
        try:
            yield _decode(data), None, len(data)
        except BadRecord as e:
            yield e, None, len(data)
        return
    if kind == "text" and s["text_split"] == "paragraph":
        paragraph: list[str] = []
        first, nbytes = 0, 0
        for k, line in enumerate(lines):
            nbytes += len(line)
            try:
                text = _decode(line)
            except BadRecord as e:
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
                    raise BadRecord(str(e)) from None
        except BadRecord as e:
            value = e
        yield value, k, len(line)


def record_place(piece: Piece, key, lines: LineCounter) -> str:
    """Where the record `key` (as piece_records gives it) lies: 'file:line', 'file: row N' or the file."""
    if key is None:  # a whole file is the record
        return piece.path
    if piece.kind == "parquet":
        return f"{piece.path}: row {key} (counting from 0)"
    if piece.stop < 0:
        return f"{piece.path}:{key + 1}"
    return lines.where(key)
