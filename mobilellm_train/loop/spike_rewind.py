"""Spike rewind: a loss above `training.spike_threshold` x the recent mean is logged and, with
`training.spike_rewind`, the run goes back to its newest checkpoint and past the data of the
steps that led to the spike (at most `training.max_rewinds` times).

Imported once training starts (it imports torch).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from mobilellm_train import config as C
from mobilellm_train.resilience import SpikeDetector

if TYPE_CHECKING:
    from mobilellm_train.checkpoint import Checkpointer, TrainState
    from mobilellm_train.loop.batches import StepBatches
    from mobilellm_train.metrics import MetricsLogger

logger = logging.getLogger("mobilellm_train")


class SpikeRewind:
    """Checks each step's global loss for a spike (`after_step`), and rewinds when allowed."""

    def __init__(self, training: C.TrainingConfig, world_size: int, checkpointer: Checkpointer,
                 train_state: TrainState, batches: StepBatches, metrics: MetricsLogger):
        self.detector = SpikeDetector(training.spike_threshold, training.spike_window)
        self.window = training.spike_window
        self.rewind_allowed = training.spike_rewind
        self.max_rewinds = training.max_rewinds
        self.world_size = world_size
        self.checkpointer = checkpointer
        self.train_state = train_state
        self.batches = batches
        self.metrics = metrics
        self.rewinds = 0

    @property
    def enabled(self) -> bool:
        return self.detector.enabled

    def after_step(self, step: int, loss_sum: torch.Tensor) -> bool:
        """True when `step` spiked and the run rewound (the step's results are then void). A
        collective: every rank calls it on every step."""
        global_loss = loss_sum.clone()
        dist.all_reduce(global_loss)
        is_spike, mean = self.detector.is_spike(global_loss.item() / self.world_size)
        if not is_spike:
            return False
        logger.warning("step %d: loss spike, %.4f against a mean of %.4f over the last %d steps",
                       step, global_loss.item() / self.world_size, mean, self.window)
        target = self.checkpointer.newest_complete_step() if self.rewind_allowed else None
        if target is not None and self.rewinds < self.max_rewinds:
            self.rewind(target, step)
            return True
        if self.rewind_allowed:
            logger.warning("not rewinding: %s", "no checkpoint yet" if target is None else "max_rewinds reached")
        return False

    def rewind(self, target: int, step: int) -> None:
        # Back to the newest checkpoint, then past the data that led to the spike.
        self.checkpointer.load(target, self.train_state)
        self.batches.restart(skip_steps=step - target)
        self.metrics.rewind(target)
        self.rewinds += 1
        self.detector.reset()
        logger.warning("rewound to step %d and skipped the data of steps %d-%d (rewind %d of %d)",
                       target, target + 1, step, self.rewinds, self.max_rewinds)
