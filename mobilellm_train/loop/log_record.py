"""The metrics record a run logs every `metrics.log_freq` steps: the loss over the interval,
throughput, MFU, memory, data wait and checkpoint blocking, and the timers behind them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class LogRecord:
    """What accumulates between two records. The interval loss stays on the device, summed step
    by step, so no step waits for the host; `take` reads it in one all-reduce."""

    def __init__(self, device: torch.device, world_size: int, global_batch_tokens: int, total_steps: int,
                 flops_per_token: float, peak_flops: float | None, elapsed_before: float = 0.0):
        import torch

        self.device = device
        self.world_size = world_size
        self.global_batch_tokens = global_batch_tokens
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        # Timed from this start; elapsed_s adds the earlier starts' seconds (see elapsed_s()).
        self.elapsed_before = elapsed_before
        self.train_begin = self.last_log_time = time.perf_counter()
        self.data_wait_s = self.checkpoint_blocked_s = 0.0
        self.steps_since_log = 0
        self.interval_loss = torch.zeros((), device=device)  # summed over the steps since the last record
        self.interval_terms: dict[str, torch.Tensor] = {}  # the loss's terms, when it has several

    def add_step(self, loss_sum: torch.Tensor, loss_terms: dict[str, torch.Tensor] | None = None) -> None:
        """One step's loss, and its terms by name (logged apart only when there are several)."""
        import torch

        self.steps_since_log += 1
        self.interval_loss += loss_sum  # on the device: no sync until the next record
        for name, value in (loss_terms or {}).items():
            self.interval_terms.setdefault(name, torch.zeros((), device=self.device)).add_(value)

    def restart(self, now: float | None = None) -> None:
        """A new interval from `now` (after a record, or after a rewind threw the interval away)."""
        self.last_log_time = time.perf_counter() if now is None else now
        self.data_wait_s, self.steps_since_log = 0.0, 0
        self.interval_loss.zero_()
        self.interval_terms.clear()

    def exclude(self, seconds: float) -> None:
        """Keep `seconds` (a save, an evaluation) out of the throughput figure."""
        self.last_log_time += seconds

    def elapsed_s(self, now: float) -> float:
        """The run's training seconds: the earlier starts' (recovered from metrics.jsonl at the
        resume, metrics.elapsed_at) plus this process's since its loop began, so the curve never
        goes back at a resume."""
        return self.elapsed_before + now - self.train_begin

    def take(self, step: int, lr: float, grad_norm: torch.Tensor, tokens_seen: int, skipped_steps: int,
             validation: dict | None) -> dict:
        """The record of the interval ending at `step`, and a new interval. A collective.
        `validation`: the validation's values (val_loss, val_loss_ema, val_ce, val_kd), when it
        ran at this step."""
        import torch
        import torch.distributed as dist

        from mobilellm_train.metrics import peak_memory_gib

        # One all-reduce for the loss and its terms.
        names = sorted(self.interval_terms) if len(self.interval_terms) > 1 else []
        sums = torch.stack([self.interval_loss.float(), *(self.interval_terms[n].float() for n in names)])
        dist.all_reduce(sums)
        means = [value / self.world_size / self.steps_since_log for value in sums.tolist()]
        now = time.perf_counter()
        interval = now - self.last_log_time
        tokens_per_second = self.steps_since_log * self.global_batch_tokens / self.world_size / interval
        record = {
            "step": step,
            "loss": means[0],
            **dict(zip(names, means[1:])),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens_per_second": tokens_per_second,
            "mfu": None if self.peak_flops is None else tokens_per_second * self.flops_per_token / self.peak_flops,
            "peak_memory_gib": peak_memory_gib(self.device),
            "data_wait_fraction": self.data_wait_s / interval,
            "step_time_s": interval / self.steps_since_log,
            "tokens_seen": tokens_seen,
            "elapsed_s": self.elapsed_s(now),
            "eta_s": (self.total_steps - step) * interval / self.steps_since_log,
            "checkpoint_blocked_s": self.checkpoint_blocked_s,
            "skipped_steps": skipped_steps,
            **(validation or {}),
        }
        self.restart(now)
        return record
