"""One unit in a worker process of mobilellm-prepare: records -> documents -> shard files -> record file.

Unit i becomes ``<out>/shard-<i>`` (and ``<out>/val/shard-<i>``, its held-out documents); the shard
files are renamed into place when complete and the unit's record ``.progress/unit-<i>.json`` is
written after them. encode turns text into token ids with the SentencePiece model each worker loads
once (`init_worker`); convert cuts token-id lines into documents at line ends or at each EOS.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np

from mobilellm_train.data.prepare.inputs import (
    BadRecord,
    LineCounter,
    Unit,
    record_place,
    piece_records,
)
from mobilellm_train.data.prepare.layout import VAL_DIR, unit_record_path
from mobilellm_train.data.prepare.space import is_full_disk, remove_quietly
from mobilellm_train.data.shards import ShardInfo, ShardWriter, write_json_atomic
from mobilellm_train.errors import DataError

_ENCODE_BATCH_BYTES = 4 << 20
_PROGRESS_EVERY_BYTES = 1 << 20
_MAX_SKIP_EXAMPLES = 20

# Per process, set by init_worker: loaded once, not sent with every unit.
_worker: dict = {}


def init_worker(settings: dict, counter, in_pool: bool = False) -> None:
    if in_pool:
        # Ctrl-C reaches every process of the terminal's group: the main process stops the pool
        # and reports; a worker's own KeyboardInterrupt would only print a traceback. SIGTERM is
        # how the pool ends its workers: the handler the main process set (cli.main) is undone.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
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


def run_unit(unit: Unit, s: dict) -> dict:
    """Encode one unit into <out>/shard-<i> (and <out>/val/shard-<i>); returns its record, or
    {"full_disk": what it was writing} when the disk filled up (its temporary files deleted)."""
    name = f"shard-{unit.index:05d}"
    try:
        return _run_unit(unit, s, name)
    except OSError as e:
        if not is_full_disk(e):
            raise
        # ShardWriter deletes its files on an error unless closing them fails too: made sure here.
        tmp = f".tmp.{os.getpid()}"
        folders = (s["out"], os.path.join(s["out"], VAL_DIR))
        remove_quietly(*(os.path.join(d, name + ext + tmp) for d in folders for ext in (".bin", ".idx")),
                       unit_record_path(s["out"], unit.index) + tmp)
        return {"full_disk": f"shard {name}"}


def _run_unit(unit: Unit, s: dict, name: str) -> dict:
    out = s["out"]
    val_rng = np.random.default_rng([s["seed"], unit.index])
    val_fraction = 1.0 if unit.split == "val" else s["val_fraction"]
    skipped, skip_examples, empty = 0, [], 0
    pending_bytes = 0
    texts: list[str] = []
    text_bytes = 0
    carry = np.zeros(0, dtype=np.int64)  # eos-split documents continue across lines
    eos_id = s.get("eos_id")
    split: list[list] = []  # [where, bytes, documents] of each document cut in parts
    reported = 0  # input bytes counted into the progress line

    def add_progress(nbytes: int) -> None:
        # Never past the unit's planned bytes: Parquet's per-row bytes are estimates.
        nonlocal reported
        nbytes = min(nbytes, unit.input_bytes - reported)
        if nbytes > 0:
            _add_progress(nbytes)
            reported += nbytes

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

        for piece, lines, value, key, nbytes in _unit_records(unit, s):
            if piece is None:  # the end of a piece (an input file, or a part of one) ends its last document
                if carry.size:
                    emit(carry)
                    carry = carry[:0]
                continue
            pending_bytes += nbytes
            if pending_bytes >= _PROGRESS_EVERY_BYTES:
                add_progress(pending_bytes)
                pending_bytes = 0
            if isinstance(value, BadRecord):
                where = f"{record_place(piece, key, lines)}: {value}"
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
                parts = split_document(value, s.get("max_document_bytes", 0))
                if len(parts) > 1:
                    split.append([record_place(piece, key, lines), len(value.encode("utf-8")), len(parts)])
                for part in parts:
                    texts.append(part)
                    text_bytes += len(part)
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
        add_progress(unit.input_bytes)  # the rest: the unit counts exactly its planned bytes
        record = {
            "unit": unit.to_dict(),
            "train": _info_dict(train.finish()),
            "val": _info_dict(val.finish()),
            "records_skipped": skipped,
            "skip_examples": skip_examples,
            "empty_documents": empty,
            "split_documents": split,
        }
    write_json_atomic(unit_record_path(out, unit.index), record)
    return record


def split_document(text: str, max_bytes: int) -> list[str]:
    """`text` cut into documents of at most `max_bytes` of UTF-8 (0: never cut), at line ends
    where it has them, else before a space. SentencePiece's memory grows with the text it encodes
    at once (docs/DATA.md): one document of tens of MB would take gigabytes."""
    if not max_bytes or len(text) <= max_bytes // 4:
        return [text]
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return [text]
    parts, start = [], 0
    while len(data) - start > max_bytes:
        stop = start + max_bytes
        cut = data.rfind(b"\n", start, stop) + 1  # after a line end
        if cut <= start:
            cut = data.rfind(b" ", start + 1, stop)  # a space starts the next word's piece
        if cut <= start:
            cut = stop
            while data[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
                cut -= 1
        parts.append(data[start:cut].decode("utf-8"))
        start = cut
    parts.append(data[start:].decode("utf-8"))
    return parts


def _unit_records(unit: Unit, s: dict):
    """(piece, its line counter, value, key, bytes) for each record of each piece of the unit, then
    (None, None, None, None, 0) at the end of each piece."""
    for piece in unit.pieces:
        lines = LineCounter(piece.path, piece.start if piece.stop >= 0 else 0)
        for value, key, nbytes in piece_records(piece, s):
            yield piece, lines, value, key, nbytes
        yield None, None, None, None, 0


def _info_dict(info: ShardInfo | None) -> dict | None:
    return None if info is None else dataclasses.asdict(info)


def run_unit_in_worker(args: tuple[Unit, dict]) -> dict:
    return run_unit(*args)
