"""Where mobilellm-prepare puts things in its output folder, besides the shards and manifest.json
(data/shards.py): the held-out documents in ``<out>/val/``, the bookkeeping of a resumable run in
``<out>/.progress/`` (its settings, one record per finished unit)."""

from __future__ import annotations

import os

PROGRESS_DIR = ".progress"
VAL_DIR = "val"


def unit_record_path(out: str, index: int) -> str:
    return os.path.join(out, PROGRESS_DIR, f"unit-{index:05d}.json")
