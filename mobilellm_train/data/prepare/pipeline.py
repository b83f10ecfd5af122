"""The run shared by encode and convert: check the output folder, skip finished units, run the
rest in worker processes with a progress line, then write the manifests.

A re-run skips the units with a record in ``<out>/.progress/``, so a killed (or Ctrl-C'd) run
loses only its units in flight, and their temporary files (``*.tmp.<pid>``) are deleted then or by
the next run. ``manifest.json`` is written last, after every unit, and the trainer reads no folder
without one. Which folders a run may write into (never a finished dataset of other inputs or
settings, unless --overwrite) is out_folder.py's. ``--skip-bad N`` allows up to N bad records over
the whole run, each logged; their count goes into the manifest.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import platform
import re
import sys
import threading
import time

import numpy as np

from mobilellm_train.data.budget import coverage_summary
from mobilellm_train.data.prepare.inputs import Unit
from mobilellm_train.data.prepare.layout import PROGRESS_DIR, VAL_DIR, unit_record_path
from mobilellm_train.data.prepare.out_folder import (
    check_out_folder,
    remove_tmp_files,
    remove_units_past,
    write_command,
)
from mobilellm_train.data.prepare.space import (
    byte_unit,
    format_bytes,
    full_disk_message,
    maybe_report_full_disk,
)
from mobilellm_train.data.prepare.worker import (
    init_worker,
    run_unit,
    run_unit_in_worker,
)
from mobilellm_train.data.shards import (
    MANIFEST_FILE,
    TOKENIZER_FILE,
    VERIFIED_FILE,
    ShardInfo,
    is_dataset,
    read_manifest,
    record_verification,
    verify_shards,
    write_file_atomic,
    write_manifest,
)
from mobilellm_train.errors import DataError

logger = logging.getLogger("mobilellm_train.prepare")

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


def _finished_record(out: str, unit: Unit) -> dict | None:
    """The record of a unit a previous run finished, if its files are all still there."""
    path = unit_record_path(out, unit.index)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    before = Unit.from_dict(record.get("unit"))
    if before != unit:
        # The input changed (or an earlier input did, shifting the units): this one is redone.
        kept = set(before.pieces) if before else set()
        changed = [p for p in unit.paths if not all(q in kept for q in unit.pieces if q.path == p)] or unit.paths
        logger.warning("%s: changed since an earlier run prepared shard %d from it; redoing that shard",
                       ", ".join(changed[:3]) + (f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""),
                       unit.index)
        os.remove(path)
        return None
    for folder, info in ((out, record["train"]), (os.path.join(out, VAL_DIR), record["val"])):
        if info and not all(os.path.isfile(os.path.join(folder, info["name"] + ext)) for ext in (".bin", ".idx")):
            return None
    return record


def _run_units(todo: list[Unit], settings: dict, workers: int, progress: Progress, counter, finished) -> str | None:
    """Run the units (in worker processes unless one is enough), handing each record to
    `finished`; stops at a full disk and returns what was being written then."""
    if workers <= 1 or len(todo) <= 1:
        init_worker(settings, counter)
        progress.start()
        try:
            for u in todo:
                rec = run_unit(u, settings)
                if "full_disk" in rec:
                    return rec["full_disk"]
                finished(rec)
        finally:
            progress.close()
        return None
    # The pool forks before the progress thread starts: no thread is copied into the workers.
    with mp.Pool(min(workers, len(todo)), initializer=init_worker, initargs=(settings, counter, True)) as pool:
        progress.start()
        try:
            for rec in pool.imap_unordered(run_unit_in_worker, [(u, settings) for u in todo]):
                if "full_disk" in rec:
                    return rec["full_disk"]
                finished(rec)
        finally:
            progress.close()
            pool.terminate()
            pool.join()
    return None


def run_prepare(units: list[Unit], settings: dict, workers: int, label: str, extra: dict,
                batch: tuple[int, int] | None = None, overwrite: bool = False) -> dict:
    """Encode every unfinished unit and write the manifests; returns a summary. `batch`
    (seq_len, global batch size) adds the windows and steps the data covers to the log;
    `overwrite` replaces a finished dataset of other inputs or settings (out_folder.py)."""
    out = settings["out"]
    check_out_folder(out, settings, units, overwrite)
    if not is_dataset(out):
        remove_units_past(out, len(units))
        write_command(out, extra.get("command_line", ""), len(units))
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
    earlier = set(records)  # units whose shards an earlier, interrupted run wrote and hashed
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
        for where, nbytes, parts in rec.get("split_documents", []):
            logger.warning("%s: a document of %s, cut into %d documents at line ends (--max-document-bytes %s)",
                           where, format_bytes(nbytes), parts, format_bytes(settings.get("max_document_bytes", 0)))
        skipped += rec["records_skipped"]
        if skipped > settings["skip_bad"]:
            raise DataError(
                f"{skipped} bad records skipped in all, more than --skip-bad {settings['skip_bad']} "
                f"(see the warnings above for where)"
            )

    begin = time.perf_counter()
    try:
        full_disk = _run_units(todo, settings, workers, progress, counter, finished)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (cli.main)
        remove_tmp_files(out)
        raise type(e)(f"{out}: {_units_on_disk(out)} of {len(units)} shards are finished and kept; rerunning "
                      "the same command resumes (it goes on with the rest)") from None
    except BaseException:
        remove_tmp_files(out)  # of the units in flight in other workers, stopped
        raise
    if full_disk:
        remove_tmp_files(out)
        done = _units_on_disk(out)
        raise DataError(full_disk_message(
            out, full_disk, f"run the same command again: the {done} of {len(units)} shards finished so far "
            f"are kept, and it goes on with the rest"))
    seconds = time.perf_counter() - begin
    if skipped > settings["skip_bad"]:  # all counted in finished units of earlier runs
        raise DataError(f"{out}: {skipped} bad records were skipped, more than --skip-bad {settings['skip_bad']}")

    ordered = [records[u.index] for u in units]
    summary = {}
    tokenizer = settings.get("tokenizer_info")
    if not any(r["train"] for r in ordered):
        raise DataError(f"{out}: the inputs gave no training documents")
    # val/ first: <out>/manifest.json, written last, says the whole folder is done.
    for split, folder in (("val", os.path.join(out, VAL_DIR)), ("train", out)):
        shards = [ShardInfo(**r[split]) for r in ordered if r[split]]
        if not shards:
            continue
        resumed = [i for i, r in enumerate(r for r in ordered if r[split]) if r["unit"]["index"] in earlier]
        then = f"run the same command again: every shard ({len(units)}) is finished and kept, it writes what is left"
        if settings.get("tokenizer"):
            with open(settings["tokenizer"], "rb") as f:
                model = f.read()
            with maybe_report_full_disk(os.path.join(folder, TOKENIZER_FILE), "the tokenizer's copy", then):
                write_file_atomic(os.path.join(folder, TOKENIZER_FILE), model)
        with maybe_report_full_disk(os.path.join(folder, MANIFEST_FILE), "the manifest", then):
            manifest = write_manifest(folder, shards, settings["dtype"], settings["vocab_size"], tokenizer, {
                "split": split,
                "records_skipped": sum(r["records_skipped"] for r in ordered),
                "empty_documents_dropped": sum(r["empty_documents"] for r in ordered),
                "sources": sorted({(p.path, p.file_bytes) for u in units for p in u.pieces}),
                "prepare": {**extra, "settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "python": platform.python_version(), "numpy": np.__version__},
            })
        _record_verification(folder, resumed)
        summary[split] = {k: manifest[k] for k in ("num_tokens", "num_documents", "max_token_id")}
        summary[split]["num_shards"] = len(shards)
    summary["seconds"] = round(seconds, 2)
    summary["records_skipped"] = skipped
    logger.info("%s: done in %.1f s: %s", out, seconds, json.dumps(summary))
    if batch is not None:
        logger.info("%s: %s", out, coverage_summary(summary["train"]["num_tokens"], *batch))
    return summary


def _units_on_disk(out: str) -> int:
    """Units finished so far, counted on disk: other workers may have finished one after an error."""
    return len([n for n in os.listdir(os.path.join(out, PROGRESS_DIR)) if re.fullmatch(r"unit-\d+\.json", n)])


def _record_verification(folder: str, resumed: list[int]) -> None:
    """Record that every shard of `folder` verified (verified.json), so training starts need not
    hash them: this run's workers hashed the shards they wrote; the shards an earlier, interrupted
    run wrote are hashed again now (they sat on disk since), so the record vouches for no byte
    nobody read. A record that cannot be written only costs later starts a hash."""
    manifest = read_manifest(folder)
    if resumed:
        verify_shards(manifest, resumed)
    try:
        record_verification(manifest, "hashed while writing")
    except OSError as e:
        logger.warning("%s: could not write %s (%s): training starts will hash the shards until "
                       "`mobilellm-prepare verify %s` records them", folder, VERIFIED_FILE, e, folder)
