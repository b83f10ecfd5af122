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

from mobilellm_train.errors import parse_json
from mobilellm_train.model import ModelArgs
from mobilellm_train.run_files import check_not_link, open_run_file, write_atomic

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


def append_line(f, line: str) -> None:
    """Append one whole line to an open text file, or nothing: a write cut short (a full disk)
    is cut off again before the error is raised, so readers never meet half a record."""
    f.flush()  # empty already: the files are line-buffered and every record ends a line
    fd, data = f.fileno(), line.encode()
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        os.ftruncate(fd, start)
        raise OSError(e.errno, f"{e.strerror}: appending to {f.name} failed; the record was not written") from None


def _record_step(line: bytes):
    """The step of a JSONL log record, None for a line that is not a whole record of a step."""
    try:
        record = parse_json(line)
    except ValueError:  # a partial line: the write it belonged to never finished
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if type(step) is int and line.endswith(b"\n") else None


def drop_records_after(path: str, step: int) -> int:
    """Remove the records of steps after `step` from a JSONL log (and a line cut off by a crash),
    so that a run resumed from the checkpoint of `step` logs each later step once. The file is
    rewritten beside itself and swapped in, so a crash here leaves the old file whole; neither is
    ever opened through a link (run_files). Returns how many lines were dropped."""
    kept, dropped = [], 0
    try:
        with open_run_file(path, "rb") as f:
            for line in f:
                record_step = _record_step(line)
                if record_step is not None and record_step <= step:
                    kept.append(line)
                else:
                    dropped += 1
    except FileNotFoundError:
        return 0
    if dropped:
        write_atomic(path, b"".join(kept))
    return dropped


# Bounds on what a resumed run takes from metrics.jsonl: a total past a century of training, or a
# step slower than a day, is a damaged or edited record.
MAX_ELAPSED_S = 100 * 365 * 86400.0
MAX_STEP_TIME_S = 86400.0


def _seconds(record: dict, key: str, limit: float) -> float | None:
    value = record.get(key, 0.0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= limit:
        return None  # NaN and infinities fail the comparison too
    return float(value)


def elapsed_at(path: str, step: int) -> float:
    """The run's training seconds up to `step`, from the records of a JSONL log that holds no
    later step (after drop_records_after): the last record's elapsed_s plus, for the steps
    between it and `step`, its step time. 0.0 without a record. A resumed run adds its own
    seconds to this, so elapsed_s is a run total that never goes backwards. A record whose values
    are not finite or out of range (damaged, or edited) is passed over with a warning."""
    last, ignored = None, []
    try:
        with open_run_file(path, "rb") as f:
            for line in f:
                try:
                    record = parse_json(line)
                except ValueError:
                    continue
                if not isinstance(record, dict) or record.get("elapsed_s") is None:
                    continue
                elapsed, step_time = _seconds(record, "elapsed_s", MAX_ELAPSED_S), _seconds(
                    record, "step_time_s", MAX_STEP_TIME_S)
                record_step = record.get("step")
                if elapsed is None or step_time is None or type(record_step) is not int or not 0 <= record_step <= step:
                    ignored.append(record_step if type(record_step) is int else "?")
                    continue
                last = (record_step, elapsed, step_time)
    except FileNotFoundError:
        return 0.0
    if ignored:
        logger.warning("%s: %d record(s) (steps %s) hold an elapsed_s, step_time_s or step that is not finite or out "
                       "of range; the elapsed time ignores them", path, len(ignored), ", ".join(map(str, ignored[:5])))
    if last is None:
        return 0.0
    record_step, elapsed, step_time = last
    return elapsed + (step - record_step) * step_time


class MetricsLogger:
    """Writes one record per logged step; only rank 0 writes anything.

    With `resume_step` (the step a run resumed from) the records of later steps, written by the
    run that was interrupted, are dropped from metrics.jsonl and eval.jsonl and hidden in
    TensorBoard, so that each step appears once, with the values of the run that continues."""

    def __init__(self, dump_folder: str, rank: int, enable_tensorboard: bool, resume_step: int | None = None):
        self.enabled = rank == 0
        self.dump_folder = dump_folder
        self.elapsed_before = 0.0  # training seconds of the earlier starts of this run (rank 0)
        self.jsonl = None
        self.eval_jsonl = None
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(dump_folder, exist_ok=True)
        self.enable_tensorboard = enable_tensorboard
        if resume_step is not None:
            self._drop_after(resume_step)
            self.elapsed_before = elapsed_at(os.path.join(dump_folder, "metrics.jsonl"), resume_step)
        # Append: a resumed run continues the same file.
        self.jsonl = open_run_file(os.path.join(dump_folder, "metrics.jsonl"), "a", buffering=1)
        self._open_tensorboard(resume_step)

    def _open_tensorboard(self, resume_step: int | None) -> None:
        if self.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events of this step and later that an earlier writer left.
            purge_step = None if resume_step is None else resume_step + 1
            check_not_link(os.path.join(self.dump_folder, "tb"))
            self.tb = SummaryWriter(os.path.join(self.dump_folder, "tb"), purge_step=purge_step)

    def _drop_after(self, step: int) -> None:
        for name in ("metrics.jsonl", "eval.jsonl"):
            dropped = drop_records_after(os.path.join(self.dump_folder, name), step)
            if dropped:
                logger.info("%s: dropped %d record(s) past step %d, which this run logs again", name, dropped, step)

    def rewind(self, step: int) -> None:
        """Training went back to the checkpoint of `step` (a loss-spike rewind): forget later records."""
        if not self.enabled:
            return
        self.jsonl.close()
        if self.eval_jsonl is not None:
            self.eval_jsonl.close()
            self.eval_jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        self._drop_after(step)
        self.jsonl = open_run_file(os.path.join(self.dump_folder, "metrics.jsonl"), "a", buffering=1)
        self._open_tensorboard(step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        append_line(self.jsonl, json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        mfu = record.get("mfu")
        logger.info(
            "step %d  loss %.4f%s  lr %.3e  grad_norm %.3f  tok/s/gpu %.0f  mfu %s  mem %.2f GiB  "
            "data_wait %.1f%%  elapsed %s  eta %s",
            step, record["loss"], f" (ce {record['ce']:.4f}, kd {record['kd']:.4f})" if "kd" in record else "",
            record["lr"], record["grad_norm"], record["tokens_per_second"],
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
            self.eval_jsonl = open_run_file(os.path.join(self.dump_folder, "eval.jsonl"), "a", buffering=1)
        append_line(self.eval_jsonl, json.dumps({"step": step, **scalars}) + "\n")
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
