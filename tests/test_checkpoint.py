"""Checkpoints you can trust: loading runs no code from the folder, corruption is caught by the
checksums, failed saves stop the run in words, retention never deletes what a load needs.

The crafted files hold a pickle whose `__reduce__` creates a marker file when unpickled: the tests
check that the marker never appears and that the error names the file.
"""

import contextlib
import errno
import glob
import json
import logging
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
    # Nesting that crashed the process, and a prefix rewriting Metadata.__getstate__: the same.
    valid = open(os.path.join(trained[1], "checkpoints", "step-10", ".metadata"), "rb").read()
    for crafted, reason in ((b"\x80\x04)" + b"\x85" * 1_000_000 + b".", "nested more than 64 deep"),
                            (b"\x80\x04" + set_state_of(b"torch.distributed.checkpoint.metadata\nMetadata",
                                                         short_str("__getstate__") + b"cbuiltins\nset\ns") + valid[2:],
                             "BUILD of something other than a new instance")):
        with open(metadata_file, "wb") as f:
            f.write(crafted)
        for name, argv, main in lone_loaders(step20, tmp_path, data):
            err = run_cli(main, argv + ["--no-verify"], capsys)
            assert metadata_file in err and reason in err, (name, err)
    craft_metadata(step20, marker)
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
    # Refused like any damage: auto-resume sets it aside and falls back.
    craft_value(step20, marker, "rng", "rank_0")
    out = run_trainer(base_args(data, run, steps=22))
    assert f"{step20}/__0_0.distcp" in out and "'rng.rank_0' was refused" in out
    assert "falling back to step 10" in out and os.path.isdir(f"{step20}.corrupt")
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
from mobilellm_train.train import cli

original = C.ChecksummedWriter.write_data

def failing(self, plan, planner):
    if str(self.path).endswith("step-10") and os.environ.get("RANK", "0") == os.environ["FAIL_RANK"]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(str(self.path), "__0_0.distcp"))
    return original(self, plan, planner)

C.ChecksummedWriter.write_data = failing
cli(sys.argv[1:])
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
    assert not os.path.lexists(ck.path(10))  # the failed save's partial folder is removed
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
    # Room for the start's free-space check (one checkpoint, estimated with slack) and a save or
    # two, not for every save of the run.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3000k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        data = make_corpus(tmp_path / "data", n_docs=100)
        out = run_trainer(base_args(data, mount / "run", steps=20, **{"checkpoint.interval": 5,
                                                                     "checkpoint.keep_latest_k": 0}), expect_rc=1)
        assert "failed: No space left on device" in out
        kept = re.search(r"Every older checkpoint is kept \(([\d, ]+)\)", out)
        assert kept, out[-2000:]
        for step in kept.group(1).split(", "):
            C.verify_checkpoint(str(mount / "run" / "checkpoints" / f"step-{step}"))
        # The failed save's partial folder is gone; only the complete ones remain.
        assert sorted(os.listdir(mount / "run" / "checkpoints")) == sorted(
            ["run.lock"] + [f"step-{step}" for step in kept.group(1).split(", ")])
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


# --- Crafted step folders, round two: nothing in a step folder changes the program, crashes it,
# reaches outside it or loses another run's data. Each builds the crafted input directly.

def rewrite_manifests(step_dir):
    """Recompute every manifest entry of a step folder: the crafted change then passes the
    checksums, as damage that happened before they were computed would."""
    for manifest in glob.glob(os.path.join(str(step_dir), C.MANIFEST_GLOB)):
        with open(manifest) as f:
            content = json.load(f)
        for name in content["files"]:
            full = os.path.join(str(step_dir), name)
            content["files"][name] = {"bytes": os.path.getsize(full), "crc32": f"{C.file_crc32(full):08x}"}
        with open(manifest, "w") as f:
            json.dump(content, f)


def set_state_of(global_name: bytes, state: bytes) -> bytes:
    """Opcodes that look up `global_name` and BUILD it with the (None, {...}) slot state `state`."""
    return b"c" + global_name + b"\nN}" + state + b"\x86b0"


def short_str(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()


def saved_steps(tmp_path, steps, tokenizer=None, keep=0):
    model, train_state, states = tiny_states()
    ck = C.Checkpointer(CheckpointConfig(async_mode="disabled", keep_latest_k=keep), str(tmp_path), states, rank=0,
                        tokenizer_path=str(tokenizer or ""))
    for step in steps:
        train_state.step = step
        ck.save(step)
    return ck, train_state


def test_metadata_cannot_rewrite_a_class_nest_deep_or_be_read_through_a_link(tmp_path, one_rank_group):
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, Metadata

    ck, _ = saved_steps(tmp_path, [5])
    step = ck.path(5)
    valid = open(os.path.join(step, ".metadata"), "rb").read()
    real = C.read_metadata(step)
    extra_field = C.read_metadata(step)
    extra_field.run_me = 1
    poisons = {
        # A prefix that replaces Metadata.__getstate__ (every later save would fail), then a valid index.
        "class": b"\x80\x04" + set_state_of(b"torch.distributed.checkpoint.metadata\nMetadata",
                                             short_str("__getstate__") + b"cbuiltins\nset\ns") + valid[2:],
        # An enum member is a shared constant: its value must not change either.
        "constant": b"\x80\x04ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\nK\x00\x85R"
                    + b"N}" + short_str("_value_") + b"K\x07s\x86b0" + valid[2:],
        # 10^6 nested tuples, no globals at all (crashed the process).
        "deep tuple": b"\x80\x04)" + b"\x85" * 1_000_000 + b".",
        # Deep lists built top-down through the memo, a constant-size stack.
        "deep lists": b"\x80\x04]\x94" + b"".join(
            b"j" + i.to_bytes(4, "little") + b"]\x94a0" for i in range(200)) + b"j\x00\x00\x00\x00.",
        # An undeclared field on a valid class.
        "field": pickle.dumps(extra_field),
        # A memo index of 2^31: the unpickler sizes its memo table by it (tens of GiB; MemoryError
        # under a 4 GB limit, an OOM kill without one).
        "memo": b"\x80\x02Nr\xff\xff\xff\x7f.",
    }
    reasons = {"class": "BUILD of something other than a new instance", "constant": "BUILD of something other",
               "deep tuple": "nested more than 64 deep", "deep lists": "changes an object after using it",
               "field": "undeclared fields", "memo": "out of sequence"}
    for name, data in poisons.items():
        with open(os.path.join(step, ".metadata"), "wb") as f:
            f.write(data)
        with pytest.raises(C.CheckpointError, match="not a valid checkpoint index") as info:
            C.read_metadata(step)
        assert reasons[name] in str(info.value), (name, info.value)
        assert "__getstate__" not in Metadata.__dict__ and _MEM_FORMAT_ENCODING(0).value == 0, name
    # What is returned holds fresh objects equal to the real index, nothing else.
    with open(os.path.join(step, ".metadata"), "wb") as f:
        f.write(valid)
    again = C.read_metadata(step)
    assert again.state_dict_metadata == real.state_dict_metadata and again.storage_data == real.storage_data
    # Huge, a device, a link: refused before reading.
    os.truncate(os.path.join(step, ".metadata"), (1 << 30) + 1)
    with pytest.raises(C.CheckpointError, match="more than any checkpoint index"):
        C.read_metadata(step)
    os.remove(os.path.join(step, ".metadata"))
    os.symlink("/dev/zero", os.path.join(step, ".metadata"))
    with pytest.raises(C.CheckpointError, match="symbolic link"):
        C.read_metadata(step)
    ck.close()


def test_manifests_cover_every_file_and_name_only_files_of_the_step(tmp_path, one_rank_group):
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(os.urandom(4096))
    ck, _ = saved_steps(tmp_path / "run", [5], tokenizer=tokenizer)
    step = ck.path(5)
    good = tmp_path / "good"
    shutil.copytree(step, good, symlinks=True)
    C.verify_checkpoint(step)

    def fresh():
        shutil.rmtree(step)
        shutil.copytree(good, step, symlinks=True)

    for name in (C.TOKENIZER_FILE, ".metadata"):  # a flipped bit in any file a load or export reads
        with open(os.path.join(step, name), "r+b") as f:
            f.seek(os.path.getsize(os.path.join(step, name)) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x10]))
        with pytest.raises(C.CheckpointError, match=re.escape(os.path.join(step, name))):
            C.verify_checkpoint(step)
        fresh()
    outside = tmp_path / "secret"
    outside.write_bytes(b"x" * 100)
    manifest = os.path.join(step, "__0_manifest.json")
    entries = {
        "../secret": {"bytes": 100, "crc32": "00000000"},
        str(outside): {"bytes": 100, "crc32": "00000000"},
        "/dev/zero": {"bytes": 0, "crc32": "00000000"},  # read forever
        "__0_0.distcp": {"bytes": 1e400, "crc32": "00000000"},  # OverflowError
    }
    for name, entry in entries.items():
        with open(manifest, "w") as f:
            json.dump({"format": 1, "files": {name: entry}}, f)
        with pytest.raises(C.CheckpointError, match=re.escape(manifest)) as info:
            C.verify_checkpoint(step)
        assert f"{C.file_crc32(str(outside)):08x}" not in str(info.value)
    with open(manifest, "w") as f:
        f.write("[" * 100_000)  # RecursionError
    with pytest.raises(C.CheckpointError, match=re.escape(manifest)):
        C.verify_checkpoint(step)
    fresh()
    os.mkdir(os.path.join(step, "__9_manifest.json"))  # IsADirectoryError
    with pytest.raises(C.CheckpointError, match="__9_manifest.json is not a checksum manifest"):
        C.verify_checkpoint(step)
    fresh()
    # A data file named by .metadata that is a link (its manifest entry matches the target).
    shard = os.path.join(step, "__0_0.distcp")
    os.replace(shard, tmp_path / "shard")
    os.symlink(tmp_path / "shard", shard)
    with pytest.raises(C.CheckpointError, match="symbolic link"):
        C.verify_checkpoint(step)
    with pytest.raises(C.CheckpointError, match="symbolic link"):
        C.load_model_from_checkpoint(step, verify=False)
    fresh()
    # A step of the earlier layout (no manifest for .metadata and the tokenizer): its shards are
    # still verified, with a warning that the rest is not; a damaged shard is still caught.
    os.remove(os.path.join(step, C.METADATA_MANIFEST))
    with caplog_at(logging.WARNING) as records:
        assert C.verify_checkpoint(step) > 0
    assert any("written before .metadata and tokenizer.model had checksums" in r for r in records)
    with open(shard, "r+b") as f:
        f.write(bytes([f.read(1)[0] ^ 1]))
    with pytest.raises(C.CheckpointError, match=re.escape(shard)):
        C.verify_checkpoint(step)
    ck.close()


@contextlib.contextmanager
def caplog_at(level):
    """The messages logged to "mobilellm_train" at `level` or above inside the block."""
    records = []
    handler = logging.Handler(level)
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("mobilellm_train")
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


def test_auto_resume_falls_back_past_any_step_that_fails_to_load(tmp_path, one_rank_group, caplog):
    from torch.distributed.checkpoint.metadata import Metadata

    ck, train_state = saved_steps(tmp_path, [5, 10, 15, 20, 25, 30])
    valid = open(os.path.join(ck.path(25), ".metadata"), "rb").read()
    # 30: the .metadata of another step (its checksum now catches that).
    shutil.copyfile(os.path.join(ck.path(5), ".metadata"), os.path.join(ck.path(30), ".metadata"))
    # 25: a prefix rewriting Metadata.__getstate__; 20: 10^6 nested tuples; 15: an index that
    # parses and verifies but points past the end of its shard (damage that still parses).
    with open(os.path.join(ck.path(25), ".metadata"), "wb") as f:
        f.write(b"\x80\x04" + set_state_of(b"torch.distributed.checkpoint.metadata\nMetadata",
                                           short_str("__getstate__") + b"cbuiltins\nset\ns") + valid[2:])
    with open(os.path.join(ck.path(20), ".metadata"), "wb") as f:
        f.write(b"\x80\x04)" + b"\x85" * 1_000_000 + b".")
    index = C.read_metadata(ck.path(15))
    index.storage_data = {k: type(v)(v.relative_path, v.offset + 10**6, v.length) for k, v in index.storage_data.items()}
    with open(os.path.join(ck.path(15), ".metadata"), "wb") as f:
        pickle.dump(index, f)
    for step in (15, 20, 25):
        rewrite_manifests(ck.path(step))
    resumed = C.TrainState(model_args=train_state.model_args)
    ck.states["train_state"] = resumed
    with caplog.at_level("INFO", logger="mobilellm_train"):
        assert ck.maybe_resume(resumed)
    assert resumed.step == 10
    assert "BUILD of something other than a new instance" in caplog.text and "nested more than 64" in caplog.text
    assert f"{ck.path(15)} cannot be read" in caplog.text  # verified, then failed in the load
    assert f"{ck.path(30)}/.metadata is damaged" in caplog.text
    for step in (15, 20, 25, 30):
        assert f"moved to {ck.path(step)}.corrupt and falling back to step 10" in caplog.text
        assert os.path.isfile(os.path.join(ck.path(step) + ".corrupt", ".metadata"))
    assert caplog.text.count(f"verified {ck.path(10)} against its checksums") == 1  # once, not twice
    # The run goes on and its saves load: nothing of the class was changed.
    assert "__getstate__" not in Metadata.__dict__
    resumed.step = 11
    ck.save(11)
    C.verify_checkpoint(ck.path(11))
    loaded = C.TrainState()
    C.checked_load({"train_state": loaded}, ck.path(11))
    assert loaded.step == 11
    ck.close()


def test_permission_problems_stop_the_resume_and_rename_nothing(tmp_path, monkeypatch, one_rank_group):
    ck, train_state = saved_steps(tmp_path, [5, 10])
    shard = os.path.join(ck.path(10), "__0_0.distcp")
    real_open = os.open

    def denying_open(path, *args, **kwargs):  # tests run as root, which reads everything
        if str(path) == shard:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denying_open)
    with pytest.raises(C.CheckpointError, match=re.escape(f"{shard}: permission denied") + ".*chmod"):
        ck.maybe_resume(C.TrainState(model_args=train_state.model_args))
    assert C.list_checkpoints(ck.folder)[0] == [5, 10] and not glob.glob(ck.path(10) + ".corrupt*")
    # A checkpoint of another model is no damage either: stop, rename nothing.
    monkeypatch.setattr(os, "open", real_open)
    other = C.TrainState(model_args=json.dumps({**json.loads(train_state.model_args), "dim": 128}))
    with pytest.raises(C.CheckpointError, match="written for another model"):
        ck.maybe_resume(other)
    assert C.list_checkpoints(ck.folder)[0] == [5, 10]
    ck.close()


def test_retention_and_saves_never_delete_through_a_link(tmp_path, one_rank_group):
    other, _ = saved_steps(tmp_path / "other", [5, 10])
    other.close()
    ck, train_state = saved_steps(tmp_path / "run", [], keep=1)
    os.makedirs(ck.folder)
    os.symlink(other.path(5), ck.path(5))  # another run's checkpoint linked in to resume from
    os.symlink(other.path(10), ck.path(10))
    os.symlink(tmp_path / "gone", ck.path(7))  # dangling
    train_state.step = 7
    ck.save(7)
    assert not os.path.islink(ck.path(7))
    train_state.step = 10
    ck.save(10)  # replaces the link, not the other run's step 10
    assert not os.path.islink(ck.path(10))
    train_state.step = 15
    ck.save(15)  # retention removes our step 10 and the link step-5, never its target
    assert C.list_checkpoints(ck.folder)[0] == [15] and not os.path.lexists(ck.path(5))
    for step in (5, 10):
        C.verify_checkpoint(other.path(step))
    ck.close()


def test_full_disk_while_copying_the_tokenizer_fails_the_save_in_words(tmp_path, monkeypatch, one_rank_group):
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(os.urandom(100_000))
    ck, train_state = saved_steps(tmp_path / "run", [5], tokenizer=tokenizer)
    real_copy = shutil.copyfileobj

    def full_disk(src, dst, length=0):
        dst.write(src.read(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfileobj", full_disk)
    train_state.step = 10
    with pytest.raises(C.CheckpointError, match=re.escape(
            f"saving the checkpoint of step 10 to {ck.path(10)} failed: No space left on device")):
        ck.save(10)
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    # Not marked complete, and the partial folder of the failed save is gone; step 5 is whole.
    assert C.list_checkpoints(ck.folder) == ([5], []) and not os.path.lexists(ck.path(10))
    C.verify_checkpoint(ck.path(5))
    assert (open(os.path.join(ck.path(5), C.TOKENIZER_FILE), "rb").read() == tokenizer.read_bytes())
    ck.close()


def test_one_stager_keeps_its_host_buffers_across_saves():
    """The pinned mode's stager (CPU here: no pinning, same code path otherwise) stages every save
    into the buffers of the first, also on torch 2.11 whose DefaultStager dropped them after each
    save (and then failed on the second)."""
    from torch.distributed.checkpoint.staging import StagingOptions

    from mobilellm_train.checkpoint.checkpointer import OrderedStager

    weight = torch.zeros(1000)
    stager = OrderedStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=True,
                                          use_non_blocking_copy=False))
    storages = []
    for step in (1, 2, 3):
        weight.fill_(step)
        staged = stager.stage({"w": weight}).result()
        assert (staged["w"] == step).all() and staged["w"].data_ptr() != weight.data_ptr()
        storages.append(staged["w"].data_ptr())
    assert len(set(storages)) == 1  # copied into the same host buffer each time
    stager.close()
