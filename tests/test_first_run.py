"""What a first run on one's own data meets (issue 21): the vocabulary taken from the data, a
refused start that leaves the run folder as it was, the free-space check of the checkpoint
folder, messages that name the fix (eval's --data-dir, --wikitext, a run folder given as
--checkpoint, the step a Ctrl-C stops at), elapsed_s as a run total, and the CPU memory line.
In-process checks, no training runs unless said."""

import json
import logging
import os

import pytest

import mobilellm_train.evaluation.cli as eval_cli


def run_eval(args, capsys):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(args)
    assert e.value.code == 1
    return capsys.readouterr().err


def test_eval_names_a_missing_data_dir_and_the_wikitext_flag(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    err = run_eval(["--checkpoint", str(tmp_path), "--tasks", "all", "--data-dir", str(missing)], capsys)
    assert f"--data-dir {missing}: no such folder" in err and "docs/EVALUATION.md" in err
    assert len(err.strip().splitlines()) == 1  # one line, not every task's accepted layouts

    (tmp_path / "data" / "wikitext").mkdir(parents=True)
    (tmp_path / "data" / "wikitext" / "train-00000.parquet").write_bytes(b"")  # the near miss
    err = run_eval(["--checkpoint", str(tmp_path), "--tasks", "wikitext", "--data-dir", str(tmp_path / "data")],
                   capsys)
    assert "train-00000.parquet" in err and "--wikitext FILE" in err


def test_a_run_folder_as_checkpoint_names_its_newest_step(tmp_path, capsys):
    from mobilellm_train import generate
    from mobilellm_train.evaluation.loading import load_model, load_tokenizer

    run = tmp_path / "run"
    for step in (10, 20):
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step}" / ".metadata").write_bytes(b"")
    (run / "checkpoints" / "step-30").mkdir()  # incomplete: not the one to name
    newest = run / "checkpoints" / "step-20"
    for call in (lambda: load_model(str(run)), lambda: load_tokenizer(str(run))):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert f"its newest complete checkpoint is {newest}: pass --checkpoint {newest}" in str(e.value)
    with pytest.raises(SystemExit):
        generate.main(["--checkpoint", str(run), "--prompt", "the", "--device", "cpu"])
    assert f"generate error: --checkpoint {run} is a training run folder" in capsys.readouterr().err
    # The checkpoint folder itself, and a run whose config.toml names another checkpoint folder.
    with pytest.raises(FileNotFoundError, match=f"pass --checkpoint {newest}"):
        load_model(str(run / "checkpoints"))
    os.rename(run / "checkpoints", run / "ckpt")
    (run / "config.toml").write_text('[checkpoint]\nfolder = "ckpt"\n')
    with pytest.raises(FileNotFoundError, match=f"pass --checkpoint {run / 'ckpt' / 'step-20'}"):
        load_model(str(run))


class _Request:
    interrupt_note = ""


@pytest.mark.parametrize("freq, stop_at, step, expected", [
    (10, 0, 0, "stopping after step 10 (the next stop check, job.stop_check_freq 10) and saving"),
    (10, 0, 10, "stopping after step 20 (the next stop check"),
    (10, 0, 37, "stopping after step 40 (the next stop check"),
    (10, 15, 10, "stopping after step 15 (training.stop_at_step)"),
    (1, 0, 4, "stopping after step 5 (the next stop check, job.stop_check_freq 1)"),
])
def test_ctrl_c_says_which_step_the_run_stops_and_saves_at(freq, stop_at, step, expected):
    from mobilellm_train.loop.stops import Stops

    stops = Stops.__new__(Stops)  # without the signal handlers and the process group
    stops.request, stops.check_freq, stops.stop_at_step, stops.saves = _Request(), freq, stop_at, True
    stops._note_step(step)
    assert stops.request.interrupt_note.startswith(expected), stops.request.interrupt_note
    stops.saves = False
    stops._note_step(step)
    assert "nothing is saved" in stops.request.interrupt_note


def test_elapsed_s_is_a_run_total_across_resumes(tmp_path):
    from mobilellm_train.metrics import MetricsLogger, elapsed_at

    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "elapsed_s": 2.0 * s, "step_time_s": 2.0} for s in (10, 20, 30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 40, "elaps')
    assert elapsed_at(str(path), 30) == 60.0
    # Resumed from the checkpoint of step 25: the records past it go, the 5 steps after step 20
    # are counted at the last record's step time.
    metrics = MetricsLogger(str(tmp_path), 0, enable_tensorboard=False, resume_step=25)
    metrics.close()
    assert metrics.elapsed_before == 40.0 + 5 * 2.0
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    assert MetricsLogger(str(tmp_path / "new"), 0, enable_tensorboard=False).elapsed_before == 0.0

    import torch

    from mobilellm_train.loop.log_record import LogRecord

    record = LogRecord(torch.device("cpu"), 1, 64, 100, 1.0, None, elapsed_before=50.0)
    assert record.elapsed_s(record.train_begin + 3.0) == 53.0


def test_the_cpu_memory_line_names_no_gpu_card(caplog):
    from conftest import ROOT
    from mobilellm_train import plan as P

    cfg = P.load_plan_config(["--config", os.path.join(ROOT, "train_configs", "125M.toml")], 1)
    with caplog.at_level(logging.INFO, logger="mobilellm_train"):
        P.check_memory(cfg, 1, "cpu", "cpu", None)
    assert "running on CPU: memory is not checked" in caplog.text
    assert "80 GB" not in caplog.text and "79.1" not in caplog.text


# ---------------------------------------------------------------------------------------------
# The vocabulary from the data


def prepared(folder, vocab=300, top=None):
    """A prepared dataset of `vocab` ids whose largest id is `top` (vocab - 1 by default)."""
    import numpy as np

    from mobilellm_train.data.shards import write_token_dataset

    top = vocab - 1 if top is None else top
    docs = [np.arange(3, 3 + 60) % (top - 2) + 3 for _ in range(40)]
    docs[0][-1] = top
    write_token_dataset(str(folder), docs, vocab_size=vocab, tokens_per_shard=5_000)
    return str(folder)


def test_vocab_size_comes_from_the_data_unless_given(tmp_path):
    from mobilellm_train.config import CheckpointConfig, ConfigError, DataConfig, ModelConfig
    from mobilellm_train.start_checks import DataVocab, checkpoint_vocab_size, choose_vocab_size, data_vocabulary

    data = data_vocabulary(DataConfig(path=prepared(tmp_path / "d", vocab=300, top=250)))
    assert (data.size, data.needed) == (300, 251) and data.where.endswith("manifest.json")
    assert data_vocabulary(DataConfig()) == DataVocab(2000, 2000, "the demo corpus (data.demo_vocab_size)")
    assert data_vocabulary(DataConfig(path=str(tmp_path))) is None  # JSONL ids, no tokenizer: unknown
    # A new run from a Hugging Face folder's weights takes their vocabulary.
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"vocab_size": 96}')
    assert checkpoint_vocab_size(CheckpointConfig(initial_load_path=str(tmp_path / "hf")), str(tmp_path)) == 96
    assert checkpoint_vocab_size(CheckpointConfig(), str(tmp_path / "none")) is None

    vocab, note = choose_vocab_size(ModelConfig(flavor="125M"), data, None)
    assert vocab == 300 and "model.vocab_size 300, taken from" in note and data.where in note
    assert choose_vocab_size(ModelConfig(flavor="125M"), None, None) == (32000, "")  # the preset's
    assert choose_vocab_size(ModelConfig(vocab_size=512), data, None) == (512, "")  # the user's, larger
    # A resumed checkpoint keeps its shape, whatever the data records.
    vocab, note = choose_vocab_size(ModelConfig(), data, 32000)
    assert vocab == 32000 and "the checkpoint's this run starts from" in note
    # The contradiction, in words, with the flag that fixes it.
    for explicit in (200, 299):
        with pytest.raises(ConfigError) as e:
            choose_vocab_size(ModelConfig(vocab_size=explicit), data, None)
        assert f"model.vocab_size {explicit} is smaller" in str(e.value)
        assert "records 300 tokens, token ids up to 250" in str(e.value)
        assert "Set --model.vocab_size 300" in str(e.value)


@pytest.mark.slow
def test_vocab_from_the_manifest_and_a_refused_start_leaves_the_run_folder_as_it_was(tmp_path):
    from conftest import TINY_MODEL, base_args, read_metrics, run_trainer
    from mobilellm_train.start_checks import checkpoint_vocab_size
    from mobilellm_train.config import CheckpointConfig

    data = prepared(tmp_path / "data", vocab=300)
    args = base_args(data, tmp_path / "new" / "run", steps=2)  # TINY_MODEL gives vocab_size 64
    out = run_trainer(args, expect_rc=1)
    assert "ConfigError: model.vocab_size 64 is smaller than the data's vocabulary" in out
    assert "Set --model.vocab_size 300" in out and "Traceback" not in out
    assert not (tmp_path / "new").exists()  # made by the start, removed with it

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    run_trainer(base_args(data, kept, steps=2), expect_rc=1)
    assert os.listdir(kept) == ["notes.txt"]  # no run.lock, nothing else

    i = args.index("--model.vocab_size")
    out = run_trainer(args[:i] + args[i + 2:])
    run = tmp_path / "new" / "run"
    assert f"model.vocab_size 300, taken from {data}/manifest.json" in out
    assert "vocab_size = 300" in (run / "config.toml").read_text() and max(read_metrics(run)) == 2
    assert checkpoint_vocab_size(CheckpointConfig(), str(run)) == 300
    assert checkpoint_vocab_size(CheckpointConfig(load_step=0), str(run)) is None
    assert TINY_MODEL[TINY_MODEL.index("--model.vocab_size") + 1] == "64"


# ---------------------------------------------------------------------------------------------
# Free space in the checkpoint folder


def fake_disk(monkeypatch, free_bytes):
    import mobilellm_train.start_checks as S

    class Stat:
        f_frsize = 4096
        f_bavail = free_bytes // 4096

    seen = []
    monkeypatch.setattr(S.os, "statvfs", lambda path: seen.append(path) or Stat())
    return seen


def test_free_space_refuses_below_one_checkpoint_and_warns_below_what_is_kept(tmp_path, monkeypatch):
    from mobilellm_train.errors import CheckpointError
    from mobilellm_train.start_checks import GIB, check_free_space, checkpoint_bytes, saves_left

    one = checkpoint_bytes(124_600_000)  # 125M
    assert 1.49e9 < one < 1.5e9
    assert saves_left(0, 200, 100) == 2 and saves_left(150, 200, 100) == 1 and saves_left(0, 250, 100) == 3
    folder = str(tmp_path / "run" / "checkpoints")  # not made yet: its nearest existing parent is asked
    seen = fake_disk(monkeypatch, int(1.0 * GIB))
    with pytest.raises(CheckpointError) as e:
        check_free_space(folder, one, 124_600_000, saves=5, keep_latest_k=3, existing=0)
    message = str(e.value)
    assert f"checkpoint folder {folder}: 1.00 GiB free" in message and "1.39 GiB" in message
    assert "124.6M parameters x 12 bytes" in message
    assert "--checkpoint.folder" in message and "--checkpoint.enable false" in message
    assert seen == [str(tmp_path)]

    fake_disk(monkeypatch, 3 * one + 4096)  # room for three: keep_latest_k 3 needs four at once
    warning = check_free_space(folder, one, 124_600_000, saves=5, keep_latest_k=3, existing=0)
    assert "room for 4 more checkpoints" in warning and "--checkpoint.keep_latest_k" in warning
    assert check_free_space(folder, one, 124_600_000, saves=5, keep_latest_k=2, existing=0) == ""
    assert check_free_space(folder, one, 124_600_000, saves=2, keep_latest_k=3, existing=0) == ""  # 2 saves left
    # keep_latest_k 0 keeps every save.
    assert "keeps every one" in check_free_space(folder, one, 124_600_000, saves=10, keep_latest_k=0, existing=0)
    assert check_free_space(folder, one, 124_600_000, saves=0, keep_latest_k=3, existing=0) == ""


# ---------------------------------------------------------------------------------------------
# A starting config for one's own data


def test_own_data_config_needs_only_the_data_folder(tmp_path):
    from conftest import ROOT
    from mobilellm_train import config as C
    from mobilellm_train.start_checks import data_vocabulary, describe_run

    data = prepared(tmp_path / "mine", vocab=300)
    prepared(tmp_path / "mine" / "val", vocab=300)
    toml = os.path.join(ROOT, "train_configs", "own_data.toml")
    cfg = C.load_config(["--config", toml, "--data.path", data], world_size=1)
    assert cfg.data.val_path == os.path.join(data, "val") and cfg.data.val_interval > 0
    assert cfg.model.vocab_size == 0 and data_vocabulary(cfg.data).size == 300  # the trainer takes 300
    assert describe_run(cfg) == f"MobileLLM-debug on {data}, validation on {data}/val"
    # Without the split the start names where it was looked for.
    with pytest.raises(C.ConfigError, match=f"data.val_interval needs data.val_path.*{tmp_path}/other/val"):
        C.load_config(["--config", toml, "--data.path", prepared(tmp_path / "other")], world_size=1)
    # An explicit description stays; the demo config says what it runs.
    assert describe_run(C.load_config(["--job.description", "mine"], world_size=1)) == "mine"
    debug = C.load_config(["--config", os.path.join(ROOT, "train_configs", "debug.toml")], world_size=1)
    assert describe_run(debug) == "MobileLLM-debug on the demo corpus"
    assert data_vocabulary(debug.data).size == 2000


def test_run_folder_record_removes_only_what_the_start_added(tmp_path):
    from mobilellm_train.start_checks import RunFolderRecord

    kept = tmp_path / "kept"
    (kept / "checkpoints" / "step-10").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    record = RunFolderRecord(str(kept))
    (kept / "run.lock").write_text("host h pid 1")
    (kept / "demo_data").mkdir()
    (kept / "demo_data" / "shard-0.bin").write_bytes(b"x")
    (kept / "checkpoints" / "step-20").mkdir()  # inside an entry that was there: not this record's
    record.undo()
    assert sorted(os.listdir(kept)) == ["checkpoints", "notes.txt"]

    record = RunFolderRecord(str(tmp_path / "a" / "b" / "run"))  # a/ is the top-most folder made
    (tmp_path / "a" / "b" / "run").mkdir(parents=True)
    (tmp_path / "a" / "b" / "run" / "run.lock").write_text("")
    record.undo()
    assert sorted(os.listdir(tmp_path)) == ["kept"]
