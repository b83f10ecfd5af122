"""Stops as a cluster or a terminal delivers them: SIGTERM to every process of the job (loader
workers included), Ctrl-C, signals to the launcher alone, a killed launcher, a second run in the
same folder, a stale stop file; and the logs hold each step once after a resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import (
    ROOT,
    base_args,
    children,
    descendants,
    make_corpus,
    read_metrics,
    run_trainer,
    running,
    subprocess_env,
    wait_for_step,
)

STEPS = 40
# Loader workers on: they receive the job's signals too. Only the stop writes a checkpoint.
COMMON = {"training.global_batch_size": 16, "data.num_workers": 2, "checkpoint.interval": 1000}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("data") / "tokens", n_docs=600)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """{nproc: per-step losses} of runs that nothing interrupts."""
    out = {}
    for nproc in (1, 2):
        run = tmp_path_factory.mktemp(f"straight{nproc}")
        run_trainer(base_args(data, run, steps=STEPS, **COMMON), nproc=nproc)
        out[nproc] = losses(run)
    return out


def losses(run):
    metrics = read_metrics(run)
    return [metrics[s]["loss"] for s in range(1, STEPS + 1)]


def logged_steps(run):
    """Every step in metrics.jsonl, repeats included."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def start(args, nproc, how=None):
    """A trainer in a session of its own (as a terminal or slurm would start it): plain python for
    one rank, mobilellm_train.launch (torchrun) for more or when `how` is "launch", and
    launch/run_train.sh (which execs the launcher) when it is "run_train.sh"."""
    how = how or ("python" if nproc == 1 else "launch")
    env = subprocess_env()
    if how == "python":
        cmd = [sys.executable, "-m", "mobilellm_train.train", *args]
    elif how == "launch":
        cmd = [sys.executable, "-m", "mobilellm_train.launch", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mobilellm_train.train", *args]
    else:
        cmd = ["bash", "launch/run_train.sh", *args]
        env.update(NGPU=str(nproc), PYTHON=sys.executable)
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_until_gone(pids, what, timeout=300):
    """The bound only ends a hang; a stop on a loaded machine may take a while."""
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, f"{what}: still running after {timeout}s"
        time.sleep(0.1)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_to_every_process_saves_at_the_stop_step(data, uninterrupted, tmp_path, nproc):
    run = tmp_path / "run"
    args = base_args(data, run, steps=STEPS, **COMMON)
    proc = start(args, nproc)
    wait_for_step(run, 8, proc)
    everyone = descendants(proc.pid)
    assert len(everyone) >= 1 + 2 * nproc  # trainer(s) and their loader workers
    for pid in everyone:
        os.kill(pid, signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 0, out[-4000:]
    assert "is killed by signal" not in out
    stopped = max(read_metrics(run))
    assert stopped < STEPS and f"stopping after step {stopped} (received SIGTERM)" in out
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata")
    out = run_trainer(args, nproc=nproc)
    assert f"step-{stopped}" in out and "resumed from" in out
    assert losses(run) == uninterrupted[nproc]
    assert logged_steps(run) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_ctrl_c_saves_and_says_how_to_resume(data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    args = base_args(data, run, steps=STEPS, **COMMON)
    proc = start(args, 1)
    wait_for_step(run, 8, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    rc, out = finish(proc)
    assert rc == 0, out[-4000:]
    assert "Traceback" not in out and "rerun the same command to resume" in out
    stopped = max(read_metrics(run))
    assert f"stopping after step {stopped} (received SIGINT)" in out
    # The first Ctrl-C named that step (the next stop check), not "this step".
    assert f"interrupt: stopping after step {stopped} (the next stop check" in out
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata")
    run_trainer(args)
    assert losses(run) == uninterrupted[1]
    assert logged_steps(run) == list(range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_to_the_launcher_reaches_every_rank(data, uninterrupted, tmp_path, sig):
    run = tmp_path / "run"
    args = base_args(data, run, steps=STEPS, **COMMON)
    proc = start(args, 2)
    wait_for_step(run, 8, proc)
    os.kill(proc.pid, sig)  # the launcher alone: torchrun starts each rank in a session of its own
    rc, out = finish(proc)
    assert rc == 0, out[-4000:]
    stopped = max(read_metrics(run))
    assert f"stopping after step {stopped} (received {sig.name})" in out
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata")
    run_trainer(args, nproc=2)
    assert losses(run) == uninterrupted[2]


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    # The handler on its own: a one-rank group, SIGINT, and a second one more than a second later
    # by the handler's clock, which the script moves (a busy machine must not turn the launcher's
    # copy of the first Ctrl-C into a second).
    script = (
        "import os, signal, time, torch.distributed as dist\n"
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
        "from mobilellm_train.resilience import StopRequest\n"
        "now = [100.0]\n"
        "StopRequest.clock = staticmethod(lambda: now[0])\n"
        "stop = StopRequest()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "assert stop.agreed() and stop.reason == 'received SIGINT'\n"
        "now[0] += 0.5\n"
        "os.kill(os.getpid(), signal.SIGINT)  # a launcher passing the same Ctrl-C on: not a second\n"
        "print('still running', flush=True)\n"
        "now[0] += 1.0\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "print('not aborted')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 130, r.stdout + r.stderr
    assert "still running" in r.stdout and "not aborted" not in r.stdout
    assert "second interrupt: aborting without saving" in r.stderr


def test_a_stop_signal_while_shutting_down_exits_0(tmp_path):
    # After the last checkpoint (restore()): a signal is noted and the shutdown goes on, also in
    # Python's own exit (an atexit hook registered before restore() runs after its hooks); a
    # second Ctrl-C exits 0 at once.
    script = (
        "import atexit, os, signal, sys, torch.distributed as dist\n"
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
        "from mobilellm_train.resilience import StopRequest\n"
        "now = [100.0]\n"
        "StopRequest.clock = staticmethod(lambda: now[0])\n"
        "def at_exit():\n"
        "    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):\n"
        "        os.kill(os.getpid(), sig)\n"
        "    print('exit went on', flush=True)\n"
        "atexit.register(at_exit)\n"
        "stop = StopRequest()\n"
        "stop.restore()\n"
        "for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):\n"
        "    os.kill(os.getpid(), sig)\n"
        "print('shutdown went on', flush=True)\n"
        "if sys.argv[1] == 'twice':\n"
        "    now[0] += 2\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    print('not exited')\n"
        "dist.destroy_process_group()\n"
    )
    for times in ("once", "twice"):
        r = subprocess.run([sys.executable, "-c", script, times], env=subprocess_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "shutdown went on" in r.stdout and "Traceback" not in r.stderr
        assert "stop requested while shutting down: the last checkpoint is complete" in r.stderr
        if times == "once":
            assert "exit went on" in r.stdout
        else:
            assert "not exited" not in r.stdout and "second interrupt: exiting now" in r.stderr


@pytest.mark.slow
def test_ctrl_c_as_a_launcher_run_finishes_exits_0(data, tmp_path):
    run = tmp_path / "run"
    proc = start(base_args(data, run, steps=6, **COMMON), 2)
    out = ""
    for line in proc.stdout:  # the ranks are shutting down once rank 0 says so
        out += line
        if "finished at step 6 of 6" in line:
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the launcher's group
            break
    rc, rest = finish(proc)
    out += rest
    assert rc == 0, out[-4000:]
    assert "FAILED" not in out and "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    assert os.path.isfile(run / "checkpoints" / "step-6" / ".metadata")


def test_metrics_and_tensorboard_hold_each_step_once_after_a_resume(tmp_path):
    from mobilellm_train.metrics import MetricsLogger

    def record(step):
        return {"step": step, "loss": float(step), "lr": 0.1, "grad_norm": 1.0, "tokens_per_second": 1.0,
                "mfu": None, "peak_memory_gib": 0.1, "data_wait_fraction": 0.0, "elapsed_s": 1.0, "eta_s": 1.0}

    first = MetricsLogger(str(tmp_path), 0, enable_tensorboard=True)
    for step in range(1, 13):
        first.log(record(step))
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "lo')  # a line cut off by the kill
    # The run resumes from the checkpoint of step 10: 11-13 are logged again.
    second = MetricsLogger(str(tmp_path), 0, enable_tensorboard=True, resume_step=10)
    for step in range(11, 16):
        second.log({**record(step), "loss": 100.0 + step})
    second.close()
    assert logged_steps(tmp_path) == list(range(1, 16))
    assert read_metrics(tmp_path)[11]["loss"] == 111.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == list(range(1, 16))
    assert scalars[10].value == 111.0


def test_killed_run_resumed_logs_each_step_once(tmp_path):
    data = make_corpus(tmp_path / "data", n_docs=300)
    run = tmp_path / "run"
    args = base_args(data, run, steps=30, **{"checkpoint.interval": 5, "checkpoint.async_mode": "disabled"})
    proc = start(args, 1)
    wait_for_step(run, 13, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(read_metrics(run)) >= 13
    out = run_trainer(args)
    assert "dropped" in out
    assert logged_steps(run) == list(range(1, 31))


@pytest.mark.slow
def test_ranks_stop_when_their_launcher_is_killed(data, tmp_path):
    # Through launch/run_train.sh, which execs mobilellm_train.launch: proc is the launcher.
    run = tmp_path / "run"
    args = base_args(data, run, steps=5000, **COMMON)
    proc = start(args, 2, "run_train.sh")
    wait_for_step(run, 5, proc)
    ranks = children(proc.pid)
    assert len(ranks) == 2
    proc.kill()  # SIGKILL to the launcher alone
    proc.wait()
    wait_until_gone(ranks, "ranks whose launcher was killed")
    stopped = max(read_metrics(run))
    assert stopped < 5000
    # Parent death is a SIGTERM: the ranks saved the step they stopped at.
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata")


def test_a_rank_whose_launcher_died_while_it_started_does_not_train(data, tmp_path):
    # Killed before the rank could ask the kernel to signal its parent's death (Python and torch
    # are still starting): the rank sees init as its parent and leaves instead of training alone.
    run = tmp_path / "run"
    proc = start(base_args(data, run, steps=5000, **COMMON), 1, "launch")
    deadline = time.monotonic() + 300
    while not children(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:]
        time.sleep(0.005)
    ranks = children(proc.pid)
    proc.kill()
    proc.wait()
    wait_until_gone(ranks, "a rank whose launcher died as it started")
    out = proc.stdout.read()  # the rank held the launcher's output pipe until it ended
    assert not os.path.exists(run / "metrics.jsonl"), out[-4000:]


def test_one_run_per_run_folder(tmp_path):
    data = make_corpus(tmp_path / "data", n_docs=200)
    run = tmp_path / "run"
    args = base_args(data, run, steps=5000, **{"checkpoint.interval": 1000})
    first = start(args, 1)
    wait_for_step(run, 2, first)
    second = subprocess.run([sys.executable, "-m", "mobilellm_train.train", *args], env=subprocess_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert f"run folder {run} is in use by another run" in second.stderr
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    os.kill(first.pid, signal.SIGTERM)
    rc, out = finish(first)
    assert rc == 0, out[-3000:]
    # The kernel dropped the lock with the process: the same folder resumes.
    out = run_trainer(base_args(data, run, steps=max(read_metrics(run)) + 2))
    assert "resumed from" in out


def test_a_stop_file_from_an_earlier_run_does_not_stop_the_next(corpus, tmp_path):
    stop_file = tmp_path / "STOP"
    stop_file.touch()
    run = tmp_path / "run"
    out = run_trainer(base_args(corpus, run, steps=6, **{"job.stop_file": stop_file}))
    assert "removed stop file" in out and not stop_file.exists()
    assert max(read_metrics(run)) == 6


def listening_addresses(pid):
    """Local addresses of the TCP sockets `pid` listens on (Linux /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    out.append(fields[1].split(":")[0])
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_lone_process_listens_on_loopback_only(corpus, tmp_path):
    run = tmp_path / "run"
    proc = start(base_args(corpus, run, steps=5000, **{"checkpoint.interval": 1000}), 1)
    try:
        wait_for_step(run, 2, proc)
        addresses = listening_addresses(proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        finish(proc)
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    assert set(addresses) <= loopback, addresses


def test_an_error_exit_shuts_down_cleanly(tmp_path):
    # A bad line read by a loader worker while a checkpoint is being written in the background.
    data = make_corpus(tmp_path / "data", n_docs=300)
    path = tmp_path / "data" / "1" / "part-0.jsonl"
    lines = path.read_text().splitlines()
    lines[150] = '{"token_ids": [1, 2, oops]}'
    path.write_text("\n".join(lines) + "\n")
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        out = run_trainer(base_args(data, run, steps=500, **{"data.num_workers": 2, "checkpoint.interval": 2}),
                          expect_rc=1)
        assert "ERROR DataError" in out and "invalid JSON" in out
        assert "terminate called" not in out and "core dumped" not in out
