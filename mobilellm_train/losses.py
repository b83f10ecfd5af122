"""Chunked linear + cross-entropy: the language-model head's loss without the [tokens, vocab] logits.

The plain path, `F.cross_entropy((hidden @ weight.T).float(), labels)`, holds the logits of the
whole micro-batch several times over: in bf16, as an fp32 copy, its log-softmax and in backward
its gradient. At 32 x 2048 tokens and a 32000 vocabulary that is 8.4 GB per fp32 copy, more than
the 125M model's weights, gradients and optimizer state together. `chunked_cross_entropy` walks
the tokens in chunks and, for each chunk, computes the logits, the loss and at once the gradient
of the loss with respect to the chunk's hidden states and to the weight (the "fused linear
cross-entropy" of Liger-Kernel). Only one chunk's logits exist at a time, in forward and in
backward; backward only scales the two gradients it kept by the incoming gradient. The matmul
count is the plain path's: one for the logits, two for the gradients.

    loss = chunked_cross_entropy(h.flatten(0, 1), model.output.weight, labels.flatten(), 4096)

Under FSDP2 call it inside the root module's forward: the tied output weight is all-gathered only
there. `compile_chunk=True` runs each chunk's softmax/gradient arithmetic as one torch.compile'd
function, which fuses the memory-bound [chunk, vocab] element-wise passes into a few kernels.

`z_loss` adds `z_loss * mean(logsumexp(logits)^2)` (PaLM's auxiliary loss, which keeps the
softmax normaliser near 1 and the logits from drifting) inside the same chunks: its forward value
and gradient cost one more scale of each chunk's softmax, and the full logits still never exist.
`unchunked_cross_entropy` is the same loss on logits the caller already has (loss_chunk_tokens 0).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def _loss_and_dlogits_inplace(logits: Tensor, labels: Tensor, inv_num_valid: Tensor, ignore_index: int,
                              z_loss: float = 0.0):
    """(summed loss over valid rows, summed lse^2 over valid rows or None without z_loss, d mean-loss
    / d logits in logits' dtype) for one chunk; the mean loss includes `z_loss` x mean lse^2.

    Eager version: works in place on a single fp32 buffer, so a chunk costs one fp32 [chunk, vocab]
    tensor plus the bf16 logits and gradient, whatever the backend.
    """
    probs = logits.float()
    lse = torch.logsumexp(probs, dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).unsqueeze(1)
    target_logit = probs.gather(1, safe_labels).squeeze(1)
    loss_sum = torch.where(valid, lse - target_logit, 0.0).sum()
    z_sum = torch.where(valid, lse.square(), 0.0).sum() if z_loss else None
    # d/dlogits of the mean loss: (softmax - onehot(label)) / num_valid on valid rows, 0 elsewhere.
    # With fp32 logits, .float() returned the logits themselves: overwriting them is fine, the
    # caller made them for this chunk only.
    probs.sub_(lse.unsqueeze(1)).exp_()
    if z_loss:  # d(z lse^2)/dlogits = 2 z lse softmax: each row's softmax scaled once more
        probs.mul_((1.0 + 2.0 * z_loss * lse).unsqueeze(1))
    probs.scatter_add_(1, safe_labels, torch.full_like(safe_labels, -1.0, dtype=probs.dtype))
    probs.mul_((valid.to(probs.dtype) * inv_num_valid).unsqueeze(1))
    return loss_sum, z_sum, probs.to(logits.dtype)


def _loss_and_dlogits_fusable(logits: Tensor, labels: Tensor, inv_num_valid: Tensor, ignore_index: int,
                              z_loss: float = 0.0):
    """Same result as `_loss_and_dlogits_inplace`, written out of place (the one-hot as an index
    comparison) so that torch.compile fuses it into a reduction and one element-wise kernel."""
    logits_f = logits.float()
    lse = torch.logsumexp(logits_f, dim=-1, keepdim=True)
    valid = (labels != ignore_index).unsqueeze(1)
    safe_labels = torch.where(valid, labels.unsqueeze(1), 0)
    target_logit = logits_f.gather(1, safe_labels)
    loss_sum = torch.where(valid, lse - target_logit, 0.0).sum()
    z_sum = torch.where(valid, lse.square(), 0.0).sum() if z_loss else None
    is_target = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0) == safe_labels
    softmax = torch.exp(logits_f - lse)
    if z_loss:
        softmax = softmax * (1.0 + 2.0 * z_loss * lse)
    dlogits = softmax - is_target.to(logits_f.dtype)
    dlogits = torch.where(valid, dlogits * inv_num_valid, 0.0)
    return loss_sum, z_sum, dlogits.to(logits.dtype)


@functools.cache
def _loss_and_dlogits_compiled():
    # dynamic=False: every full chunk has the same shape and the last one its own; two static
    # graphs beat one dynamic graph, and "automatic dynamic" would switch after the second shape.
    return torch.compile(_loss_and_dlogits_fusable, dynamic=False)


def add_chunk_gradients(dlogits: torch.Tensor | None, h: torch.Tensor, w: torch.Tensor, start: int,
                        grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None) -> None:
    """The backward of one chunk's logits (h @ w.T), done in forward while the chunk exists: its
    rows of the hidden states' gradient written into `grad_hidden`, its share of the weight's
    gradient added to `grad_weight` (fp32; either None when not needed). Shared by the
    cross-entropy here and the distillation loss (distill/kd_loss.py)."""
    if grad_hidden is not None:
        torch.mm(dlogits, w, out=grad_hidden[start:start + h.shape[0]])
    if grad_weight is not None:
        if grad_weight.dtype == dlogits.dtype:
            grad_weight.addmm_(dlogits.T, h)
        else:
            grad_weight += (dlogits.T @ h).float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, ignore_index, compile_chunk, z_loss):
        # The matmuls run in hidden's dtype whatever the autocast state: the precision is this
        # function's decision, and out= matmuls refuse autocast's mixed dtypes.
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedCrossEntropy._forward(ctx, hidden, weight, labels, chunk_size, ignore_index, compile_chunk,
                                                 z_loss)

    @staticmethod
    def _forward(ctx, hidden, weight, labels, chunk_size, ignore_index, compile_chunk, z_loss):
        need_grad_hidden, need_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)
        # A tensor, not a Python number: reading the count would sync the host with the device.
        inv_num_valid = 1.0 / (labels != ignore_index).sum().to(torch.float32)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_sum = torch.zeros((), dtype=torch.float32, device=hidden.device) if z_loss else None
        grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
        # fp32 accumulation over chunks: the plain path's single matmul also accumulates in fp32.
        grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad_weight else None
        chunk_fn = _loss_and_dlogits_compiled() if compile_chunk else _loss_and_dlogits_inplace
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            # F.linear rather than h @ w.T (the same matmul): a torchao-quantized weight
            # (mobilellm-eval --quantize) then computes its own quantized linear, as the program does.
            logits = F.linear(h, w)
            chunk_loss, chunk_z, dlogits = chunk_fn(logits, labels[start:start + chunk_size], inv_num_valid,
                                                    ignore_index, z_loss)
            del logits
            loss_sum += chunk_loss
            if z_loss:
                z_sum += chunk_z
            add_chunk_gradients(dlogits, h, w, start, grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        if not z_loss:
            return loss_sum * inv_num_valid
        # The loss, and its two terms for the log (no gradient flows through those).
        ce, z_term = loss_sum * inv_num_valid, z_loss * z_sum * inv_num_valid
        ctx.mark_non_differentiable(ce, z_term)
        return ce + z_term, ce, z_term

    @staticmethod
    def backward(ctx, grad_loss, *_terms):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_loss).to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_size: int = 4096,
    ignore_index: int = -100,
    compile_chunk: bool = False,
    z_loss: float = 0.0,
    terms: dict[str, Tensor] | None = None,
) -> Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` against `labels`, equal to
    `F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=ignore_index)`, plus
    `z_loss * mean(logsumexp(logits)^2)` over the same labels when `z_loss` > 0.

    `terms`, a dict, receives the loss's terms detached: "ce", and "z_loss" (the term as added,
    coefficient included) when it is on.

    hidden: [N, D] (the final norm's output, flattened over batch and sequence); weight: [V, D]
    (the output projection, tied to the embedding in MobileLLM); labels: [N] integer class ids,
    `ignore_index` marks positions left out of the mean. Returns an fp32 scalar. At most
    `chunk_size` x V logits exist at once, in fp32 only inside the per-chunk arithmetic.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or labels.ndim != 1:
        raise ValueError(
            f"chunked_cross_entropy: expected hidden [N, D], weight [V, D], labels [N]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"chunked_cross_entropy: shapes do not match: hidden {tuple(hidden.shape)}, weight "
            f"{tuple(weight.shape)}, labels {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"chunked_cross_entropy: labels must be integer ids, got {labels.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be positive, got {chunk_size}")
    out = _ChunkedCrossEntropy.apply(hidden, weight, labels.long(), chunk_size, ignore_index, compile_chunk,
                                     float(z_loss))
    loss, ce, z_term = out if z_loss else (out, None, None)
    if terms is not None:
        terms["ce"] = loss.detach() if ce is None else ce
        if z_term is not None:
            terms["z_loss"] = z_term
    return loss


def unchunked_cross_entropy(logits: Tensor, labels: Tensor, z_loss: float = 0.0, ignore_index: int = -100,
                            terms: dict[str, Tensor] | None = None) -> Tensor:
    """The same loss on whole logits [N, V] (fp32 inside), for loss_chunk_tokens = 0."""
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    if terms is not None:
        terms["ce"] = loss.detach()
    if z_loss:
        valid = labels != ignore_index
        z_term = z_loss * torch.where(valid, torch.logsumexp(logits, dim=-1).square(), 0.0).sum() / valid.sum()
        loss = loss + z_term
        if terms is not None:
            terms["z_loss"] = z_term.detach()
    return loss
