"""The run shared by encode and convert: check the output folder, skip finished units, run the
rest in worker processes with a progress line, then write the manifests.

A re-run skips the units with a record in ``<out>/.progress/``, so a killed run loses only its
units in flight, and their temporary files (``*.tmp.<pid>``) are deleted by the next run.
``manifest.json`` is written last, after every unit, and the trainer reads no folder without one.
A re-run with other settings (tokenizer, text field, BOS/EOS, ...) into the same folder is refused,
naming what differs; the units of an input file that changed since (its size, or the units before
it) are redone, with a warning. ``--skip-bad N`` allows up to N bad records over the whole run,
each logged; their count goes into the manifest.
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
from mobilellm_train.data.prepare.space import (
    byte_unit,
    format_bytes,
    full_disk_message,
    maybe_report_full_disk,
    remove_quietly,
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
    write_json_atomic,
    write_manifest,
)
from mobilellm_train.errors import DataError

logger = logging.getLogger("mobilellm_train.prepare")

# What a killed or failed run leaves (shards.write_file_atomic and ShardWriter write <name>.tmp.<pid>).
_TMP_NAME = re.compile(r"^(shard-\d+\.(bin|idx)|unit-\d+\.json|settings\.json|manifest\.json|tokenizer\.model)"
                       r"\.tmp\.\d+$")


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
    _remove_tmp_files(out)
    with maybe_report_full_disk(settings_file, "the run's settings", "run the same command again"):
        os.makedirs(progress, exist_ok=True)
        write_json_atomic(settings_file, settings)


def _remove_tmp_files(out: str) -> None:
    """Delete the temporary files of killed or failed runs (never a finished file)."""
    for folder in (out, os.path.join(out, VAL_DIR), os.path.join(out, PROGRESS_DIR)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if _TMP_NAME.match(name):
                    remove_quietly(os.path.join(folder, name))


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
    with mp.Pool(min(workers, len(todo)), initializer=init_worker, initargs=(settings, counter)) as pool:
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
                batch: tuple[int, int] | None = None) -> dict:
    """Encode every unfinished unit and write the manifests; returns a summary. `batch`
    (seq_len, global batch size) adds the windows and steps the data covers to the log."""
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
        skipped += rec["records_skipped"]
        if skipped > settings["skip_bad"]:
            raise DataError(
                f"{skipped} bad records skipped in all, more than --skip-bad {settings['skip_bad']} "
                f"(see the warnings above for where)"
            )

    begin = time.perf_counter()
    try:
        full_disk = _run_units(todo, settings, workers, progress, counter, finished)
    except BaseException:
        _remove_tmp_files(out)  # of the units in flight in other workers, stopped
        raise
    if full_disk:
        _remove_tmp_files(out)
        # Counted on disk: other workers may have finished a shard after this one failed.
        done = len([n for n in os.listdir(os.path.join(out, PROGRESS_DIR)) if re.fullmatch(r"unit-\d+\.json", n)])
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
