"""Tests of the training step's host-side costs: a non-finite gradient skips the update on the
device (weights, AdamW moments and step counts unchanged) and is reported later with its step
number, and Python's garbage collector runs at fixed steps only.

    python -m pytest tests/test_step.py -q
"""

import gc
import logging

import pytest
import torch

from conftest import init_model
from mobilellm_train.config import OptimizerConfig
from mobilellm_train.model import MODEL_PRESETS
from mobilellm_train.optim import build_optimizer
from mobilellm_train.train import GarbageCollection, NonFiniteError, NonFiniteSteps, train_step
from dataclasses import replace


def tiny_model():
    args = replace(MODEL_PRESETS["debug"], vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   ffn_dim=64, max_seq_len=32)
    return init_model(args, seed=1).train()


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 17), generator=gen)
    return [{"input": tokens[:, :-1], "label": tokens[:, 1:]}]


def snapshot(model, optimizer):
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    return params, state


def assert_same(a, b):
    params_a, state_a = a
    params_b, state_b = b
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for field in state_a[key]:
            assert torch.equal(state_a[key][field], state_b[key][field]), field


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_gradient_never_changes_weights_or_optimizer_state(fused):
    model = tiny_model()
    optimizer = build_optimizer(model, OptimizerConfig(fused=fused), lr=1e-2)
    assert optimizer.defaults["fused"] is fused  # the device path runs on CPU too
    _, _, skipped = train_step(model, optimizer, batch(0), max_norm=1.0)
    assert not skipped.item()
    before = snapshot(model, optimizer)
    steps_before = [s["step"].item() for s in optimizer.state.values()]

    # An inf in a single gradient element: the global norm is inf, so nothing may move.
    hook = model.layers[1].feed_forward.w2.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
    loss, grad_norm, skipped = train_step(model, optimizer, batch(1), max_norm=1.0)
    hook.remove()
    assert skipped.item() and not torch.isfinite(grad_norm)
    assert_same(before, snapshot(model, optimizer))
    assert [s["step"].item() for s in optimizer.state.values()] == steps_before
    assert getattr(optimizer, "found_inf", None) is None  # not left behind for the next step

    # And the next finite step updates as usual.
    _, _, skipped = train_step(model, optimizer, batch(2), max_norm=1.0)
    assert not skipped.item()
    assert [s["step"].item() for s in optimizer.state.values()] == [s + 1 for s in steps_before]
    assert not torch.equal(before[0]["layers.0.attention_norm.weight"], model.layers[0].attention_norm.weight)


def flags(*values):
    return [torch.tensor(v) for v in values]


def test_skipped_steps_are_reported_at_the_check_with_their_step_numbers(caplog):
    tracker = NonFiniteSteps("skip", max_skipped_steps=3, describe_checkpoint=lambda: "No checkpoint has been saved yet.")
    for step, bad in zip(range(1, 6), [False, True, False, True, False]):
        tracker.record(step, torch.tensor(bad), torch.tensor(float("nan") if bad else 1.5), torch.tensor(2.0))
    with caplog.at_level(logging.WARNING, logger="mobilellm_train"):
        assert tracker.check(current_step=5) == [2, 4]
    assert tracker.skipped_steps == 2
    assert "step 2: non-finite gradient norm (nan)" in caplog.text and "(1 of at most 3)" in caplog.text
    assert "step 4: non-finite" in caplog.text and "(2 of at most 3)" in caplog.text
    assert tracker.check(current_step=6) == []  # each flag is read once

    # Over budget: the step that broke it is named, and where the run stopped.
    for step in (7, 8):
        tracker.record(step, torch.tensor(True), torch.tensor(float("inf")), torch.tensor(float("nan")))
    with pytest.raises(NonFiniteError, match=r"step 8: non-finite gradient norm \(inf\).*\(3 steps already "
                                             r"skipped\); stopped at step 9"):
        tracker.check(current_step=9)


def test_stop_policy_raises_at_the_first_skipped_step():
    tracker = NonFiniteSteps(
        "stop", max_skipped_steps=10, describe_checkpoint=lambda: "The newest checkpoint, x, verified intact."
    )
    tracker.record(3, torch.tensor(False), torch.tensor(1.0), torch.tensor(2.0))
    tracker.record(4, torch.tensor(True), torch.tensor(float("nan")), torch.tensor(2.0))
    with pytest.raises(NonFiniteError, match=r"^step 4: .*stopped at step 4, .*The newest checkpoint, x, verified intact"):
        tracker.check(current_step=4)


def test_gc_runs_generation_one_at_gc_freq_and_full_rarely(monkeypatch):
    was_enabled = gc.isenabled()
    gc.enable()
    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *generation: calls.append(generation) or 0)
    try:
        collector = GarbageCollection(gen1_freq=5, full_freq=20)
        assert not gc.isenabled()
        assert calls == [()]  # start-up garbage, once
        calls.clear()
        for step in range(1, 41):
            collector.collect(step)
        assert calls == [(1,), (1,), (1,), (), (1,), (1,), (1,), ()]  # steps 5, 10, 15, 20 (full), ...
        collector.close()
        assert gc.isenabled()
        calls.clear()
        never_full = GarbageCollection(gen1_freq=5, full_freq=0)
        for step in range(1, 11):
            never_full.collect(step)
        assert calls == [(), (1,), (1,)]
        never_full.close()
    finally:
        monkeypatch.setattr(gc, "collect", real_collect)
        (gc.enable if was_enabled else gc.disable)()
