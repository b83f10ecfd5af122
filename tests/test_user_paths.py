"""What a new user meets on a first day: initial weights that really load, mismatched
tokenizer/model/data pairs refused, a refused start that leaves the run folder as it was, data
that is not what the trainer reads named as such, and the noise-free log of a normal run.
Each failure path is triggered and its message checked."""

import json
import os

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
    assert sorted(os.listdir(run)) == sorted(["config.toml", "checkpoints", "metrics.jsonl"])

    out = run_trainer(base_args(corpus, run, steps=20))
    assert "config changed since the last start" in out and "training.steps 10 -> 20" in out
    assert "training budget changed on resume: 10 steps (1280 tokens) -> 20 steps (2560 tokens)" in out
    assert "the lr of step 11 is" in out
    assert "steps = 20" in (run / "config.toml").read_text()
    assert (run / "config.previous.toml").read_text() == written
    assert [n for n in os.listdir(run) if n.startswith("config")].__len__() == 2


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
