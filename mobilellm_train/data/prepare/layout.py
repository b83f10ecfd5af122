"""Where mobilellm-prepare puts things in its output folder, besides the shards and manifest.json
(data/shards.py): the held-out documents in ``<out>/val/``, the bookkeeping of a resumable run in
``<out>/.progress/`` (its settings, the command that made it, one record per finished unit); and
how a folder whose run has not finished is named to whoever tries to train on it."""

from __future__ import annotations

import json
import os
import re

PROGRESS_DIR = ".progress"
VAL_DIR = "val"
SETTINGS_FILE = "settings.json"
COMMAND_FILE = "command.json"


def unit_record_path(out: str, index: int) -> str:
    return os.path.join(out, PROGRESS_DIR, f"unit-{index:05d}.json")


def unfinished_message(folder: str) -> str:
    """"" unless `folder` (or, for its val/, the folder above) is a mobilellm-prepare output whose
    run has not finished: then what it is and the command that finishes it. Reads only JSON."""
    folder = os.path.normpath(folder)
    if os.path.basename(folder) == VAL_DIR and not os.path.isdir(os.path.join(folder, PROGRESS_DIR)):
        parent = os.path.dirname(folder)
        return unfinished_message(parent) if os.path.isdir(os.path.join(parent, PROGRESS_DIR)) else ""
    progress = os.path.join(folder, PROGRESS_DIR)
    finished = os.path.isfile(os.path.join(folder, "manifest.json"))
    if finished or not os.path.isfile(os.path.join(progress, SETTINGS_FILE)):
        return ""
    done = sum(1 for n in os.listdir(progress) if re.fullmatch(r"unit-\d+\.json", n))
    try:
        with open(os.path.join(progress, COMMAND_FILE)) as f:
            command = json.load(f)
    except (OSError, ValueError):
        command = {}
    command = command if isinstance(command, dict) else {}
    total, line, cwd = command.get("units"), command.get("command_line"), command.get("cwd")
    shards = f"{done} of {total} shards" if isinstance(total, int) else f"{done} shards"
    if isinstance(line, str) and line:
        where = f" in {cwd}" if isinstance(cwd, str) and cwd and cwd != os.getcwd() else ""
        how = f"run the command that made it again{where}: {line}"
    else:
        how = "run the mobilellm-prepare command that made it again"
    return (f"{folder} is an unfinished mobilellm-prepare output: preparing it was interrupted ({shards} "
            f"finished, no manifest.json yet). To finish it, {how} (it goes on where it stopped)")
