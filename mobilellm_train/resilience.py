"""What keeps a multi-day run alive: clean stops on preemption, communication timeouts, the
NCCL flight recorder, and a loss-spike detector.

A stop request (SIGTERM, SIGUSR1, or a stop file appearing) only sets a flag; every
`job.stop_check_freq` steps the ranks agree on it with one tiny all-reduce, so that every rank
saves the same step and exits together instead of one rank leaving the others in a collective.
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import signal

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from mobilellm_train.config import CommConfig

logger = logging.getLogger("mobilellm_train")


def set_flight_recorder_env(cfg: CommConfig, dump_folder: str) -> None:
    """The flight recorder is configured by environment variables read when NCCL starts, so this
    runs before init_process_group."""
    if cfg.trace_buf_size <= 0:
        return
    trace_dir = os.path.join(os.path.abspath(dump_folder), "comm_traces")
    os.makedirs(trace_dir, exist_ok=True)
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", str(cfg.trace_buf_size))
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", os.path.join(trace_dir, "rank_"))


def set_train_timeout(cfg: CommConfig) -> None:
    """Shorten the collective timeout once start-up (compile, checkpoint load) is behind us, so a
    hung or dead rank ends the job in minutes rather than after the long start-up timeout."""
    distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=cfg.train_timeout_seconds), None)
    logger.info("collective timeout now %ds", cfg.train_timeout_seconds)


class StopRequest:
    """Set by SIGTERM/SIGUSR1 or by `stop_file` appearing; `agreed()` makes it every rank's."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, stop_file: str = ""):
        self.stop_file = stop_file
        self.reason = ""
        # A CPU gloo group: agreeing costs no GPU sync and never queues behind GPU work.
        self.pg = dist.new_group(backend="gloo")
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: saving from inside a signal handler could interrupt a collective.
        self.reason = f"received {signal.Signals(signum).name}"

    def agreed(self) -> bool:
        """True on every rank if any rank was asked to stop. A collective: all ranks call it."""
        if not self.reason and self.stop_file and os.path.exists(self.stop_file):
            self.reason = f"stop file {self.stop_file} exists"
        flag = torch.tensor([1 if self.reason else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.pg)
        if flag.item() and not self.reason:
            self.reason = "another rank was asked to stop"
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class SpikeDetector:
    """Flags a loss above `threshold` x the mean of the last `window` losses (once it has seen
    `window` of them)."""

    def __init__(self, threshold: float, window: int):
        self.threshold = threshold
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def is_spike(self, loss: float) -> tuple[bool, float]:
        """(is it a spike, the mean it was compared with). A spike is not added to the window."""
        if len(self.recent) < self.recent.maxlen:
            self.recent.append(loss)
            return False, float("nan")
        mean = sum(self.recent) / len(self.recent)
        if loss > self.threshold * mean:
            return True, mean
        self.recent.append(loss)
        return False, mean

    def reset(self) -> None:
        self.recent.clear()
