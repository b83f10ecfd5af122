"""Quantization-aware training in the loop: fake quantization on from qat.start_step.

build.build_model made the linear layers torchao's fake-quantized ones (quantization.apply_qat),
and with qat.embedding_quantize the embedding (apply_embedding_qat), with fake quantization off; `before_step` turns it on for every step from qat.start_step, so
whether a step trains fake-quantized is a function of its number alone: a resumed run, a spike
rewind and a run folder switched to QAT mid-way all do what an uninterrupted run does. The
validation and zero-shot evaluations after a step see the model as that step trained it, so
from the start step on they report the quantized model's loss. Off, a fake-quantized layer
computes exactly what nn.Linear does.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mobilellm_train import config as C

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("mobilellm_train")


class QATSwitch:
    """Fake quantization of `model` on at every step >= qat.start_step; a no-op without qat.enable."""

    def __init__(self, cfg: C.QATConfig, model: torch.nn.Module, resumed_step: int):
        self.enabled = cfg.enable
        self.model = model
        self.start_step = max(cfg.start_step, 1)  # 0 and 1 both mean the run's first step
        self.on = False
        if self.enabled:
            from mobilellm_train.quantization import describe, parse_embedding_scheme

            self.scheme = describe(cfg.scheme, cfg.group_size)
            embedding = parse_embedding_scheme(cfg.embedding_quantize, "qat.embedding_quantize")
            if embedding is not None:
                self.scheme += f"; the embedding table {embedding.describe()}"
            when = "already on" if resumed_step >= self.start_step else f"from step {self.start_step}"
            logger.info("quantization-aware training: every linear layer fake-quantized as %s, %s",
                        self.scheme, when)

    def before_step(self, step: int) -> None:
        if not self.enabled or (step >= self.start_step) == self.on:
            return
        from mobilellm_train.quantization import set_fake_quantization

        self.on = step >= self.start_step
        set_fake_quantization(self.model, self.on)
        if self.on:
            logger.info("step %d: fake quantization on (%s); the loss logged is the quantized model's",
                        step, self.scheme)
