"""The distillation loss: alpha * KD + (1 - alpha) * CE over the student's logits, chunk by chunk,
with the teacher's targets handed in per chunk, so neither model's [tokens, vocab] logits exist.

KD, per token, is the KL divergence from the teacher's distribution q to the student's p, both at
temperature T, times T^2 (Hinton et al. 2015: the soft term's gradient shrinks as 1/T^2, and the
factor keeps alpha's meaning across temperatures; at T = 1 it is the plain KL):

    full vocabulary (top_k 0):  KD = T^2 sum_v q_v (log q_v - log p_v),  q = softmax(t/T), p = softmax(s/T)
    top-K:                      KD = T^2 sum_k q_k (log q_k - log p_id(k)),  q = softmax over the
                                teacher's K largest logits of t/T (renormalised), p over the whole vocabulary

with t and s the teacher's and the student's logits. Top-K with K = vocabulary is the full KL. The
mean is over the tokens whose label is not -100, as the cross-entropy's. Its gradient with respect
to the student's logits is T (p - q) per token (q zero outside the K ids), so each chunk's
gradient is ((1 - alpha) (softmax(s) - onehot(label)) + alpha T (p - q)) / tokens, computed at once
as `losses.chunked_cross_entropy` computes its own: one matmul for the logits, two for the
gradients of the hidden states and of the weight, and backward only scales what forward kept.

How the teacher's targets reach the student's loss, which runs inside MobileLLM.forward because
FSDP2 gathers the (tied) output weight only there:
- top-K (`TopKTargets`): the teacher's own forward computes its K largest logits per token chunk
  by chunk with its own gathered weight (`teacher_topk`), and only [tokens, K] ids and
  log-probabilities (12 bytes x K per token) cross over; the cached values are these same numbers,
  read from disk beside the tokens.
- full vocabulary (`DenseTargets`): the teacher's final hidden states [tokens, teacher dim] cross
  over, and its root module (output weight included) stays gathered through the student's
  forward, so each chunk's teacher logits are made beside the student's, one matmul per chunk.
  Any smaller hand-over (the teacher's softmax, its log-sum-exp) would still need the [tokens,
  vocab] logits on one side or the other.

    targets = teacher_topk(teacher_hidden, teacher_weight, k=16, chunk_size=4096)
    total, ce, kd = chunked_distillation_loss(h, weight, labels, targets, alpha=0.5, temperature=1.0)
"""

from __future__ import annotations

import torch
from torch import Tensor

from mobilellm_train.losses import add_chunk_gradients


class TopKTargets:
    """The teacher's K most likely tokens per position: `ids` [N, K] (int64) and their
    log-probabilities at temperature 1 over the whole vocabulary, `logprobs` [N, K] (fp32),
    largest first. Renormalising over the K at temperature T is softmax(logprobs / T): the
    teacher's log-sum-exp is a constant per token, so these values serve every temperature.

    A plain class, not a dataclass: FSDP2 casts the floating-point tensors of a forward's
    dataclass arguments to the parameter dtype, and the log-probabilities must stay fp32."""

    def __init__(self, ids: Tensor, logprobs: Tensor):
        if ids.shape != logprobs.shape or ids.ndim != 2:
            raise ValueError(f"top-K targets: ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} "
                             "must both be [tokens, K]")
        self.ids, self.logprobs = ids, logprobs

    def __len__(self) -> int:
        return self.ids.shape[0]

    def kd_chunk(self, start: int, stop: int, log_p: Tensor, temperature: float) -> Tensor:
        """The KL per token of rows [start, stop), unscaled; `log_p` (the student's fp32
        log-softmax at temperature T, [rows, vocab], this call's to overwrite) becomes p - q."""
        ids = self.ids[start:stop]
        log_q = torch.log_softmax(self.logprobs[start:stop] / temperature, dim=-1)
        q = log_q.exp()
        kl = (q * (log_q - log_p.gather(1, ids))).sum(-1)
        log_p.exp_().scatter_add_(1, ids, -q)
        return kl


class DenseTargets:
    """The teacher's final hidden states `hidden` [N, teacher dim] and its output weight [vocab,
    teacher dim]: each chunk's teacher logits are computed when the chunk needs them."""

    def __init__(self, hidden: Tensor, weight: Tensor):
        self.hidden, self.weight = hidden, weight

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def kd_chunk(self, start: int, stop: int, log_p: Tensor, temperature: float) -> Tensor:
        """As TopKTargets.kd_chunk, over the whole vocabulary."""
        log_q = (self.hidden[start:stop] @ self.weight.to(self.hidden.dtype).T).float()  # a copy unless fp32
        log_q.div_(temperature)
        log_q.sub_(torch.logsumexp(log_q, dim=-1, keepdim=True))
        q = log_q.exp()
        # Rows are dotted in place: sum(q * (log q - log p)) without one more [rows, vocab] tensor.
        kl = log_q.sub_(log_p).mul_(q).sum(-1)
        log_p.exp_().sub_(q)
        return kl


def _distill_chunk(logits: Tensor, labels: Tensor, targets, start: int, alpha: float, temperature: float,
                   inv_num_valid: Tensor, ignore_index: int, need_grad: bool):
    """(summed CE, summed KD including T^2, d mean-loss / d logits in logits' dtype or None) for
    one chunk. fp32 logits are overwritten: the caller made them for this chunk only."""
    x = logits.float()
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    ce_sum = torch.where(valid, (lse - x.gather(1, safe_labels)).squeeze(1), 0.0).sum()
    grad = None
    if need_grad:  # softmax(s) - onehot(label): the cross-entropy's gradient per token
        grad = (x - lse).exp_()
        grad.scatter_add_(1, safe_labels, torch.full_like(safe_labels, -1.0, dtype=grad.dtype))
    if temperature != 1.0:
        lse = torch.logsumexp(x.div_(temperature), dim=-1, keepdim=True)
    log_p = x.sub_(lse)
    kd_sum = torch.where(valid, targets.kd_chunk(start, start + labels.shape[0], log_p, temperature), 0.0).sum()
    if not need_grad:
        return ce_sum, kd_sum * temperature**2, None
    # d KD / d s = T^2 x (1/T) (p - q): log_p holds p - q now.
    grad.mul_(1.0 - alpha).add_(log_p, alpha=alpha * temperature)
    grad.mul_((valid.to(grad.dtype) * inv_num_valid).unsqueeze(1))
    return ce_sum, kd_sum * temperature**2, grad.to(logits.dtype)


class _ChunkedDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, targets, alpha, temperature, chunk_size, ignore_index):
        # As losses._ChunkedCrossEntropy: the matmuls run in hidden's dtype whatever autocast says.
        with torch.autocast(hidden.device.type, enabled=False):
            need_grad_hidden, need_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            w = weight.to(hidden.dtype)
            inv_num_valid = 1.0 / (labels != ignore_index).sum().to(torch.float32)
            sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)  # CE, KD
            grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
            grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad_weight else None
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size]
                logits = h @ w.T
                ce, kd, dlogits = _distill_chunk(logits, labels[start:start + chunk_size], targets, start, alpha,
                                                 temperature, inv_num_valid, ignore_index,
                                                 need_grad_hidden or need_grad_weight)
                del logits
                sums[0] += ce
                sums[1] += kd
                add_chunk_gradients(dlogits, h, w, start, grad_hidden, grad_weight)
                del dlogits  # before the next chunk's logits, not after them
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        ce, kd = sums[0] * inv_num_valid, sums[1] * inv_num_valid
        ctx.mark_non_differentiable(ce, kd)
        return (1.0 - alpha) * ce + alpha * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_loss).to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_distillation_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    targets: TopKTargets | DenseTargets,
    alpha: float,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha * KD + (1 - alpha) * CE, CE, KD): fp32 scalars, the last two detached, for the
    student's logits `hidden @ weight.T` (hidden [N, D], weight [V, D]) against `labels` [N] and
    the teacher's `targets` for the same N tokens. At most `chunk_size` x V logits of each model
    exist at once."""
    if hidden.ndim != 2 or weight.ndim != 2 or labels.ndim != 1 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_distillation_loss: expected hidden [N, D], weight [V, D], labels [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if len(targets) != hidden.shape[0] or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"chunked_distillation_loss: {hidden.shape[0]} tokens of the student, {labels.shape[0]} "
                         f"labels and {len(targets)} of the teacher")
    if not 0.0 < alpha <= 1.0 or not temperature > 0.0 or chunk_size < 1:
        raise ValueError(f"chunked_distillation_loss: need 0 < alpha <= 1, temperature > 0, chunk_size >= 1; got "
                         f"{alpha}, {temperature}, {chunk_size}")
    return _ChunkedDistillation.apply(hidden, weight, labels.long(), targets, float(alpha), float(temperature),
                                      chunk_size, ignore_index)


@torch.no_grad()
def teacher_topk(hidden: Tensor, weight: Tensor, k: int, chunk_size: int = 4096) -> TopKTargets:
    """The teacher's K largest logits of `hidden @ weight.T` per token, as ids and log-probabilities
    over the whole vocabulary (fp32), chunk by chunk: what online top-K distillation and
    `mobilellm-prepare teacher-logits` both use, so the two give the same values."""
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"top-K: k must be in [1, vocabulary {weight.shape[0]}], got {k}")
    n = hidden.shape[0]
    ids = torch.empty(n, k, dtype=torch.int64, device=hidden.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(hidden.dtype)
        for start in range(0, n, chunk_size or n):
            logits = (hidden[start:start + (chunk_size or n)] @ w.T).float()
            values, top = logits.topk(k, dim=-1)
            logprobs[start:start + top.shape[0]] = values - torch.logsumexp(logits, dim=-1, keepdim=True)
            ids[start:start + top.shape[0]] = top
    return TopKTargets(ids, logprobs)


class Distillation:
    """One micro-batch's distillation, what `MobileLLM.forward(..., distill=)` takes: the
    teacher's targets for its tokens and how the loss weighs them (see the module docstring)."""

    def __init__(self, targets: TopKTargets | DenseTargets, alpha: float, temperature: float):
        self.targets, self.alpha, self.temperature = targets, alpha, temperature

    def loss(self, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int,
             loss_terms: dict | None = None) -> Tensor:
        """The loss of the student's final hidden states [N, D] (its output weight [V, D]); the
        terms "ce" and "kd" go into `loss_terms`. chunk_tokens 0: one chunk of all N tokens."""
        total, ce, kd = chunked_distillation_loss(hidden, weight, labels, self.targets, self.alpha,
                                                  self.temperature, chunk_tokens or hidden.shape[0])
        if loss_terms is not None:
            loss_terms["ce"], loss_terms["kd"] = ce, kd
        return total
