"""The lr schedules, AdamW's parameter groups and the MFU formula."""

import dataclasses

import pytest
import torch

from mobilellm_train.config import LRSchedulerConfig, OptimizerConfig
from mobilellm_train.metrics import flops_per_token, format_duration
from mobilellm_train.model import MODEL_PRESETS, MobileLLM
from mobilellm_train.optim import build_lr_scheduler, build_optimizer, lr_multiplier


def test_cosine_warmup_and_floor():
    cfg = LRSchedulerConfig(warmup_steps=10, decay_type="cosine", min_lr_ratio=0.1)
    m = [lr_multiplier(s, cfg, 110) for s in range(110)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(m[:9], m[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(m[10:], m[11:]))  # then decays
    assert m[-1] == pytest.approx(0.1)  # to the 10% floor at the last step
    assert m[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 50 / 99)).item()))


def test_linear_and_wsd():
    lin = LRSchedulerConfig(warmup_steps=0, decay_type="linear", min_lr_ratio=0.0)
    assert [lr_multiplier(s, lin, 11) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    wsd = LRSchedulerConfig(warmup_steps=10, decay_type="wsd", min_lr_ratio=0.1, decay_ratio=0.2)
    m = [lr_multiplier(s, wsd, 100) for s in range(100)]
    assert m[10:80] == [1.0] * 70  # stable phase
    assert m[99] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(m[80:], m[81:]))


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_lr_scheduler(opt, LRSchedulerConfig(warmup_steps=4), 20)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25e-3)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_no_weight_decay_on_norms():
    model = MobileLLM(MODEL_PRESETS["debug"])
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1), lr=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    norm_ids = {id(m.weight) for n, m in model.named_modules() if n.endswith("norm")}
    assert {id(p) for p in no_decay["params"]} == norm_ids
    assert any(p is model.tok_embeddings.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_mfu_formula_matches_reference_table():
    # docs/REFERENCE.md: 125M at 168k tokens/s on a 989 TFLOP/s card is 19.9% MFU;
    # 1.5B at 27k tokens/s is 30.7%.
    assert 168e3 * flops_per_token(MODEL_PRESETS["125M"], 2048) / 989e12 == pytest.approx(0.199, abs=1e-3)
    assert 27e3 * flops_per_token(MODEL_PRESETS["1.5B"], 2048) / 989e12 == pytest.approx(0.307, abs=2e-3)


def test_layer_sharing_counts_blocks_twice():
    args = MODEL_PRESETS["125M"]
    ls = dataclasses.replace(args, layer_sharing=True)
    embed = 6 * args.vocab_size * args.dim
    assert flops_per_token(ls, 2048) - embed == 2 * (flops_per_token(args, 2048) - embed)


def test_format_duration():
    assert format_duration(59) == "0m59s"
    assert format_duration(3 * 86400 + 3600 * 5 + 60 * 7) == "3d05h07m"
