"""Throughput, MFU, memory and the loggers: stdout (rank 0), TensorBoard and <dump_folder>/metrics.jsonl.

MFU uses one formula everywhere (docs/REFERENCE.md):
    flops per token = 6 x (block matmul params + vocab x hidden) + 12 x layers x hidden x seq_len
with a layer-sharing model's blocks counted twice, over the device's bf16 dense peak.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys

import torch

from mobilellm_train.model import ModelArgs

logger = logging.getLogger("mobilellm_train")

# bf16 dense peak, TFLOP/s, by substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def block_matmul_params(args: ModelArgs) -> int:
    """Weights of one block's matmuls: q, k, v, o projections and the three SwiGLU matrices."""
    kv_dim = args.n_kv_heads * args.head_dim
    attention = 2 * args.dim * args.dim + 2 * args.dim * kv_dim
    return attention + 3 * args.dim * args.ffn_dim


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) of the formula in docs/REFERENCE.md."""
    layers = args.n_layers * args.n_passes  # an LS block is computed twice
    matmul_params = layers * block_matmul_params(args) + args.vocab_size * args.dim
    return 6 * matmul_params + 12 * layers * args.dim * seq_len


def detect_peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s for MFU, or None where no peak is known (CPU, an unlisted GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    logger.warning("unknown GPU %r: MFU is not reported; set --metrics.peak_tflops", name)
    return None


def _proc_status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (Linux), e.g. VmHWM (peak resident) or VmRSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's counter, or on Linux the process's resident
    high-water mark (writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # peak_memory_bytes then reports the process's all-time peak


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


def current_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS") or 0


def peak_memory_gib(device: torch.device) -> float:
    return peak_memory_bytes(device) / 2**30


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class MetricsLogger:
    """Writes one record per logged step; only rank 0 writes anything."""

    def __init__(self, dump_folder: str, rank: int, enable_tensorboard: bool):
        self.enabled = rank == 0
        self.dump_folder = dump_folder
        self.jsonl = None
        self.eval_jsonl = None
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(dump_folder, exist_ok=True)
        # Append: a resumed run continues the same file (steps already logged after the
        # checkpoint it resumed from appear twice, with the resumed values last).
        self.jsonl = open(os.path.join(dump_folder, "metrics.jsonl"), "a", buffering=1)
        if enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(dump_folder, "tb"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        mfu = record.get("mfu")
        logger.info(
            "step %d  loss %.4f  lr %.3e  grad_norm %.3f  tok/s/gpu %.0f  mfu %s  mem %.2f GiB  "
            "data_wait %.1f%%  elapsed %s  eta %s",
            step, record["loss"], record["lr"], record["grad_norm"], record["tokens_per_second"],
            "n/a" if mfu is None else f"{100 * mfu:.1f}%", record["peak_memory_gib"],
            100 * record["data_wait_fraction"], format_duration(record["elapsed_s"]),
            format_duration(record["eta_s"]),
        )

    def log_eval(self, step: int, scalars: dict[str, float]) -> None:
        """Task scores at a step: <dump_folder>/eval.jsonl (apart from metrics.jsonl, whose
        readers key records by step), TensorBoard and one stdout line."""
        if not self.enabled:
            return
        if self.eval_jsonl is None:
            self.eval_jsonl = open(os.path.join(self.dump_folder, "eval.jsonl"), "a", buffering=1)
        self.eval_jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        table = {k.removeprefix("eval/"): v for k, v in scalars.items() if not k.endswith(("_acc", "_acc_norm"))}
        logger.info("step %d  eval  %s", step, "  ".join(f"{k} {v:.1f}" for k, v in table.items()))

    def close(self) -> None:
        if self.eval_jsonl is not None:
            self.eval_jsonl.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
