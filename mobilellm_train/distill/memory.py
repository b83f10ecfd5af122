"""What distillation adds to the per-GPU memory plan (plan.py, mobilellm-plan), counted from the code
as the planner's other terms are:

- the teacher's parameters, fp32 shards like the student's (online);
- the teacher's forward, before the student's: its gathered root and blocks (the current one, the
  prefetched next one and the all-gather buffer), one block's no-grad intermediates and its top-K
  chunk (`teacher_forward_bytes_per_token`);
- what crosses to the student's loss and lives through the student's forward: [tokens, K] ids
  (int64) and log-probabilities (fp32), or for the full vocabulary the teacher's hidden states and
  its gathered root (output weight);
- the loss's working set, `kd_loss_bytes`: the CE loss's, plus for the full vocabulary one chunk of
  teacher logits in fp32 and the teacher's distribution (checked against the tensors the loss
  creates in tests/test_distill.py).
"""

from __future__ import annotations

import dataclasses
import functools

from mobilellm_train import config as C
from mobilellm_train.model import ModelArgs, count_params

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class DistillPlan:
    """What the planner needs of a [distill] section."""

    teacher: ModelArgs | None
    """The online teacher's shape; None when the values are cached."""
    top_k: int
    """K; 0 for the full vocabulary (online only)."""


def plan_distillation(cfg: C.DistillConfig) -> DistillPlan | None:
    """The [distill] section's plan (reading the teacher's shape or the cache's K), None when off."""
    return _plan(cfg.teacher, cfg.logits, cfg.top_k) if cfg.alpha > 0 else None


@functools.lru_cache(maxsize=16)
def _plan(teacher: str, logits: str, top_k: int) -> DistillPlan:
    # Cached: the planner's suggestions estimate dozens of variants of one config.
    if teacher:
        from mobilellm_train.distill.teacher import read_teacher_shape

        return DistillPlan(read_teacher_shape(teacher), top_k)
    from mobilellm_train.distill.cache import read_cache_manifest

    return DistillPlan(None, top_k or read_cache_manifest(logits).top_k)


def kd_loss_bytes(tokens: int, dim: int, vocab: int, chunk_tokens: int, dtype_bytes: int, top_k: int
                  ) -> tuple[int, int, tuple[str, str]]:
    """As plan.loss_bytes, for kd_loss.chunked_distillation_loss (c tokens per chunk): it keeps the
    same two gradients. Per chunk it holds the student's logits, their fp32 copy (the logits
    themselves in fp32) and the fp32 gradient, and at the end the gradient in compute dtype; the
    full vocabulary adds the teacher's fp32 logits and its softmax (top-K adds [c, K] values only).
    Each chunk's gradient is dropped before the next chunk starts."""
    b, c = dtype_bytes, min(chunk_tokens or tokens, tokens)
    kept = b * tokens * dim + 4 * vocab * dim
    per_logit = b + (4 if b != 4 else 0) + 4
    chunk = c * vocab * (per_logit + (8 if top_k == 0 else (b if b != 4 else 0)))
    weight_grad = 0 if b == 4 else b * c * vocab + (b + 4) * vocab * dim
    backward = b * tokens * dim + 4 * vocab * dim + (0 if b == 4 else b * vocab * dim)
    teacher = "the teacher's fp32 logits and softmax" if top_k == 0 else f"the teacher's top-{top_k} values"
    return kept, max(chunk, weight_grad, backward), (
        "hidden-state gradient (compute dtype) and output-weight gradient (fp32)",
        f"the largest of: one chunk ({c:,} tokens x {vocab:,}: the student's logits, fp32 copy, gradient, "
        f"{teacher}) {chunk / GIB:.2f} GiB; a chunk's weight gradient and its fp32 copy {weight_grad / GIB:.2f} GiB; "
        f"backward's scaled gradients {backward / GIB:.2f} GiB",
    )


def teacher_forward_bytes_per_token(t: ModelArgs, dtype_bytes: int) -> int:
    """The most one eager no-grad block of the teacher holds at once beyond its input, per token: in
    attention the norm's fp32 work (2 values) and output, the fused q/k/v output, v's copy and RoPE's
    temporaries (three of q's size); in the feed-forward the norm output, the gate/up output (2 ffn)
    and SiLU and its product (2 ffn). An upper bound (tests/test_distill.py checks it)."""
    b, q, kv, f, d = dtype_bytes, t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim, t.ffn_dim, t.dim
    attention = 8 * d + b * (d + q + 3 * kv + 3 * q)
    feed_forward = 8 * d + b * (d + 4 * f)
    return b * d + max(attention, feed_forward)


def add_distillation_items(add, plan: DistillPlan, tokens: int, chunk_tokens: int, dtype_bytes: int,
                           shard: int) -> tuple[int, int, int]:
    """Add the teacher's terms to the planner's breakdown (`add(name, bytes, how)`); returns (bytes
    held all along, bytes held through the student's forward and loss, the peak of the teacher's
    own forward beyond the training state)."""
    b, K = dtype_bytes, plan.top_k
    targets_how = f"[{tokens:,} tokens, K={K}] ids (int64) and log-probabilities (fp32)"
    if plan.teacher is None:
        held = add("distillation: cached top-K on the device", tokens * K * 12, targets_how)
        return 0, held, 0
    t = plan.teacher
    params = count_params(t)
    block = count_params(dataclasses.replace(t, n_layers=1)) - count_params(dataclasses.replace(t, n_layers=0))
    root = params - t.n_layers * block
    state = add("teacher parameters (fp32 shard)", 4 * -(-params // shard), f"{params:,} / {shard} ranks x 4 B, "
                "frozen: no gradients, no optimizer state")
    if K:
        held = add("distillation: teacher's top-K", tokens * K * 12, targets_how)
        head = min(chunk_tokens or tokens, tokens) * t.vocab_size * (4 + (b if b != 4 else 0))
    else:
        held = add("distillation: teacher's hidden states and output weight", b * (tokens * t.dim + root),
                   f"{tokens:,} x {t.dim} hidden states and the gathered root ({root:,} parameters), {b} B each")
        head = 0
    gathered = b * (root + 3 * block)
    work = tokens * teacher_forward_bytes_per_token(t, b) + head + held
    teacher = add("teacher forward (before the student's)", gathered + work,
                  f"gathered root + 3 blocks ({gathered / GIB:.2f} GiB), one block's no-grad intermediates"
                  + (", a chunk of its logits for the top-K" if K else "") + " and its output")
    return state, held, teacher
