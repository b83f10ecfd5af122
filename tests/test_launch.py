"""The launch scripts, run for real: run_train.sh under torchrun, and train.slurm with stand-ins for
srun, scontrol and squeue: its time-limit stop -> checkpoint -> requeue -> resume cycle, SIGTERM
without a requeue, a refused requeue, the stop lead against the time limit, and ranks per node
from the allocation. tests/test_slurm.py runs the same script on a real one-host slurm."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, base_args, descendants, read_metrics, subprocess_env, wait_for_step

SRUN = """#!/bin/bash
# srun stand-in: record srun's own options (and the stop file the ranks are told is theirs), then
# run the command once (one node).
[ -n "${SRUN_RECORD:-}" ] && { echo "$@"; echo "fresh stop file ${MOBILELLM_FRESH_STOP_FILE:-}"; } > "$SRUN_RECORD"
while [[ "$1" == --* ]]; do shift; done
[ -n "${SRUN_RECORD:-}" ] && exit 0
exec "$@"
"""

SCONTROL = """#!/bin/bash
# scontrol stand-in: this machine is the only node; a requeue is recorded in a file, or refused
# as for a job submitted with --no-requeue.
case "$1 $2" in
  "show hostnames") echo 127.0.0.1 ;;
  requeue*) [ -n "${REQUEUE_REFUSED:-}" ] && { echo "scontrol: error: Requested operation is presently disabled" >&2; exit 1; }
            echo "$2" > "$REQUEUE_MARKER" ;;
esac
"""

SQUEUE = """#!/bin/bash
# squeue stand-in for `squeue -h -j ID -o %L`: the seconds written in TIME_LEFT_FILE (a clock the
# test moves), the time left before JOB_END_EPOCH, or no limit.
if [ -n "${TIME_LEFT_FILE:-}" ]; then left=$(cat "$TIME_LEFT_FILE")
elif [ -n "${JOB_END_EPOCH:-}" ]; then left=$(( JOB_END_EPOCH - $(date +%s) )); [ $left -lt 0 ] && left=0
else echo UNLIMITED; exit 0; fi
printf '%d:%02d\n' $(( left / 60 )) $(( left % 60 ))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(tmp_path, marker, **extra):
    """The variables slurm sets in a one-node CPU job (no GPUs: one rank)."""
    return script_env(tmp_path, SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="node1", SLURM_JOB_NUM_NODES=1,
                      MASTER_PORT=free_port(), REQUEUE_MARKER=marker, SLURM_SUBMIT_DIR=tmp_path, **extra)


def script_env(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("squeue", SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
    return subprocess_env(PATH=path, **extra)


@pytest.mark.slow
def test_run_train_sh_two_ranks(corpus, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(["bash", "launch/run_train.sh", *base_args(corpus, run, steps=4)], cwd=ROOT,
                       env=script_env(tmp_path, NGPU=2), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "2 rank(s)" in r.stdout + r.stderr
    assert sorted(read_metrics(run)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_slurm_script_checkpoints_requeues_and_resumes(corpus, tmp_path):
    run = tmp_path / "run"
    marker = tmp_path / "requeued"
    env = slurm_env(tmp_path, marker)
    args = base_args(corpus, run, steps=5000, **{"checkpoint.interval": 1000})
    proc = start_script(args, env)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGUSR1)  # what slurm sends 300 s before the time limit
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    stopped = max(read_metrics(run))
    assert stopped < 5000 and "time limit (USR1): asking every rank to checkpoint and stop" in out
    assert marker.read_text().strip() == "4242" and "requeued job 4242" in out
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata")
    assert not os.path.exists(tmp_path / ".mobilellm-stop-4242")

    # The requeued job: same command, finds the checkpoint, ends normally and does not requeue.
    marker.unlink()
    env["MASTER_PORT"] = str(free_port())
    r = subprocess.run(["bash", "launch/train.slurm", *base_args(corpus, run, steps=stopped + 3)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert f"step-{stopped}" in r.stdout and "resumed from" in r.stdout
    assert max(read_metrics(run)) == stopped + 3 and not marker.exists()


def start_script(args, env):
    return subprocess.Popen(["bash", "launch/train.slurm", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_slurm_script_sigterm_saves_and_does_not_requeue(corpus, tmp_path):
    run = tmp_path / "run"
    marker = tmp_path / "requeued"
    proc = start_script(base_args(corpus, run, steps=5000, **{"checkpoint.interval": 1000, "data.num_workers": 2}),
                        slurm_env(tmp_path, marker))
    wait_for_step(run, 3, proc)
    for pid in descendants(proc.pid):  # scancel: SIGTERM to every process of the job
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    stopped = max(read_metrics(run))
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata")
    assert "not requeueing" in out and not marker.exists()


@pytest.mark.slow
def test_slurm_script_stops_before_its_time_limit_and_reports_a_refused_requeue(corpus, tmp_path):
    # 24 s left at start: the derived lead is a fifth (4 s). The clock is the test's: time moves to
    # 2 s left once the run trains, however long its start took. The requeue is refused as with
    # --no-requeue.
    run = tmp_path / "run"
    marker = tmp_path / "requeued"
    clock = tmp_path / "time-left"
    clock.write_text("24")
    proc = start_script(base_args(corpus, run, steps=100000, **{"checkpoint.interval": 100000}),
                        slurm_env(tmp_path, marker, TIME_LEFT_FILE=clock, REQUEUE_REFUSED=1))
    wait_for_step(run, 3, proc)
    (tmp_path / "time-left.new").write_text("2")
    os.replace(tmp_path / "time-left.new", clock)  # the script never reads a half-written file
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-4000:]
    assert "stop 4s before the time limit" in out and "time limit (USR1)" in out
    assert "could not be requeued" in out and "submit the same command again to resume" in out
    stopped = max(read_metrics(run))
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata") and not marker.exists()


def test_slurm_script_refuses_a_lead_longer_than_half_the_time_limit(tmp_path):
    env = slurm_env(tmp_path, tmp_path / "requeued", JOB_END_EPOCH=int(time.time()) + 120, STOP_LEAD_S=300)
    r = subprocess.run(["bash", "launch/train.slurm", "--config", "train_configs/debug.toml"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "less than twice the stop lead of 300s" in r.stderr and "Raise --time or lower STOP_LEAD_S" in r.stderr


@pytest.mark.parametrize("allocation, ranks", [
    ({"SLURM_GPUS_ON_NODE": 4, "SLURM_GPUS_PER_NODE": 8}, 4),
    ({"SLURM_GPUS_PER_NODE": "h100:2"}, 2),
    ({}, 1),
    ({"SLURM_GPUS_PER_NODE": 0}, 1),
    ({"NPROC_PER_NODE": 3, "SLURM_GPUS_ON_NODE": 8}, 3),
])
def test_slurm_script_ranks_follow_the_allocation(tmp_path, allocation, ranks):
    record = tmp_path / "srun-args"
    env = slurm_env(tmp_path, tmp_path / "requeued", SRUN_RECORD=record, SLURM_CPUS_PER_TASK=12, **allocation)
    r = subprocess.run(["bash", "launch/train.slurm", "--config", "x.toml"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    srun = record.read_text()
    assert "--cpus-per-task=12" in srun and f"--nproc_per_node={ranks}" in srun
    assert "-m mobilellm_train.launch" in srun and f"x {ranks} rank(s)" in r.stdout
    # The stop file the script removed before starting is the ranks' to keep (not stale).
    stop_file = tmp_path / ".mobilellm-stop-4242"
    assert f"--job.stop_file {stop_file}" in srun and f"fresh stop file {stop_file}" in srun


def test_one_line_error_is_the_root_cause_over_a_rank_stopped_in_the_same_second(tmp_path, monkeypatch):
    """Rank 1 refuses the config and writes its line; torchrun then stops rank 0, which leaves no
    error file. Timestamps are whole seconds, so both often carry the same one: the rank that wrote
    its error is the root cause, and the launcher prints its line instead of torchrun's block."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from mobilellm_train.launch import one_line_errors, report_one_line_error

    line = "config error: data.sources: /data is an unfinished mobilellm-prepare output"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "1.json"))
    report_one_line_error(line)
    refused = ProcessFailure(local_rank=1, pid=11, exitcode=2, error_file=str(tmp_path / "1.json"))
    stopped = ProcessFailure(local_rank=0, pid=10, exitcode=-15, error_file=str(tmp_path / "0.json"))
    stopped.timestamp = refused.timestamp
    assert one_line_errors({0: stopped, 1: refused}) == [line]
    # A rank that crashed a second earlier, leaving no error file, stays the root cause.
    stopped.timestamp = refused.timestamp - 1
    assert one_line_errors({0: stopped, 1: refused}) is None
