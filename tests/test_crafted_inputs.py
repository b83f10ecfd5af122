"""Run folders, step folders, Hugging Face folders, configs and logs from elsewhere, round three:
each test builds one crafted (or damaged) input and shows the safe outcome. A refusal is one
error of ours naming the file and the cause; nothing outside the run folder is written or
deleted; where the docs promise a fallback (an automatic resume), the run falls back.

CI runs this file under torch 2.11 too (.ci/run), beside tests/test_checkpoint.py.

Run: python -m pytest -q tests/test_crafted_inputs.py
"""

import contextlib
import glob
import io
import json
import logging
import math
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_MODEL, init_model, make_corpus, subprocess_env
from mobilellm_train import checkpoint as C
from mobilellm_train.checkpoint import safe_load
from mobilellm_train.config import CheckpointConfig, ConfigError, load_config
from mobilellm_train.errors import DataError, RunFolderError
from mobilellm_train.model import MobileLLM, ModelArgs

ARGS = ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
MEMBER = "torch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n"


@contextlib.contextmanager
def logged(level=logging.WARNING):
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


def saved(dump_folder, steps, extra=None, model_args=None, **cfg):
    """A Checkpointer of the tiny model (and `extra` states) with `steps` saved in dump_folder."""
    model = MobileLLM(ARGS)
    model.init_weights(seed=0)
    train_state = C.TrainState(model_args=model_args or C.model_args_fingerprint(ARGS))
    states = {"model": C.ModelState(model), "train_state": train_state, **(extra or {})}
    ck = C.Checkpointer(CheckpointConfig(async_mode="disabled", keep_latest_k=0, **cfg), str(dump_folder), states,
                        rank=0, per_rank=frozenset(extra or ()), required_per_rank=frozenset(extra or ()))
    for step in steps:
        train_state.step = step
        ck.save(step)
    return ck, train_state


def write_index(step_dir, index_or_bytes, consistent=True):
    """Replace a step's .metadata; `consistent` rewrites the manifests to match, as an edit by
    whoever hands the folder over would (only the loader's own care can stop it then)."""
    data = index_or_bytes if isinstance(index_or_bytes, bytes) else pickle.dumps(index_or_bytes)
    with open(os.path.join(step_dir, ".metadata"), "wb") as f:
        f.write(data)
    if consistent:
        for manifest in glob.glob(os.path.join(step_dir, C.MANIFEST_GLOB)):
            content = json.load(open(manifest))
            for name in content["files"]:
                full = os.path.join(step_dir, name)
                content["files"][name] = {"bytes": os.path.getsize(full), "crc32": f"{C.file_crc32(full):08x}"}
            json.dump(content, open(manifest, "w"))


def short_str(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()


# --- 1, 2: a refused start deletes nothing it did not make --------------------------------------

def test_a_refused_start_leaves_a_sibling_run_of_its_sweep(tmp_path):
    from mobilellm_train.start_checks import RunFolderRecord

    sweep = tmp_path / "outputs" / "sweep-7"
    record = RunFolderRecord(str(sweep / "lr1"))  # sweep-7 does not exist yet: this start makes it
    (sweep / "lr1").mkdir(parents=True)
    (sweep / "lr1" / "run.lock").write_text("host h pid 1")
    # Meanwhile the sweep's other run starts beside it and saves.
    (sweep / "lr2" / "checkpoints" / "step-10").mkdir(parents=True)
    (sweep / "lr2" / "run.lock").write_text("host h pid 2")
    record.undo()
    assert sorted(os.listdir(sweep)) == ["lr2"]
    assert os.listdir(sweep / "lr2" / "checkpoints") == ["step-10"]
    # Alone, the same start leaves nothing behind: every folder it made was empty once undone.
    record = RunFolderRecord(str(tmp_path / "a" / "b" / "run"))
    (tmp_path / "a" / "b" / "run" / "demo_data").mkdir(parents=True)
    record.undo()
    assert not (tmp_path / "a").exists()


def test_only_a_stop_file_is_ever_deleted_and_only_once_the_start_is_past_its_checks(tmp_path, monkeypatch):
    from mobilellm_train.resilience import StaleStopFile

    monkeypatch.delenv("MOBILELLM_FRESH_STOP_FILE", raising=False)
    precious = tmp_path / "thesis.tex"
    precious.write_text("\\documentclass{article} ...")
    (tmp_path / "target").write_text("")
    os.symlink(tmp_path / "target", tmp_path / "linked")
    os.mkfifo(tmp_path / "fifo")
    for path, why in ((precious, "it holds"), (tmp_path / "linked", "a symbolic link"),
                      (tmp_path / "fifo", "not a regular file"), (tmp_path, "not a regular file")):
        with pytest.raises(ConfigError, match=re.escape(f"job.stop_file {path} exists and is not a stop file ({why}")):
            StaleStopFile(str(path))
    assert precious.read_text().startswith("\\documentclass") and (tmp_path / "target").exists()
    # A stale stop file (empty, or holding the word) goes, but only at remove(): past every refusal.
    for content in ("", "stop\n"):
        stop = tmp_path / "STOP"
        stop.write_text(content)
        stale = StaleStopFile(str(stop))
        assert stop.exists()
        stale.remove()
        assert not stop.exists()
    # One replaced meanwhile (a new stop request made during a slow start) stays.
    stop.write_text("")
    stale = StaleStopFile(str(stop))
    stop.unlink()
    stop.write_text("stop")
    stale.remove()
    assert stop.exists()
    # The launch script's own request for this run stays too.
    monkeypatch.setenv("MOBILELLM_FRESH_STOP_FILE", str(stop))
    StaleStopFile(str(stop)).remove()
    assert stop.exists()


def test_a_start_refused_for_its_stop_file_says_so_in_one_line_and_leaves_everything(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("not a stop file")
    data = make_corpus(tmp_path / "data", n_docs=40)
    run = tmp_path / "sweep" / "lr1"  # neither folder exists yet
    r = subprocess.run(
        [sys.executable, "-m", "mobilellm_train.train", *TINY_MODEL, "--data.path", data, "--job.dump_folder",
         str(run), "--job.stop_file", str(precious), "--training.steps", "2", "--training.seq_len", "16",
         "--metrics.enable_tensorboard", "false"],
        capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "Error" in line]
    assert len(errors) == 1 and f"ConfigError: job.stop_file {precious} exists and is not a stop file" in errors[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert precious.read_text() == "not a stop file"
    assert sorted(os.listdir(tmp_path)) == ["data", "notes.txt"]  # sweep/ and lr1/ were this start's


# --- 3: a run folder's files are never opened through links --------------------------------------

def test_run_folder_files_are_never_written_or_read_through_links(tmp_path):
    from mobilellm_train.build import resolve_data
    from mobilellm_train.run_config import write_effective_config
    from mobilellm_train.config import Config
    from mobilellm_train.metrics import MetricsLogger
    from mobilellm_train.resilience import RunFolderLock

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"

    def plant(link, target_text="keep me"):
        victim.write_text(target_text)
        os.symlink(victim, link)

    run = tmp_path / "run"
    ckpt = tmp_path / "shared-ckpt"
    ckpt.mkdir()
    run.mkdir()
    # run.lock, of the run folder or of the checkpoint folder: a link to a file, or dangling.
    for folder in (run, ckpt):
        plant(folder / "run.lock")
        with pytest.raises(RunFolderError, match=re.escape(f"{folder / 'run.lock'} is a symbolic link")):
            RunFolderLock(str(run), str(ckpt)).acquire()
        assert victim.read_text() == "keep me"
        os.remove(folder / "run.lock")
    os.remove(run / "run.lock")  # made, and released, when the checkpoint folder's was refused
    os.symlink(outside / "made.txt", run / "run.lock")
    with pytest.raises(RunFolderError, match="is a symbolic link"):
        RunFolderLock(str(run)).acquire()
    assert not (outside / "made.txt").exists()
    os.remove(run / "run.lock")
    # config.toml.tmp planted as a link is replaced, never written through; config.toml as a link is refused.
    plant(run / "config.toml.tmp")
    assert write_effective_config(Config(), str(run)) is None
    assert victim.read_text() == "keep me" and not os.path.islink(run / "config.toml")
    os.remove(run / "config.toml")
    os.symlink(victim, run / "config.toml")
    with pytest.raises(RunFolderError, match=re.escape(f"{run / 'config.toml'} is a symbolic link")):
        write_effective_config(Config(), str(run))
    assert victim.read_text() == "keep me"
    # metrics.jsonl.tmp (written when a resume drops later records), metrics.jsonl, eval.jsonl.
    (run / "metrics.jsonl").write_text('{"step": 1, "elapsed_s": 1.0}\n{"step": 9, "elapsed_s": 9.0}\n')
    os.symlink(victim, run / "metrics.jsonl.tmp")
    MetricsLogger(str(run), 0, False, resume_step=5).close()
    assert victim.read_text() == "keep me" and (run / "metrics.jsonl").read_text().count("\n") == 1
    os.replace(run / "metrics.jsonl", tmp_path / "kept.jsonl")
    os.symlink(victim, run / "metrics.jsonl")
    with pytest.raises(RunFolderError, match=re.escape(f"{run / 'metrics.jsonl'} is a symbolic link")):
        MetricsLogger(str(run), 0, False)
    os.remove(run / "metrics.jsonl")
    os.symlink(victim, run / "eval.jsonl")
    metrics = MetricsLogger(str(run), 0, False)
    with pytest.raises(RunFolderError, match=re.escape(f"{run / 'eval.jsonl'} is a symbolic link")):
        metrics.log_eval(10, {"eval/x": 1.0})
    metrics.close()
    assert victim.read_text() == "keep me"
    # The folders the run writes files into.
    os.symlink(outside, run / "demo_data")
    with pytest.raises(RunFolderError, match="demo_data is a symbolic link"):
        resolve_data(Config().data, str(run), rank=0)
    os.symlink(outside, run / "tb")
    with pytest.raises(RunFolderError, match="tb is a symbolic link"):
        MetricsLogger(str(run), 0, True)
    # A checkpoint folder inside the run folder that leads out of it (saves write there, retention
    # deletes there): refused before its lock file is written.
    from mobilellm_train.run_parts import RunParts

    other = tmp_path / "other-run"
    other.mkdir()
    os.symlink(outside, other / "checkpoints")
    with pytest.raises(RunFolderError, match="checkpoints is a symbolic link.*absolute --checkpoint.folder"):
        RunParts().hold_run_folder(str(other), CheckpointConfig())
    assert sorted(os.listdir(outside)) == ["victim.txt"]
    # A folder where a file belongs is refused in words too.
    (other / "metrics.jsonl").mkdir()
    with pytest.raises(RunFolderError, match="metrics.jsonl is not a regular file"):
        MetricsLogger(str(other), 0, False)


# --- 4, 5, 6: the .metadata scanner and rebuild ---------------------------------------------------

def test_metadata_cannot_build_or_change_an_enum_member(tmp_path, one_rank_group):
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    ck, state = saved(tmp_path, [5])
    step = ck.path(5)
    valid = open(os.path.join(step, ".metadata"), "rb").read()
    rewrite = b"N}(" + short_str("_value_") + b"K\x07" + short_str("_name_") + short_str("X") + b"u\x86b0"
    payloads = {
        # NEWOBJ on the enum class returns the shared member; the BUILD after it would rewrite it.
        "GLOBAL": b"\x80\x04c" + MEMBER.encode() + b"K\x00\x85\x81" + rewrite + valid[2:],
        "STACK_GLOBAL": b"\x80\x04" + short_str("torch.distributed.checkpoint.metadata")
                        + short_str("_MEM_FORMAT_ENCODING") + b"\x93K\x00\x85\x81" + rewrite + valid[2:],
        "NEWOBJ_EX": b"\x80\x04c" + MEMBER.encode() + b"K\x00\x85}\x92" + rewrite + valid[2:],
    }
    for name, data in payloads.items():
        write_index(step, data)
        with pytest.raises(C.CheckpointError, match=r"\.metadata is not a valid checkpoint index .*NEWOBJ(_EX)? of "
                                                    r"'torch.distributed.checkpoint.metadata _MEM_FORMAT_ENCODING'"):
            C.read_metadata(step)
        # Without the scan, the unpickler alone cannot do it either: enums are looked up by value only.
        with pytest.raises(pickle.UnpicklingError):
            safe_load._MetadataUnpickler(io.BytesIO(data)).load()
        assert _MEM_FORMAT_ENCODING(0).name == "TORCH_CONTIGUOUS_FORMAT" and _MEM_FORMAT_ENCODING(0).value == 0
    # The run goes on and saves a checkpoint that loads.
    state.step = 6
    ck.save(6)
    loaded = C.TrainState()
    C.checked_load({"train_state": loaded}, ck.path(6))
    assert loaded.step == 6
    ck.close()


def test_metadata_keys_and_container_sizes_are_what_dcp_writes(tmp_path, one_rank_group, monkeypatch):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    ck, _ = saved(tmp_path, [5])
    step = ck.path(5)
    valid = open(os.path.join(step, ".metadata"), "rb").read()
    real = C.read_metadata(step)
    prime = (1 << 61) - 1  # ints n and n + prime have the same hash: a dict of them fills in quadratic time
    same_hash = [pickle.dumps(7 + i * prime, 2)[2:-1] for i in range(20_000)]
    payloads = {
        "dict of ints": b"\x80\x04}(" + b"".join(k + b"N" for k in same_hash) + b"u0" + valid[2:],
        "set of ints": b"\x80\x04\x8f(" + b"".join(same_hash) + b"\x900" + valid[2:],
        "frozenset of ints": b"\x80\x04(" + b"".join(same_hash) + b"\x910" + valid[2:],
        "dict of tuples": b"\x80\x04}(" + b"".join(k + b"\x85N" for k in same_hash) + b"u0" + valid[2:],
    }
    for name, data in payloads.items():
        write_index(step, data)
        with pytest.raises(C.CheckpointError, match="with a key or member that is not a string") as info:
            C.read_metadata(step)
        assert str(step) in str(info.value), name
    # storage_data keyed by MetadataIndex: offsets of equal hash are not points of the tensor.
    write_index(step, valid)
    crafted = C.read_metadata(step)
    info = next(iter(crafted.storage_data.values()))
    crafted.storage_data = dict(real.storage_data)
    for i in range(1, 200):
        crafted.storage_data[MetadataIndex("model.norm.weight", (5 + i * prime,))] = info
    write_index(step, crafted)
    with pytest.raises(C.CheckpointError, match=r"the offset \(\d+,\) of 'model.norm.weight' is not a point of its "
                                                r"tensor of size \(64,\)"):
        C.read_metadata(step)
    # A tensor claiming more elements than any checkpoint holds.
    write_index(step, valid)
    crafted = C.read_metadata(step)
    crafted.storage_data = real.storage_data
    crafted.state_dict_metadata["model.norm.weight"].size = torch.Size([1 << 30, 1 << 30])
    write_index(step, crafted)
    with pytest.raises(C.CheckpointError, match="model.norm.weight'] is a tensor of size .* more than"):
        C.read_metadata(step)
    # Entries per container are bounded (the bound lowered to show it; the real index passes).
    write_index(step, valid)
    monkeypatch.setattr(safe_load, "_SCANNED", {})  # scanned already under the real bound
    monkeypatch.setattr(safe_load, "METADATA_MAX_ENTRIES", 10)
    with pytest.raises(C.CheckpointError, match="a container of more than 10 entries"):
        C.read_metadata(step)
    monkeypatch.undo()
    assert C.read_metadata(step).storage_data == real.storage_data
    ck.close()


def test_storage_transforms_are_refused(tmp_path, one_rank_group):
    ck, _ = saved(tmp_path, [5])
    step = ck.path(5)
    crafted = C.read_metadata(step)
    for info in crafted.storage_data.values():
        info.transform_descriptors = ["zstd"]  # a 24 KB slice could decompress to 1.5 GiB
    write_index(step, crafted)
    for load in (C.read_metadata, C.load_model_from_checkpoint):
        with pytest.raises(C.CheckpointError, match=re.escape(f"{step}/.metadata is not a valid checkpoint index")
                           + ".*storage transforms \\['zstd'\\], which this trainer never writes"):
            load(step)
    ck.close()


# --- 7: the model's shape recorded in a step ------------------------------------------------------

def test_model_args_of_a_step_are_checked_before_a_model_is_built(tmp_path, one_rank_group):
    fields = json.loads(C.model_args_fingerprint(ARGS))
    crafted = {
        "unknown key": ({**fields, "run_me": 1}, "has the key 'run_me', which is not a field of the model"),
        "no heads": ({**fields, "n_heads": 0}, "n_heads = 0; expected an integer from 1 to 65536"),
        "a string": ({**fields, "dim": "64"}, "dim = '64'; expected an integer"),
        "NaN": ({**fields, "norm_eps": float("nan")}, "norm_eps = nan; expected a finite positive number"),
        "not JSON": ("{", "is not JSON"),
        "deep": ("[" * 50_000, "is not JSON (invalid JSON: nested too deeply"),
        "indivisible": ({**fields, "n_heads": 3}, "describe no model (dim 64 is not divisible by n_heads 3)"),
        # Within every ceiling, but 2.6 trillion parameters from a folder of a few hundred KB.
        "huge": ({**fields, "dim": 1 << 16, "ffn_dim": 1 << 16, "n_layers": 128, "n_heads": 256, "n_kv_heads": 256},
                 "model_args describe 3,848,311,734,272 parameters, but the step's data files hold"),
    }
    for name, (value, message) in crafted.items():
        text = value if isinstance(value, str) else json.dumps(value)
        ck, _ = saved(tmp_path / name, [5], model_args=text)
        with pytest.raises(C.CheckpointError, match=re.escape(message)) as info:
            C.load_model_from_checkpoint(ck.path(5))
        assert ck.path(5) in str(info.value), name
        ck.close()
    # At resume it is damage like any other: an automatic resume falls back past it.
    ck, state = saved(tmp_path / "resume", [5])
    state.model_args = json.dumps({**fields, "n_heads": 0})
    ck.save(10)
    state.model_args = C.model_args_fingerprint(ARGS)
    resumed = C.TrainState(model_args=state.model_args)
    ck.states["train_state"] = resumed
    with logged() as warnings:
        assert ck.maybe_resume(resumed) and resumed.step == 5
    assert any("n_heads = 0" in w and "falling back to step 5" in w for w in warnings)
    ck.close()


# --- 8: an HF .bin holds the bytes its tensors claim ----------------------------------------------

def test_an_hf_bin_whose_tensors_claim_more_than_their_bytes_is_refused_before_any_copy(tmp_path):
    from safetensors.torch import load_file

    from mobilellm_train.export import write_hf_folder
    from mobilellm_train.hf import HFCheckpointError, load_hf_checkpoint

    folder = write_hf_folder(ARGS, init_model(ARGS).state_dict(), str(tmp_path / "hf"))
    state = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    good = dict(state)
    for name, tensor, why in (
        # Stride-0 views: 4 bytes stored, the config's shape claimed (read as weights of zeros), or a
        # (2^20, 2^10) one (4 GiB once cast to fp32; a generate config's 48 GiB the same way).
        ("model.embed_tokens.weight", torch.zeros(1).expand(64, 64), "strides (0, 0)"),
        ("model.embed_tokens.weight", torch.zeros(1).expand(1 << 20, 1 << 10), "strides (0, 0)"),
        ("model.norm.weight", torch.zeros(128)[::2], "strides (2,)"),  # not contiguous
    ):
        torch.save({**good, name: tensor}, os.path.join(folder, "pytorch_model.bin"))
        with pytest.raises(HFCheckpointError, match=re.escape(f"{folder}/pytorch_model.bin: {name} (shape")
                           + ".*" + re.escape(why) + ".*is not a contiguous tensor inside its stored bytes"):
            load_hf_checkpoint(folder)
    torch.save([1, 2], os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(HFCheckpointError, match="not a state dict"):
        load_hf_checkpoint(folder)
    torch.save(good, os.path.join(folder, "pytorch_model.bin"))
    assert load_hf_checkpoint(folder)[0].vocab_size == ARGS.vocab_size


# --- 9: what is read before the load comes from a step that verifies ------------------------------

def test_a_damaged_newest_step_does_not_decide_the_vocabulary_the_fallback_loads(tmp_path, one_rank_group):
    from mobilellm_train.start_checks import checkpoint_vocab_size

    ck, state = saved(tmp_path, [5, 10, 15])
    cfg = CheckpointConfig()
    # 15: a flipped bit in the embedding's shape in .metadata (its checksum no longer matches).
    index = C.read_metadata(ck.path(15))
    index.state_dict_metadata["model.tok_embeddings.weight"].size = torch.Size([65, 64])
    write_index(ck.path(15), index, consistent=False)
    # 10: a damaged shard (its .metadata intact).
    shard = os.path.join(ck.path(10), "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert checkpoint_vocab_size(cfg, str(tmp_path)) == 64
    assert checkpoint_vocab_size(CheckpointConfig(verify=False), str(tmp_path)) == 65  # unchecked, as asked
    resumed = C.TrainState(model_args=state.model_args)
    ck.states["train_state"] = resumed
    with logged() as warnings:
        assert ck.maybe_resume(resumed) and resumed.step == 5
    assert sum("falling back to step 5" in w for w in warnings) == 2
    ck.close()


# --- 10: a restored data position is checked against the vocabulary -------------------------------

class CraftedLoaderState:
    """Saves `loader`'s state with one token id of its buffer replaced."""

    def __init__(self, loader, token):
        self.loader, self.token = loader, token

    def state_dict(self):
        state = self.loader.state_dict()
        state["dataset_state"]["buffer"][0] = self.token
        return state


def test_token_ids_of_a_restored_jsonl_position_are_checked(tmp_path, one_rank_group):
    from mobilellm_train.data.jsonl import JsonlTokenDataset, build_dataloader

    data = make_corpus(tmp_path / "data", n_docs=40)

    def loader():
        dataset = JsonlTokenDataset(data, seq_len=16, vocab_size=64, dp_rank=0, dp_world_size=1, ranks_per_node=1)
        return build_dataloader(dataset, 2, num_workers=0, pin_memory=False)

    source = loader()
    batches = iter(source)
    next(batches)
    assert source.state_dict()["dataset_state"]["buffer"]  # the position carries a token buffer
    position = C.PerRankState(0, source)
    ck, state = saved(tmp_path / "run", [5], extra={"dataloader": position})
    for step, token in ((10, 64), (15, -1), (20, "3")):
        position.obj = CraftedLoaderState(source, token)
        state.step = step
        ck.save(step)
    fresh = C.PerRankState(0, loader())
    resumed = C.TrainState(model_args=state.model_args)
    ck.states.update(dataloader=fresh, train_state=resumed)
    with logged() as warnings:
        assert ck.maybe_resume(resumed) and resumed.step == 5
    assert any(f"{ck.path(20)}: the saved JSONL data position holds the token id '3' (buffer[0])" in w
               for w in warnings)
    assert any("token id 64 (buffer[0]), not an id of this model's vocabulary [0, 64)" in w for w in warnings)
    # An explicit load of such a step stops in words (step 20, set aside as .corrupt above).
    os.rename(ck.path(20) + ".corrupt", ck.path(20))
    ck.cfg.load_step = 20
    with pytest.raises(C.CheckpointError, match=re.escape(f"{ck.path(20)}: the saved JSONL data position holds")):
        ck.maybe_resume(C.TrainState(model_args=state.model_args))
    ck.close()


# --- 11: values recovered from metrics.jsonl --------------------------------------------------------

def test_non_finite_or_absurd_values_in_metrics_are_ignored_with_a_warning(tmp_path):
    from mobilellm_train.metrics import MetricsLogger, format_duration

    lines = [
        {"step": 4, "elapsed_s": 40.0, "step_time_s": 10.0},
        {"step": 5, "elapsed_s": float("nan"), "step_time_s": 1.0},
        {"step": 6, "elapsed_s": float("inf"), "step_time_s": 1.0},
        {"step": 7, "elapsed_s": 1e300, "step_time_s": 1.0},
        {"step": 8, "elapsed_s": 1.0, "step_time_s": -5.0},
        {"step": "9", "elapsed_s": 1.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "[" * 50_000 + "\n")
    with logged() as warnings:
        metrics = MetricsLogger(str(tmp_path), 0, False, resume_step=10)
    metrics.close()
    assert metrics.elapsed_before == 40.0 + 6 * 10.0  # step 4's total and step time, to step 10
    assert format_duration(metrics.elapsed_before) == "1m40s"
    assert any("4 record(s) (steps 5, 6, 7, 8)" in w and "not finite or out of range" in w for w in warnings)
    kept = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(kept) == 5 and math.isnan(json.loads(kept[1])["elapsed_s"])  # kept: only step numbers decide


# --- 12: deep nesting is a named error for its file ------------------------------------------------

def test_deep_nesting_is_a_named_error_for_its_file(tmp_path):
    from mobilellm_train.data.shards import MANIFEST_FILE, read_manifest, unverified_shards
    from mobilellm_train.hf import HFCheckpointError, load_hf_checkpoint

    deep = "[" * 100_000
    toml = tmp_path / "deep.toml"
    toml.write_text("[training]\nsteps = " + deep + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{toml}: invalid TOML: nested too deeply")):
        load_config(["--config", str(toml)])
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--config", str(tmp_path / "folder.toml")])

    data = tmp_path / "data"
    data.mkdir()
    (data / MANIFEST_FILE).write_text(deep)
    with pytest.raises(DataError, match=re.escape(f"{data / MANIFEST_FILE}: not valid JSON (invalid JSON: nested")):
        read_manifest(str(data))
    (data / MANIFEST_FILE).write_text('{"format": ' + "[" * 150 + "]" * 150 + "}")  # parses, but too deep
    with pytest.raises(DataError, match="nested more than 100 deep"):
        read_manifest(str(data))

    class Manifest:  # what unverified_shards reads of a manifest
        folder, shards = str(data), []
    (data / "verified.json").write_text(deep)
    assert "is unreadable (invalid JSON: nested too deeply" in unverified_shards(Manifest(), {})[1]

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(deep)
    with pytest.raises(HFCheckpointError, match=re.escape(f"{hf / 'config.json'}: not valid JSON")):
        load_hf_checkpoint(str(hf))
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64}))
    (hf / "model.safetensors.index.json").write_text('{"weight_map": ' + deep + "}")
    with pytest.raises(HFCheckpointError, match=re.escape(f"{hf / 'model.safetensors.index.json'}: not valid JSON")):
        load_hf_checkpoint(str(hf))
    # The per-rank state of a checkpoint (JSON too) and the run folder's config.toml, read back.
    with pytest.raises(ValueError, match="nested too deeply"):
        C.decode_state(deep)
    from mobilellm_train.config import parse_effective_config

    with pytest.raises(ValueError, match="nested too deeply"):
        parse_effective_config("[training]\nsteps = " + deep + "\n")
