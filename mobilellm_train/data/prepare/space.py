"""Sizes in words (`format_bytes`), and a full disk in words: every mobilellm-prepare command that
writes turns "No space left on device" (ENOSPC, or EDQUOT: a quota) into a DataError that says
what it was writing, where, how much room is left there and what to do; the temporary file it
was writing is deleted, what is complete is kept.

    with maybe_report_full_disk(path, "the manifest", "run the same command again: ..."):
        write_json_atomic(path, manifest)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

from mobilellm_train.errors import DataError

FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_full_disk(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS


def byte_unit(num_bytes: float) -> tuple[float, str]:
    """The decimal unit a byte count reads best in: (1e9, "GB") for 3.2e9, (1e3, "kB") for 4500."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if num_bytes >= scale:
            return scale, unit
    return 1.0, "B"


def format_bytes(num_bytes: float) -> str:
    """'15.3 MB', '2.10 GB', '512 B'."""
    scale, unit = byte_unit(num_bytes)
    return f"{num_bytes:.0f} B" if scale == 1.0 else f"{num_bytes / scale:.3g} {unit}"


def _disk_usage(path: str):
    """shutil.disk_usage of the disk that holds path (or its nearest existing folder); None if unknown."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder)
    except OSError:
        return None


def free_bytes(path: str) -> float:
    """Bytes free on the disk that holds path (infinite when that cannot be known)."""
    usage = _disk_usage(path)
    return float("inf") if usage is None else usage.free


def free_space(path: str) -> str:
    """'12.0 kB free of 2.10 MB' on the disk that holds path (or its nearest existing folder)."""
    usage = _disk_usage(path)
    if usage is None:
        return "free space unknown"
    return f"{format_bytes(usage.free)} free of {format_bytes(usage.total)}"


def full_disk_message(path: str, what: str, then: str, option: str = "--out") -> str:
    return (f"{path}: no space left on the device while writing {what} ({free_space(path)} there). "
            f"Free some space on that disk (or choose another {option}), then {then}")


def remove_quietly(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def maybe_report_full_disk(path: str, what: str, then: str, option: str = "--out"):
    """Inside: a full disk while writing `path` becomes a DataError (full_disk_message), and this
    process's temporary file of it (``<path>.tmp.<pid>``, see shards.write_file_atomic) is deleted."""
    try:
        yield
    except OSError as e:
        if not is_full_disk(e):
            raise
        remove_quietly(f"{path}.tmp.{os.getpid()}")
        raise DataError(full_disk_message(path, what, then, option)) from None
