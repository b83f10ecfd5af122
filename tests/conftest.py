"""Shared fixtures: a small learnable corpus in the original layout, runners for the trainer
in-process (one rank) and under torchrun (several gloo ranks on CPU), and an automatic one that
ends every process a test started, whatever the test's outcome."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough that a step takes milliseconds on CPU.
TINY_MODEL = [
    "--model.flavor", "debug", "--model.vocab_size", "64", "--model.dim", "64", "--model.n_layers", "2",
    "--model.n_heads", "4", "--model.n_kv_heads", "2", "--model.ffn_dim", "128",
]


def init_model(args, seed=3):
    """A MobileLLM of `args` with the trainer's initialisation, in eval mode."""
    from mobilellm_train.model import MobileLLM

    model = MobileLLM(args)
    model.init_weights(seed=seed)
    return model.eval()


def make_corpus(path, n_docs=400, vocab=64, folders=1, seed=0):
    """Documents of arithmetic progressions mod (vocab - 3): easy to learn, so loss falls fast."""
    rng = random.Random(seed)
    for folder in range(1, folders + 1):
        os.makedirs(os.path.join(path, str(folder)), exist_ok=True)
        with open(os.path.join(path, str(folder), "part-0.jsonl"), "w") as f:
            for _ in range(n_docs):
                start, stride, n = rng.randrange(vocab - 3), rng.choice([1, 2, 3]), rng.randrange(20, 80)
                ids = [1] + [3 + (start + i * stride) % (vocab - 3) for i in range(n)] + [2]
                f.write(json.dumps({"token_ids": ids}) + "\n")
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "data")


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group for in-process DCP saves and loads."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def base_args(data_path, dump_folder, steps=20, **overrides):
    args = TINY_MODEL + [
        "--data.path", str(data_path), "--job.dump_folder", str(dump_folder),
        "--training.steps", str(steps), "--training.seq_len", "32", "--training.local_batch_size", "4",
        "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
        "--metrics.enable_tensorboard", "false", "--data.num_workers", "0", "--checkpoint.interval", "10",
    ]
    for key, value in overrides.items():
        args += [f"--{key.replace('__', '.')}", str(value)]
    return args


def subprocess_env(**extra) -> dict:
    """Environment for a child process: this checkout first on PYTHONPATH (then whatever it held,
    e.g. a folder of carried wheels), one thread per process, and no inherited torchrun variables
    that would make the child think it is a rank of some other job."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_trainer(args, nproc=1, expect_rc=0, timeout=300):
    """Run mobilellm_train.train in fresh processes (torchrun for nproc > 1); return the output."""
    env = subprocess_env()
    if nproc == 1:
        cmd = [sys.executable, "-m", "mobilellm_train.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mobilellm_train.train", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == expect_rc, f"exit {r.returncode}, expected {expect_rc}:\n{out[-6000:]}"
    return out


def read_metrics(dump_folder):
    """metrics.jsonl as {step: record}; a resumed run's records replace the ones it repeats."""
    with open(os.path.join(dump_folder, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def wait_for_step(run, step, proc, timeout=300):
    """Wait until the trainer `proc`, writing into `run`, has logged `step`; fail if it exits first.
    The timeout only bounds a hang: a loaded machine may take minutes to start a run."""
    path = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read()[-4000:]}"
        if os.path.exists(path) and read_metrics(run) and max(read_metrics(run)) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def children(pid):
    """Process ids whose parent is `pid` (a launcher's ranks, a rank's loader workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def descendants(pid):
    """pid and every process below it: what slurm signals when it signals a job."""
    out = [pid]
    for child in children(pid):
        out += descendants(child)
    return out


def running(pid):
    """Still running: a zombie (exited, not yet reaped by init) has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def train_tiny_tokenizer(folder) -> str:
    """A 60-piece SentencePiece BPE model (bos 1, eos 2) trained in-process on two sentences;
    returns its tokenizer.model path."""
    import sentencepiece as spm

    prefix = os.path.join(str(folder), "sp")
    lines = ["the quick brown fox jumps over the lazy dog", "a dog and a cat sat on the mat"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, model_type="bpe",
                                   vocab_size=60, bos_id=1, eos_id=2, unk_id=0, hard_vocab_limit=False,
                                   minloglevel=2, num_threads=1)
    return prefix + ".model"


# Every process a test starts (directly, through torchrun, sbatch and srun, or as a loader worker)
# inherits this variable, with a value of that test's own, and keeps it when its parent dies and
# it is handed to init: the one thing that finds all of them after the test.
TEST_MARK = "MOBILELLM_TEST_PROCESS"


def marked_processes(mark):
    needle = f"\0{TEST_MARK}={mark}\0".encode()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in b"\0" + f.read():
                        out.append(int(entry))
            except OSError:
                pass  # ended while we looked, or not ours to read
    return out


@pytest.fixture(autouse=True)
def end_every_process_the_test_started():
    """After each test, passed or failed, SIGKILL whatever it started that still runs (ranks
    included: torchrun puts them in sessions of their own, so killing a process group misses them)."""
    mark = uuid.uuid4().hex
    os.environ[TEST_MARK] = mark
    try:
        yield
    finally:
        os.environ.pop(TEST_MARK, None)
        if os.path.isdir("/proc"):
            for pid in marked_processes(mark):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
