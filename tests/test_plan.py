"""The memory planner: its activation and loss counts against what torch actually saves and
creates, no fitted term, every preset against an 80 GB card, and the CLI."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import ROOT, subprocess_env
from mobilellm_train import config as C
from mobilellm_train import plan as P
from mobilellm_train.losses import chunked_cross_entropy
from mobilellm_train.model import MODEL_PRESETS, TransformerBlock, count_params, precompute_rope

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


class CreatedBytes(TorchDispatchMode):
    """Bytes of the tensor storages ops create while the mode is on, as they are created and freed,
    and their peak; storages of `existing` tensors (inputs a view may return) are left out."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live, self.live_bytes, self.peak_bytes = {}, 0, 0

    def now(self) -> int:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.live_bytes -= self.live.pop(key)[1]
        return self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.now()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in self.existing:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,chunk", [(512, 128), (500, 128), (256, 0), (100, 128)])
def test_loss_count_is_what_the_loss_creates(dtype, tokens, chunk):
    """What the loss keeps from forward to backward, and its peak beyond that, as the planner counts
    them: the model's chunked loss (several chunks, a short last one, a single chunk) and the
    unchunked fp32 cross-entropy, eager, in bf16 and fp32."""
    dim, vocab = 64, 1000
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=gen).to(dtype).requires_grad_()
    weight = (0.02 * torch.randn(vocab, dim, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    with CreatedBytes([hidden, weight, labels]) as mem:
        if chunk:
            loss = chunked_cross_entropy(hidden, weight, labels, chunk)
        else:
            loss = F.cross_entropy((hidden @ weight.T).float(), labels)
        kept = mem.now() - 4  # the loss itself, an fp32 scalar
        loss.backward()
    kept_planned, work_planned, _ = P.loss_bytes(tokens, dim, vocab, chunk, dtype.itemsize)
    assert 0 <= kept - kept_planned <= 16  # plus 0-dim tensors such as nll_loss's total weight
    # Above the count: only per-chunk vectors (labels' mask, the log-sum-exp, ...), a few KiB.
    assert 0 <= mem.peak_bytes - kept - work_planned < 8 * (chunk or tokens) * 4
    if chunk:  # the case the planner exists for: a chunk, not the whole logits
        assert work_planned < 12 * min(chunk, tokens) * vocab


def test_nothing_is_fitted_and_every_output_says_how_far_it_was_checked():
    assert not [name for name in vars(P) if "UNEXPLAINED" in name or "CALIBRAT" in name.upper()]
    cfg = P.load_plan_config(["--config", os.path.join(ROOT, "train_configs", "125M.toml"),
                              "--training.local_batch_size", "32", "--training.global_batch_size", "0"], 1)
    plan = P.estimate_config(cfg, 1, P.CARDS_GIB["h200-141gb"])
    assert not [name for name, _, how in plan.items if "fitted" in how or "calibration" in name]
    assert "not yet checked against" in P.format_plan(plan, "h200-141gb", 0.0)
    assert "not yet" in plan.to_json()["checked_against_gpu"]
    # Counted on our own model (compiled blocks, chunked loss), 125M x 32 plans near 35 GiB
    # allocated; the 47.6 GiB once measured was another program's.
    assert 33 < plan.allocated_bytes / P.GIB < 37


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


def test_weight_ema_adds_an_fp32_shard():
    cfg = P.load_plan_config(["--config", os.path.join(ROOT, "train_configs", "1B.toml")], 32)
    without = P.estimate_config(cfg, 32, 80.0)
    cfg.training.ema_decay = 0.999
    with_ema = P.estimate_config(cfg, 32, 80.0)
    (_, nbytes, _), = [item for item in with_ema.items if "EMA" in item[0]]
    assert nbytes == 4 * math.ceil(count_params(C.build_model_args(cfg.model)) / 32)
    assert with_ema.allocated_bytes - without.allocated_bytes == nbytes
    assert not [item for item in without.items if "EMA" in item[0]]


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
