"""Validation: the loss over a fixed validation set every `data.val_interval` steps and at the
last step, on every rank; with a weight EMA (training.ema_decay) also the EMA's loss, on the same
set, as `val_loss_ema`; when distilling, the model's CE and KD terms too (val_ce, val_kd).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mobilellm_train import config as C

if TYPE_CHECKING:
    import torch

    from mobilellm_train.distill.distiller import Distiller
    from mobilellm_train.loop.ema import EMA

logger = logging.getLogger("mobilellm_train")


class Validation:
    """The validation set (built at set-up, so a bad one stops the run before training) and the
    steps it is evaluated at. `maybe_run` is a no-op when data.val_interval is 0."""

    def __init__(self, cfg: C.DataConfig, training: C.TrainingConfig, rank: int, world_size: int,
                 vocab_size: int, tokenizer_path: str, total_steps: int, ema: EMA | None = None,
                 teacher_logits: str = ""):
        self.interval = cfg.val_interval
        self.total_steps = total_steps
        self.ema = ema if ema is not None and ema.enabled else None
        self.batches = None
        if cfg.val_interval:
            from mobilellm_train.data.loader import build_val_batches

            self.batches = build_val_batches(
                cfg.val_path, training.seq_len, training.local_batch_size, rank, world_size, cfg.val_sequences,
                doc_mask=cfg.doc_mask, vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                verify_checksums=cfg.verify_checksums, teacher_logits=teacher_logits,
            )

    def maybe_run(self, model: torch.nn.Module, step: int, distiller: Distiller | None = None) -> dict | None:
        """{"val_loss": ...}, with an EMA "val_loss_ema", when distilling "val_ce" and "val_kd", if
        this step is due a validation (logged), else None."""
        if self.batches is None or not (step % self.interval == 0 or step == self.total_steps):
            return None
        values = validation_losses(model, self.batches, distiller)
        if self.ema is not None:
            with self.ema.swapped_in(model):
                values["val_loss_ema"] = validation_losses(model, self.batches, distiller)["val_loss"]
        logger.info("step %d  validation loss %.4f%s", step, values["val_loss"],
                    "".join(f"  {k[4:]} {v:.4f}" for k, v in values.items() if k != "val_loss"))
        return values


def validation_loss(model: torch.nn.Module, batches: Iterable[dict]) -> float:
    """Mean token loss over the fixed validation set, on all ranks (every rank runs the same
    number of forwards, as FSDP needs; padding rows carry labels -100)."""
    return validation_losses(model, batches)["val_loss"]


def validation_losses(model: torch.nn.Module, batches: Iterable[dict], distiller: Distiller | None = None) -> dict:
    """validation_loss, and with a distiller the mean of each term (val_ce, val_kd) beside it."""
    import torch

    with torch.no_grad():
        return _validation_loss(model, batches, distiller)


def _validation_loss(model: torch.nn.Module, batches: Iterable[dict], distiller: Distiller | None = None) -> dict:
    import torch
    import torch.distributed as dist

    from mobilellm_train.distill.distiller import maybe_teacher_targets
    from mobilellm_train.step import LossTerms

    device = next(model.parameters()).device
    model.eval()
    names = ["loss"] + (["ce", "kd"] if distiller is not None else [])
    sums = torch.zeros(len(names) + 1, device=device, dtype=torch.float64)  # each term's sum, token count
    for batch in batches:
        inputs, labels = (batch[k].to(device, non_blocking=True) for k in ("input", "label"))
        positions = batch.get("position_ids")
        positions = None if positions is None else positions.to(device, non_blocking=True)
        terms = LossTerms()
        with maybe_teacher_targets(distiller, batch, inputs, positions) as distill:
            terms["loss"] = model(inputs, labels=labels, position_ids=positions, loss_terms=terms, distill=distill)
        count = (labels != -100).sum()
        for i, name in enumerate(names):  # an all-padding batch's mean is NaN
            sums[i] += torch.where(count > 0, terms[name].double() * count, 0.0)
        sums[-1] += count
    model.train()
    dist.all_reduce(sums)
    return {f"val_{name}": value for name, value in zip(names, (sums[:-1] / sums[-1]).tolist())}
