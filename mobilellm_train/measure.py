"""What the benchmarks measure with: wall time of device work, dynamo's compile counters, and
running a measurement again at half the batch after an out-of-memory. Used by bench.py and
loss_bench.py; torch is imported inside the functions.
"""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch




class StepTimer:
    """Wall time of a region of device work: CUDA events on GPU (no sync inside the region),
    perf_counter on CPU."""

    def __init__(self, device: torch.device):
        import torch

        self.cuda = device.type == "cuda"
        if self.cuda:
            self.begin_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)

    def begin(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.begin_event.record()
        else:
            self.begin_s = time.perf_counter()

    def end(self) -> float:
        """Seconds since begin(), once the device has finished the region's work."""
        import torch

        if self.cuda:
            self.end_event.record()
            torch.cuda.synchronize()
            return self.begin_event.elapsed_time(self.end_event) / 1e3
        return time.perf_counter() - self.begin_s


def compile_counts() -> dict[str, int]:
    """Dynamo's running totals: graphs compiled (a recompile is one more) and graph breaks."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def free_memory(device: torch.device) -> None:
    """Between runs: drop compiled code (its caches pin shapes and memory) and cached blocks."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def with_oom_retry(run: Callable[[int], dict], batch_size: int, retry: bool, device: torch.device) -> dict:
    """run(batch_size), halving the batch after each out-of-memory until it fits or reaches 1.

    The result carries `oom_batch_sizes`, the batches that did not fit; a run that never fits is
    {"status": "oom", ...}. Any other error is reported as {"status": "error", "error": ...}.
    """
    oom_batch_sizes = []
    while True:
        out_of_memory = False
        try:
            result = run(batch_size)
        except Exception as e:  # noqa: BLE001 - reported in the results, not raised
            # Keep no reference to the exception: its traceback holds the failed run's tensors.
            out_of_memory = is_oom(e)
            result = {"status": "error", "local_batch_size": batch_size, "error": f"{type(e).__name__}: {e}"[:2000]}
        # Only here, outside the except block, are the failed run's frames (and tensors) released.
        free_memory(device)
        if not out_of_memory:
            result["oom_batch_sizes"] = oom_batch_sizes
            return result
        oom_batch_sizes.append(batch_size)
        if not retry or batch_size == 1:
            return {"status": "oom", "local_batch_size": batch_size, "oom_batch_sizes": oom_batch_sizes}
        batch_size //= 2
