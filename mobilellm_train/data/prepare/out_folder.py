"""The output folder of encode and convert, and what a run may do to it.

A run writes into a new (or empty) folder, resumes an unfinished one of its own (same settings;
the units of an input that changed since are redone), or finds a finished one made from the same
inputs and settings (nothing to do). A finished dataset made from other inputs, another tokenizer
or other settings is refused, naming what differs: its bytes stay as they are, and the ways on are
another --out or --overwrite, which removes the earlier dataset's files first (never a file of
another name). A folder that is not a mobilellm-prepare output is never written into.
`unlisted_files` names what a dataset folder holds besides what its manifest lists (verify
reports them).
"""

from __future__ import annotations

import json
import logging
import os
import re

from mobilellm_train.data.prepare.inputs import Unit
from mobilellm_train.data.prepare.layout import COMMAND_FILE, PROGRESS_DIR, SETTINGS_FILE, VAL_DIR
from mobilellm_train.data.prepare.space import format_bytes, maybe_report_full_disk, remove_quietly
from mobilellm_train.data.shards import (
    MANIFEST_FILE,
    TOKENIZER_FILE,
    VERIFIED_FILE,
    Manifest,
    is_dataset,
    read_manifest,
    write_json_atomic,
)
from mobilellm_train.errors import DataError

logger = logging.getLogger("mobilellm_train.prepare")

# What a killed or failed run leaves (shards.write_file_atomic and ShardWriter write <name>.tmp.<pid>).
TMP_NAME = re.compile(r"^(shard-\d+\.(bin|idx)|unit-\d+\.json|settings\.json|command\.json|manifest\.json|"
                      r"tokenizer\.model)\.tmp\.\d+$")
# The files of a prepared folder (and of its val/): what --overwrite removes.
_DATASET_FILE = re.compile(r"^(shard-\d+\.(bin|idx)|manifest\.json|verified\.json|tokenizer\.model)$")
_PROGRESS_FILE = re.compile(r"^(unit-\d+\.json|settings\.json|command\.json)$")
_SHARD_FILE = re.compile(r"^shard-(\d+)\.(bin|idx)$")
_UNIT_RECORD = re.compile(r"^unit-(\d+)\.json$")
_SHOWN = 3  # names shown of a list of files


def check_out_folder(out: str, settings: dict, units: list[Unit], overwrite: bool) -> None:
    """Refuse a folder that is not ours, or a finished dataset or unfinished run of other inputs
    or settings (module docstring); with `overwrite`, remove an earlier dataset of ours first.
    Then clear temporary files and record this run's settings."""
    settings_file = os.path.join(out, PROGRESS_DIR, SETTINGS_FILE)
    ours = os.path.isfile(settings_file) or is_dataset(out)
    if os.path.isdir(out) and os.listdir(out) and not ours:
        raise DataError(f"{out}: exists, is not empty and is not a mobilellm-prepare output; choose a new --out")
    if overwrite and ours:
        remove_earlier_output(out)
    elif is_dataset(out) and not os.path.isfile(settings_file):
        raise DataError(
            f"{out}: a finished dataset without mobilellm-prepare's bookkeeping ({PROGRESS_DIR}/: made by another "
            f"tool or removed since), so what it was made from is unknown; it is left as it is. Choose another "
            f"--out, or pass --overwrite to replace it ({_dataset_in_words(read_manifest(out))} are removed first)"
        )
    elif os.path.isfile(settings_file):
        _check_earlier_run(out, settings_file, settings, units)
    remove_tmp_files(out)
    with maybe_report_full_disk(settings_file, "the run's settings", "run the same command again"):
        os.makedirs(os.path.dirname(settings_file), exist_ok=True)
        write_json_atomic(settings_file, settings)


def _check_earlier_run(out: str, settings_file: str, settings: dict, units: list[Unit]) -> None:
    with open(settings_file) as f:
        saved = json.load(f)
    diff = settings_differences(saved, settings)
    finished = _unit_records(out)
    if is_dataset(out):
        inputs = input_differences(list(finished.values()), units)
        if diff or inputs:
            what = " and ".join(filter(None, [
                f"with other settings ({diff})" if diff else "", f"from other inputs ({inputs})" if inputs else ""]))
            raise DataError(
                f"{out}: a finished dataset ({_dataset_in_words(read_manifest(out))}), prepared earlier {what}; it "
                "is left as it is. Choose another --out for this data, or pass --overwrite to replace it (its "
                "files are removed first)"
            )
    elif diff and not finished:
        # An earlier run that finished no shard (it failed on its first records, say) pins nothing.
        logger.info("%s: an earlier run with other settings finished no shard; starting afresh", out)
    elif diff:
        raise DataError(
            f"{out}: prepared earlier with other settings ({diff}); rerun with the same ones to finish it, "
            "choose a new --out, or pass --overwrite to start it afresh"
        )


def settings_differences(saved: dict, settings: dict) -> str:
    """What differs between an earlier run's settings and these, in words ("" when nothing).
    Where the output and the tokenizer lie may change, what they are (the sha256) may not; the
    skip budget changes no finished shard; a setting an older version did not record is not
    compared."""
    keys = sorted((set(saved) & set(settings)) - {"out", "tokenizer", "skip_bad"})
    parts = []
    for key in keys:
        then, now = saved.get(key), settings.get(key)
        if then == now:
            continue
        if key == "tokenizer_info" and isinstance(then, dict) and isinstance(now, dict):
            parts.append(f"tokenizer: {_tokenizer_in_words(then)} then, {_tokenizer_in_words(now)} now")
        else:
            parts.append(f"{key}: {then!r} then, {now!r} now")
    return "; ".join(parts)


def _tokenizer_in_words(info: dict) -> str:
    return f"{info.get('vocab_size')} pieces, sha256 {str(info.get('sha256'))[:12]}..."


def input_differences(before: list[Unit | None], units: list[Unit]) -> str:
    """How the planned units differ from an earlier run's, in words ("" when they are the same):
    files added, no longer given, or of another size."""
    if before == units:
        return ""
    if None in before:
        return "recorded by an older mobilellm-prepare in a form that cannot be compared"
    old = {p.path: p.file_bytes for u in before if u is not None for p in u.pieces}
    new = {p.path: p.file_bytes for u in units for p in u.pieces}
    parts = []
    added, gone = [p for p in new if p not in old], [p for p in old if p not in new]
    changed = [f"{p}: {old[p]:,} bytes then, {new[p]:,} now" for p in new if p in old and old[p] != new[p]]
    for what, names in (("added", added), ("no longer given", gone), ("changed size", changed)):
        if names:
            more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
            parts.append(f"{len(names)} {'file' if len(names) == 1 else 'files'} {what}: "
                         f"{', '.join(names[:_SHOWN])}{more}")
    return "; ".join(parts) or "the same files, in another order or cut into other shards"


def _unit_records(out: str) -> dict[int, Unit | None]:
    """The units an earlier run finished (None for a record of another form), by index."""
    folder = os.path.join(out, PROGRESS_DIR)
    records = {}
    for name in sorted(os.listdir(folder)):
        m = _UNIT_RECORD.match(name)
        if m:
            with open(os.path.join(folder, name)) as f:
                records[int(m.group(1))] = Unit.from_dict(json.load(f).get("unit"))
    return dict(sorted(records.items()))


def _dataset_in_words(manifest: Manifest) -> str:
    return f"{len(manifest.shards)} shards, {manifest.num_tokens:,} tokens"


def remove_earlier_output(out: str) -> None:
    """--overwrite: delete the files of an earlier dataset of ours (shards, manifests, tokenizer
    copy, bookkeeping, in <out> and <out>/val); files of other names are left."""
    shards, nbytes = {}, 0
    for folder, pattern in ((out, _DATASET_FILE), (os.path.join(out, VAL_DIR), _DATASET_FILE),
                            (os.path.join(out, PROGRESS_DIR), _PROGRESS_FILE)):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if (pattern.match(name) or TMP_NAME.match(name)) and os.path.isfile(path) and not os.path.islink(path):
                nbytes += os.path.getsize(path)
                shards[folder] = shards.get(folder, 0) + bool(_SHARD_FILE.match(name) and name.endswith(".bin"))
                os.remove(path)
        if folder != out and not os.listdir(folder):
            os.rmdir(folder)
    logger.warning("%s: --overwrite: removed the earlier dataset (%d shards, %d in %s/; %s in all)", out,
                   shards.get(out, 0), shards.get(os.path.join(out, VAL_DIR), 0), VAL_DIR, format_bytes(nbytes))


def remove_tmp_files(out: str) -> None:
    """Delete the temporary files of killed or failed runs (never a finished file)."""
    for folder in (out, os.path.join(out, VAL_DIR), os.path.join(out, PROGRESS_DIR)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if TMP_NAME.match(name):
                    remove_quietly(os.path.join(folder, name))


def remove_units_past(out: str, count: int) -> None:
    """An unfinished run resumed with fewer units than before: the records and shards of the
    units past the plan would be orphans beside the new manifest."""
    stale = []
    for folder, pattern in ((out, _SHARD_FILE), (os.path.join(out, VAL_DIR), _SHARD_FILE),
                            (os.path.join(out, PROGRESS_DIR), _UNIT_RECORD)):
        if os.path.isdir(folder):
            stale += [os.path.join(folder, n) for n in os.listdir(folder)
                      if (m := pattern.match(n)) and int(m.group(1)) >= count]
    if stale:
        logger.warning("%s: the inputs now make %d shards; removing the %d files an earlier run wrote past them",
                       out, count, len(stale))
        remove_quietly(*stale)


def write_command(out: str, command_line: str, units: int) -> None:
    """Record the command of this run (and its folder) for the message that names an unfinished
    folder at training start (layout.unfinished_message)."""
    if command_line:
        write_json_atomic(os.path.join(out, PROGRESS_DIR, COMMAND_FILE),
                          {"command_line": command_line, "cwd": os.getcwd(), "units": units})


def unlisted_files(folder: str, manifest: Manifest, top: bool) -> list[str]:
    """The files of a dataset folder its manifest does not list (shards an earlier dataset left,
    anything else put there): not part of the dataset. `top`: <out> itself, whose val/ and
    .progress/ belong to it."""
    listed = {s.name + ext for s in manifest.shards for ext in (".bin", ".idx")}
    listed |= {MANIFEST_FILE, VERIFIED_FILE, TOKENIZER_FILE}
    if top:
        listed |= {VAL_DIR, PROGRESS_DIR}
    return sorted(n for n in os.listdir(folder) if n not in listed)
