"""A user's first month, round three (issue 32): each step a user took that went wrong, taken
again, with what should happen now: a prepared dataset never silently replaced, an interrupted
encode named as such (on exit and at training start), the config change a resume logs, continued
pretraining from another tokenizer refused, a command-line data.sources against a TOML data.path,
and the smaller rough edges. Everything in-process on tiny inputs, except where the processes
themselves are what is tested (the launcher's one-line error).
Run: python -m pytest tests/test_first_month.py -q
"""

import gzip
import json
import logging
import os
import re
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from mobilellm_train.data import prepare
from mobilellm_train.data.shards import read_manifest
from mobilellm_train.errors import ConfigError, DataError
from test_prepare import documents, encode, random_texts, tokenizer, write_jsonl  # noqa: F401 (a fixture)

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def folder_bytes(folder):
    """Every file under `folder` (relative name -> bytes)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# ---------------------------------------------------------------------------------------------
# 1. A finished dataset is never replaced without --overwrite; verify names what is not listed.


def test_encode_into_a_finished_dataset_of_other_inputs_is_refused(tmp_path, tokenizer, caplog):
    big = write_jsonl(tmp_path / "web" / "a.jsonl", [{"text": t} for t in random_texts(300, seed=2)])
    write_jsonl(tmp_path / "web" / "b.jsonl", [{"text": t} for t in random_texts(200, seed=3)])
    small = write_jsonl(tmp_path / "man" / "c.jsonl", [{"text": t} for t in random_texts(30, seed=4)])
    out = tmp_path / "data"
    encode(tokenizer, [tmp_path / "web"], out, "--unit-bytes", "4K", "--val-fraction", "0.1")
    shards = len(read_manifest(str(out)).shards)
    assert shards > 3
    before = folder_bytes(out)

    # The user's step: the same --out, other inputs. Refused, naming what differs and the ways on.
    with pytest.raises(DataError) as e:
        encode(tokenizer, [small], out, "--unit-bytes", "4K", "--val-fraction", "0.1")
    message = str(e.value)
    assert f"{out}: a finished dataset ({shards} shards" in message and "from other inputs" in message
    assert f"1 file added: {small}" in message and "2 files no longer given" in message
    assert "Choose another --out" in message and "--overwrite" in message
    assert folder_bytes(out) == before  # not a byte changed
    # Other settings too (and a grown input), all named at once.
    write_jsonl(big, [{"text": t} for t in random_texts(301, seed=2)])
    with pytest.raises(DataError, match=r"with other settings \(eos: True then, False now\) and from other inputs "
                                        rf"\(1 file changed size: {re.escape(big)}: [\d,]+ bytes then, [\d,]+ now\)"):
        encode(tokenizer, [tmp_path / "web"], out, "--unit-bytes", "4K", "--val-fraction", "0.1", "--no-eos")
    assert folder_bytes(out) == before
    write_jsonl(big, [{"text": t} for t in random_texts(300, seed=2)])

    # verify names what the manifest does not list (an orphan shard, a stray file), and keeps them.
    (out / "shard-00042.bin").write_bytes(b"\0" * 64)
    (out / "notes.txt").write_text("mine")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        summary = prepare.run(["verify", str(out)])
    assert summary[str(out)]["unlisted"] == ["notes.txt", "shard-00042.bin"]
    assert summary[str(out / "val")]["unlisted"] == []
    assert "2 files (68 B) that manifest.json does not list" in caplog.text
    assert "notes.txt, shard-00042.bin" in caplog.text

    # --overwrite: the old dataset's files go first (the orphan shard too), a file of another name stays.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        encode(tokenizer, [small], out, "--unit-bytes", "4K", "--val-fraction", "0.1", "--overwrite")
    assert f"--overwrite: removed the earlier dataset ({shards + 1} shards" in caplog.text
    fresh = tmp_path / "fresh"
    encode(tokenizer, [small], fresh, "--unit-bytes", "4K", "--val-fraction", "0.1")
    assert documents(out) == documents(fresh) and documents(out / "val") == documents(fresh / "val")
    assert prepare.run(["verify", str(out)])[str(out)]["unlisted"] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# 5. An interrupted encode says how it resumes, and training names the folder as unfinished.


def test_interrupted_encode_says_rerunning_resumes_and_training_names_it_unfinished(tmp_path, tokenizer, caplog,
                                                                                   monkeypatch):
    from mobilellm_train.config import load_config
    from mobilellm_train.data.prepare import pipeline

    raw = write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in random_texts(400, seed=5)])
    out = tmp_path / "data"
    argv = ["encode", "--input", raw, "--tokenizer", tokenizer, "--out", str(out), "--workers", "1",
            "--unit-bytes", "2K", "--val-fraction", "0.1"]
    real_run_unit, calls = pipeline.run_unit, []

    def run_unit_then_sigterm(unit, settings):
        record = real_run_unit(unit, settings)
        calls.append(unit.index)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or slurm would, between two units
        return record

    monkeypatch.setattr(pipeline, "run_unit", run_unit_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as e:
        prepare.main(argv)
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is handler
    units = len([n for n in os.listdir(out / ".progress") if n.startswith("unit-")])
    assert units == 2
    total = json.loads((out / ".progress" / "command.json").read_text())["units"]
    assert f"stopped by SIGTERM: {out}: 2 of {total} shards are finished and kept; rerunning the same command " \
           "resumes" in caplog.text
    assert not [n for n in os.listdir(out) if ".tmp." in n]

    # The user's next step: training on it. Named as unfinished, with the command that finishes it.
    for key, args in (("data.path", ["--data.path", str(out), "--data.val_interval", "10"]),
                      ("data.sources", ["--data.sources", str(out)]),
                      ("data.val_path", ["--data.val_path", str(out / "val")])):
        with pytest.raises(ConfigError) as e:
            load_config(args + ["--job.dump_folder", str(tmp_path / "run")])
        assert str(e.value).startswith(f"{key}: {out if key != 'data.val_path' else out}"), e.value
        assert f"is an unfinished mobilellm-prepare output: preparing it was interrupted (2 of {total} shards " \
               "finished, no manifest.json yet)" in str(e.value)
        assert "mobilellm-prepare encode --input" in str(e.value) and f"--out {out}" in str(e.value)
    with pytest.raises(DataError, match="is an unfinished mobilellm-prepare output"):
        prepare.run(["verify", str(out)])

    monkeypatch.setattr(pipeline, "run_unit", real_run_unit)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        prepare.run(argv[:])
    assert f"2 of {total} shards already finished" in caplog.text
    assert load_config(["--data.path", str(out), "--data.val_interval", "10", "--job.dump_folder",
                        str(tmp_path / "run")]).data.val_path == str(out / "val")


# ---------------------------------------------------------------------------------------------
# 8. The smaller rough edges of mobilellm-prepare.


def test_gz_progress_ends_at_100_percent(tmp_path, tokenizer, capsys):
    rows = "".join(json.dumps({"text": t}) + "\n" for t in random_texts(600, seed=6) * 4)
    path = tmp_path / "in" / "a.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(rows.encode()))
    assert len(rows) > 4 * path.stat().st_size  # text compresses well: counted decompressed, 400%+
    encode(tokenizer, [path], tmp_path / "out")
    percents = [float(p) for p in re.findall(r"\[encode\]\s+([\d.]+)%", capsys.readouterr().err)]
    assert percents and max(percents) == 100.0 and percents[-1] == 100.0


def test_empty_inputs_are_skipped_and_text_field_takes_a_list(tmp_path, tokenizer, caplog):
    texts = random_texts(60, seed=7)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in texts[:20]])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"content": t, "text_len": len(t)} for t in texts[20:40]])
    pq.write_table(pa.table({"content": texts[40:]}), tmp_path / "in" / "c.parquet")
    (tmp_path / "in" / "empty.jsonl").write_bytes(b"")
    with caplog.at_level(logging.INFO):
        encode(tokenizer, [tmp_path / "in"], tmp_path / "out", "--text-field", "text,content")
    assert f"{tmp_path / 'in' / 'empty.jsonl'}: empty file (0 bytes); skipping it" in caplog.text
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    assert documents(tmp_path / "out") == [[1, *ids, 2] for ids in sp.encode(texts)]
    # The tokenizer command reads the same inputs the same way.
    summary = prepare.run(["tokenizer", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "t.model"),
                           "--vocab-size", "300", "--text-field", "text,content", "--workers", "1"])
    assert set(summary["sample_bytes_per_input"]) == {str(tmp_path / "in" / n) for n in ("a.jsonl", "b.jsonl",
                                                                                          "c.parquet")}
    with pytest.raises(DataError, match=r"b\.jsonl:1: no key 'text' or 'body' \(keys: 'content', 'text_len'\)"):
        encode(tokenizer, [tmp_path / "in" / "b.jsonl"], tmp_path / "o2", "--text-field", "text,body")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file \(0 bytes\); nothing to read"):
        encode(tokenizer, [tmp_path / "in" / "empty.jsonl"], tmp_path / "o3")


def test_a_huge_document_is_cut_at_line_ends_into_documents(tmp_path, tokenizer, caplog):
    lines = [f"line {i} of the book: " + " ".join(random_texts(1, seed=i)[0].split()) + "\n" for i in range(120)]
    book = tmp_path / "book.txt"
    book.write_text("".join(lines))
    with caplog.at_level(logging.INFO):
        encode(tokenizer, [book], tmp_path / "out", "--max-document-bytes", "2K")
    docs = documents(tmp_path / "out")
    size = book.stat().st_size
    assert f"{book}: a document of {size / 1000:.3g} kB, cut into {len(docs)} documents at line ends" in caplog.text
    assert len(docs) == -(-size // 2048) or len(docs) == -(-size // 2048) + 1
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    parts = [sp.decode(d[1:-1]) for d in docs]
    assert all(p.endswith("\n") and len(p.encode()) <= 2048 for p in parts) and "".join(parts) == book.read_text()
    encode(tokenizer, [book], tmp_path / "whole", "--max-document-bytes", "0")
    assert len(documents(tmp_path / "whole")) == 1


# ---------------------------------------------------------------------------------------------
# 2. The config a checkpoint records (the resume's log of it: test_user_paths).


def test_a_checkpoint_from_before_the_config_record_resumes(tmp_path, one_rank_group):
    """A checkpoint whose train state has no `config` (written before it was recorded) resumes;
    the run keeps its own config for the checkpoints it writes, and says what the loaded one held."""
    import dataclasses

    from torch.distributed.checkpoint.stateful import Stateful

    from mobilellm_train import checkpoint as ckpt
    from mobilellm_train.config import CheckpointConfig
    from mobilellm_train.model import MobileLLM, ModelArgs

    args = ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)
    model = MobileLLM(args)
    model.init_weights(seed=1)
    fingerprint = ckpt.model_args_fingerprint(args)

    class OlderTrainState(Stateful):
        def state_dict(self):
            return {"step": 7, "tokens_seen": 700, "dp_world_size": 1, "model_args": fingerprint}

        def load_state_dict(self, state_dict):
            raise AssertionError("not loaded here")

    cfg = CheckpointConfig(async_mode="disabled")
    old = ckpt.Checkpointer(cfg, str(tmp_path), {"model": ckpt.ModelState(model), "train_state": OlderTrainState()}, 0)
    old.save(7)
    old.close()
    assert "train_state.config" not in ckpt.read_metadata(old.path(7)).state_dict_metadata

    state = ckpt.TrainState(model_args=fingerprint, config="[training]\nsteps = 20\n")
    new = ckpt.Checkpointer(cfg, str(tmp_path), {"model": ckpt.ModelState(model), "train_state": state}, 0)
    assert new.maybe_resume(state)
    assert (state.step, state.tokens_seen, state.config) == (7, 700, "[training]\nsteps = 20\n")
    assert dataclasses.asdict(new.resumed_train_state)["config"] == ""
    new.save(8)
    new.close()
    assert ckpt.read_train_state(new.path(8)).config == "[training]\nsteps = 20\n"


# ---------------------------------------------------------------------------------------------
# 3. Continued pretraining from a model of another tokenizer is refused before training.


@pytest.fixture
def model_and_other_data(tmp_path):
    """A step folder of a 300-id model holding its tokenizer, and token data (ids < 300) prepared
    with another 300-piece tokenizer."""
    from dataclasses import replace

    import numpy as np

    from conftest import init_model
    from mobilellm_train.data.shards import write_token_dataset
    from test_generate import ARGS, save_step_folder
    from test_user_paths import train_sp

    own = train_sp(tmp_path / "own", 300)
    other = train_sp(tmp_path / "other", 300, lines=["zebra yak xylophone wombat vole"] * 80)
    step = save_step_folder(init_model(replace(ARGS, vocab_size=300, max_seq_len=64)), tmp_path / "step-5", own)
    docs = [np.arange(3, 120) % 290 + 3 for _ in range(40)]
    write_token_dataset(str(tmp_path / "theirs"), docs, vocab_size=300, tokens_per_shard=10_000, tokenizer_path=other)
    return step, own, str(tmp_path / "theirs"), other


@pytest.mark.slow
def test_initial_load_from_a_model_of_another_tokenizer_is_refused(tmp_path, model_and_other_data):
    from conftest import run_trainer

    step, own, data, other = model_and_other_data
    run = tmp_path / "run"
    out = run_trainer(["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
                       "--model.ffn_dim", "128", "--model.max_seq_len", "64", "--training.seq_len", "32",
                       "--training.local_batch_size", "2", "--training.steps", "2", "--data.num_workers", "0",
                       "--metrics.enable_tensorboard", "false", "--data.path", data, "--job.dump_folder", str(run),
                       "--checkpoint.initial_load_path", step], expect_rc=1)
    line = [ln for ln in out.splitlines() if "CheckpointError" in ln]
    assert len(line) == 1 and "Traceback" not in out, out[-3000:]
    assert f"checkpoint.initial_load_path {step} was trained with the tokenizer {step}/tokenizer.model, and this " \
           f"run's data was made with another, {data}/tokenizer.model (their sha256 differ)" in line[0]
    assert "--checkpoint.initial_load_other_tokenizer true" in line[0] and "step 1" not in out
    assert not run.exists()  # the refused start left nothing behind


def test_initial_tokenizer_check_passes_the_same_tokenizer_and_warns_when_asked_for_another(
        tmp_path, model_and_other_data, caplog):
    from mobilellm_train.config import CheckpointConfig
    from mobilellm_train.errors import CheckpointMismatchError
    from mobilellm_train.start_checks import check_initial_tokenizer

    step, own, data, other = model_and_other_data
    cfg = CheckpointConfig(initial_load_path=step)
    check_initial_tokenizer(cfg, str(tmp_path / "run"), own, rank=0)  # its own tokenizer: fine
    with pytest.raises(CheckpointMismatchError, match="their sha256 differ"):
        check_initial_tokenizer(cfg, str(tmp_path / "run"), other, rank=0)
    cfg.initial_load_other_tokenizer = True
    with caplog.at_level(logging.WARNING):
        check_initial_tokenizer(cfg, str(tmp_path / "run"), other, rank=0)
    assert f"checkpoint.initial_load_other_tokenizer: starting from the weights of {step}, trained with the " \
           f"tokenizer {step}/tokenizer.model, on data of another tokenizer, {other}" in caplog.text


# ---------------------------------------------------------------------------------------------
# 4. A command-line data.sources replaces a TOML data.path; the launcher's one-line error.


def test_command_line_sources_replace_the_toml_path_and_typos_get_a_suggestion(tmp_path):
    import numpy as np

    from conftest import ROOT
    from mobilellm_train.config import load_config
    from mobilellm_train.data.shards import write_token_dataset

    docs = [np.arange(3, 60) for _ in range(20)]
    write_token_dataset(str(tmp_path / "mine"), docs, vocab_size=64, tokens_per_shard=1000)
    write_token_dataset(str(tmp_path / "mine" / "val"), docs[:4], vocab_size=64, tokens_per_shard=1000)
    write_token_dataset(str(tmp_path / "web"), docs, vocab_size=64, tokens_per_shard=1000)
    toml = os.path.join(ROOT, "train_configs", "own_data.toml")  # data.path = "data/prepared", val_interval set
    run = ["--job.dump_folder", str(tmp_path / "run")]
    cfg = load_config(["--config", toml, "--data.sources", str(tmp_path / "mine")] + run)
    assert (cfg.data.path, cfg.data.sources, cfg.data.val_path) == ("", str(tmp_path / "mine"),
                                                                   str(tmp_path / "mine" / "val"))
    with pytest.raises(ConfigError, match=r"data.val_interval needs data.val_path.*of several, name one with "
                                          r"--data.val_path, or set --data.val_interval 0"):
        load_config(["--config", toml, "--data.sources", f"{tmp_path / 'mine'}:0.5,{tmp_path / 'web'}:0.5"] + run)
    cfg = load_config(["--config", toml, "--data.sources", f"{tmp_path / 'mine'},{tmp_path / 'web'}",
                       "--data.val_path", str(tmp_path / "mine" / "val")] + run)
    assert cfg.data.path == "" and cfg.data.val_path == str(tmp_path / "mine" / "val")
    # A TOML naming sources, and data.path on the command line: the path is what trains.
    sources_toml = tmp_path / "sources.toml"
    sources_toml.write_text(f'[data]\nsources = "{tmp_path / "web"}"\n')
    cfg = load_config(["--config", str(sources_toml), "--data.path", str(tmp_path / "mine")] + run)
    assert (cfg.data.path, cfg.data.sources) == (str(tmp_path / "mine"), "")

    for given, meant in (("--training.lr", "optimizer.lr"), ("--optimizer.lrr", "optimizer.lr"),
                         ("--trainng.steps", "training.steps"), ("--model.vocab", "model.vocab_size")):
        with pytest.raises(ConfigError, match=rf"; did you mean {re.escape(meant)}\?"):
            load_config([given, "1"] + run)
    sources_toml.write_text("[optimiser]\nlr = 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown section 'optimiser'; did you mean optimizer\.lr\?"):
        load_config(["--config", str(sources_toml)] + run)


@pytest.mark.slow
def test_a_multi_rank_start_refused_by_every_rank_prints_the_error_once_last(tmp_path, tokenizer):
    """launch/run_train.sh on 2 ranks, the user's command of issue 32: own_data.toml with the data
    given as --data.sources, a folder whose encode was interrupted. Every rank refuses it; the
    launcher prints the line once, last, with no torchrun failure block."""
    import subprocess
    import sys

    from conftest import ROOT
    from test_launch import script_env

    raw = write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in random_texts(50, seed=8)])
    data = tmp_path / "data"
    encode(tokenizer, [raw], data, "--val-fraction", "0.2")
    os.remove(data / "manifest.json")  # as an interrupted encode leaves it
    r = subprocess.run(["bash", "launch/run_train.sh", "--config", "train_configs/own_data.toml", "--data.sources",
                        str(data), "--job.dump_folder", str(tmp_path / "run")], cwd=ROOT,
                       env=script_env(tmp_path, NGPU=2, PYTHON=sys.executable), capture_output=True, text=True,
                       timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    expected = f"config error: data.sources: {data} is an unfinished mobilellm-prepare output"
    assert r.returncode == 2 and lines[-1].startswith(expected), r.stderr[-3000:]
    assert sum(ln.startswith("config error:") for ln in lines) == 1  # rank 0's own copy is prefixed [rank0]:
    assert "ChildFailedError" not in r.stderr and "Root Cause" not in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# 7. The HF export's files, weights included, get the user's umask.


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_hf_export_files_get_the_users_umask(tmp_path, umask):
    pytest.importorskip("safetensors")
    import stat

    from conftest import init_model
    from mobilellm_train.export import write_hf_folder
    from test_generate import ARGS

    old = os.umask(umask)
    try:
        out = write_hf_folder(ARGS, init_model(ARGS).state_dict(), str(tmp_path / "hf"))
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) for name in os.listdir(out)}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask


# ---------------------------------------------------------------------------------------------
# 8. mobilellm-eval: a run folder named first; the CPU's perplexity batch.


def test_eval_names_a_run_folder_before_anything_about_its_contents(tmp_path, capsys, caplog):
    import numpy as np
    import torch

    from mobilellm_train.data.shards import write_token_dataset
    from mobilellm_train.evaluation import cli

    run = tmp_path / "run"
    (run / "checkpoints" / "step-20").mkdir(parents=True)
    (run / "checkpoints" / "step-20" / ".metadata").write_bytes(b"")
    write_token_dataset(str(tmp_path / "tokens"), [np.arange(3, 90)] * 4, vocab_size=100, tokens_per_shard=1000)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(run), "--tasks", "tokens", "--token-data", str(tmp_path / "tokens")])
    newest = run / "checkpoints" / "step-20"
    assert capsys.readouterr().err.strip() == (f"eval error: --checkpoint {run} is a training run folder, not a "
                                               f"checkpoint; its newest complete checkpoint is {newest}: pass "
                                               f"--checkpoint {newest}")
    assert "tokenizer" not in caplog.text
    args = cli.build_parser().parse_args(["--checkpoint", "x"])
    assert cli.ppl_batch_size(args, torch.device("cpu")) == 32 and cli.ppl_batch_size(args, torch.device("cuda")) == 4
    args.ppl_batch_size = 8
    assert cli.ppl_batch_size(args, torch.device("cpu")) == 8
