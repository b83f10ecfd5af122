"""The files of a run folder, opened without following symbolic links.

A run folder may come from elsewhere (copied, unpacked, handed over). A link planted where one of
its files belongs (run.lock, config.toml, metrics.jsonl, eval.jsonl, their temporaries, the demo
corpus) would make the run truncate, overwrite or append to the file it points to, outside the
folder. So every writer of the run folder opens its files here: never through a link
(`O_NOFOLLOW`), temporaries created exclusively (`O_EXCL`, a stale one removed first: removing a
link never touches its target), only regular files (a FIFO or a device is refused before it is
read or written), and a link where a file belongs is a RunFolderError naming it. The folders a run
writes files into (tb/, demo_data/, profile/, comm_traces/, and a checkpoint folder inside the run
folder) may not be links either. Step folders have their own rule (checkpoint/folders.py: a
linked-in step is read, and loses its link only, never what it points to).
"""

from __future__ import annotations

import errno
import os
import stat

from mobilellm_train.errors import RunFolderError

_LINK = ("is a symbolic link: a run never writes or reads its folder's files through a link (it could "
         "point outside the folder); remove it, or start in a new --job.dump_folder")
_NOT_A_FILE = "is not a regular file; a run keeps only regular files there (remove it)"


def _opener(path: str, flags: int) -> int:
    """os.open for `open(..., opener=)`: no link followed, nothing but a regular file kept open."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunFolderError(f"{path} {_LINK}") from None
        if e.errno in (errno.EISDIR, errno.ENXIO):  # a folder, or a FIFO nothing reads
            raise RunFolderError(f"{path} {_NOT_A_FILE}") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFolderError(f"{path} {_NOT_A_FILE}")
    os.set_blocking(fd, True)  # O_NONBLOCK only kept a FIFO from blocking the open
    return fd


def open_run_file(path: str, mode: str, **kwargs):
    """builtins.open for a file of the run folder, never through a link ("x" modes create it
    exclusively)."""
    return open(path, mode, opener=_opener, **kwargs)


def open_lock_file(path: str) -> int:
    """A descriptor open for reading and writing on `path`, created if missing, never a link."""
    return _opener(path, os.O_RDWR | os.O_CREAT)


def read_run_file(path: str) -> bytes | None:
    """The bytes of a run-folder file, None when it does not exist."""
    try:
        with open_run_file(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def fresh_temporary(path: str):
    """<path>.tmp created empty and exclusively, open for writing (binary): a stale one (a crash's
    leftover, or a planted link) is removed first, which never touches another file."""
    tmp = path + ".tmp"
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            raise RunFolderError(f"{tmp} is a folder where a temporary file belongs; remove it")
        os.unlink(tmp)
    return open_run_file(tmp, "xb")


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data` whole: written to a fresh <path>.tmp, then renamed over `path`
    (a rename replaces a link at `path` itself, never its target)."""
    with fresh_temporary(path) as f:
        try:
            f.write(data)
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def check_not_link(path: str) -> None:
    """Refuse a folder (or file) of the run folder that is a symbolic link."""
    if os.path.islink(path):
        raise RunFolderError(f"{path} {_LINK}")


def check_no_links_below(root: str, path: str) -> None:
    """Refuse a link in any folder from `root` (excluded) down to `path`, a folder inside it: the
    checkpoint folder, where saves write and retention deletes, must not lead out of the run folder
    (one elsewhere is named as such, by an absolute --checkpoint.folder)."""
    root, path = os.path.abspath(root), os.path.abspath(path)
    while path.startswith(root + os.sep):
        if os.path.islink(path):
            raise RunFolderError(f"{path} {_LINK}. To keep checkpoints on another disk, name the folder there "
                                 "with an absolute --checkpoint.folder")
        path = os.path.dirname(path)
