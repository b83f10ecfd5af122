"""What a new user meets on a first day: initial weights that really load, mismatched
tokenizer/model/data pairs refused, a refused start that leaves the run folder as it was, data
that is not what the trainer reads named as such, and the noise-free log of a normal run.
Each failure path is triggered and its message checked."""

import json
import os
import re

import pytest
import torch

from conftest import base_args, read_metrics, run_trainer


def first_batch_loss(model, data_path, seq_len=32, batch_size=4):
    """The loss of `model` on the first batch the trainer reads from a JSONL-layout folder
    (one rank, no workers)."""
    from mobilellm_train.data.jsonl import JsonlTokenDataset, build_dataloader

    dataset = JsonlTokenDataset(data_path, seq_len=seq_len, vocab_size=model.args.vocab_size, dp_rank=0,
                                dp_world_size=1, ranks_per_node=1)
    batch = next(iter(build_dataloader(dataset, batch_size, 0, pin_memory=False)))
    with torch.no_grad():
        return model(batch["input"], labels=batch["label"]).item()


@pytest.mark.slow
def test_initial_weights_load_with_checkpoints_off(corpus, tmp_path):
    """checkpoint.enable = false must not drop checkpoint.initial_load_path: the first step's loss
    is the loaded model's loss on that batch, from a DCP step folder and from an HF export."""
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env
    from mobilellm_train.checkpoint import load_model_from_checkpoint

    first = tmp_path / "first"
    run_trainer(base_args(corpus, first, steps=10))
    step = first / "checkpoints" / "step-10"
    hf = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.export", "--checkpoint", str(step), "--out", str(hf)],
                       cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = first_batch_loss(load_model_from_checkpoint(str(step)), corpus)

    for name, source in (("from_step", step), ("from_hf", hf)):
        run = tmp_path / name
        out = run_trainer(base_args(corpus, run, steps=1, **{
            "checkpoint.enable": "false", "checkpoint.initial_load_path": source}))
        assert "initialised model weights from" in out
        assert read_metrics(run)[1]["loss"] == pytest.approx(expected, rel=1e-5)
        assert not (run / "checkpoints").exists()


def train_sp(prefix, vocab_size, lines=None):
    """A small SentencePiece model trained in-process."""
    spm = pytest.importorskip("sentencepiece")
    lines = lines or ["the quick brown fox jumps over the lazy dog", "a dog and a cat sat on the mat",
                      "pack my box with five dozen liquor jugs", "how vexingly quick daft zebras jump"] * 40
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe",
                                   vocab_size=vocab_size, bos_id=1, eos_id=2, unk_id=0, hard_vocab_limit=False,
                                   byte_fallback=True, minloglevel=2, num_threads=1)
    return f"{prefix}.model"


def run_cli(module, args, expect_rc):
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                       env=subprocess_env(), timeout=300)
    assert r.returncode == expect_rc, f"exit {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture
def step_with_tokenizer(tmp_path):
    """A DCP step folder of a 300-id model holding the 300-piece tokenizer it was trained with."""
    from dataclasses import replace

    from conftest import init_model
    from test_generate import ARGS, save_step_folder

    tokenizer = train_sp(tmp_path / "own", 300)
    model = init_model(replace(ARGS, vocab_size=300, max_seq_len=64))
    return save_step_folder(model, tmp_path / "step-5", tokenizer), tokenizer


def test_generate_refuses_a_tokenizer_of_another_model(tmp_path, step_with_tokenizer):
    import shutil

    step, _ = step_with_tokenizer
    bare = tmp_path / "bare"  # a step folder that holds no tokenizer: only the vocabulary can be checked
    shutil.copytree(step, bare)
    os.remove(bare / "tokenizer.model")
    bigger = train_sp(tmp_path / "bigger", 400)
    args = ["--prompt", "the dog", "--max-new-tokens", "4", "--device", "cpu"]
    r = run_cli("mobilellm_train.generate", ["--checkpoint", str(bare), "--tokenizer", bigger, *args], expect_rc=1)
    assert "400 pieces, more than the model's vocab_size 300" in r.stderr and "Traceback" not in r.stderr
    base = ["--checkpoint", step, *args]
    # Same size, other pieces: not the checkpoint's own tokenizer.
    other = train_sp(tmp_path / "other", 300, lines=["zebra yak xylophone wombat vole"] * 80)
    r = run_cli("mobilellm_train.generate", base + ["--tokenizer", other], expect_rc=1)
    assert f"--tokenizer {other} is not the tokenizer" in r.stderr and "leave out --tokenizer" in r.stderr
    r = run_cli("mobilellm_train.generate", base, expect_rc=0)
    assert r.stdout.startswith("=== prompt 1 ===")


def test_eval_refuses_token_data_of_another_tokenizer(tmp_path, step_with_tokenizer):
    import numpy as np

    from mobilellm_train.data.shards import write_token_dataset

    step, own = step_with_tokenizer
    other = train_sp(tmp_path / "other", 300, lines=["zebra yak xylophone wombat vole"] * 80)
    docs = [np.arange(3, 200) % 290 + 3 for _ in range(4)]
    write_token_dataset(str(tmp_path / "theirs"), docs, vocab_size=300, tokens_per_shard=10_000, tokenizer_path=other)
    write_token_dataset(str(tmp_path / "ours"), docs, vocab_size=300, tokens_per_shard=10_000, tokenizer_path=own)
    base = ["--checkpoint", step, "--tasks", "tokens", "--seq-len", "32", "--max-windows", "4", "--device", "cpu"]
    r = run_cli("mobilellm_train.evaluation.cli", base + ["--token-data", str(tmp_path / "theirs")], expect_rc=1)
    assert "is not the one" in r.stderr and str(tmp_path / "theirs") in r.stderr and "perplexity" not in r.stdout
    r = run_cli("mobilellm_train.evaluation.cli", base + ["--token-data", str(tmp_path / "ours")], expect_rc=0)
    assert "tokens perplexity" in r.stdout


@pytest.mark.slow
def test_refused_start_keeps_config_and_budget_change_is_logged(corpus, tmp_path):
    run = tmp_path / "run"
    run_trainer(base_args(corpus, run, steps=10))
    written = (run / "config.toml").read_text()
    assert "vocab_size = 64" in written
    out = run_trainer(base_args(corpus, run, steps=20, **{"model.vocab_size": 80}), expect_rc=1)
    assert "CheckpointError" in out and "vocab_size" in out
    assert (run / "config.toml").read_text() == written
    assert sorted(os.listdir(run)) == sorted(["config.toml", "checkpoints", "metrics.jsonl", "run.lock"])

    # The user's step (issue 32): edit <run>/config.toml and resume from it. The comparison is with
    # the config the checkpoint records, not with that (edited) file; values are the effective ones
    # (global_batch_size 0 meant 4 on one rank: no change), and the lr warning names its causes.
    edited = (written.replace("\nsteps = 10\n", "\nsteps = 20\n").replace("\nlr = 0.003\n", "\nlr = 0.001\n")
              .replace("\nglobal_batch_size = 0\n", "\nglobal_batch_size = 4\n"))
    assert edited.count("\nsteps = 20\n") == 1 and "\nlr = 0.001\n" in edited and "global_batch_size = 4" in edited
    (run / "config.toml").write_text(edited)
    out = run_trainer(["--config", str(run / "config.toml")])
    changes = re.search(r"config changed since the checkpoint of step 10 was trained with \(the config it "
                        r"records\): (.*)", out).group(1)
    assert changes == "training.steps 10 -> 20; optimizer.lr 0.003 -> 0.001", changes
    assert "training budget changed on resume: 10 steps (1280 tokens) -> 20 steps (2560 tokens); the lr schedule " \
           "spans the new budget" in out
    assert re.search(r"the lr of step 11 is [\d.e-]+ \(it would have been [\d.e-]+\), from the change of "
                     r"optimizer\.lr, the budget", out)
    assert (run / "config.toml").read_text() == edited and not (run / "config.previous.toml").exists()
    # The resumed run's checkpoints record the config they were trained with.
    from mobilellm_train.checkpoint import read_train_state

    assert "lr = 0.001" in read_train_state(str(run / "checkpoints" / "step-20")).config


@pytest.mark.slow
def test_a_run_and_its_resume_print_no_warnings_of_libraries(corpus, tmp_path):
    """No torchdata set_vital or lr_scheduler UserWarning, on start or on resume; the linear scaling
    rule on a tiny batch is called out."""
    run = tmp_path / "run"
    scaled = {"optimizer.scale_lr_with_batch": "true", "data.num_workers": 1}
    out = run_trainer(base_args(corpus, run, steps=10, **scaled))
    assert "the linear scaling rule makes the peak lr 7.32e-07, 0.000244x optimizer.lr 0.003" in out
    out += run_trainer(base_args(corpus, run, steps=20, **scaled))
    assert "resumed from" in out
    assert "Warning" not in out and "set_vital" not in out and "get_last_lr" not in out
    out = run_trainer(base_args(corpus, tmp_path / "plain", steps=2))
    assert "linear scaling rule" not in out


def args_without_path(args):
    i = args.index("--data.path")
    return args[:i] + args[i + 2:]


@pytest.mark.slow
def test_data_sources_alone_train_without_the_demo_corpus(tmp_path):
    import numpy as np

    from mobilellm_train.data.shards import write_token_dataset

    docs = [np.arange(3, 3 + 40 + i % 7) % 61 + 3 for i in range(60)]
    write_token_dataset(str(tmp_path / "a"), docs, vocab_size=64, tokens_per_shard=1000)
    write_token_dataset(str(tmp_path / "b"), docs[:30], vocab_size=64, tokens_per_shard=1000)
    run = tmp_path / "run"
    out = run_trainer(args_without_path(base_args("", run, steps=3)) +
                      ["--data.sources", f"{tmp_path / 'a'}:0.7,{tmp_path / 'b'}:0.3"])
    assert "demo" not in out and not (run / "demo_data").exists()
    assert max(read_metrics(run)) == 3


# ---------------------------------------------------------------------------------------------
# Bad input: each is refused with its file and what to do, before any process group where it can be.


def test_config_refuses_non_finite_numbers_a_file_as_data_path_and_an_unusable_run_folder(tmp_path):
    from mobilellm_train.config import ConfigError, load_config

    for key, value in (("optimizer.lr", "inf"), ("optimizer.eps", "nan"), ("training.max_norm", "-inf")):
        with pytest.raises(ConfigError, match=rf"{key}: must be a finite number \(got '{value}'\)"):
            load_config([f"--{key}", value])
    toml = tmp_path / "c.toml"
    toml.write_text("[optimizer]\nlr = inf\n")
    with pytest.raises(ConfigError, match="optimizer.lr: must be a finite number"):
        load_config(["--config", str(toml)])

    text = tmp_path / "corpus.txt"
    text.write_text("plain English text\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--data.path", str(text)])
    assert f"data.path: {text} is a file, not a folder" in str(e.value)
    assert f"mobilellm-prepare encode --input {text} --tokenizer {tmp_path / 'corpus_tokenizer.model'}" in str(e.value)
    assert f"--data.path {tmp_path / 'corpus_tokens'}" in str(e.value)

    with pytest.raises(ConfigError, match=f"job.dump_folder: {text}/run cannot be created: {text} is a file"):
        load_config(["--job.dump_folder", str(text / "run")])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes regardless of permissions")
def test_config_refuses_a_run_folder_it_cannot_write(tmp_path):
    from mobilellm_train.config import ConfigError, load_config

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"job.dump_folder: .*run cannot be created: .*locked is not writable by this user"):
        load_config(["--job.dump_folder", str(locked / "run")])
    with pytest.raises(ConfigError, match=r"job.dump_folder: .*locked is not writable by this user"):
        load_config(["--job.dump_folder", str(locked)])


def test_trainer_config_errors_exit_2_before_any_process_group(tmp_path):
    out = run_trainer(["--optimizer.lr", "inf", "--job.dump_folder", str(tmp_path / "run")], expect_rc=2)
    assert "config error: optimizer.lr: must be a finite number" in out
    assert "rank0" not in out and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_raw_text_as_data_path_names_the_prepare_commands(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("Some plain text.\n")
    out = run_trainer(base_args(texts, tmp_path / "run", steps=2), expect_rc=1)
    assert "a.txt: this looks like raw text, not token ids" in out
    assert f"mobilellm-prepare encode --input {texts} --tokenizer" in out and "Traceback" not in out

    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "docs.jsonl").write_text(json.dumps({"text": "hello there", "id": 3}) + "\n")
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"not checked here")
    out = run_trainer(base_args(jsonl, tmp_path / "run", steps=2, **{"data.tokenizer_path": tokenizer}),
                      expect_rc=1)
    assert 'records have no key "token_ids" (keys: \'text\', \'id\'): this looks like raw text in JSONL' in out
    assert f"mobilellm-prepare encode --input {jsonl} --tokenizer {tokenizer} --out {jsonl}_tokens" in out
    assert "prepare tokenizer" not in out and "Traceback" not in out


@pytest.mark.slow
def test_bad_line_in_a_loader_worker_is_one_clean_error_naming_the_flag(tmp_path):
    from conftest import make_corpus

    data = make_corpus(tmp_path / "data", n_docs=50)
    path = tmp_path / "data" / "1" / "part-0.jsonl"
    lines = path.read_text().splitlines()
    lines[5] = "[" * 100_000 + "]" * 100_000  # deeper than Python's json parser can recurse
    path.write_text("\n".join(lines) + "\n")
    out = run_trainer(base_args(data, tmp_path / "run", steps=5, **{"data.num_workers": 1}), expect_rc=1)
    assert f"DataError: {path}:6: invalid JSON: nested too deeply to parse" in out
    assert "pass --data.skip_bad_lines N" in out
    assert "Traceback" not in out and "worker" not in out


@pytest.mark.slow
def test_out_of_range_id_in_a_shard_is_caught_on_read_without_checksums(tmp_path):
    import numpy as np

    from mobilellm_train.data.shards import DTYPES, read_manifest, write_token_dataset

    docs = [np.arange(3, 3 + 40 + i % 7) % 61 + 3 for i in range(60)]
    folder = tmp_path / "shards"
    write_token_dataset(str(folder), docs, vocab_size=64, tokens_per_shard=1000)
    m = read_manifest(str(folder))
    shard = folder / f"{m.shards[1].name}.bin"
    tokens = np.fromfile(shard, dtype=DTYPES[m.dtype])
    tokens[17] = 60_000  # a flipped bit the manifest does not know of
    tokens.tofile(shard)
    args = base_args(folder, tmp_path / "run", steps=40, **{"data.verify_checksums": "false", "data.num_workers": 1})
    out = run_trainer(args, expect_rc=1)
    assert f"DataError: {shard}: token id 60000 at token 17 of the shard is outside the model's vocabulary [0, 64)" in out
    assert "--data.verify_checksums true" in out and "IndexError" not in out and "Traceback" not in out


def test_deeply_nested_json_in_encode_and_convert_names_file_and_line(tmp_path):
    from mobilellm_train.data import prepare
    from mobilellm_train.data.jsonl import DataError

    deep = "[" * 100_000 + "]" * 100_000
    raw = tmp_path / "raw" / "a.jsonl"
    raw.parent.mkdir()
    raw.write_text(json.dumps({"text": "fine"}) + "\n" + deep + "\n")
    tokenizer = train_sp(tmp_path / "tok", 300)
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid JSON: nested too deeply"):
        prepare.run(["encode", "--input", str(raw), "--tokenizer", tokenizer, "--out", str(tmp_path / "o"),
                     "--workers", "1"])
    nodes = tmp_path / "nodes" / "1"
    nodes.mkdir(parents=True)
    (nodes / "p.jsonl").write_text(json.dumps({"token_ids": [1, 5, 2]}) + "\n" + deep + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: invalid JSON: nested too deeply"):
        prepare.run(["convert", "--layout", "nodes", "--input", str(tmp_path / "nodes"), "--out",
                     str(tmp_path / "o2"), "--vocab-size", "64"])


def test_a_failed_encode_that_finished_nothing_does_not_pin_its_settings(tmp_path):
    from mobilellm_train.data import prepare
    from mobilellm_train.data.jsonl import DataError
    from mobilellm_train.data.shards import read_manifest

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"body": f"text number {i}"}) + "\n" for i in range(20)))
    tokenizer = train_sp(tmp_path / "tok", 300)
    out = tmp_path / "out"
    base = ["encode", "--input", str(raw), "--tokenizer", tokenizer, "--out", str(out), "--workers", "1"]
    with pytest.raises(DataError, match=r"raw\.jsonl:1: no key 'text'"):
        prepare.run(base)
    prepare.run(base + ["--text-field", "body"])
    assert read_manifest(str(out)).num_tokens > 20


def test_progress_units_follow_the_size():
    from mobilellm_train.data.prepare import Progress, format_bytes

    class Counter:
        value = 2_500_000

    line = Progress("encode", 15_300_000, 4, Counter()).line()
    assert " 2.50/15.30 MB " in line
    assert format_bytes(512) == "512 B" and format_bytes(4500) == "4.5 kB" and format_bytes(2.1e9) == "2.1 GB"


@pytest.mark.slow
def test_demo_run_says_each_thing_once(tmp_path):
    """The demo corpus is announced once ('built', not also 'already built'), with no library warnings."""
    from conftest import ROOT

    def args(steps):
        return ["--config", os.path.join(ROOT, "train_configs", "debug.toml"), "--job.dump_folder",
                str(tmp_path / "run"), "--training.steps", str(steps), "--training.local_batch_size", "2",
                "--training.seq_len", "32", "--metrics.enable_tensorboard", "false"]

    out = run_trainer(args(1))
    assert out.count("demo corpus built") == 1 and "already built" not in out
    assert "Warning" not in out
    out = run_trainer(args(2))
    assert out.count("demo corpus already built") == 1 and "resumed from" in out
