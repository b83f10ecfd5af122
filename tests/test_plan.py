"""The memory planner: its activation count against what torch actually saves, its calibration
against the two H200 measurements, every preset against an 80 GB card, and the CLI."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, subprocess_env
from mobilellm_train import config as C
from mobilellm_train import plan as P
from mobilellm_train.model import MODEL_PRESETS, TransformerBlock, precompute_rope

PRESETS = sorted(glob.glob(os.path.join(ROOT, "train_configs", "*.toml")))
FULL_SIZE = [p for p in PRESETS if not p.endswith(("debug.toml", "own_data.toml"))]  # the debug model's configs


def measured_saved_bytes_per_token(block, dim, dtype, compiled=False, batch=3, seq_len=64):
    """Bytes of the tensors `block`'s forward keeps for backward, per token: every distinct
    storage the saved-tensor hooks see, leaving out parameters and the RoPE tables (which do
    not grow with the batch)."""
    torch.manual_seed(0)
    block = block.to(dtype)
    x = torch.randn(batch, seq_len, dim, dtype=dtype, requires_grad=True)
    cos, sin = precompute_rope(dim // block.attention.n_heads, seq_len, 10000.0)
    fn = torch.compile(block, fullgraph=True, backend="inductor") if compiled else block
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    for _ in range(2 if compiled else 1):  # the second call runs the compiled graph as cached
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(x, cos, sin)
        storages = {}
        for t in saved:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and t.shape[0] in (batch, batch * seq_len):
                storages[ptr] = t.untyped_storage().nbytes()
        y.float().sum().backward()
    return sum(storages.values()) / (batch * seq_len)


@pytest.mark.parametrize("flavor", ["125M", "1B"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eager_block_count_is_what_torch_saves(flavor, dtype):
    args = MODEL_PRESETS[flavor]
    measured = measured_saved_bytes_per_token(TransformerBlock(args), args.dim, dtype)
    assert P.block_saved_bytes_per_token(args, "none", compiled=False, dtype_bytes=dtype.itemsize) == measured


def test_layer_sharing_block_saves_both_passes():
    args = C.build_model_args(C.ModelConfig(flavor="125M", layer_sharing=True))
    measured = measured_saved_bytes_per_token(TransformerBlock(args), args.dim, torch.bfloat16)
    assert 2 * P.block_saved_bytes_per_token(args, "none", compiled=False) == measured


@pytest.mark.slow
def test_compiled_block_count_is_what_inductor_saves():
    args = MODEL_PRESETS["125M"]
    measured = measured_saved_bytes_per_token(TransformerBlock(args), args.dim, torch.bfloat16, compiled=True)
    assert P.block_saved_bytes_per_token(args, "none", compiled=True) == measured


def test_checkpointed_block_keeps_only_its_input():
    args = MODEL_PRESETS["600M"]
    assert P.block_saved_bytes_per_token(args, "full", compiled=True) == 2 * args.dim
    none, op = (P.block_saved_bytes_per_token(args, m, compiled=True) for m in ("none", "op"))
    assert 2 * args.dim < op < none
    with pytest.raises(ValueError, match="unknown activation checkpointing mode 'partial'"):
        P.block_saved_bytes_per_token(args, "partial", compiled=True)


# Peaks measured on one H200 (torch 2.11, seq 2048, bf16 params, fp32 reduce, per-block compile,
# no AC, chunked loss, fused AdamW): the figures docs/PERFORMANCE.md states the planner's error on.
H200_POINTS = [("125M", 32, 47.6), ("1B", 8, 53.6)]


@pytest.mark.parametrize("flavor,batch,measured_gib", H200_POINTS)
def test_planner_matches_the_h200_measurements(flavor, batch, measured_gib):
    cfg = P.load_plan_config(["--config", os.path.join(ROOT, "train_configs", f"{flavor}.toml"),
                              "--training.local_batch_size", str(batch), "--training.global_batch_size", "0",
                              "--activation_checkpoint.mode", "none", "--compile.enable", "true"], 1)
    plan = P.estimate_config(cfg, 1, P.CARDS_GIB["h200-141gb"])
    error = plan.allocated_bytes / P.GIB / measured_gib - 1
    assert abs(error) < 0.03, f"{flavor}: planner {plan.allocated_bytes / P.GIB:.1f} GiB vs {measured_gib} GiB"
    assert plan.peak_bytes > plan.allocated_bytes  # fragmentation and the CUDA context come on top


@pytest.mark.parametrize("path", FULL_SIZE, ids=os.path.basename)
def test_every_preset_fits_80gb_on_32_gpus_at_the_lightest_ac_that_does(path):
    cfg = P.load_plan_config(["--config", path], 32)
    card = P.CARDS_GIB["a100-80gb"]
    plan = P.estimate_config(cfg, 32, card)
    assert plan.fits(headroom=0.10), f"{path}: {plan.peak_gib:.1f} GiB of {card} GiB"
    modes = P.ac_modes_supported()
    for lighter in modes[:modes.index(cfg.activation_checkpoint.mode)]:
        assert not P.estimate_config(cfg, 32, card, ac_mode=lighter).fits(headroom=0.10), (
            f"{path}: AC {lighter} also fits at micro-batch {cfg.training.local_batch_size}")
    # The recipe's global batch (1024 sequences) is kept by accumulation.
    assert C.global_batch_size(cfg.training, 32) == 1024


def test_the_old_600M_preset_did_not_fit_and_the_planner_says_what_does():
    cfg = P.load_plan_config(["--config", os.path.join(ROOT, "train_configs", "600M.toml"),
                              "--training.local_batch_size", "32"], 32)
    card = P.CARDS_GIB["a100-80gb"]
    assert not P.estimate_config(cfg, 32, card).fits()
    rows = P.suggest(cfg, 32, card, headroom=0.1)
    best = P.recommendation(rows, 32)
    assert best["ac_mode"] == "none" and best["local_batch_size"] == 16 and best["grad_accum_steps"] == 2
    full = next(r for r in rows if r["ac_mode"] == "full")
    assert full["local_batch_size"] == 32  # full AC fits the whole micro-batch


def test_sharding_divides_the_training_state():
    cfg = P.load_plan_config(["--config", os.path.join(ROOT, "train_configs", "1B.toml")], 32)
    state = lambda plan: sum(b for name, b, _ in plan.items if "shard" in name)  # noqa: E731
    one, eight = (P.estimate_config(cfg, n, 80.0) for n in (1, 8))
    assert state(one) == pytest.approx(8 * state(eight), rel=1e-6)
    cfg.parallelism.dp_replicate = 4  # HSDP: 32 GPUs, shards of 8
    assert state(P.estimate_config(cfg, 32, 80.0)) == state(eight)
    assert P.estimate_config(cfg, 32, 80.0).settings["shard_group"] == 8


def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "mobilellm_train.plan", *args], capture_output=True, text=True,
                          env=subprocess_env(), cwd=ROOT, timeout=120)


def test_cli_json_breakdown_and_overrides():
    r = run_plan("--config", "train_configs/600M.toml", "--gpus", "32", "--card", "a100-80gb", "--json",
                 "--training.local_batch_size", "32", "--training.global_batch_size", "1024")
    assert r.returncode == 1, r.stderr  # does not fit: exit status 1
    out = json.loads(r.stdout)
    assert out["fits"] is False and out["card_gib"] == P.CARDS_GIB["a100-80gb"] and out["peak_gib"] > out["card_gib"]
    assert out["settings"]["local_batch_size"] == 32 and out["suggested"]["local_batch_size"] == 16
    r = run_plan("--config", "train_configs/600M.toml", "--gpus", "32")
    assert r.returncode == 0, r.stderr
    assert "activations" in r.stdout and "fits" in r.stdout and "suggested:" in r.stdout


def test_cli_bad_arguments_exit_2():
    r = run_plan("--config", "train_configs/125M.toml", "--model.dimm", "3")
    assert r.returncode == 2 and "unknown key 'model.dimm'" in r.stderr
    r = run_plan("--config", "train_configs/125M.toml", "--gpus", "0")
    assert r.returncode == 2 and "--gpus" in r.stderr
    r = run_plan("--config", "train_configs/125M.toml", "--card", "v100")
    assert r.returncode == 2


def test_trainer_check_stops_a_config_too_big_for_the_gpu_and_names_the_fix():
    cfg = P.load_plan_config(["--config", os.path.join(ROOT, "train_configs", "600M.toml"),
                              "--training.local_batch_size", "32", "--training.global_batch_size", "32"], 1)
    with pytest.raises(C.ConfigError, match=r"exceeds the 79\.1 GiB of NVIDIA A100.*"
                                            r"--activation_checkpoint.mode none --training.local_batch_size 16.*"
                                            r"--profiling.memory_check false"):
        P.check_memory(cfg, 1, "cuda", "NVIDIA A100-SXM4-80GB", int(79.1 * P.GIB))
    cfg.profiling.memory_check = False  # the override: logged, not raised
    assert not P.check_memory(cfg, 1, "cuda", "NVIDIA A100-SXM4-80GB", int(79.1 * P.GIB)).fits()
    cfg.profiling.memory_check = True
    assert not P.check_memory(cfg, 1, "cpu", "cpu", None).fits()  # CPU: only logged
    assert P.check_memory(cfg, 1, "cuda", "NVIDIA H200", int(139.8 * P.GIB)).fits()
