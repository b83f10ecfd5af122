"""One optimizer step on this rank's micro-batches: forward and backward per micro-batch, the
global gradient norm (and clipping), and the update, skipped on the device when the norm is not
finite. `train.Trainer` runs it every step; bench.py and checkpoint_bench.py time it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mobilellm_train.distill.distiller import Distiller


class LossTerms(MutableMapping):
    """The loss's terms by name, as model.forward fills them (`loss_terms`). Not a dict on purpose:
    FSDP2 casts a forward's inputs by rebuilding every dict among its arguments, so a dict passed
    to the wrapped model would be filled in a copy and the step would see no terms."""

    def __init__(self):
        self._terms: dict = {}

    def __getitem__(self, name: str):
        return self._terms[name]

    def __setitem__(self, name: str, value) -> None:
        self._terms[name] = value

    def __delitem__(self, name: str) -> None:
        del self._terms[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._terms)

    def __len__(self) -> int:
        return len(self._terms)


def clip_grad_norm_(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm over all shards (and clipping to max_norm when > 0)."""
    import torch
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        # Each rank holds a partial norm of its shards; full_tensor() reduces them.
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), max_norm, norm, foreach=True)
    return norm


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[dict],
    max_norm: float,
    before_update: Callable[[], None] | None = None,
    loss_terms: dict[str, torch.Tensor] | None = None,
    distiller: Distiller | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches.

    Returns, all on the device: the loss summed over the micro-batches (each divided by their
    count), the global gradient norm, and a bool scalar that is True when the norm was not finite
    and the update was therefore skipped. `before_update` runs just before the parameters may
    change (a checkpoint copy may still read them). `loss_terms`, a dict, receives each term of
    the loss (model.forward's names), summed like the loss. `distiller` adds the teacher's targets
    to each micro-batch's forward (distillation).

    A fused AdamW skips the update on the device (its found_inf input), so no step waits for the
    host: weights, moments and step counts stay as they were. Any other optimizer needs the
    decision on the host, one sync per step.
    """
    import torch

    from mobilellm_train.distill.distiller import maybe_teacher_targets
    from mobilellm_train.parallelize import set_replica_all_reduce

    device = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        # Every micro-batch's backward reduce-scatters within its shard group; under HSDP the
        # gradients cross the replicas once per step, with the last micro-batch's backward.
        set_replica_all_reduce(model, i == len(batches) - 1)
        inputs = batch["input"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        positions = batch.get("position_ids")  # present when documents are masked apart
        if positions is not None:
            positions = positions.to(device, non_blocking=True)
        # Mean over this micro-batch's tokens; dividing by the micro-batch count makes the summed
        # gradients the mean over the global batch (FSDP averages over ranks).
        terms = None if loss_terms is None else LossTerms()
        with maybe_teacher_targets(distiller, batch, inputs, positions) as distill:
            loss = model(inputs, labels=labels, position_ids=positions, loss_terms=terms, distill=distill)
        del distill  # the teacher's targets are freed before backward, not kept through it
        loss = loss / len(batches)
        loss.backward()
        loss_sum += loss.detach()
        for name, value in (terms or {}).items():
            loss_terms[name] = loss_terms.get(name, 0.0) + value / len(batches)

    grad_norm = clip_grad_norm_(model, max_norm)
    # The norm is global (reduced over all shards), so every rank takes the same decision.
    nonfinite = ~torch.isfinite(grad_norm)
    if before_update is not None:
        before_update()
    step_on_device(optimizer, nonfinite)
    return loss_sum, grad_norm, nonfinite


def step_on_device(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step(), unless the bool scalar `skip` is True; then nothing it owns changes.

    Fused Adam/AdamW read `found_inf` on the device (the mechanism GradScaler uses): a non-zero
    value leaves parameters and moments untouched and takes back the step-count increment.
    Other optimizers have no such input, so the flag is read on the host (a sync).
    """
    import torch

    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.to(torch.float32)
        try:
            optimizer.step()
        finally:
            optimizer.found_inf = None
    elif not skip.item():
        optimizer.step()
