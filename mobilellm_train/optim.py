"""AdamW with MobileLLM's parameter groups, and the learning-rate schedule as a pure function of the step.

The schedule is a `LambdaLR` over `lr_multiplier(step, ...)`, so its whole state is the step
count, which the checkpoint saves and restores.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from mobilellm_train.config import LRSchedulerConfig, OptimizerConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float) -> torch.optim.AdamW:
    """AdamW at peak `lr`; weight decay on matrices and embeddings, not on norm weights (1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():  # a tied weight is yielded once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    device_type = next(model.parameters()).device.type
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        # The fused kernel updates every parameter in a few launches instead of a few per tensor,
        # and it can skip a non-finite step on the device (found_inf; see step.step_on_device).
        # torch has it for CUDA and CPU.
        fused=cfg.fused and device_type in ("cuda", "cpu"),
    )


def lr_multiplier(step: int, cfg: LRSchedulerConfig, total_steps: int) -> float:
    """Fraction of the peak lr used for optimizer step `step` (0-based).

    Linear warmup to 1 over `warmup_steps`, then:
      cosine: cosine decay to `min_lr_ratio` at the last step;
      linear: linear decay to `min_lr_ratio` at the last step;
      wsd:    stay at 1, then decay linearly to `min_lr_ratio` over the last `decay_ratio` of steps.
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.decay_type == "wsd":
        decay_steps = max(1, round(cfg.decay_ratio * total_steps))
        decay_start = max(warmup, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total_steps - 1 - decay_start)
        return 1.0 - (1.0 - floor) * min(progress, 1.0)
    progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    if cfg.decay_type == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LRSchedulerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_multiplier, cfg=cfg, total_steps=total_steps)
    )
