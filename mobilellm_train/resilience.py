"""What keeps a multi-day run alive: clean stops on preemption, communication timeouts, the
NCCL flight recorder, and a loss-spike detector.

A stop request (SIGTERM, SIGINT, SIGUSR1, or a stop file appearing) only sets a flag; every
`job.stop_check_freq` steps the ranks agree on it with one tiny all-reduce, so that every rank
saves the same step and exits together instead of one rank leaving the others in a collective. A second Ctrl-C aborts
at once. A rank also never outlives the process that started it (`exit_with_parent`), and one run
folder holds one run at a time (`RunFolderLock`).
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import datetime
import errno
import logging
import os
import signal
import socket
import stat
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from mobilellm_train.config import CommConfig
from mobilellm_train.errors import ConfigError, RunFolderError
from mobilellm_train.run_files import check_not_link, open_lock_file

logger = logging.getLogger("mobilellm_train")


def set_flight_recorder_env(cfg: CommConfig, dump_folder: str) -> None:
    """The flight recorder is configured by environment variables read when NCCL starts, so this
    runs before init_process_group."""
    if cfg.trace_buf_size <= 0:
        return
    trace_dir = os.path.join(os.path.abspath(dump_folder), "comm_traces")
    check_not_link(trace_dir)  # NCCL writes its dumps inside, and follows links there
    os.makedirs(trace_dir, exist_ok=True)
    for name in os.listdir(trace_dir):
        check_not_link(os.path.join(trace_dir, name))
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", str(cfg.trace_buf_size))
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", os.path.join(trace_dir, "rank_"))


def set_train_timeout(cfg: CommConfig) -> None:
    """Shorten the collective timeout once start-up (compile, checkpoint load) is behind us, so a
    hung or dead rank ends the job in minutes rather than after the long start-up timeout.

    On every process group this rank is in, not only the default one: the device mesh's groups
    (HSDP's shard and replicate groups) carry their own timeout, which would otherwise stay at
    the start-up value."""
    timeout = datetime.timedelta(seconds=cfg.train_timeout_seconds)
    groups = [g for g in distributed_c10d._world.pg_map if not distributed_c10d._rank_not_in_group(g)]
    for group in groups:
        distributed_c10d._set_pg_timeout(timeout, group)
    logger.info("collective timeout now %ds on %d process group(s)", cfg.train_timeout_seconds, len(groups))


class StopRequest:
    """Set by SIGTERM/SIGINT/SIGUSR1 or by `stop_file` appearing; `agreed()` makes it every rank's."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    # A launcher may pass one Ctrl-C on to a rank that the terminal already told: only a SIGINT
    # this long after the first counts as the second, aborting one.
    SECOND_INTERRUPT_AFTER_S = 1.0
    clock = staticmethod(time.monotonic)  # tests replace it: what counts is the order, not the speed

    def __init__(self, stop_file: str = ""):
        self.stop_file = stop_file
        self.reason = ""
        # What the first Ctrl-C says happens next; the training loop names the step (loop/stops.py).
        self.interrupt_note = "saving at the next stop check"
        self._first_interrupt: float | None = None
        # A CPU gloo group: agreeing costs no GPU sync and never queues behind GPU work.
        self.pg = dist.new_group(backend="gloo")
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        now = self.clock()
        if signum == signal.SIGINT:
            if self._first_interrupt is not None and now - self._first_interrupt > self.SECOND_INTERRUPT_AFTER_S:
                # The user asked twice: no save, no cleanup that could wait on other ranks.
                os.write(2, b"second interrupt: aborting without saving; the last checkpoint is what remains\n")
                os._exit(130)
            if self._first_interrupt is None:
                self._first_interrupt = now
                os.write(2, f"interrupt: {self.interrupt_note} (Ctrl-C again to abort without saving)\n".encode())
        # Only a flag: saving from inside a signal handler could interrupt a collective.
        if not self.reason:
            self.reason = f"received {signal.Signals(signum).name}"

    def agreed(self) -> bool:
        """True on every rank if any rank was asked to stop. A collective: all ranks call it."""
        if not self.reason and self.stop_file and os.path.exists(self.stop_file):
            self.reason = f"stop file {self.stop_file} exists"
        flag = torch.tensor([1 if self.reason else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.pg)
        if flag.item() and not self.reason:
            self.reason = "another rank was asked to stop"
        return bool(flag.item())

    def restore(self) -> None:
        """Called once the last checkpoint is complete: the run is shutting down, and a stop signal
        from here on must not turn a finished run into a failed one. The previous handlers would
        let Ctrl-C raise KeyboardInterrupt in the middle of the shutdown (or kill the process
        outright once Python resets its handlers at exit), and torchrun would then report the rank
        FAILED. Instead a first signal is noted and the shutdown goes on to exit 0; a second Ctrl-C
        (as in training, more than a second after the first) exits 0 at once."""
        self._first_interrupt = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal_while_shutting_down)
        # Python resets its handlers to the default action before it exits; past the atexit
        # hooks nothing is left to stop, so the signals are ignored there instead.
        atexit.register(_ignore_stop_signals_at_exit)

    def _on_signal_while_shutting_down(self, signum, frame) -> None:
        now = self.clock()
        if self._first_interrupt is None:
            self._first_interrupt = now
            os.write(2, b"stop requested while shutting down: the last checkpoint is complete; finishing\n")
        elif signum == signal.SIGINT and now - self._first_interrupt > self.SECOND_INTERRUPT_AFTER_S:
            os.write(2, b"second interrupt: exiting now; the last checkpoint is complete\n")
            os._exit(0)


def _ignore_stop_signals_at_exit() -> None:
    for sig in StopRequest.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class SpikeDetector:
    """Flags a loss above `threshold` x the mean of the last `window` losses (once it has seen
    `window` of them)."""

    def __init__(self, threshold: float, window: int):
        self.threshold = threshold
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def is_spike(self, loss: float) -> tuple[bool, float]:
        """(is it a spike, the mean it was compared with). A spike is not added to the window."""
        if len(self.recent) < self.recent.maxlen:
            self.recent.append(loss)
            return False, float("nan")
        mean = sum(self.recent) / len(self.recent)
        if loss > self.threshold * mean:
            return True, mean
        self.recent.append(loss)
        return False, mean

    def reset(self) -> None:
        self.recent.clear()


# Set by mobilellm_train.launch to its own process id: the parent its ranks must outlive.
LAUNCHER_PID_ENV = "MOBILELLM_LAUNCHER_PID"


def exit_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux; elsewhere nothing).

    Under torchrun a rank's parent is torchrun's agent. If that is killed (even by kill -9),
    SIGTERM makes the rank save at the next step and exit like any other stop, instead of
    training on unsupervised beside a restarted run (under slurm's proctrack/linuxproc an orphan
    is not even part of the job any more). The signal is tied to the parent *thread*: torchrun
    starts its ranks from its main thread, so that lives as long as torchrun does.

    The kernel signals only a parent death that happens after this call, and a rank gets here
    only after Python and torch have started (seconds, more on a busy machine): a launcher that
    died before then has already handed the rank to init, and the rank would train on. So the
    parent is checked after the call against the launcher's pid, which mobilellm_train.launch
    passes in MOBILELLM_LAUNCHER_PID (under plain torchrun, against the parent seen on entry).
    Only under torchrun: a plain run's parent is a shell, and `nohup mobilellm-train &` must
    survive it.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    parent = int(launcher) if launcher.isdigit() else os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        zero = ctypes.c_ulong(0)  # prctl is variadic: pass full-width arguments
        if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM), zero, zero, zero) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); this rank will not follow its launcher",
                           ctypes.get_errno())
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        # Nothing has started yet (no process group, no lock): leaving now loses nothing.
        print(f"the launcher (pid {parent}) exited before this rank (pid {os.getpid()}) started; "
              f"not training without it", file=sys.stderr, flush=True)
        raise SystemExit(1)


class RunFolderLock:
    """One run per run folder: rank 0 holds an exclusive lock on <dump_folder>/run.lock, and on
    <checkpoint folder>/run.lock when the run saves checkpoints (an absolute --checkpoint.folder
    may be shared by runs whose dump folders differ), for the whole run. Each file keeps naming
    its last holder (host, pid, job id).

    The locks are POSIX record locks (`fcntl.lockf`): they belong to the process that took them,
    so loader workers and other forked children do not inherit them (an `flock` is shared with
    every fork and would stay held by orphaned workers after a kill -9), and the kernel drops them
    when that process ends, however it ends. Their one trap is that closing *any* descriptor of the
    file in the holding process drops the lock: nothing else in the process opens these files, and
    this class refuses to open a lock file its process already holds (`_HELD`).
    """

    FILE = "run.lock"
    # (st_dev, st_ino) of every lock file this process holds, with its path.
    _HELD: dict[tuple[int, int], str] = {}

    def __init__(self, dump_folder: str, checkpoint_folder: str = ""):
        self.path = os.path.join(dump_folder, self.FILE)
        self.paths = [(self.path, "run folder", "--job.dump_folder")]
        if checkpoint_folder:
            path = os.path.join(checkpoint_folder, self.FILE)
            if os.path.realpath(path) != os.path.realpath(self.path):
                self.paths.append((path, "checkpoint folder", "--checkpoint.folder"))
        self._fds: list[tuple[int, tuple[int, int]]] = []

    def acquire(self) -> None:
        """Take every lock or none: a RunFolderError names the folder in use and its holder."""
        try:
            for path, what, option in self.paths:
                self._fds.append(self._lock(path, what, option))
        except BaseException:
            self.release()
            raise
        job = os.environ.get("SLURM_JOB_ID", "")
        text = (f"host {socket.gethostname()} pid {os.getpid()}" + (f" slurm job {job}" if job else "")
                + f" since {datetime.datetime.now().isoformat(timespec='seconds')}\n")
        for fd, _ in self._fds:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)

    def _lock(self, path: str, what: str, option: str) -> tuple[int, tuple[int, int]]:
        import fcntl  # POSIX only, like the rest of the launch path

        folder = os.path.dirname(path) or "."

        def in_use(holder: str) -> RunFolderError:
            return RunFolderError(f"{what} {folder} is in use by another run ({holder}); stop that run first, "
                                  f"or choose another {option}")

        os.makedirs(folder, exist_ok=True)
        held = self._held_key(path)
        if held is not None:
            # Opening it again and closing that descriptor would drop this process's own lock.
            raise in_use(f"this process, pid {os.getpid()}")
        fd = open_lock_file(path)  # never through a link: it is truncated and written below
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # not held by another: locks do not work here
                os.close(fd)
                raise RunFolderError(f"cannot lock {path}: {e.strerror}; the file system of the {what} may not "
                                     f"support file locks: choose another {option}") from None
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise in_use(holder) from None
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        self._HELD[key] = path
        return fd, key

    def _held_key(self, path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (st.st_dev, st.st_ino)
        return key if key in self._HELD else None

    def release(self) -> None:
        while self._fds:
            fd, key = self._fds.pop()
            self._HELD.pop(key, None)
            os.close(fd)  # closing the descriptor drops the lock


# Set by launch/train.slurm to the stop file it removed itself before starting the ranks.
FRESH_STOP_FILE_ENV = "MOBILELLM_FRESH_STOP_FILE"


# What a stop file may hold: nothing (what `touch` and launch/train.slurm make) or this word.
STOP_FILE_WORD = b"stop"
_STOP_FILE_MAX_BYTES = 64


class StaleStopFile:
    """A stop file that exists when a run starts, left by an earlier run (which has stopped): left
    in place it would stop every rerun after one step, so rank 0 removes it, but only once the
    start is past every refusal (`remove`, called before the first step), and only if it is still
    the same file then. A refused start deletes nothing.

    Only a stop file is ever removed: a regular file of this user, not a link, empty or holding
    the word `stop`. Anything else at job.stop_file (a config naming an existing file of the user's
    by mistake, or a link) is a ConfigError naming it, raised at construction, never deleted.

    Except where the launch script already removed the file before starting the ranks and says so
    in MOBILELLM_FRESH_STOP_FILE: then it is the script's stop request for this run (a time limit
    near while a slow start was still under way), and deleting it would lose that stop."""

    def __init__(self, stop_file: str):
        self.path, self.seen = stop_file, None
        if not stop_file or not os.path.lexists(stop_file):
            return
        if os.environ.get(FRESH_STOP_FILE_ENV) == stop_file:
            logger.info("stop file %s was created for this run: stopping at the first stop check", stop_file)
            return
        self.seen = _stop_file_identity(stop_file)

    def remove(self) -> None:
        if self.seen is None:
            return
        try:
            now = _stop_file_identity(self.path)
        except (ConfigError, OSError):  # gone or replaced meanwhile: not the file seen at start
            return
        if now == self.seen:
            os.remove(self.path)
            logger.warning("removed stop file %s left from an earlier run", self.path)


def _stop_file_identity(path: str) -> tuple[int, int, int, int]:
    """(device, inode, mtime, size) of the stop file at `path`; ConfigError when what is there is
    not a stop file."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(
            f"job.stop_file {path} exists and is not a stop file ({why}), so it was not deleted. A stop file is "
            "an empty file (as `touch` makes it) or one holding the word stop, of your own; name another "
            "--job.stop_file, or remove that file yourself if it is a stale stop request"
        )

    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise refuse("a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise refuse("not a regular file")
    if st.st_uid != os.getuid():
        raise refuse(f"owned by uid {st.st_uid}, not by you")
    if st.st_size > _STOP_FILE_MAX_BYTES:
        raise refuse(f"{st.st_size} bytes")
    if st.st_size:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            text = os.read(fd, _STOP_FILE_MAX_BYTES + 1)
        finally:
            os.close(fd)
        if text.strip().lower() != STOP_FILE_WORD:
            raise refuse(f"it holds {text[:20]!r}")
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size
