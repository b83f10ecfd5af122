"""The run-folder lock (resilience.RunFolderLock) and the loader workers' set-up
(data.jsonl.ignore_stop_signals): the lock dies with the process that took it, not with its
forked children; orphaned loader workers end with their parent; a checkpoint folder shared by two
runs from different dump folders is refused.

Run: python -m pytest -q tests/test_run_lock.py
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, base_args, children, make_corpus, subprocess_env, wait_for_step
from mobilellm_train.errors import RunFolderError
from mobilellm_train.resilience import RunFolderLock


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, waiting for a parent to reap it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until_gone(pids, timeout=60):
    deadline = time.time() + timeout
    while any(alive(p) for p in pids):
        assert time.time() < deadline, f"still running after {timeout}s: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Script:
    """A python -c script in a session of its own that prints lines the test waits for; killed,
    with its process group, when the test ends."""

    def __init__(self, code: str):
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)

    def line(self) -> str:
        out = self.proc.stdout.readline()
        assert out, f"script ended early: {self.proc.stderr.read()[-3000:]}"
        return out.strip()

    def close(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.communicate(timeout=30)


@pytest.fixture
def scripts():
    started = []
    yield lambda code: started.append(Script(code)) or started[-1]
    for s in started:
        s.close()


HOLD = (
    "import sys\n"
    "from mobilellm_train.resilience import RunFolderLock\n"
    "RunFolderLock(*sys.argv[1:]).acquire()\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


def hold(scripts, *folders) -> Script:
    s = scripts(HOLD.replace("sys.argv[1:]", repr([str(f) for f in folders])))
    assert s.line() == "held"
    return s


def test_lock_is_not_inherited_by_forked_children(scripts, tmp_path):
    # An flock would stay held by the child: it shares the parent's open file description.
    s = scripts(
        "import os, sys, time\n"
        "from mobilellm_train.resilience import RunFolderLock\n"
        f"RunFolderLock({str(tmp_path)!r}).acquire()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(120); os._exit(0)\n"
        "print(child, flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = int(s.line())
    with pytest.raises(RunFolderError, match=f"pid {s.proc.pid}"):
        RunFolderLock(str(tmp_path)).acquire()
    s.proc.kill()
    s.proc.wait()
    assert alive(child)
    lock = RunFolderLock(str(tmp_path))
    lock.acquire()  # at once, while the child of the killed holder lives on
    lock.release()
    kill_all([child])


def test_orphaned_loader_workers_end_with_their_parent(scripts, tmp_path):
    # Workers busy inside a batch (here: asleep for ten minutes) that ignore SIGTERM, as the
    # training loaders' workers do; the parent is then killed with SIGKILL.
    s = scripts(
        "import sys, time, torch\n"
        "from torch.utils.data import IterableDataset\n"
        "from mobilellm_train.data.jsonl import ignore_stop_signals, quiet_stateful_dataloader\n"
        "from mobilellm_train.resilience import RunFolderLock\n"
        "class Slow(IterableDataset):\n"
        "    def __iter__(self):\n"
        "        yield torch.zeros(1)\n"
        "        time.sleep(600)\n"
        f"RunFolderLock({str(tmp_path)!r}).acquire()\n"
        "it = iter(quiet_stateful_dataloader(Slow(), batch_size=None, num_workers=2, worker_init_fn=ignore_stop_signals))\n"
        "next(it); next(it)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    assert s.line() == "ready"
    workers = children(s.proc.pid)
    assert len(workers) >= 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)  # ignored, as a job-wide SIGTERM is
    time.sleep(0.2)
    assert all(alive(p) for p in workers)
    s.proc.kill()
    s.proc.wait()
    lock = RunFolderLock(str(tmp_path))
    lock.acquire()
    lock.release()
    try:
        wait_until_gone(workers)
    finally:
        kill_all(workers)


def test_a_shared_checkpoint_folder_is_refused(scripts, tmp_path):
    ckpt = tmp_path / "a" / "checkpoints"
    holder = hold(scripts, tmp_path / "a", ckpt)  # a run in folder a, checkpoints in a/checkpoints
    # Another dump folder, the same (absolute) checkpoint folder.
    with pytest.raises(RunFolderError, match=f"checkpoint folder {ckpt} is in use by another run") as e:
        RunFolderLock(str(tmp_path / "b"), str(ckpt)).acquire()
    assert f"pid {holder.proc.pid}" in str(e.value) and "--checkpoint.folder" in str(e.value)
    # Nothing was kept: folder b is free, for this process too.
    lock = RunFolderLock(str(tmp_path / "b"), str(tmp_path / "b" / "checkpoints"))
    lock.acquire()
    lock.release()
    holder.close()
    lock = RunFolderLock(str(tmp_path / "b"), str(ckpt))
    lock.acquire()
    lock.release()


def test_checkpoint_folder_equal_to_the_run_folder_is_one_lock(tmp_path):
    lock = RunFolderLock(str(tmp_path), str(tmp_path / "."))
    lock.acquire()
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]
    lock.release()


def test_a_second_lock_in_the_holding_process_is_refused_and_keeps_the_first(scripts, tmp_path):
    first = RunFolderLock(str(tmp_path))
    first.acquire()
    try:
        # Opening the file again and closing it would drop a POSIX lock: refused before opening.
        with pytest.raises(RunFolderError, match=f"this process, pid {os.getpid()}"):
            RunFolderLock(str(tmp_path)).acquire()
        s = scripts(HOLD.replace("sys.argv[1:]", repr([str(tmp_path)])))
        s.proc.wait(timeout=60)
        assert s.proc.returncode == 1 and f"pid {os.getpid()}" in s.proc.stderr.read()
    finally:
        first.release()


@pytest.mark.slow
def test_a_killed_run_frees_its_folder_at_once(tmp_path):
    data = make_corpus(tmp_path / "data", n_docs=200)
    run = tmp_path / "run"
    args = base_args(data, run, steps=5000, **{"checkpoint.interval": 1000, "data.num_workers": 2})
    proc = subprocess.Popen([sys.executable, "-m", "mobilellm_train.train", *args], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    workers = []
    try:
        wait_for_step(run, 2, proc)
        workers = children(proc.pid)
        assert len(workers) >= 2
        proc.kill()  # kill -9: no handler runs, no worker is told
        proc.wait()
        lock = RunFolderLock(str(run), str(run / "checkpoints"))
        lock.acquire()  # the rerun is not refused by the orphans
        lock.release()
        wait_until_gone(workers)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_all(workers)
        proc.communicate(timeout=30)


def test_the_trainer_refuses_a_checkpoint_folder_in_use(scripts, tmp_path):
    ckpt = tmp_path / "shared_checkpoints"
    holder = hold(scripts, tmp_path / "first", ckpt)
    data = make_corpus(tmp_path / "data", n_docs=50)
    args = base_args(data, tmp_path / "second", **{"checkpoint.folder": ckpt})
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.train", *args], env=subprocess_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"checkpoint folder {ckpt} is in use by another run" in r.stderr
    assert f"pid {holder.proc.pid}" in r.stderr and "Traceback" not in r.stderr


def test_a_file_system_without_locks_is_named(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, cmd):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.raises(RunFolderError, match="may not support file locks: choose another --job.dump_folder"):
        RunFolderLock(str(tmp_path)).acquire()
    monkeypatch.undo()
    lock = RunFolderLock(str(tmp_path))  # nothing was left held
    lock.acquire()
    lock.release()
