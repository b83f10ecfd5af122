"""The weight EMA (training.ema_decay): its update, a skipped step, the exact swap for validation,
its place in checkpoints (saved, resumed, started afresh, dropped), and trainer runs that are
killed or stopped and resumed and end bit for bit where uninterrupted ones end, on 1 and 2 ranks.
Also the trainer's loss terms: z-loss logged apart on the original layout and on prepared data."""

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, base_args, make_corpus, read_metrics, run_trainer, subprocess_env, wait_for_step
from mobilellm_train import checkpoint as C
from mobilellm_train.config import CheckpointConfig
from mobilellm_train.loop.ema import EMA
from mobilellm_train.model import MobileLLM, ModelArgs

TINY = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
TODAY_STATES = {"model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng"}


def tiny_model(seed=0):
    model = MobileLLM(TINY)
    model.init_weights(seed=seed)
    return model


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def nudge(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))


def test_update_follows_the_formula_skips_and_swaps_exactly():
    model = tiny_model()
    ema = EMA(model, decay=0.9)
    assert set(ema.state_dict()) == {n for n, _ in model.named_parameters()}  # the tied weight once
    expected = weights(model)
    for seed in range(3):
        nudge(model, seed)
        ema.update(torch.tensor(False))
        for name, p in model.named_parameters():
            expected[name] = 0.9 * expected[name] + 0.1 * p.detach()
            torch.testing.assert_close(ema.state_dict()[name], expected[name], rtol=0, atol=1e-6)
    # A skipped (non-finite) step: the weights did not change and neither does the average, bit for bit.
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(torch.tensor(True))
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    # Swapped in for validation: the model holds the average, then its own weights again, exactly.
    own = weights(model)
    with ema.swapped_in(model):
        assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert all(torch.equal(model.state_dict()[k], own[k]) for k in own)
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    # Off: no state, nothing moves.
    off = EMA(model, decay=0.0)
    off.update(torch.tensor(False))
    assert not off.enabled and off.state_dict() == {}


def ema_states(model, decay):
    train_state = C.TrainState(model_args=C.model_args_fingerprint(TINY))
    ema = EMA(model, decay)
    states = {"model": C.ModelState(model), "train_state": train_state}
    if ema.enabled:
        states["ema"] = ema
    return train_state, ema, states


def test_checkpoints_hold_the_ema_restore_it_and_start_it_when_absent(tmp_path, one_rank_group, caplog):
    cfg = CheckpointConfig(async_mode="disabled", keep_latest_k=0)
    model = tiny_model()
    train_state, ema, states = ema_states(model, 0.5)
    ck = C.Checkpointer(cfg, str(tmp_path), states, rank=0, optional=frozenset({"ema"}))
    nudge(model, 0)
    ema.update(torch.tensor(False))
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    train_state.step = 5
    ck.save(5)
    assert "ema" in C.stored_states(ck.path(5))
    # A spike rewind reloads the newest checkpoint: the average comes back with the weights.
    nudge(model, 1)
    ema.update(torch.tensor(False))
    ck.load(5, train_state)
    assert all(torch.equal(saved[k], v) for k, v in ema.state_dict().items())
    # The tools read it in place of the weights.
    for name, value in C.load_model_from_checkpoint(ck.path(5), weights="ema").state_dict().items():
        assert torch.equal(value, saved["tok_embeddings.weight" if name == "output.weight" else name])

    # A checkpoint written without an EMA (ema_decay 0, or before EMA existed) resumed with one on:
    # the average starts from the weights resumed, and says so.
    plain_model = tiny_model(seed=1)
    plain_state, _, plain_states = ema_states(plain_model, 0.0)
    plain = C.Checkpointer(cfg, str(tmp_path / "plain"), plain_states, rank=0)
    plain_state.step = 3
    plain.save(3)
    with pytest.raises(C.CheckpointError, match="holds no weight EMA"):
        C.load_model_from_checkpoint(plain.path(3), weights="ema")
    resumed_model = tiny_model(seed=2)
    resumed_state, resumed_ema, resumed_states = ema_states(resumed_model, 0.5)
    resumed = C.Checkpointer(cfg, str(tmp_path / "plain"), resumed_states, rank=0, optional=frozenset({"ema"}))
    with caplog.at_level(logging.INFO, logger="mobilellm_train"):
        assert resumed.maybe_resume(resumed_state)
    assert "starts from the current weights" in caplog.text and "written without it" in caplog.text
    assert all(torch.equal(v, plain_model.state_dict()[k]) for k, v in resumed_ema.state_dict().items())

    # The other way round: a run without an EMA resumes the checkpoint and says the EMA is dropped.
    caplog.clear()
    off_state, _, off_states = ema_states(tiny_model(), 0.0)
    with caplog.at_level(logging.WARNING, logger="mobilellm_train"):
        C.Checkpointer(cfg, str(tmp_path), off_states, rank=0).load(5, off_state)
    assert "also holds ema, which this run does not keep" in caplog.text


def final_weights(run, step, source):
    model = C.load_model_from_checkpoint(str(run / "checkpoints" / f"step-{step}"), weights=source)
    return model.state_dict()


def assert_same_weights(a_run, b_run, step, sources=("model", "ema")):
    for source in sources:
        a, b = final_weights(a_run, step, source), final_weights(b_run, step, source)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{source} differs"


@pytest.mark.slow
def test_one_rank_resume_equals_uninterrupted_ema_off_unchanged_and_a_branch(tmp_path):
    """Prepared data with validation and document masking, FSDP keeping gathered weights between
    forward and backward, z-loss: stopped and resumed equals uninterrupted, weights and EMA bit for
    bit; the same run without an EMA trains exactly the same weights and writes today's checkpoint.
    Then a decay branch of that run: its own schedule, the source step only read."""
    from test_train import prepare_shards

    shards = prepare_shards(tmp_path, val_fraction=0.1)
    common = {"training.ema_decay": 0.8, "training.z_loss": 1e-3, "data.val_path": shards / "val",
              "data.val_interval": 4, "data.val_sequences": 8, "data.doc_mask": "true",
              "parallelism.reshard_after_forward": "false", "checkpoint.interval": 4}
    straight, split, off = tmp_path / "straight", tmp_path / "split", tmp_path / "off"
    run_trainer(base_args(shards, straight, steps=10, **common))
    run_trainer(base_args(shards, split, steps=10, **common, **{"training.stop_at_step": 6}))
    out = run_trainer(base_args(shards, split, steps=10, **common))
    assert "resumed from" in out and "step-6" in out
    a, b = read_metrics(straight), read_metrics(split)
    assert [a[s]["loss"] for s in range(1, 11)] == [b[s]["loss"] for s in range(1, 11)]
    assert [a[s]["val_loss_ema"] for s in (4, 8, 10)] == [b[s]["val_loss_ema"] for s in (4, 8, 10)]
    assert_same_weights(straight, split, 10)
    # The EMA is an average of the trained weights (not a copy, nor the initialisation left behind).
    assert all(a[s]["val_loss_ema"] != a[s]["val_loss"] for s in (4, 8, 10))
    assert a[10]["val_loss_ema"] < a[1]["loss"] - 0.3
    assert a[10]["ce"] + a[10]["z_loss"] == pytest.approx(a[10]["loss"], rel=1e-6) and a[10]["z_loss"] > 0

    run_trainer(base_args(shards, off, steps=10, **{**common, "training.ema_decay": 0}))
    c = read_metrics(off)
    assert [a[s]["loss"] for s in range(1, 11)] == [c[s]["loss"] for s in range(1, 11)]
    assert [a[s]["val_loss"] for s in (4, 8, 10)] == [c[s]["val_loss"] for s in (4, 8, 10)]
    assert not any("val_loss_ema" in r for r in c.values())
    assert_same_weights(straight, off, 10, sources=("model",))
    assert C.stored_states(str(off / "checkpoints" / "step-10")) == TODAY_STATES
    assert C.stored_states(str(straight / "checkpoints" / "step-10")) == TODAY_STATES | {"ema"}

    source = straight / "checkpoints" / "step-8"
    before = {name: (source / name).read_bytes() for name in os.listdir(source)}
    branch = tmp_path / "branch"
    out = run_trainer(base_args(shards, branch, steps=4, **{
        **common, "checkpoint.initial_load_path": source, "checkpoint.initial_load_optimizer": "true",
        "lr_scheduler.warmup_steps": 0, "lr_scheduler.decay_type": "linear", "lr_scheduler.min_lr_ratio": 0}))
    assert f"branch of {source} (step 8, " in out and "and weight EMA loaded" in out
    assert {name: (source / name).read_bytes() for name in os.listdir(source)} == before
    d = read_metrics(branch)
    assert d[1]["lr"] == pytest.approx(3e-3) and d[4]["lr"] == 0  # from the peak to 0 over its own 4 steps
    assert d[1]["tokens_seen"] == 4 * 32  # its own step count and data, from the start
    assert d[1]["loss"] < a[1]["loss"] - 0.5  # trained weights, not an initialisation
    with open(branch / "config.toml") as f:
        config = f.read()
    assert f'initial_load_path = "{source}"' in config and "initial_load_optimizer = true" in config


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_equals_uninterrupted(tmp_path):
    """Two gloo ranks on the original layout: kill -9 mid-run, resume, and the weights and the EMA
    (each rank updates its own shard) end bit for bit as an uninterrupted run's; read whole in one
    process, the 2-rank shards reshard."""
    data = make_corpus(tmp_path / "data", folders=2)
    steps = 16
    common = {"training.ema_decay": 0.9, "training.z_loss": 1e-3, "checkpoint.interval": 5}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_trainer(base_args(data, straight, steps=steps, **common), nproc=2)
    args = base_args(data, killed, steps=steps, **common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mobilellm_train.train", *args]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        wait_for_step(killed, 8, proc)
        os.killpg(proc.pid, signal.SIGKILL)  # every rank and the agent, at whatever they were doing
    finally:
        proc.wait()
    assert max(read_metrics(killed)) < steps
    out = run_trainer(args, nproc=2)
    assert "resumed from" in out
    a, b = read_metrics(straight), read_metrics(killed)
    assert [a[s]["loss"] for s in range(1, steps + 1)] == [b[s]["loss"] for s in range(1, steps + 1)]
    assert {"ce", "z_loss"} <= set(a[steps])
    assert_same_weights(straight, killed, steps)
