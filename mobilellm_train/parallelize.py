"""Wrap a MobileLLM for training: activation checkpointing, then per-block compile, then FSDP2.

The model itself knows nothing of this; `parallelize` applies the three in the one order that
works, and each `apply_*` modifies the model in place.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mobilellm_train.config import ActivationCheckpointConfig, CompileConfig, ParallelismConfig


def build_mesh(device_type: str, world_size: int, dp_replicate: int) -> DeviceMesh:
    """1-D mesh for FSDP, or (replicate, shard) for HSDP: shard within a node, replicate across."""
    if dp_replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(
        device_type, (dp_replicate, world_size // dp_replicate), mesh_dim_names=("dp_replicate", "dp_shard")
    )


def _op_sac_save_list() -> set:
    """The ops whose outputs op-level selective AC keeps: every matmul and every attention
    kernel. Their recompute would cost FLOPs; what is left to recompute (RMSNorm, RoPE, SiLU and
    the SwiGLU product, residual adds) is elementwise, cheap in time but most of the memory."""
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_attention_math",
    ):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    # FlexAttention is a higher-order op, not an aten op; its output is saved the same way.
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op
    except ImportError:  # pragma: no cover - present on every torch this project supports
        pass
    else:
        ops.add(flex_attention_op)
    return ops


def op_sac_context_fn():
    """A fresh pair of selective-checkpoint contexts per checkpointed call: matmul and attention
    outputs are saved (MUST_SAVE), everything else recomputed (PREFER_RECOMPUTE)."""
    save = _op_sac_save_list()

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_ac(model: nn.Module, cfg: ActivationCheckpointConfig) -> None:
    """Recompute a block's activations in backward instead of keeping them.

    full: every block keeps only its input. selective: every `selective_every`-th block does.
    op: every block keeps its matmul and attention outputs and recomputes only the elementwise
    ops between them, so backward repeats no GEMM (see op_sac_context_fn).

    A layer-sharing block runs both of its passes inside one forward, so one checkpoint covers
    both and the recompute repeats both.
    """
    if cfg.mode == "none":
        return
    for i, (name, block) in enumerate(model.layers.named_children()):
        if cfg.mode == "op":
            # Non-reentrant checkpoint (checkpoint_wrapper's default), the only kind that takes a
            # context_fn; it also traces under torch.compile, which then sees the policy.
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=op_sac_context_fn)
            model.layers.register_module(name, wrapped)
        elif cfg.mode == "full" or i % cfg.selective_every == 0:
            model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))


def apply_compile(model: nn.Module, cfg: CompileConfig) -> None:
    """Compile each block on its own: the blocks are identical, so one graph is compiled and
    reused, and FSDP's hooks stay outside the compiled region (compile wraps the block, FSDP
    then wraps the compiled block)."""
    if not cfg.enable:
        return
    if any(hasattr(m, "weight_fake_quantizer") for m in model.modules()) and hasattr(
            torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        # QAT: torchao's fake quantizers keep the scales they computed last as attributes of
        # themselves, a side effect that a checkpointed region refuses to trace, since eager AC
        # would repeat it in the recompute. The scales are recomputed from the same values there
        # (dynamic quantization never reads the kept ones), so the repeat is not needed.
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for name, block in model.layers.named_children():
        model.layers.register_module(name, torch.compile(block, fullgraph=True))


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    cfg: ParallelismConfig,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
) -> None:
    """fully_shard every block, then the root (embedding, final norm and the tied output).

    Each block is its own all-gather/reduce-scatter unit so communication overlaps the
    neighbouring blocks' compute. The last block is not resharded after forward: backward
    starts with it and would gather it again at once.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.children())
    for i, block in enumerate(blocks):
        reshard = cfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    if cfg.explicit_prefetch:
        # Gather the next block while this one computes, in both directions.
        for prev, nxt in zip(blocks, blocks[1:]):
            prev.set_modules_to_forward_prefetch([nxt])
            nxt.set_modules_to_backward_prefetch([prev])


def set_replica_all_reduce(model: nn.Module, enabled: bool) -> None:
    """HSDP: whether the next backward all-reduces gradients across the replicas.

    train_step turns it off for every micro-batch of an accumulation step but the last: each
    backward still reduce-scatters within its replica group (set_requires_gradient_sync stays
    on, so unsharded gradients never pile up), FSDP adds the partial results up on the shard, and
    the last backward all-reduces the sum across replicas once instead of once per micro-batch.
    Without HSDP (one mesh dimension) there is no such all-reduce and this changes nothing; a
    model that is not FSDP-wrapped is left alone."""
    if isinstance(model, FSDPModule):
        model.set_requires_all_reduce(enabled, recurse=True)


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    parallelism: ParallelismConfig,
    ac: ActivationCheckpointConfig,
    compile_cfg: CompileConfig,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
) -> nn.Module:
    # Order matters: checkpoint_wrapper must sit inside the compiled module so compile sees the
    # recompute region, and FSDP must wrap the compiled module so its hooks run eagerly.
    apply_ac(model, ac)
    apply_compile(model, compile_cfg)
    apply_fsdp(model, mesh, parallelism, param_dtype, reduce_dtype)
    return model
