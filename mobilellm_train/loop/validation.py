"""Validation: the loss over a fixed validation set every `data.val_interval` steps and at the
last step, on every rank; with a weight EMA (training.ema_decay) also the EMA's loss, on the same
set, as `val_loss_ema`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mobilellm_train import config as C

if TYPE_CHECKING:
    import torch

    from mobilellm_train.loop.ema import EMA

logger = logging.getLogger("mobilellm_train")


class Validation:
    """The validation set (built at set-up, so a bad one stops the run before training) and the
    steps it is evaluated at. `maybe_run` is a no-op when data.val_interval is 0."""

    def __init__(self, cfg: C.DataConfig, training: C.TrainingConfig, rank: int, world_size: int,
                 vocab_size: int, tokenizer_path: str, total_steps: int, ema: EMA | None = None):
        self.interval = cfg.val_interval
        self.total_steps = total_steps
        self.ema = ema if ema is not None and ema.enabled else None
        self.batches = None
        if cfg.val_interval:
            from mobilellm_train.data.loader import build_val_batches

            self.batches = build_val_batches(
                cfg.val_path, training.seq_len, training.local_batch_size, rank, world_size, cfg.val_sequences,
                doc_mask=cfg.doc_mask, vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                verify_checksums=cfg.verify_checksums,
            )

    def maybe_run(self, model: torch.nn.Module, step: int) -> dict[str, float] | None:
        """{"val_loss": ..., and "val_loss_ema" with an EMA} if this step is due one (logged), else None."""
        if self.batches is None or not (step % self.interval == 0 or step == self.total_steps):
            return None
        losses = {"val_loss": validation_loss(model, self.batches)}
        if self.ema is not None:
            with self.ema.swapped_in(model):
                losses["val_loss_ema"] = validation_loss(model, self.batches)
        logger.info("step %d  validation loss %.4f%s", step, losses["val_loss"],
                    f"  (weight EMA {losses['val_loss_ema']:.4f})" if self.ema is not None else "")
        return losses


def validation_loss(model: torch.nn.Module, batches: Iterable[dict]) -> float:
    """Mean token loss over the fixed validation set, on all ranks (every rank runs the same
    number of forwards, as FSDP needs; padding rows carry labels -100)."""
    import torch

    with torch.no_grad():
        return _validation_loss(model, batches)


def _validation_loss(model: torch.nn.Module, batches: Iterable[dict]) -> float:
    import torch
    import torch.distributed as dist

    device = next(model.parameters()).device
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, token count
    for batch in batches:
        labels = batch["label"].to(device, non_blocking=True)
        positions = batch.get("position_ids")
        loss = model(batch["input"].to(device, non_blocking=True), labels=labels,
                     position_ids=None if positions is None else positions.to(device, non_blocking=True))
        count = (labels != -100).sum()
        sums[0] += torch.where(count > 0, loss.double() * count, 0.0)  # an all-padding batch's mean is NaN
        sums[1] += count
    model.train()
    dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()
