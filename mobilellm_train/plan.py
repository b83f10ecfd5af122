"""Per-GPU memory planner: will this config fit the card, and if not, what would?

    mobilellm-plan --config train_configs/1B.toml --gpus 32 --card a100-80gb
    mobilellm-plan --config train_configs/600M.toml --training.local_batch_size 16 --json
    python -m mobilellm_train.plan --config train_configs/125M.toml --gpus 1 --card h200-141gb

It reads the config exactly as `mobilellm-train` does (`config.load_config`, the same
`--section.key value` overrides) and adds up, per GPU and without a GPU:

- the sharded training state: fp32 parameters, fp32 gradients and AdamW's two fp32 moments (and
  the fp32 weight EMA when training.ema_decay is set), each split over the ranks of one FSDP shard
  group (all ranks, or one replica group under HSDP);
- gathered parameters in the compute dtype: the root (embedding, tied output, final norm), and
  every block when `reshard_after_forward` is off, else the current and the prefetched block,
  plus one block's all-gather buffer;
- activations: what each block saves for backward, per token (`block_saved_bytes_per_token`, a
  count of the tensors the block's graph keeps under each activation-checkpointing mode, eager
  or compiled), times the tokens of one micro-batch and the block passes that keep them;
- the loss (`loss_bytes`): what `losses.chunked_cross_entropy` keeps (the hidden-state and fp32
  weight gradients) and its work at one time (a chunk of logits with its fp32 softmax and
  gradient, the previous chunk's gradient, the weight-gradient copies), or, unchunked, the
  whole-batch fp32 log-softmax and its gradients; counted from the code and checked exactly
  against the tensors it creates in tests/test_plan.py;
- backward: one block's recomputed activations (checkpointed blocks) and its gradient
  temporaries, and the gradient buffers of the reduce-scatter;
- distillation ([distill], distill/memory.py): the teacher's fp32 shard, its forward before the
  student's, what its targets hold through the student's forward, and the KD loss's chunk;
- headroom: allocator fragmentation (a fraction of the peak) and the memory outside the
  allocator (CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers).

Nothing is fitted: every term is arithmetic on the shapes, and the activation and loss counts are
checked on CPU against the tensors torch keeps. The whole has not yet been checked against a peak
measured on a GPU with this trainer (GPU_CHECKED says so in every output; the GPU check in
docs/PERFORMANCE.md compares the two per preset). It prints a breakdown and, when the config does not fit or has room to spare, the lightest activation
checkpointing and largest micro-batch that fit. `--json` prints one object instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing

from mobilellm_train import config as C

if typing.TYPE_CHECKING:
    from mobilellm_train.distill.memory import DistillPlan
    from mobilellm_train.model import ModelArgs

# The model module (and with it torch) is imported where a plan is computed, so that --help and
# argument errors answer at once.

GIB = 2**30

# Total memory of each card as CUDA reports it (torch.cuda.get_device_properties().total_memory),
# rounded down to 0.1 GiB; the marketing figure counts in GB (10^9) and includes reserved memory.
CARDS_GIB = {"a100-80gb": 79.1, "h100-80gb": 79.1, "h200-141gb": 139.8}

# Activation checkpointing, lightest first: what a suggestion tries in turn.
AC_MODES = ("none", "op", "selective", "full")

# Memory the caching allocator does not count: the CUDA context, cuBLAS/cuDNN workspaces, and on
# more than one GPU NCCL's communicator buffers.
RUNTIME_GIB = 1.0
NCCL_GIB = 0.5
# The allocator reserves more than it hands out (blocks split and cached): a fraction of the peak.
FRAGMENTATION = 0.05

# How far the planner has been checked against memory measured on a GPU with this trainer. The two
# H200 peaks known so far (125M x 32: 47.6 GiB, 1B x 8: 53.6 GiB) came from a reference program
# whose loss keeps every chunk's fp32 log-softmax and whose blocks save more than ours, so they
# say nothing about this count; a term once fitted to them was removed.
GPU_CHECKED = "not yet checked against a peak measured on a GPU with this trainer"


def ac_modes_supported() -> tuple[str, ...]:
    """The activation-checkpointing modes this checkout's config accepts, lightest first."""
    hints = typing.get_type_hints(C.ActivationCheckpointConfig)
    accepted = set(typing.get_args(hints["mode"]))
    return tuple(m for m in AC_MODES if m in accepted)


def block_saved_bytes_per_token(args: ModelArgs, mode: str, compiled: bool, dtype_bytes: int = 2) -> int:
    """Bytes one block pass keeps for backward, per token, in compute dtype `dtype_bytes`.

    mode "none": everything backward needs. Counted from what the block's graph saves, and checked
    against torch's saved-tensor hooks in tests/test_plan.py:
      compiled (inductor's min-cut partitioner): the block input, the attention-norm output, q,
        k and v after RoPE, the attention output and the [B, T, dim] copy of it that feeds wo,
        the ffn-norm output, w1 and w3 outputs and their SwiGLU product: 6 dim + 2 kv + 3 ffn
        values, plus two fp32 inverse RMS values and the attention's fp32 log-sum-exp per head;
      eager: each RMSNorm keeps its fp32 input, its normalised value and its output (the fp32
        input, the inverse RMS and two compute-dtype copies); attention keeps q, k, v and its
        output (which feeds wo as a view); the feed-forward keeps w1, w3, SiLU and product
        outputs: 4 ffn values.
    mode "op" (operator-level selective checkpointing): only matmul and attention outputs are kept
      (q, k, v, the attention output, wo, w1, w3 and w2 outputs) and the block input; norms, RoPE
      and SwiGLU's element-wise product are recomputed: 5 dim + 2 kv + 2 ffn values.
    mode "full" (or a checkpointed block under "selective"): only the block input, dim values.
    """
    d, kv, f, h = args.dim, args.n_kv_heads * args.head_dim, args.ffn_dim, args.n_heads
    b = dtype_bytes
    if mode == "full":
        return b * d
    if mode == "op":
        return b * (5 * d + 2 * kv + 2 * f) + 4 * h
    if mode not in ("none", "selective"):
        raise ValueError(f"unknown activation checkpointing mode {mode!r} (one of {', '.join(AC_MODES)})")
    if compiled:
        return b * (6 * d + 2 * kv + 3 * f) + 4 * (2 + h)
    rms_norm = 4 * d + 4 + 2 * b * d
    return 2 * rms_norm + b * (2 * d + 2 * kv + 4 * f) + 4 * h


def loss_bytes(tokens: int, dim: int, vocab: int, chunk_tokens: int, dtype_bytes: int = 2,
               compiled_chunk: bool = False) -> tuple[int, int, tuple[str, str]]:
    """(bytes the loss keeps from its forward until its backward, the most it holds beyond that at
    any one time in forward or backward, how each was counted), for `tokens` tokens of width
    `dim` and the output weight [vocab, dim], both in compute dtype `dtype_bytes`.

    Chunked (`losses.chunked_cross_entropy`, c = min(chunk_tokens, tokens) tokens per chunk): it
    keeps the hidden-state gradient [tokens, dim] and the fp32 weight gradient [vocab, dim]. At
    its peak in forward a chunk's logits, their fp32 copy and the chunk's gradient exist (2 + 4 +
    2 bytes per logit in bf16; in fp32 all three are one tensor) while the previous chunk's
    gradient is still referenced (from the second chunk on). Compiled, the chunk's
    fp32 arithmetic fuses into one kernel, so no fp32 chunk is materialised. Next, the weight
    gradient of a chunk in compute dtype and its fp32 copy (none in fp32, where it accumulates in
    place). Backward scales the two kept gradients into new tensors (the weight's fp32, then in
    compute dtype).
    Unchunked (`F.cross_entropy` on fp32 logits): the fp32 log-softmax is kept, and backward
    holds it with two more fp32 [tokens, vocab] gradients; forward holds less.
    Checked exactly against the tensors torch creates, eager in bf16 and fp32, in
    tests/test_plan.py (not the compiled chunk, whose buffers inductor allocates).
    """
    b = dtype_bytes
    if not chunk_tokens:
        return 4 * tokens * vocab, 8 * tokens * vocab, (
            "fp32 log-softmax of the whole logits", "backward: two fp32 gradients of the whole logits")
    c = min(chunk_tokens, tokens)
    kept = b * tokens * dim + 4 * vocab * dim
    previous = b * c * vocab if tokens > c else 0
    if compiled_chunk:
        chunk = 2 * b * c * vocab + previous
    else:
        chunk = (4 if b == 4 else 2 * b + 4) * c * vocab + previous
    weight_grad = 0 if b == 4 else b * c * vocab + (b + 4) * vocab * dim
    backward = b * tokens * dim + 4 * vocab * dim + (0 if b == 4 else b * vocab * dim)
    work = max(chunk, weight_grad, backward)
    fp32_how = "fused" if compiled_chunk else "fp32 copy"
    return kept, work, (
        "hidden-state gradient (compute dtype) and output-weight gradient (fp32)",
        f"the largest of: one chunk ({c:,} tokens x {vocab:,}: logits, {fp32_how}, gradient, previous "
        f"chunk's gradient) {chunk / GIB:.2f} GiB; a chunk's weight gradient and its fp32 copy "
        f"{weight_grad / GIB:.2f} GiB; backward's scaled gradients {backward / GIB:.2f} GiB",
    )


@dataclasses.dataclass
class MemoryPlan:
    """Per-GPU memory of one config; every figure in bytes, `items` in order of the breakdown."""

    items: list[tuple[str, int, str]]
    """(name, bytes, how it was counted) for every term of the peak."""
    allocated_bytes: int
    """Peak the caching allocator hands out (what torch.cuda.max_memory_allocated reports)."""
    peak_bytes: int
    """allocated_bytes plus fragmentation and the memory outside the allocator."""
    card_bytes: int
    peak_phase: str
    """Where the peak falls: 'loss' (end of forward), 'backward' or, distilling online, 'teacher forward'."""
    settings: dict

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def card_gib(self) -> float:
        return self.card_bytes / GIB

    def fits(self, headroom: float = 0.0) -> bool:
        """Peak within the card, keeping `headroom` (a fraction of the card) free."""
        return self.peak_bytes <= (1.0 - headroom) * self.card_bytes

    def to_json(self, headroom: float = 0.0) -> dict:
        return {
            "peak_gib": round(self.peak_gib, 2),
            "card_gib": round(self.card_gib, 2),
            "fits": self.fits(headroom),
            "headroom_required": headroom,
            "free_fraction": round(1 - self.peak_bytes / self.card_bytes, 3),
            "allocated_gib": round(self.allocated_bytes / GIB, 2),
            "peak_phase": self.peak_phase,
            "settings": self.settings,
            "breakdown_gib": {name: round(b / GIB, 3) for name, b, _ in self.items},
            "checked_against_gpu": GPU_CHECKED,
        }


def estimate(
    model_args: ModelArgs,
    training: C.TrainingConfig,
    parallelism: C.ParallelismConfig,
    ac: C.ActivationCheckpointConfig,
    compile_cfg: C.CompileConfig,
    n_gpus: int,
    card_gib: float,
    ac_mode: str | None = None,
    local_batch_size: int | None = None,
    distill: DistillPlan | None = None,
) -> MemoryPlan:
    """Per-GPU peak memory of training with these settings on `n_gpus` GPUs (CUDA, bf16 or fp32
    compute as `training.mixed_precision_param` says). `ac_mode` / `local_batch_size` override
    the config's, for trying alternatives. `distill` adds a teacher or cached values (distill/memory.py)."""
    mode = ac_mode or ac.mode
    micro_batch = local_batch_size or training.local_batch_size
    if n_gpus < 1 or n_gpus % parallelism.dp_replicate:
        raise ValueError(f"--gpus {n_gpus} must be a positive multiple of parallelism.dp_replicate "
                         f"({parallelism.dp_replicate})")
    shard = n_gpus // parallelism.dp_replicate
    a = model_args
    compute_bytes = 2 if training.mixed_precision_param == "bfloat16" else 4
    reduce_bytes = 4 if training.mixed_precision_reduce == "float32" else 2
    compiled = compile_cfg.enable
    tokens = micro_batch * training.seq_len
    passes = a.n_passes

    from mobilellm_train.model import count_params

    params = count_params(a)
    block_params = (count_params(dataclasses.replace(a, n_layers=1)) - count_params(dataclasses.replace(a, n_layers=0)))
    root_params = params - a.n_layers * block_params
    shard_params = math.ceil(params / shard)

    items: list[tuple[str, int, str]] = []

    def add(name: str, nbytes: float, how: str) -> int:
        items.append((name, int(nbytes), how))
        return int(nbytes)

    state = add("parameters (fp32 shard)", 4 * shard_params, f"{params:,} / {shard} ranks x 4 B")
    state += add("gradients (fp32 shard)", 4 * shard_params, "same shape as the parameter shard")
    state += add("AdamW moments (fp32 shard)", 8 * shard_params, "exp_avg and exp_avg_sq")
    if training.ema_decay:
        state += add("weight EMA (fp32 shard)", 4 * shard_params, "training.ema_decay: the average, sharded like the parameters")
    teacher_state = held = teacher_forward = 0
    if distill is not None:
        from mobilellm_train.distill.memory import add_distillation_items

        teacher_state, held, teacher_forward = add_distillation_items(
            add, distill, tokens, training.loss_chunk_tokens, compute_bytes, shard)

    gathered_blocks = a.n_layers if not parallelism.reshard_after_forward else min(a.n_layers, 2)
    gathered = add(
        "gathered parameters", compute_bytes * (root_params + (gathered_blocks + 1) * block_params),
        f"root + {gathered_blocks} block(s) kept + 1 all-gather buffer, {compute_bytes} B each",
    )

    # Activations: each block's passes either keep their graph's saved set or, when checkpointed,
    # only the block input (for the recompute).
    kept = block_saved_bytes_per_token(a, "none" if mode in ("none", "selective") else mode, compiled, compute_bytes)
    ckpt = block_saved_bytes_per_token(a, "full", compiled, compute_bytes)
    if mode == "selective":
        n_ckpt = len(range(0, a.n_layers, ac.selective_every))
    elif mode == "full":
        n_ckpt = a.n_layers
    else:
        n_ckpt = 0
    n_kept = a.n_layers - n_ckpt
    per_token = n_kept * passes * kept + n_ckpt * ckpt
    activations = add(
        "activations", tokens * per_token,
        f"{tokens:,} tokens x ({n_kept} kept block(s) x {passes} pass(es) x {kept:,} B"
        + (f" + {n_ckpt} checkpointed x {ckpt:,} B" if n_ckpt else "") + ")",
    )
    # The root: embedding output feeds block 0 (counted there); the final norm runs eagerly.
    root_act = add("final norm", tokens * (4 * a.dim + 4 + 2 * compute_bytes * a.dim),
                   "eager RMSNorm: fp32 input, inverse RMS, normalised value and output")

    # The loss runs on GPU with its chunk arithmetic compiled when compile is on (train.build_model).
    if distill is None:
        kept_bytes, work_bytes, (kept_how, work_how) = loss_bytes(
            tokens, a.dim, a.vocab_size, training.loss_chunk_tokens, compute_bytes, compiled_chunk=compiled)
    else:  # the distillation loss computes CE and KD in the same chunks (eager)
        from mobilellm_train.distill.memory import kd_loss_bytes

        kept_bytes, work_bytes, (kept_how, work_how) = kd_loss_bytes(
            tokens, a.dim, a.vocab_size, training.loss_chunk_tokens, compute_bytes, distill.top_k)
    loss_kept = add("loss: kept for backward", kept_bytes, kept_how)
    loss_work = add("loss: working set", work_bytes, work_how)

    # Backward of one block: its recomputed activations when checkpointed, gradient temporaries of
    # about its saved set, and gradient buffers (compute dtype unsharded + reduce dtype copy) for
    # the block being reduced and the one being computed.
    full_block = tokens * passes * block_saved_bytes_per_token(a, "none", compiled, compute_bytes)
    recompute = full_block if n_ckpt else (tokens * passes * kept // 2 if mode == "op" else 0)
    bwd_work = add("backward: recompute + gradient temporaries", recompute + tokens * passes * kept,
                   "one block: recomputed activations (if checkpointed) and the gradients of its tensors")
    grad_buffers = add("backward: gradient buffers", 2 * block_params * (compute_bytes + reduce_bytes),
                       "two blocks' unsharded gradients and their reduce-scatter copies")

    base = state + teacher_state + gathered + activations + root_act + loss_kept
    phases = {"loss": base + held + loss_work, "backward": base + bwd_work + grad_buffers,
              "teacher forward": state + teacher_state + gathered + teacher_forward}
    phase = max(phases, key=phases.get)
    allocated = phases[phase]
    frag = add("allocator fragmentation", FRAGMENTATION * allocated, f"{FRAGMENTATION:.0%} of the allocated peak")
    runtime = add("outside the allocator", (RUNTIME_GIB + (NCCL_GIB if n_gpus > 1 else 0)) * GIB,
                  "CUDA context, library workspaces" + (", NCCL buffers" if n_gpus > 1 else ""))
    settings = {
        "flavor": f"{'LS-' if a.layer_sharing else ''}{a.dim}x{a.n_layers}", "params": params,
        "gpus": n_gpus, "shard_group": shard, "local_batch_size": micro_batch, "seq_len": training.seq_len,
        "ac_mode": mode, "compile": compiled, "reshard_after_forward": parallelism.reshard_after_forward,
        "loss_chunk_tokens": training.loss_chunk_tokens, "compute_dtype": training.mixed_precision_param,
        **({} if distill is None else {"distill_top_k": distill.top_k, "distill_teacher":
                                       None if distill.teacher is None else count_params(distill.teacher)}),
    }
    return MemoryPlan(items, allocated, allocated + frag + runtime, int(card_gib * GIB), phase, settings)


def estimate_config(cfg: C.Config, n_gpus: int, card_gib: float, **overrides) -> MemoryPlan:
    """`estimate` for a loaded Config (reading the distillation teacher's shape, or the cache's K)."""
    from mobilellm_train.distill.memory import plan_distillation

    return estimate(C.build_model_args(cfg.model), cfg.training, cfg.parallelism, cfg.activation_checkpoint,
                    cfg.compile, n_gpus, card_gib, distill=plan_distillation(cfg.distill), **overrides)


def micro_batch_choices(training: C.TrainingConfig, dp_size: int) -> list[int]:
    """Micro-batches that keep the config's global batch (dividing it over the ranks), largest first."""
    global_batch = C.global_batch_size(training, dp_size)
    per_rank = global_batch // dp_size if global_batch % dp_size == 0 else training.local_batch_size
    return [b for b in range(per_rank, 0, -1) if per_rank % b == 0]


def suggest(cfg: C.Config, n_gpus: int, card_gib: float, headroom: float = 0.0) -> list[dict]:
    """For each activation-checkpointing mode (lightest first), the largest micro-batch that keeps
    the global batch and fits with `headroom`; `None` where even one sequence does not fit."""
    rows = []
    choices = micro_batch_choices(cfg.training, n_gpus)
    for mode in ac_modes_supported():
        best = None
        for batch in choices:
            plan = estimate_config(cfg, n_gpus, card_gib, ac_mode=mode, local_batch_size=batch)
            if plan.fits(headroom):
                best = {"ac_mode": mode, "local_batch_size": batch, "peak_gib": round(plan.peak_gib, 2),
                        "grad_accum_steps": C.global_batch_size(cfg.training, n_gpus) // (batch * n_gpus)}
                break
        rows.append(best or {"ac_mode": mode, "local_batch_size": None})
    return rows


def recommendation(rows: list[dict], current_batch: int) -> dict | None:
    """The lightest mode whose largest fitting micro-batch is at least min(8, the config's): a
    smaller micro-batch usually costs more throughput than the next checkpointing mode does."""
    floor = min(8, current_batch)
    for row in rows:
        if row["local_batch_size"] is not None and row["local_batch_size"] >= floor:
            return row
    fitting = [r for r in rows if r["local_batch_size"] is not None]
    return fitting[-1] if fitting else None


def format_plan(plan: MemoryPlan, card: str, headroom: float) -> str:
    s = plan.settings
    lines = [
        f"{s['flavor']} ({s['params']:,} parameters) on {s['gpus']} GPU(s) ({card}, {plan.card_gib:.1f} GiB), "
        f"shard group {s['shard_group']}, micro-batch {s['local_batch_size']} x {s['seq_len']}, "
        f"AC {s['ac_mode']}, compile {'on' if s['compile'] else 'off'}",
        "",
    ]
    width = max(len(name) for name, _, _ in plan.items)
    for name, nbytes, how in plan.items:
        lines.append(f"  {name:<{width}}  {nbytes / GIB:8.2f} GiB   {how}")
    verdict = "fits" if plan.fits(headroom) else "does NOT fit"
    lines += [
        "",
        f"  peak ({plan.peak_phase} phase, with headroom)  {plan.peak_gib:.2f} GiB of {plan.card_gib:.1f} GiB "
        f"({100 * plan.peak_bytes / plan.card_bytes:.0f}%): {verdict}"
        + (f" with {headroom:.0%} kept free" if headroom else ""),
        f"  counted, not fitted; {GPU_CHECKED}",
    ]
    return "\n".join(lines)


def format_suggestions(rows: list[dict], best: dict | None) -> str:
    lines = ["", "  largest micro-batch that fits, keeping the global batch:"]
    for r in rows:
        if r["local_batch_size"] is None:
            lines.append(f"    AC {r['ac_mode']:<10} none fits")
        else:
            lines.append(f"    AC {r['ac_mode']:<10} micro-batch {r['local_batch_size']:>3} "
                         f"(accumulation {r['grad_accum_steps']}), {r['peak_gib']:.1f} GiB")
    if best is not None:
        lines.append(f"  suggested: --activation_checkpoint.mode {best['ac_mode']} "
                     f"--training.local_batch_size {best['local_batch_size']}")
    else:
        lines.append("  nothing fits: use more GPUs, a shorter sequence or a larger card")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="mobilellm-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other --section.key value is a config override, as for mobilellm-train.",
    )
    parser.add_argument("--config", help="training TOML (as mobilellm-train --config)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs training together (the data-parallel size)")
    parser.add_argument("--card", choices=sorted(CARDS_GIB), default="a100-80gb", help="the GPU model")
    parser.add_argument("--card-gib", type=float, default=0.0, help="usable memory per GPU instead of --card's")
    parser.add_argument("--headroom", type=float, default=0.0,
                        help="fraction of the card to keep free for a fit (e.g. 0.1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the breakdown")
    return parser.parse_known_args(argv)


def check_memory(cfg: C.Config, world_size: int, device, device_name: str, total_memory_bytes: int | None) -> MemoryPlan:
    """The trainer's start-up check: log the planned per-GPU peak and, on a GPU whose memory it
    exceeds, raise ConfigError with what would fit (unless profiling.memory_check is off).

    `total_memory_bytes` is the GPU's (torch.cuda.get_device_properties); None on CPU, where the
    estimate is only logged, for an 80 GB card."""
    import logging

    logger = logging.getLogger("mobilellm_train")
    card_gib = total_memory_bytes / GIB if total_memory_bytes else CARDS_GIB["a100-80gb"]
    plan = estimate_config(cfg, world_size, card_gib)
    parts = (sum(b for name, b, _ in plan.items if name.startswith("activations")) / GIB,
             sum(b for name, b, _ in plan.items if "shard" in name) / GIB)
    if total_memory_bytes:
        logger.info("planned peak memory per GPU: %.1f GiB of %.1f GiB on %s (activations %.1f GiB, sharded "
                    "state %.1f GiB; mobilellm-plan shows the breakdown; %s)", plan.peak_gib, card_gib, device_name,
                    *parts, GPU_CHECKED)
    else:
        # No GPU to compare with: the figure is what this config would take on one, not on this host.
        logger.info("running on CPU: memory is not checked (on %d GPU(s) this config would need %.1f GiB per GPU: "
                    "activations %.1f GiB, sharded state %.1f GiB; mobilellm-plan --card CARD says whether it fits; "
                    "%s)", world_size, plan.peak_gib, *parts, GPU_CHECKED)
    if total_memory_bytes and not plan.fits():
        best = recommendation(suggest(cfg, world_size, card_gib), cfg.training.local_batch_size)
        fix = ("nothing fits on this many GPUs: use more GPUs or a shorter sequence" if best is None else
               f"--activation_checkpoint.mode {best['ac_mode']} --training.local_batch_size {best['local_batch_size']} "
               f"fits ({best['peak_gib']:.1f} GiB)")
        message = (f"planned peak memory {plan.peak_gib:.1f} GiB per GPU exceeds the {card_gib:.1f} GiB of {device_name} "
                   f"(micro-batch {cfg.training.local_batch_size} x {cfg.training.seq_len}, activation checkpointing "
                   f"{cfg.activation_checkpoint.mode}, {world_size} GPU(s)); {fix}. "
                   "Set --profiling.memory_check false to start anyway.")
        if cfg.profiling.memory_check:
            raise C.ConfigError(message)
        logger.warning("%s", message)
    return plan


# Where the data lives does not change memory, and the planner runs where the data is not: these
# overrides come last so that a preset's data.path need not exist here.
_IGNORED_FOR_PLANNING = ["--data.path", "", "--data.sources", "", "--data.val_path", "", "--data.val_interval", "0",
                         "--data.tokenizer_path", "", "--data.doc_mask", "false", "--eval.tasks", "",
                         "--checkpoint.initial_load_path", ""]


def load_plan_config(argv: list[str], n_gpus: int) -> C.Config:
    """The trainer's config loading (defaults < TOML < overrides) for `n_gpus` ranks, with data,
    evaluation and checkpoint paths cleared. Document masking is not modelled."""
    return C.load_config(argv + _IGNORED_FOR_PLANNING, world_size=n_gpus)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parse_args(argv)
    if args.gpus < 1:
        print("mobilellm-plan: --gpus must be positive", file=sys.stderr)
        raise SystemExit(2)
    if not 0 <= args.headroom < 1:
        print("mobilellm-plan: --headroom must be in [0, 1)", file=sys.stderr)
        raise SystemExit(2)
    try:
        cfg = load_plan_config((["--config", args.config] if args.config else []) + rest, args.gpus)
        card_gib = args.card_gib or CARDS_GIB[args.card]
        plan = estimate_config(cfg, args.gpus, card_gib)
    except (C.ConfigError, ValueError) as e:
        print(f"mobilellm-plan: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    rows = suggest(cfg, args.gpus, card_gib, args.headroom)
    best = recommendation(rows, cfg.training.local_batch_size)
    if args.json:
        out = plan.to_json(args.headroom)
        out.update(card=args.card if not args.card_gib else "custom", suggestions=rows, suggested=best)
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, args.card if not args.card_gib else "custom", args.headroom))
        print(format_suggestions(rows, best))
    raise SystemExit(0 if plan.fits(args.headroom) else 1)


if __name__ == "__main__":
    main()
