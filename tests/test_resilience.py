"""Interruptions cost only the steps since the last checkpoint: kill -9, signals, stop files,
damaged checkpoints, dead ranks, non-finite steps and loss spikes, on CPU with gloo."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, base_args, children, make_corpus, read_metrics, run_trainer, subprocess_env, wait_for_step

STEPS = 60
COMMON = {"checkpoint.interval": 5, "training.global_batch_size": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("data") / "tokens", n_docs=600)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """Per-step losses of a 2-rank run that nothing interrupts."""
    run = tmp_path_factory.mktemp("straight")
    run_trainer(base_args(data, run, steps=STEPS, **COMMON), nproc=2)
    metrics = read_metrics(run)
    return [metrics[s]["loss"] for s in range(1, STEPS + 1)]


def start_trainer(args, nproc=2):
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mobilellm_train.train", *args]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)




def losses(run):
    metrics = read_metrics(run)
    return [metrics[s]["loss"] for s in range(1, STEPS + 1)]


@pytest.mark.slow
@pytest.mark.parametrize("async_mode", ["async", "disabled"])
def test_kill_9_then_resume_equals_uninterrupted(data, uninterrupted, tmp_path, async_mode):
    run = tmp_path / "run"
    args = base_args(data, run, steps=STEPS, **COMMON, **{"checkpoint.async_mode": async_mode})
    proc = start_trainer(args)
    wait_for_step(run, random.Random(async_mode).randrange(8, 20), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the agent, at whatever they were doing
    proc.wait()
    assert max(read_metrics(run)) < STEPS
    out = run_trainer(args, nproc=2)
    assert "resumed from" in out
    assert losses(run) == uninterrupted


@pytest.mark.slow
def test_signal_to_one_rank_stops_all_at_the_same_step(data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    args = base_args(data, run, steps=STEPS, **COMMON, **{"job.stop_check_freq": 4})
    proc = start_trainer(args)
    wait_for_step(run, 6, proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    stopped = max(read_metrics(run))
    assert stopped < STEPS and stopped % 4 == 0  # at an agreement step, the same on both ranks
    assert f"stopping after step {stopped}" in out
    # Both ranks saved that step (a save is a collective: a rank that went on would hang it).
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata")
    run_trainer(args, nproc=2)
    assert losses(run) == uninterrupted


def test_stop_file_and_sigterm_single_rank(corpus, tmp_path):
    stop_file = tmp_path / "STOP"
    run = tmp_path / "run"
    args = base_args(corpus, run, steps=3000, **{"job.stop_file": stop_file, "checkpoint.interval": 1000,
                                                         "job.stop_check_freq": 3})
    proc = subprocess.Popen([sys.executable, "-m", "mobilellm_train.train", *args], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run, 3, proc)
    stop_file.touch()  # a stop file appearing during the run (one present at start is cleared)
    out, _ = proc.communicate(timeout=300)
    stopped = max(read_metrics(run))
    assert proc.returncode == 0 and f"stopping after step {stopped} (stop file" in out, out[-3000:]
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata")
    # The ranks agree on stop requests every stop_check_freq steps only.
    assert stopped % 3 == 0, stopped

    stop_file.unlink()
    args = base_args(corpus, run, steps=3000, **{"checkpoint.interval": 1000})
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "mobilellm_train.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run, stopped + 2, proc)  # a step of this run: its signal handlers are in place
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped = max(read_metrics(run))
    assert "received SIGTERM" in out and stopped < 3000
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata")


def test_truncated_shard_is_reported(corpus, tmp_path):
    run = tmp_path / "run"
    run_trainer(base_args(corpus, run, steps=10, **{"checkpoint.async_mode": "disabled"}))
    step = run / "checkpoints" / "step-10"
    shard = max((p for p in step.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # The checksum manifest catches it first, naming the shard; with no older checkpoint to fall
    # back to, the start stops.
    out = run_trainer(base_args(corpus, run, steps=20), expect_rc=1)
    assert "CheckpointError" in out and f"{shard} is damaged" in out and "truncated" in out
    # Unverified, the read itself reports it.
    out = run_trainer(base_args(corpus, run, steps=20, **{"checkpoint.verify": "false"}), expect_rc=1)
    assert "CheckpointError" in out and "step-10 cannot be read" in out and "truncated" in out
    # The same messages where evaluation and export load a step folder in a lone process (cut
    # further: they read the model alone, which may lie in the first half).
    from mobilellm_train.checkpoint import CheckpointError, load_model_from_checkpoint

    shard.write_bytes(shard.read_bytes()[:64])
    with pytest.raises(CheckpointError, match=f"{shard} is damaged"):
        load_model_from_checkpoint(str(step))
    with pytest.raises(CheckpointError, match="(?s)step-10 cannot be read.*truncated"):
        load_model_from_checkpoint(str(step), verify=False)


def test_other_flavor_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    run_trainer(base_args(corpus, run, steps=10))
    out = run_trainer(base_args(corpus, run, steps=20, **{"model.layer_sharing": "true"}), expect_rc=1)
    assert "was written for another model" in out and "'layer_sharing': (False, True)" in out


@pytest.mark.slow
def test_a_dying_rank_takes_the_job_down_with_its_reason(tmp_path):
    data = make_corpus(tmp_path / "data", n_docs=200)
    path = tmp_path / "data" / "1" / "part-0.jsonl"
    lines = path.read_text().splitlines()
    lines[39] = '{"token_ids": [1, 2, oops]}'  # line 40: an odd line, read by rank 1 only
    path.write_text("\n".join(lines) + "\n")
    # Collective timeouts far beyond the run's own limit: the job must end because torchrun stops
    # the rank left behind, not because that rank's collective timed out.
    out = run_trainer(base_args(data, tmp_path / "run", steps=50, **{"comm.init_timeout_seconds": 3600,
                                                                     "comm.train_timeout_seconds": 3600}),
                      nproc=2, expect_rc=1, timeout=900)
    assert f"[rank1] ERROR DataError: {path}:40: invalid JSON" in out


def test_non_finite_steps_are_skipped_up_to_a_budget(corpus, tmp_path):
    out = run_trainer(base_args(corpus, tmp_path / "run", steps=20, **{
        "optimizer.lr": "1e30", "lr_scheduler.warmup_steps": 0, "training.max_norm": 0,
        "training.on_nonfinite": "skip", "training.max_skipped_steps": 2}), expect_rc=1)
    assert out.count("update skipped") == 2
    assert "(2 steps already skipped)" in out


def test_loss_spike_rewinds_and_skips_the_data(tmp_path):
    # After ~60 learnable documents come 12 of random tokens: the loss jumps when they arrive.
    data = make_corpus(tmp_path / "data", n_docs=400)
    path = tmp_path / "data" / "1" / "part-0.jsonl"
    lines = path.read_text().splitlines()
    rng = random.Random(1)
    noise = [json.dumps({"token_ids": [1] + [rng.randrange(3, 64) for _ in range(60)] + [2]}) for _ in range(12)]
    path.write_text("\n".join(lines[:60] + noise + lines[60:]) + "\n")
    run = tmp_path / "run"
    out = run_trainer(base_args(data, run, steps=40, **{
        "training.spike_threshold": 1.5, "training.spike_window": 5, "training.spike_rewind": "true",
        "checkpoint.interval": 5, "checkpoint.async_mode": "disabled", "optimizer.lr": "1e-2"}))
    assert "loss spike" in out and "rewound to step" in out
    assert max(read_metrics(run)) == 40


def test_checkpoint_bench_reports_blocking_time(tmp_path):
    out_json = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.checkpoint_bench", "--flavor", "debug", "--repeats", "1",
                        "--out", str(out_json)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=subprocess_env())
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out_json.read_text())
    modes = report["flavors"]["debug"]["modes"]
    assert set(modes) == {"disabled", "async"}  # pinned staging needs CUDA
    for m in modes.values():
        assert 0 < m["blocked_s"] <= m["total_s"] + 1e-3
    assert report["torch"] == __import__("torch").__version__


def test_a_stop_file_the_launch_script_made_for_this_run_is_kept(tmp_path, monkeypatch):
    # train.slurm removes its stop file before starting the ranks; one present when rank 0 starts
    # is its time-limit stop, made while a slow start was under way.
    from mobilellm_train.resilience import StaleStopFile

    stop_file = tmp_path / ".mobilellm-stop-7"
    stop_file.touch()
    monkeypatch.setenv("MOBILELLM_FRESH_STOP_FILE", str(stop_file))
    StaleStopFile(str(stop_file)).remove()
    assert stop_file.exists()
    monkeypatch.setenv("MOBILELLM_FRESH_STOP_FILE", str(tmp_path / "another"))
    StaleStopFile(str(stop_file)).remove()
    assert not stop_file.exists()


def test_a_rank_leaves_when_its_launcher_is_gone_before_it_starts():
    # MOBILELLM_LAUNCHER_PID names a process that is not this rank's parent: the launcher died
    # and the rank was handed to init before it could ask for the parent-death signal. (Every run
    # under mobilellm_train.launch checks that the rule does not fire while the launcher lives.)
    launcher = os.getpid() + 1_000_000
    script = "from mobilellm_train.resilience import exit_with_parent\nexit_with_parent()\nprint('trained on')\n"
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=subprocess_env(TORCHELASTIC_RUN_ID="test", MOBILELLM_LAUNCHER_PID=launcher))
    assert r.returncode == 1 and "trained on" not in r.stdout, r.stdout + r.stderr
    assert f"the launcher (pid {launcher}) exited before this rank" in r.stderr
