"""Profiling a training run: a torch.profiler trace of a few steps and CUDA memory snapshots.

    mobilellm-train --config train_configs/125M.toml --profiling.enable true --profiling.start_step 20
    mobilellm-train --config train_configs/1B.toml --profiling.memory_snapshot true

Traces go to <dump_folder>/profile/rank<R>.steps<A>-<B>.pt.trace.json: open them in
https://ui.perfetto.dev (or chrome://tracing), or point TensorBoard at <dump_folder>/profile with
the PyTorch profiler plugin. Memory snapshots (CUDA only) go to
<dump_folder>/profile/memory_snapshot.rank<R>.<step-N|oom>.pickle: drag one onto
https://pytorch.org/memory_viz to see every allocation, its size and the Python stack that made
it. A snapshot is written after the last profiled step and, if the run runs out of memory, at that
moment (before the error unwinds and frees the evidence).
"""

from __future__ import annotations

import logging
import os
import pickle

import torch

from mobilellm_train.config import ProfilingConfig
from mobilellm_train.run_files import check_not_link, fresh_temporary, write_atomic

logger = logging.getLogger("mobilellm_train")

# Allocation events kept for a snapshot: enough for several steps of the largest preset, a few
# hundred MB of host memory at most.
MEMORY_HISTORY_ENTRIES = 200_000


class StepProfiler:
    """Starts the torch profiler before step `start_step`, stops it after `start_step + steps - 1`,
    and records CUDA allocation history for snapshots. Every method is a no-op when disabled."""

    def __init__(self, cfg: ProfilingConfig, dump_folder: str, rank: int, device: torch.device):
        self.cfg = cfg
        self.rank = rank
        self.folder = os.path.join(dump_folder, "profile")
        self.on_gpu = device.type == "cuda"
        self.last_step = cfg.start_step + cfg.steps - 1
        self.profiler: torch.profiler.profile | None = None
        self.step_range = None
        self.recording_memory = False
        self.last_seen_step = 0
        if cfg.enable or cfg.memory_snapshot:
            check_not_link(self.folder)  # traces and snapshots are written inside
        if cfg.memory_snapshot and not self.on_gpu:
            logger.warning("profiling.memory_snapshot needs CUDA; no snapshot on %s", device.type)
        if cfg.memory_snapshot and self.on_gpu:
            os.makedirs(self.folder, exist_ok=True)
            # From the start, so the snapshot shows what was allocated before the first step too.
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self.recording_memory = True
            attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
            if attach is not None:
                attach(self._on_out_of_memory)

    def _on_out_of_memory(self, device, alloc, device_alloc, device_free) -> None:
        # Called by the allocator when an allocation fails, with every tensor still alive.
        self.dump_memory_snapshot("oom")

    def dump_memory_snapshot(self, tag: str) -> str | None:
        if not self.recording_memory:
            return None
        path = os.path.join(self.folder, f"memory_snapshot.rank{self.rank}.{tag}.pickle")
        snapshot = torch.cuda.memory._snapshot()
        write_atomic(path, pickle.dumps(snapshot))  # for memory_viz; this project never loads one
        logger.warning("memory snapshot written to %s (open it at https://pytorch.org/memory_viz)", path)
        return path

    def step_begin(self, step: int) -> None:
        if self.cfg.enable and step == self.cfg.start_step and self.profiler is None:
            os.makedirs(self.folder, exist_ok=True)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.on_gpu:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True,
                                                   profile_memory=True, with_stack=False)
            self.profiler.start()
            logger.info("profiling steps %d-%d", step, self.last_step)
        if self.profiler is not None:
            # A named span per step, so the trace shows where each step begins and ends.
            self.step_range = torch.profiler.record_function(f"train step {step}")
            self.step_range.__enter__()

    def step_end(self, step: int) -> None:
        self.last_seen_step = step
        if self.profiler is not None:
            self.step_range.__exit__(None, None, None)
            if step >= self.last_step:
                self._stop_profiler(step)
        if self.recording_memory and step == self.last_step:
            self.dump_memory_snapshot(f"step-{step}")

    def _stop_profiler(self, step: int) -> None:
        self.profiler.stop()
        path = os.path.join(self.folder, f"rank{self.rank}.steps{self.cfg.start_step}-{step}.pt.trace.json")
        with fresh_temporary(path) as f:  # torch writes the file it is given: never a link
            pass
        self.profiler.export_chrome_trace(f.name)
        os.replace(f.name, path)
        self.profiler = None
        logger.info("profiler trace written to %s (open it at https://ui.perfetto.dev)", path)

    def close(self) -> None:
        """A run that ends inside the profiled window still writes its trace."""
        if self.profiler is not None:
            self._stop_profiler(self.last_seen_step)
        if self.recording_memory:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording_memory = False
