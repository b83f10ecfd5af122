"""Checkpoints you can trust: loading runs no code from the folder, corruption is caught by the
checksums, failed saves stop the run in words, retention never deletes what a load needs.

The crafted files hold a pickle whose `__reduce__` creates a marker file when unpickled: the tests
check that the marker never appears and that the error names the file.
"""

import errno
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from conftest import ROOT, base_args, make_corpus, read_metrics, run_trainer, subprocess_env
from mobilellm_train import checkpoint as C
from mobilellm_train.config import CheckpointConfig
from mobilellm_train.metrics import append_line
from mobilellm_train.model import MobileLLM, ModelArgs


class Evil:
    """Unpickling this creates `marker`: the stand-in for any code a crafted pickle could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished single-rank run with complete checkpoints at steps 10 and 20."""
    root = tmp_path_factory.mktemp("trained")
    data = make_corpus(root / "data")
    run = root / "run"
    run_trainer(base_args(data, run, steps=20, **{"checkpoint.keep_latest_k": 0}))
    return data, run


def copy_run(trained, dest):
    shutil.copytree(trained[1], dest)
    return dest


def craft_metadata(step_dir, marker):
    with open(os.path.join(step_dir, ".metadata"), "wb") as f:
        pickle.dump(Evil(marker), f)


def craft_value(step_dir, marker, *key):
    """Rewrite a step folder with the value at `key` replaced by a code-running pickle, its
    checksum manifests consistent: only the loader's own care can stop it."""
    state: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load_state_dict(state, storage_reader=FileSystemReader(step_dir), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        node = state
        for k in key[:-1]:
            node = node[k]
        assert key[-1] in node
        node[key[-1]] = Evil(marker)
        shutil.rmtree(step_dir)
        dcp.save(state, storage_writer=C.ChecksummedWriter(str(step_dir)), no_dist=True)


def run_cli(module_main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module_main(argv)
    assert exit_info.value.code == 1
    return capsys.readouterr().err


def lone_loaders(step, tmp_path, data):
    """(name, argv, main) of every lone-process tool that opens a step folder."""
    from mobilellm_train.evaluation.cli import main as eval_main
    from mobilellm_train.export import main as export_main
    from mobilellm_train.generate import main as generate_main

    return [
        ("export", ["--checkpoint", step, "--out", str(tmp_path / "hf")], export_main),
        ("eval", ["--checkpoint", step, "--tasks", "tokens", "--token-data", str(data), "--device", "cpu"], eval_main),
        ("generate", ["--checkpoint", step, "--prompt", "x", "--device", "cpu"], generate_main),
    ]


def test_per_rank_state_round_trips_through_json():
    random.seed(7)
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "loader": {0: {"buffer": [1, 2, 3], "done": False, "name": None}, "bf16": torch.ones(2, 3, dtype=torch.bfloat16)},
        "empty": torch.zeros(0, 4),
        "raw": b"\x00\xff",
        "scalar": torch.tensor(3.5),
    }
    back = C.decode_state(C.encode_state(state))
    assert back["python"] == state["python"]  # tuples stay tuples: random.setstate accepts it
    random.setstate(back["python"])
    assert torch.equal(back["torch"], state["torch"]) and back["torch"].dtype == torch.uint8
    assert back["loader"][0] == state["loader"][0] and 0 in back["loader"]  # an int key stays an int
    assert torch.equal(back["loader"]["bf16"], state["loader"]["bf16"])
    assert back["empty"].shape == (0, 4) and back["raw"] == b"\x00\xff" and back["scalar"].item() == 3.5
    with pytest.raises(TypeError, match="cannot hold a Evil"):
        C.encode_state({"x": Evil("nowhere")})


@pytest.mark.slow
def test_crafted_metadata_runs_no_code_anywhere(trained, tmp_path, capsys):
    data, _ = trained
    marker = tmp_path / "MARKER"
    run = copy_run(trained, tmp_path / "run")
    step20 = str(run / "checkpoints" / "step-20")
    craft_metadata(step20, marker)
    metadata_file = os.path.join(step20, ".metadata")

    # The lone-process tools refuse it, naming the file, with or without checksum verification.
    for name, argv, main in lone_loaders(step20, tmp_path, data):
        for extra in ([], ["--no-verify"]):
            err = run_cli(main, argv + extra, capsys)
            assert metadata_file in err and "not a valid checkpoint index" in err, (name, err)
    # As the weights of a new run, without verification: the restricted unpickler alone refuses it.
    out = run_trainer(base_args(data, tmp_path / "fresh", steps=2, **{"checkpoint.initial_load_path": step20,
                                                                     "checkpoint.verify": "false"}), expect_rc=1)
    assert metadata_file in out and "CheckpointError" in out
    # Auto-resume treats it as damaged: set aside (kept), the run continues from step 10.
    out = run_trainer(base_args(data, run, steps=22))
    assert metadata_file in out and "falling back to step 10" in out and "resumed from" in out
    assert os.path.isfile(os.path.join(step20 + ".corrupt", ".metadata"))
    assert not marker.exists()


@pytest.mark.slow
def test_crafted_values_run_no_code(trained, tmp_path, capsys):
    data, _ = trained
    marker = tmp_path / "MARKER"
    run = copy_run(trained, tmp_path / "run")
    step20 = run / "checkpoints" / "step-20"
    step10 = run / "checkpoints" / "step-10"
    # A per-rank entry (the RNG state, once pickled) on resume; the manifests match, so only the
    # loader's refusal to unpickle stands between the file and the code.
    craft_value(step20, marker, "rng", "rank_0")
    out = run_trainer(base_args(data, run, steps=30), expect_rc=1)
    assert f"{step20}/__0_0.distcp" in out and "'rng.rank_0' was refused" in out
    # The train state every tool reads first.
    craft_value(step10, marker, "train_state", "model_args")
    for name, argv, main in lone_loaders(str(step10), tmp_path, data):
        err = run_cli(main, argv, capsys)
        assert f"{step10}/__0_0.distcp" in err and "'train_state.model_args' was refused" in err, (name, err)
    assert not marker.exists()


def flip_bytes(path, count=5000):
    """Flip the low mantissa bit of `count` float32s in the middle of the file: the values stay
    finite and plausible, the kind of damage nothing else would notice."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2 & ~3
        for i in range(count):
            data[middle - 4 * count // 2 + 4 * i] ^= 1
        f.seek(0)
        f.write(data)


@pytest.mark.slow
def test_corruption_is_caught_and_auto_resume_falls_back(trained, tmp_path, capsys):
    data, _ = trained
    run = copy_run(trained, tmp_path / "run")
    step20 = run / "checkpoints" / "step-20"
    damaged = f"{step20}/__0_0.distcp"
    flip_bytes(damaged)

    from mobilellm_train.export import main as export_main

    err = run_cli(export_main, ["--checkpoint", str(step20), "--out", str(tmp_path / "hf")], capsys)
    assert damaged in err and "CRC-32" in err
    export_main(["--checkpoint", str(step20), "--out", str(tmp_path / "hf"), "--no-verify"])  # the user's choice
    out = run_trainer(base_args(data, run, steps=30, **{"checkpoint.load_step": 20}), expect_rc=1)
    assert damaged in out and "damaged" in out
    out = run_trainer(base_args(data, run, steps=22))
    assert damaged in out and "falling back to step 10" in out and "verified" in out
    assert os.path.isdir(f"{step20}.corrupt") and C.list_checkpoints(run / "checkpoints")[0] == [10, 20, 22]
    C.verify_checkpoint(str(step20))  # the new step 20, written on the way to 22


FAILING_SAVE = """
import errno, os, sys
from mobilellm_train import checkpoint as C
from mobilellm_train.train import main

original = C.ChecksummedWriter.write_data

def failing(self, plan, planner):
    if str(self.path).endswith("step-10") and os.environ.get("RANK", "0") == os.environ["FAIL_RANK"]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(str(self.path), "__0_0.distcp"))
    return original(self, plan, planner)

C.ChecksummedWriter.write_data = failing
main(sys.argv[1:])
"""


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_failed_save_is_reported_at_once_one_rank(tmp_path, monkeypatch, one_rank_group, async_mode):
    model, train_state, states = tiny_states()
    ck = C.Checkpointer(CheckpointConfig(async_mode=async_mode, keep_latest_k=1), str(tmp_path), states, rank=0)
    train_state.step = 5
    ck.save(5)
    ck.wait()

    def full_disk(self, plan, planner):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(str(self.path), "__0_0.distcp"))

    monkeypatch.setattr(C.ChecksummedWriter, "write_data", full_disk)
    train_state.step = 10
    expected = re.escape(f"saving the checkpoint of step 10 to {ck.path(10)} failed: No space left on device")
    if async_mode == "disabled":
        with pytest.raises(C.CheckpointError, match=expected):
            ck.save(10)
    else:
        ck.save(10)  # returns while the write goes on in the background
        deadline = time.monotonic() + 30
        while not ck.pending.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(C.CheckpointError, match=expected):
            ck.raise_if_failed()  # the next step boundary
    assert C.list_checkpoints(str(tmp_path / "checkpoints"))[0] == [5]
    ck.close()  # nothing left in flight: closing does not raise again


@pytest.mark.slow
@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_failed_save_stops_a_two_rank_run_in_words(tmp_path, async_mode):
    nproc = 2
    data = make_corpus(tmp_path / "data", n_docs=100)
    run = tmp_path / "run"
    script = tmp_path / "failing_save.py"
    script.write_text(FAILING_SAVE)
    args = base_args(data, run, steps=20, **{"checkpoint.interval": 5, "checkpoint.async_mode": async_mode,
                                             "checkpoint.keep_latest_k": 1})
    cmd = [sys.executable, str(script), *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=subprocess_env(FAIL_RANK=nproc - 1))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    step10 = run / "checkpoints" / "step-10"
    assert f"saving the checkpoint of step 10 to {step10} failed: No space left on device" in out, out[-3000:]
    assert "Every older checkpoint is kept (5)" in out
    assert C.list_checkpoints(run / "checkpoints")[0] == [5]
    # Stopped at the next step boundary: never reached the next save.
    assert max(read_metrics(run)) < 15


@pytest.mark.slow
def test_full_disk_on_a_small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1800k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        data = make_corpus(tmp_path / "data", n_docs=100)
        out = run_trainer(base_args(data, mount / "run", steps=20, **{"checkpoint.interval": 5,
                                                                     "checkpoint.keep_latest_k": 0}), expect_rc=1)
        assert "failed: No space left on device" in out and "Every older checkpoint is kept (5)" in out
        C.verify_checkpoint(str(mount / "run" / "checkpoints" / "step-5"))
        with open(mount / "run" / "metrics.jsonl") as f:
            for line in f:
                json.loads(line)  # whole records only
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_metrics_append_never_leaves_half_a_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    with open(path, "a", buffering=1) as f:
        append_line(f, '{"step": 1}\n')
        real_write = os.write
        calls = []

        def short_then_full(fd, data):
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, bytes(data[:5]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", short_then_full)
        with pytest.raises(OSError, match="No space left on device: appending to .*metrics.jsonl"):
            append_line(f, '{"step": 2, "loss": 1.0}\n')
    assert path.read_text() == '{"step": 1}\n'


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_states(seed=0):
    args = ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    model = MobileLLM(args)
    model.init_weights(seed=seed)
    train_state = C.TrainState(model_args=C.model_args_fingerprint(args))
    return model, train_state, {"model": C.ModelState(model), "train_state": train_state}


def test_rewind_with_keep_one_while_a_save_is_in_flight(tmp_path, one_rank_group):
    model, train_state, states = tiny_states()
    cfg = CheckpointConfig(async_mode="async", keep_latest_k=1)
    ck = C.Checkpointer(cfg, str(tmp_path), states, rank=0)
    train_state.step = 5
    ck.save(5)
    ck.wait()
    train_state.step = 10
    ck.save(10)  # in flight
    # A rewind asks for the newest checkpoint: the save in flight is finished first, so the
    # answer is 10 and the retention that finishing triggers (deleting 5) cannot pull the rug.
    assert ck.newest_complete_step() == 10
    ck.load(10, train_state)
    # Loading an older step while a save is in flight: retention keeps the step being loaded.
    train_state.step = 15
    ck.save(15)
    ck.load(10, train_state)
    assert train_state.step == 10 and os.path.isdir(ck.path(10))
    ck.close()
    # The tied output projection is stored once.
    keys = C.read_metadata(ck.path(15)).state_dict_metadata
    assert "model.tok_embeddings.weight" in keys and "model.output.weight" not in keys


def test_unreadable_step_folder_is_reported_never_deleted(tmp_path, monkeypatch, one_rank_group):
    model, train_state, states = tiny_states()
    ck = C.Checkpointer(CheckpointConfig(async_mode="disabled", keep_latest_k=1), str(tmp_path), states, rank=0)
    for step in (5, 10):
        train_state.step = step
        ck.save(step)
    ck.cfg.keep_latest_k = 0
    train_state.step = 15
    ck.save(15)
    # Tests run as root, which reads everything: deny the listing as the file system would.
    real_listdir = os.listdir
    denied = {ck.path(10), ck.path(15)}

    def listdir(path):
        if str(path) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(C.CheckpointError, match=f"{ck.path(15)}: permission denied"):
        ck.maybe_resume(C.TrainState(model_args=train_state.model_args))
    with pytest.raises(C.CheckpointError, match="permission denied"):
        ck.save(15)
    ck.cfg.keep_latest_k = 1
    denied.discard(ck.path(15))
    ck.save(20)  # retention would delete 10 and 15: 10 cannot be read, so it is left alone
    assert os.path.isdir(ck.path(10)) and not os.path.isdir(ck.path(15))


def test_restricted_unpickler_accepts_real_metadata_and_nothing_else(trained, tmp_path):
    step10 = trained[1] / "checkpoints" / "step-10"
    metadata = C.read_metadata(str(step10))
    assert "train_state.step" in metadata.state_dict_metadata
    bad = tmp_path / "bad"
    shutil.copytree(step10, bad)
    with open(bad / ".metadata", "wb") as f:
        pickle.dump({"path": os.path.join}, f)  # a function, even a harmless one, is refused
    with pytest.raises(C.CheckpointError, match="posixpath.join is not a checkpoint metadata type"):
        C.read_metadata(str(bad))
    metadata.storage_data = {k: type(v)(relative_path="../../etc/passwd", offset=v.offset, length=v.length)
                             for k, v in metadata.storage_data.items()}
    with open(bad / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(C.CheckpointError, match="not a file of this folder"):
        C.read_metadata(str(bad))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_memory_async_mode_saves_every_time(tmp_path, one_rank_group):
    """torch 2.11's DefaultStager failed on its second save; each save must hold its own step's
    weights, not those written after its staging finished."""
    model, train_state, states = tiny_states()
    model.cuda()
    ck = C.Checkpointer(CheckpointConfig(async_mode="async_with_pinned_mem", keep_latest_k=0), str(tmp_path),
                        states, rank=0)
    for step in (1, 2, 3):
        train_state.step = step
        with torch.no_grad():
            model.tok_embeddings.weight.fill_(step)
        ck.save(step)
        ck.wait_for_staging()
        with torch.no_grad():  # what the next optimizer step does: must not reach the file
            model.tok_embeddings.weight.fill_(-1.0)
        ck.wait()
    ck.close()
    for step in (1, 2, 3):
        C.verify_checkpoint(ck.path(step))
        assert (C.load_model_from_checkpoint(ck.path(step)).tok_embeddings.weight == step).all()
