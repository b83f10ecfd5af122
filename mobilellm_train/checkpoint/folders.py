"""Step folders on disk: naming, completeness, listing, deletion and retention.

A checkpoint is the folder <checkpoint folder>/step-<N>/; it is complete once DCP has written its
`.metadata` (after every rank's shards are on disk), and folders without it are never loaded.
Everything that lists, deletes or renames step folders is here, so how the run folder is
treated (retention, unreadable folders, replacing an old save) can be read and changed in one
place, apart from what the files inside hold.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from mobilellm_train.errors import CheckpointError

logger = logging.getLogger("mobilellm_train")

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def folder_state(path: str) -> str:
    """'complete', 'incomplete' or 'unreadable' (listing it fails: permissions)."""
    try:
        names = os.listdir(path)
    except PermissionError:
        return "unreadable"
    except FileNotFoundError:  # removed meanwhile
        return "incomplete"
    return "complete" if ".metadata" in names else "incomplete"


def scan_checkpoints(folder: str) -> tuple[list[int], list[int], list[int]]:
    """(complete, incomplete, unreadable) steps found in `folder`, each sorted ascending."""
    found: dict[str, list[int]] = {"complete": [], "incomplete": [], "unreadable": []}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = _STEP_DIR.match(name)
            if m:
                found[folder_state(os.path.join(folder, name))].append(int(m.group(1)))
    return sorted(found["complete"]), sorted(found["incomplete"]), sorted(found["unreadable"])


def list_checkpoints(folder: str) -> tuple[list[int], list[int]]:
    """(complete steps, incomplete steps) found in `folder`, each sorted ascending; unreadable
    step folders are in neither."""
    complete, incomplete, _ = scan_checkpoints(folder)
    return complete, incomplete


def permission_error(path: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: permission denied. This checkpoint folder cannot be read, so it is neither loaded "
        "nor deleted; fix its permissions (chmod -R u+rwX) or move it out of the checkpoint folder, "
        "then rerun."
    )


def delete_step_folder(path: str) -> None:
    """Delete a step folder, unmarked first: no crash in between leaves a "complete" half (or a
    "complete" mix of two saves). Raises OSError; the callers decide what a failure means."""
    if is_complete(path):
        os.remove(os.path.join(path, ".metadata"))
    shutil.rmtree(path)


def apply_retention(folder: str, keep_latest_k: int, protected_step: int | None) -> None:
    """Delete the oldest complete checkpoints beyond keep_latest_k (0 keeps all). Called only after
    a save completed, so the newest complete checkpoint is always kept and none is in flight; the
    step being loaded (`protected_step`) and unreadable folders are never deleted."""
    if keep_latest_k == 0:
        return
    complete, _ = list_checkpoints(folder)
    for step in complete[:-keep_latest_k]:
        if step == protected_step:
            continue
        path = step_path(folder, step)
        try:
            delete_step_folder(path)
        except OSError as e:
            logger.warning("retention could not delete %s: %s", path, e)


def corrupt_destination(path: str) -> str:
    """Where a step folder that fails verification is moved: step-<N>.corrupt, .corrupt2, ...
    (kept for inspection, out of the way of retention and of saves that reach its step again)."""
    moved = base = path + ".corrupt"
    n = 1
    while os.path.exists(moved):
        n += 1
        moved = f"{base}{n}"
    return moved
