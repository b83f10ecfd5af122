"""The text `mobilellm-prepare tokenizer` trains on: about ``--sample-bytes`` of it, spread over
the inputs in proportion to their size and over each input from start to end, streamed.

Each input gets a byte budget, ``--sample-bytes`` x its size / the total size (sizes on disk, so a
.gz or Parquet file counts at its compressed size). It is read in windows spread evenly across
the file (one per `WINDOW_BYTES` of its budget, at least `MIN_WINDOWS`; a .gz file by its decompressed size as its
gzip trailer gives it), each taking text from its start until its share of the budget is met (a
window that holds less text leaves the rest to the next one). What SentencePiece gets is lines,
a long one (a text file that is one document on one line) cut at whitespace into sentences of at
most `MAX_SENTENCE_CHARS`; the last sentence of a window is cut to fit its budget, so the sample
never exceeds ``--sample-bytes``. Nothing holds more than a sentence, a line of at most
`READ_BYTES` or one JSONL record at a time: memory does not grow with the input.

Used as ``sample_sentences(args, stats)``, a generator of sentences; `stats` counts what it gave.
"""

from __future__ import annotations

import codecs
import gzip
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from mobilellm_train.data.prepare.inputs import (
    BadRecord,
    LineCounter,
    Piece,
    _json_text,
    _parquet_row_groups,
    find_inputs,
    piece_records,
    record_place,
)
from mobilellm_train.errors import DataError

logger = logging.getLogger("mobilellm_train.prepare")

WINDOW_BYTES = 1 << 20
MIN_WINDOWS = 16
MAX_SENTENCE_CHARS = 8192  # SentencePiece drops sentences over max_sentence_length (64 KiB)
READ_BYTES = 1 << 20
_WHITESPACE = " \t\r\f\v"


@dataclass
class SampleStats:
    """What the sample holds so far: bytes (UTF-8) and sentences, in all and per input."""

    bytes: int = 0
    sentences: int = 0
    per_input: dict[str, int] = field(default_factory=dict)
    skipped: int = 0


def _cut(text: str, max_chars: int) -> Iterator[str]:
    """`text` (one line) in pieces of at most max_chars, cut at whitespace where there is some."""
    while len(text) > max_chars:
        head = text[:max_chars]
        i = max(head.rfind(c) for c in _WHITESPACE)
        cut = i + 1 if i >= max_chars // 2 else max_chars
        yield text[:cut]
        text = text[cut:]
    yield text


def _fit(sentence: str, budget: int) -> str:
    """The longest start of `sentence` within `budget` UTF-8 bytes, ending at whitespace if it can."""
    head = sentence.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    i = max(head.rfind(c) for c in _WHITESPACE)
    return head[: i + 1] if i > 0 else head


def _sentences(text: str) -> Iterator[str]:
    for line in text.split("\n"):
        if line.strip():
            yield from _cut(line, MAX_SENTENCE_CHARS)


def _gzip_size(path: str) -> int:
    """A .gz file's decompressed size from its trailer (modulo 4 GiB, so at least its size on disk)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 4))
        isize = struct.unpack("<I", f.read(4).rjust(4, b"\0"))[0]
    while isize < size:
        isize += 1 << 32 if size > 1 << 30 else 3 * size  # wrapped past 4 GiB, or a multi-member file
    return isize


def _line_of(path: str, pos: int, gz: bool) -> str:
    """'path:line' of byte `pos` (decompressed, for gz); reads the file up to it, so only on an error."""
    line = 1
    with (gzip.open if gz else open)(path, "rb") as f:
        while pos > 0:
            chunk = f.read(min(pos, 1 << 24))
            if not chunk:
                break
            line += chunk.count(b"\n")
            pos -= len(chunk)
    return f"{path}:{line}"


class _Skipper:
    """The --skip-bad budget over the whole sample."""

    def __init__(self, allowed: int, stats: SampleStats):
        self.allowed, self.stats = allowed, stats

    def __call__(self, where, problem) -> None:
        """Count a bad record; `where` says (or, when called, finds) where it is."""
        self.stats.skipped += 1
        where = where() if callable(where) else where
        if self.stats.skipped > self.allowed:
            raise DataError(f"{where}: {problem}; pass --skip-bad N to skip up to N bad records")
        logger.warning("skipped bad record %s: %s", where, problem)


def _window_start(f, kind: str, start: int, gz: bool) -> bytes:
    """Move the open file to the window's first record; returns bytes read past it (text only)."""
    if kind == "text":
        # Text is sampled from where the window starts (a one-line document has no line start to
        # go to); only a start inside a UTF-8 sequence moves on to the next character.
        if start > f.tell():
            f.seek(start)  # for gz, decompresses up to there
        for _ in range(4):
            b = f.read(1) if f.tell() > 0 else b""
            if not b or b[0] & 0xC0 != 0x80:
                return b
        return b""
    if start <= f.tell():
        return b""  # the window before ended past this one's start, on a record boundary
    f.seek(start)
    if gz:
        f.readline()
    else:
        f.seek(start - 1)
        if f.read(1) != b"\n":
            f.readline()  # mid-record: that record belongs to the window before
    return b""


def _window_texts(f, path: str, kind: str, start: int, stop: int, text_field: str, bad: _Skipper,
                  gz: bool) -> Iterator[str]:
    """Texts of the records that begin in [start, stop) of the open file f (decompressed positions
    for gz); plain text comes in parts of at most READ_BYTES."""
    pending = _window_start(f, kind, start, gz)
    decoder = codecs.getincrementaldecoder("utf-8")()
    while f.tell() - len(pending) < stop:
        pos = f.tell() - len(pending)
        # Plain text is read no further than the window's end: the next window starts there.
        limit = max(1, min(READ_BYTES, stop - pos - len(pending))) if kind == "text" else -1
        line = pending if pending.endswith(b"\n") else pending + f.readline(limit)
        pending = b""
        if not line:
            return
        whole = line.endswith(b"\n")
        try:
            if kind == "jsonl":
                yield _json_text(line, text_field)
            else:
                yield decoder.decode(line, final=whole)
        except BadRecord as e:
            bad(lambda: _line_of(path, pos, gz), e)
        except UnicodeDecodeError as e:
            bad(lambda: _line_of(path, pos, gz), f"invalid UTF-8 (byte 0x{e.object[e.start]:02x})")
            decoder.reset()
            while line and not line.endswith(b"\n"):  # the rest of that line goes with it
                line = f.readline(READ_BYTES)


def _file_sample(path: str, kind: str, budget: int, args, bad: _Skipper) -> Iterator[str]:
    """About `budget` bytes of sentences from windows spread across one input file."""
    size = os.path.getsize(path)
    gz = path.lower().endswith(".gz")
    # At least MIN_WINDOWS (a small budget is spread too), each worth a few lines at least.
    windows = max(1, min(max(MIN_WINDOWS, -(-budget // WINDOW_BYTES)), budget // 256))
    taken = 0
    if kind == "parquet":
        groups = len(_parquet_row_groups(path, args.text_field))
        windows = min(windows, groups)
        spans = [(groups * j // windows, groups * (j + 1) // windows) for j in range(windows)]
    else:
        if gz:
            size = _gzip_size(path)
        windows = min(windows, max(1, size // 4096))
        spans = [(size * j // windows, size * (j + 1) // windows) for j in range(windows)]
    opener = gzip.open if gz else open
    f = None if kind == "parquet" else opener(path, "rb")
    try:
        for j, (start, stop) in enumerate(spans):
            quota = budget * (j + 1) // windows  # what this and the windows before take, together
            if kind == "parquet":
                texts = _parquet_texts(path, start, stop, args.text_field, bad)
            else:
                texts = _window_texts(f, path, kind, start, stop, args.text_field, bad, gz)
            partial = ""  # a plain-text line read in parts: the part after its last newline
            for text in texts:
                if kind == "text":
                    text, sep, partial_next = (partial + text).rpartition("\n")
                    text, partial = (text + sep, partial_next) if sep else ("", partial_next)
                    if len(partial) > MAX_SENTENCE_CHARS:
                        *pieces, partial = _cut(partial, MAX_SENTENCE_CHARS)
                        text += "\n".join(pieces)
                for sentence in _sentences(text):
                    n = len(sentence.encode("utf-8"))
                    if taken + n > quota:
                        sentence = _fit(sentence, quota - taken)
                        n = len(sentence.encode("utf-8"))
                    if n:
                        taken += n
                        yield sentence
                    if taken >= quota:
                        break
                if taken >= quota:
                    break
            else:
                for sentence in _sentences(partial):  # the window's last line, without a newline
                    sentence = _fit(sentence, quota - taken)
                    if sentence:
                        taken += len(sentence.encode("utf-8"))
                        yield sentence
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    finally:
        if f is not None:
            f.close()


def _parquet_texts(path: str, first: int, stop: int, text_field: str, bad: _Skipper) -> Iterator[str]:
    piece = Piece(path, "parquet", first, stop, 0, 0)
    for value, key, _ in piece_records(piece, {"text_field": text_field}):
        if isinstance(value, BadRecord):
            bad(record_place(piece, key, LineCounter(path, 0)), value)
            continue
        yield value


def sample_sentences(args, stats: SampleStats) -> Iterator[str]:
    """Sentences of about args.sample_bytes of text from all inputs (module docstring)."""
    files = find_inputs(args.input, args.format)
    sizes = [os.path.getsize(p) for p, _ in files]
    total = sum(sizes)
    bad = _Skipper(args.skip_bad, stats)
    for (path, kind), size in zip(files, sizes):
        budget = min(args.sample_bytes * size // total, args.sample_bytes)
        if budget <= 0:
            continue
        for sentence in _file_sample(path, kind, budget, args, bad):
            n = len(sentence.encode("utf-8"))
            stats.bytes += n
            stats.sentences += 1
            stats.per_input[path] = stats.per_input.get(path, 0) + n
            yield sentence
