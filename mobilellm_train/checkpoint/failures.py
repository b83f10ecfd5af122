"""Failed checkpoint saves and loads in words.

DCP reports a failure as a CheckpointException holding each rank's exception, often several
layers of chaining deep; a user needs the one root cause (a full disk, a permission) and what
is kept. Separate from the save and load code so those read as the happy path, and so the
messages for every failure are written in one place.
"""

from __future__ import annotations

import errno
import os
import shutil

from torch.distributed.checkpoint.api import CheckpointException

from mobilellm_train.checkpoint.folders import list_checkpoints
from mobilellm_train.errors import CheckpointError


def save_failed_error(error: BaseException, step: int, path: str, folder: str) -> CheckpointError:
    """The error that stops a run whose save of `step` to `path` failed: the cause, what is kept
    and how to resume."""
    older = [s for s in list_checkpoints(folder)[0] if s != step]
    return CheckpointError(
        f"saving the checkpoint of step {step} to {path} failed: {describe_save_failure(error, path)}. "
        f"Every older checkpoint is kept ({', '.join(map(str, older)) or 'none yet'}); the incomplete {path} "
        "is never loaded. Fix the cause, then rerun the same command to resume"
        + (f" from step {older[-1]}." if older else ".")
    )


def describe_save_failure(error: BaseException, path: str) -> str:
    """The cause of a failed save in words: the first OS error found in DCP's per-rank failures
    and exception chains, with ENOSPC and friends spelled out."""
    causes, seen = [], set()
    stack = [error]
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        causes.append(e)
        if isinstance(e, CheckpointException):
            for rank, failure in sorted(e.failures.items()):
                exc = failure[0] if isinstance(failure, tuple) else failure
                if exc is not None:
                    exc._failed_rank = rank  # noqa: SLF001  (for the message only)
                    stack.append(exc)
        stack += [e.__cause__, e.__context__]
    root = next((c for c in causes if isinstance(c, OSError) and c.errno), None)
    if root is None:
        root = next((c for c in causes if not isinstance(c, CheckpointException)), error)
    rank = getattr(root, "_failed_rank", None)
    where = f" on rank {rank}" if rank is not None else ""
    if isinstance(root, OSError) and root.errno:
        return f"{os.strerror(root.errno)}{where} ({type(root).__name__}: {root})"
    text = f"{type(root).__name__}{where}: {str(root).strip()[:500]}"
    # torch's zip writer loses errno ("unexpected pos", "file write failed"): a full file
    # system is the usual cause, so look.
    try:
        usage = shutil.disk_usage(os.path.dirname(path.rstrip("/")) or ".")
    except OSError:
        return text
    if usage.free < max(64 << 20, usage.total // 200):
        return (f"{os.strerror(errno.ENOSPC)}{where}: the file system holding {path} has {usage.free:,} bytes "
                f"free ({text})")
    return text


def find_checkpoint_error(error: BaseException) -> CheckpointError | None:
    """A CheckpointError of ours (e.g. a refused value) that DCP wrapped into a CheckpointException."""
    if isinstance(error, CheckpointError):
        return error
    if isinstance(error, CheckpointException):
        for failure in error.failures.values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            found = find_checkpoint_error(exc) if exc is not None else None
            if found is not None:
                return found
    for nested in (error.__cause__, error.__context__):
        if nested is not None and nested is not error:
            found = find_checkpoint_error(nested)
            if found is not None:
                return found
    return None
