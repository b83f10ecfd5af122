"""launch/train.slurm on a real slurm: a one-host cluster (munged, slurmctld, slurmd) started from a
generated slurm.conf in a temporary folder, jobs submitted with sbatch and CPU overrides.

Checked: periodic checkpoints; the time-limit stop -> save -> requeue -> resume cycle with losses
equal to an uninterrupted run; `scontrol requeue` (SIGTERM to every process of the job, loader
workers on) saves at the stop step and the requeued job resumes from it; `scancel` of a running
job cancels it for good. Needs slurm-wlm and munge installed (`apt-get install slurm-wlm munge`)
and root (slurmd starts jobs as their user); skipped otherwise.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TEST_MARK, base_args, children, make_corpus, marked_processes, read_metrics, run_trainer, running, subprocess_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo")

SLURM_CONF = """\
ClusterName=mobilellmtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={dir}/munge.sock
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
# Signals reach every descendant of the job's step daemon, loader workers included.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=30
MinJobAge=600
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def missing_prerequisite():
    missing = [name for name in DAEMONS + COMMANDS if shutil.which(name) is None
               and not os.path.exists(f"/usr/sbin/{name}")]
    if missing:
        return f"slurm is not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "a one-host slurm needs root (slurmd starts jobs as their user)"
    return ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon(name):
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    def __init__(self, folder):
        self.dir = str(folder)
        self.env = subprocess_env(SLURM_CONF=os.path.join(self.dir, "slurm.conf"),
                                  PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
        self.procs = []

    def start(self):
        os.chmod(self.dir, 0o755)  # munged refuses a socket folder that others may write
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.dir, sub))
        key = os.path.join(self.dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        host = socket.gethostname().split(".")[0]
        with open(self.env["SLURM_CONF"], "w") as f:
            f.write(SLURM_CONF.format(host=host, dir=self.dir, ctld_port=free_port(), slurmd_port=free_port(),
                                      cpus=os.cpu_count()))
        log = open(os.path.join(self.dir, "daemons.log"), "w")
        self.procs.append(subprocess.Popen(
            [daemon("munged"), "-F", "-f", f"--socket={self.dir}/munge.sock", f"--key-file={key}",
             f"--log-file={self.dir}/munged.log", f"--pid-file={self.dir}/munged.pid",
             f"--seed-file={self.dir}/munged.seed"], stdout=log, stderr=log))
        self._wait(lambda: os.path.exists(f"{self.dir}/munge.sock"), "munged")
        self.procs.append(subprocess.Popen([daemon("slurmctld"), "-D", "-i"], env=self.env, stdout=log, stderr=log))
        self._wait(lambda: self.run("sinfo", check=False).returncode == 0, "slurmctld")
        self.procs.append(subprocess.Popen([daemon("slurmd"), "-D", "-N", host], env=self.env, stdout=log, stderr=log))
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", "slurmd")

    def _wait(self, ready, what, timeout=60):
        deadline = time.time() + timeout
        while not ready():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; see {self.dir}/*.log")
            if time.time() > deadline:
                raise RuntimeError(f"{what} not ready in {timeout}s; see {self.dir}/*.log")
            time.sleep(0.2)

    def run(self, *cmd, check=True):
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check:
            assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"
        return r

    def submit(self, args, *sbatch_options, **env):
        """launch/train.slurm on one node, CPU only: one rank, one core."""
        r = subprocess.run(
            ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
             f"--output={self.dir}/job-%j.out", f"--chdir={self.dir}", *sbatch_options,
             os.path.join(ROOT, "launch", "train.slurm"), *args],
            # The test's mark travels with the job (sbatch exports the environment): what the test
            # started is found and ended after it, even a process that left slurm's tracking.
            env={**self.env, TEST_MARK: os.environ.get(TEST_MARK, ""), "MASTER_PORT": str(free_port()),
                 **{k: str(v) for k, v in env.items()}},
            capture_output=True, text=True, timeout=60, cwd=self.dir)  # the stop file goes to the submit folder
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0]

    def job(self, job_id):
        """scontrol's fields of a job, e.g. job(j)["JobState"]."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def output(self, job_id):
        path = os.path.join(self.dir, f"job-{job_id}.out")
        return open(path).read() if os.path.exists(path) else ""

    def wait_for(self, job_id, condition, what, timeout=300):
        """The bound only ends a hang: on a loaded machine a job may take minutes to start."""
        deadline = time.time() + timeout
        while not condition():
            assert time.time() < deadline, f"{what}: not in {timeout}s\n{self.job(job_id)}\n{self.output(job_id)[-4000:]}"
            time.sleep(0.5)

    def release(self, job_id, *fields):
        """Start a requeued job now: slurm holds one back two minutes once it is PENDING again."""
        self.wait_for(job_id, lambda: self.job(job_id)["JobState"] == "PENDING", "the requeued job")
        # slurmd refuses to launch a job whose credential was revoked (the requeue) within the same
        # second; slurm's own two-minute hold exists for this.
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job_id}", *fields, "StartTime=now")

    def stop(self):
        self.run("scancel", "--user=root", check=False)
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def max_step(run):
    return max(read_metrics(run)) if os.path.exists(os.path.join(run, "metrics.jsonl")) and read_metrics(run) else 0


def test_time_limit_requeue_resume_and_scancel(cluster, tmp_path):
    data = make_corpus(tmp_path / "data", n_docs=300)
    run = tmp_path / "run"
    args = base_args(data, run, steps=100000, **{"checkpoint.interval": 50, "data.num_workers": 1})
    # A one-minute limit: the stop comes 25 s before it.
    job = cluster.submit(args, "--time=1", STOP_LEAD_S=25)
    # The requeue counts before the script logs it: wait for both, its log line being its last words.
    cluster.wait_for(job, lambda: cluster.job(job)["Restarts"] == "1" and f"requeued job {job}" in cluster.output(job),
                     "the time-limit requeue")
    out = cluster.output(job)
    stopped = max_step(run)
    assert "time limit (USR1): asking every rank to checkpoint and stop" in out, out[-4000:]
    assert f"stopping after step {stopped} (stop file" in out, out[-4000:]
    # Periodic checkpoints, as many as the steps before the stop allowed (a loaded machine trains fewer).
    assert all(f"{run}/checkpoints/step-{s} complete" in out for s in range(50, stopped, 50)), out[-4000:]
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata")

    cluster.release(job, "TimeLimit=10")  # with room to run this time
    cluster.wait_for(job, lambda: max_step(run) >= stopped + 5, "the resumed job's steps")
    assert f"resumed from {run}/checkpoints/step-{stopped} (step {stopped})" in cluster.output(job)

    cluster.run("scancel", job)
    # The script's last words: past them it can no longer requeue the job.
    cluster.wait_for(job, lambda: "not requeueing" in cluster.output(job), "the script's end after the cancel")
    cluster.wait_for(job, lambda: cluster.job(job)["JobState"] == "CANCELLED", "the cancel")
    info = cluster.job(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", info

    # Every step logged once, equal to a run that nothing interrupted (ended by the same schedule).
    last = max_step(run)
    reference = tmp_path / "reference"
    run_trainer(base_args(data, reference, steps=100000, **{"checkpoint.interval": 50, "data.num_workers": 1,
                                                            "training.stop_at_step": last}))
    assert [read_metrics(run)[s]["loss"] for s in range(1, last + 1)] == \
        [read_metrics(reference)[s]["loss"] for s in range(1, last + 1)]


def test_scontrol_requeue_saves_at_the_stop_step_and_resumes(cluster, tmp_path):
    data = make_corpus(tmp_path / "data", n_docs=300)
    run = tmp_path / "run"
    args = base_args(data, run, steps=100000, **{"checkpoint.interval": 100000, "data.num_workers": 2})
    job = cluster.submit(args, "--time=10")
    cluster.wait_for(job, lambda: max_step(run) >= 10, "training")
    cluster.run("scontrol", "requeue", job)  # SIGTERM to every process of the job
    cluster.wait_for(job, lambda: "not requeueing" in cluster.output(job), "the stop")
    out = cluster.output(job)
    stopped = max_step(run)
    assert f"stopping after step {stopped} (received SIGTERM)" in out, out[-4000:]
    assert "is killed by signal" not in out
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata")
    assert cluster.job(job)["Restarts"] == "1"

    cluster.release(job)
    cluster.wait_for(job, lambda: max_step(run) >= stopped + 3, "the requeued job's steps")
    assert f"resumed from {run}/checkpoints/step-{stopped} (step {stopped})" in cluster.output(job)
    cluster.run("scancel", job)
    cluster.wait_for(job, lambda: cluster.job(job)["JobState"] == "CANCELLED", "the cancel")


def launchers_of_this_test():
    """The torchrun agents (python -m mobilellm_train.launch) this test's jobs run; srun and the
    batch script, whose command lines name the module too, are not."""
    out = []
    for pid in marked_processes(os.environ[TEST_MARK]):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]).startswith(b"python") and argv[1:3] == [b"-m", b"mobilellm_train.launch"]:
            out.append(pid)
    return out


def test_ranks_stop_when_their_launcher_is_killed(cluster, tmp_path):
    # kill -9 of the launcher leaves its rank to init, where slurm (proctrack/linuxproc, which
    # follows parents) no longer sees it: only the parent-death signal stops it, with a save.
    data = make_corpus(tmp_path / "data", n_docs=300)
    run = tmp_path / "run"
    job = cluster.submit(base_args(data, run, steps=100000, **{"checkpoint.interval": 100000,
                                                                "data.num_workers": 1}), "--time=10")
    cluster.wait_for(job, lambda: max_step(run) >= 5, "training")
    [launcher] = launchers_of_this_test()
    ranks = children(launcher)
    assert len(ranks) == 1
    os.kill(launcher, signal.SIGKILL)
    cluster.wait_for(job, lambda: not running(ranks[0]), "the end of the rank whose launcher was killed")
    # Its output may end with srun, which the launcher's death ends: the run folder tells. Periodic
    # saves are off, so a checkpoint of the last step is the stop's.
    stopped = max_step(run)
    assert os.path.isfile(run / "checkpoints" / f"step-{stopped}" / ".metadata"), cluster.output(job)[-4000:]
    cluster.run("scancel", job, check=False)
