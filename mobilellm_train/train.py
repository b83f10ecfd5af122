"""Pretrain a MobileLLM: the whole run, top to bottom, in `train()`.

    mobilellm-train --config train_configs/debug.toml               # CPU, demo corpus, a minute
    NGPU=8 launch/run_train.sh --config train_configs/125M.toml --data.path /data/tokens
    python -m mobilellm_train.train --help                          # every config field

Restarting the same command in the same --job.dump_folder resumes from its newest complete
checkpoint, data position included.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from mobilellm_train import config as C
from mobilellm_train.errors import NonFiniteError

if TYPE_CHECKING:
    import torch
    from torch.distributed.checkpoint.stateful import Stateful
    from torch.distributed.device_mesh import DeviceMesh

    from mobilellm_train.checkpoint import Checkpointer
    from mobilellm_train.model import ModelArgs
    from mobilellm_train.resilience import RunFolderLock

# torch and the modules built on it are imported inside the functions that use them, so that
# --help and command-line errors answer at once (importing torch takes seconds).

logger = logging.getLogger("mobilellm_train")


class NonFiniteSteps:
    """The steps whose update was skipped for a non-finite gradient norm, and the
    `training.on_nonfinite` policy applied to them.

    Each step's skip flag stays on the device; `check()` reads all flags since the last check in
    one transfer (on log and checkpoint steps), so no step waits for the host. A skipped update
    changed nothing (see `step_on_device`), so learning of it a few steps late loses nothing.
    """

    def __init__(self, policy: str, max_skipped_steps: int, describe_checkpoint: Callable[[], str]):
        self.policy = policy
        self.describe_checkpoint = describe_checkpoint  # says "intact" only after verifying it
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = 0  # in this process
        self._pending: list[tuple[int, torch.Tensor]] = []

    def record(self, step: int, skipped: torch.Tensor, grad_norm: torch.Tensor, loss: torch.Tensor) -> None:
        import torch

        self._pending.append((step, torch.stack([skipped.float(), grad_norm.float(), loss.float()])))

    def check(self, current_step: int) -> list[int]:
        """The steps skipped since the last check (each logged); raises NonFiniteError when the
        policy says stop."""
        import torch

        if not self._pending:
            return []
        steps = [step for step, _ in self._pending]
        rows = torch.stack([values for _, values in self._pending]).tolist()  # the one sync
        self._pending.clear()
        skipped = []
        for step, (flag, grad_norm, loss) in zip(steps, rows):
            if not flag:
                continue
            skipped.append(step)
            self.skipped_steps += 1
            problem = f"step {step}: non-finite gradient norm ({grad_norm}), local loss {loss}"
            if self.policy == "stop" or self.skipped_steps > self.max_skipped_steps:
                budget = f" ({self.skipped_steps - 1} steps already skipped)" if self.policy == "skip" else ""
                raise NonFiniteError(
                    f"{problem}; its update was skipped{budget}; stopped at step {current_step}, where the flag "
                    "was read. No non-finite gradient reached the weights. " + self.describe_checkpoint()
                )
            logger.warning("%s; update skipped (%d of at most %d)", problem, self.skipped_steps, self.max_skipped_steps)
        return skipped


def init_distributed(comm: C.CommConfig | None = None, dump_folder: str = ".") -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes, or make a group of one for a plain `python` run.

    A one-rank group keeps a single code path: FSDP2 and DCP work the same on 1 or N ranks.
    """
    import torch
    import torch.distributed as dist

    from mobilellm_train.resilience import set_flight_recorder_env

    comm = comm or C.CommConfig()
    set_flight_recorder_env(comm, dump_folder)
    timeout = datetime.timedelta(seconds=comm.init_timeout_seconds)
    # A lone process needs no rendezvous: an in-memory store, and the communication libraries
    # on the loopback interface, so that nothing listens on the network.
    store = None
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        loopback = "lo0" if sys.platform == "darwin" else "lo"
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
        store = dist.HashStore()
    group_args = {} if store is None else {"store": store, "rank": 0, "world_size": 1}
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout, **group_args)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout, **group_args)
    return dist.get_rank(), dist.get_world_size(), device


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def write_effective_config(cfg: C.Config, dump_folder: str) -> str | None:
    """Write <dump_folder>/config.toml, the config of the latest start that got as far as
    training (a refused start writes nothing). A different earlier one is kept as
    config.previous.toml, one file rather than a pile. Returns the earlier text, if any."""
    os.makedirs(dump_folder, exist_ok=True)
    path = os.path.join(dump_folder, "config.toml")
    text = C.to_toml(cfg)
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old == text:
            return old
        os.replace(path, os.path.join(dump_folder, "config.previous.toml"))
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return old


def log_config_change(old_text: str, cfg: C.Config, world_size: int, step: int) -> None:
    """Say what changed since the last start; for a resumed run, a changed budget in steps and
    tokens and what the recomputed lr schedule does at this step."""
    from mobilellm_train.optim import lr_multiplier

    try:
        old = C.parse_effective_config(old_text)
    except Exception as e:  # an unreadable old file must not stop the run
        logger.warning("could not read the previous config.toml (%s)", e)
        return
    changed = [
        f"{section}.{key} {C._toml_value(before)} -> {C._toml_value(after)}"
        for section in C._section_types()
        for (key, before), after in zip(dataclasses.asdict(getattr(old, section)).items(),
                                        dataclasses.asdict(getattr(cfg, section)).values())
        if before != after
    ]
    if changed:
        logger.info("config changed since the last start (the earlier one is config.previous.toml): %s",
                    "; ".join(changed))
    if step == 0:
        return
    budget = {}
    for name, c in (("old", old), ("new", cfg)):
        batch_tokens = C.global_batch_size(c.training, world_size) * c.training.seq_len
        steps = C.total_steps(c.training, world_size)
        lr = C.peak_lr(c.optimizer, batch_tokens) * lr_multiplier(step, cfg=c.lr_scheduler, total_steps=steps)
        budget[name] = (steps, steps * batch_tokens, lr)
    (old_steps, old_tokens, old_lr), (new_steps, new_tokens, new_lr) = budget["old"], budget["new"]
    if (old_steps, old_tokens) != (new_steps, new_tokens):
        logger.warning(
            "training budget changed on resume: %d steps (%.4g tokens) -> %d steps (%.4g tokens); the lr "
            "schedule spans the new budget, so the lr of step %d is %.4g (it would have been %.4g)",
            old_steps, old_tokens, new_steps, new_tokens, step + 1, new_lr, old_lr,
        )
    elif not math.isclose(old_lr, new_lr, rel_tol=1e-9):
        logger.warning("the lr settings changed on resume: the lr of step %d is %.4g (it would have been %.4g)",
                       step + 1, new_lr, old_lr)


def resolve_data(cfg: C.DataConfig, dump_folder: str, rank: int) -> tuple[str, str]:
    """(token folder, tokenizer): data.path (or data.sources), else the demo corpus built once by
    rank 0."""
    import torch.distributed as dist

    from mobilellm_train.data.demo import build_demo_corpus

    if cfg.path or cfg.sources:
        return cfg.path, cfg.tokenizer_path
    out_dir = os.path.join(dump_folder, "demo_data")
    if rank == 0:
        paths = build_demo_corpus(out_dir, vocab_size=cfg.demo_vocab_size)
    dist.barrier()
    if rank != 0:
        paths = build_demo_corpus(out_dir, vocab_size=cfg.demo_vocab_size)  # finished: returns at once
    return paths


def clip_grad_norm_(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm over all shards (and clipping to max_norm when > 0)."""
    import torch
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        # Each rank holds a partial norm of its shards; full_tensor() reduces them.
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), max_norm, norm, foreach=True)
    return norm


def build_model(
    model_args: ModelArgs,
    mesh: DeviceMesh,
    device: torch.device,
    training: C.TrainingConfig,
    parallelism: C.ParallelismConfig,
    ac: C.ActivationCheckpointConfig,
    compile_cfg: C.CompileConfig,
) -> torch.nn.Module:
    """The model wrapped for training and initialised.

    Built on the meta device (no memory), wrapped, and only then materialised, so each rank
    allocates only its shard: a 1.5B model never exists whole on one rank.
    """
    import torch

    from mobilellm_train.model import MobileLLM
    from mobilellm_train.parallelize import parallelize

    with torch.device("meta"):
        model = MobileLLM(model_args)
    on_gpu = device.type == "cuda"
    param_dtype = getattr(torch, training.mixed_precision_param) if on_gpu else torch.float32
    reduce_dtype = getattr(torch, training.mixed_precision_reduce) if on_gpu else torch.float32
    parallelize(model, mesh, parallelism, ac, compile_cfg, param_dtype, reduce_dtype)
    model.to_empty(device=device)
    model.init_weights(seed=training.seed)
    model.loss_chunk_tokens = training.loss_chunk_tokens
    # The per-chunk softmax arithmetic fuses into a few kernels when compiled.
    model.compile_loss = compile_cfg.enable and on_gpu
    model.flex_doc_mask = training.doc_mask_attention == "flex" and on_gpu
    model.train()
    return model


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[dict],
    max_norm: float,
    before_update: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches.

    Returns, all on the device: the loss summed over the micro-batches (each divided by their
    count), the global gradient norm, and a bool scalar that is True when the norm was not finite
    and the update was therefore skipped. `before_update` runs just before the parameters may
    change (a checkpoint copy may still read them).

    A fused AdamW skips the update on the device (its found_inf input), so no step waits for the
    host: weights, moments and step counts stay as they were. Any other optimizer needs the
    decision on the host, one sync per step.
    """
    import torch

    from mobilellm_train.parallelize import set_replica_all_reduce

    device = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        # HSDP: gradients cross the replicas once per step, with the last micro-batch's backward.
        set_replica_all_reduce(model, i == len(batches) - 1)
        inputs = batch["input"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        positions = batch.get("position_ids")  # present when documents are masked apart
        if positions is not None:
            positions = positions.to(device, non_blocking=True)
        # Mean over this micro-batch's tokens; dividing by the micro-batch count makes the summed
        # gradients the mean over the global batch (FSDP averages over ranks).
        loss = model(inputs, labels=labels, position_ids=positions) / len(batches)
        loss.backward()
        loss_sum += loss.detach()

    grad_norm = clip_grad_norm_(model, max_norm)
    # The norm is global (reduced over all shards), so every rank takes the same decision.
    nonfinite = ~torch.isfinite(grad_norm)
    if before_update is not None:
        before_update()
    step_on_device(optimizer, nonfinite)
    return loss_sum, grad_norm, nonfinite


def step_on_device(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step(), unless the bool scalar `skip` is True; then nothing it owns changes.

    Fused Adam/AdamW read `found_inf` on the device (the mechanism GradScaler uses): a non-zero
    value leaves parameters and moments untouched and takes back the step-count increment.
    Other optimizers have no such input, so the flag is read on the host (a sync).
    """
    import torch

    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.to(torch.float32)
        try:
            optimizer.step()
        finally:
            optimizer.found_inf = None
    elif not skip.item():
        optimizer.step()


class GarbageCollection:
    """Python's cyclic garbage collector at fixed steps instead of at random points.

    An automatic collection pauses one rank at an arbitrary moment and every other rank waits for
    it at the next collective. So automatic collection is off from construction until `close()`;
    `collect(step)` runs a cheap generation-1 pass every `gen1_freq` steps (what a training step's
    short-lived cycles reach) and a full pass, which walks every object, every `full_freq` steps.
    """

    def __init__(self, gen1_freq: int, full_freq: int):
        self.gen1_freq = gen1_freq
        self.full_freq = full_freq
        self.was_enabled = gc.isenabled()
        gc.disable()
        gc.collect()  # start-up garbage (model build, compile) goes now, before the timed steps

    def collect(self, step: int) -> None:
        if self.full_freq and step % self.full_freq == 0:
            gc.collect()
        elif step % self.gen1_freq == 0:
            gc.collect(1)

    def close(self) -> None:
        if self.was_enabled:
            gc.enable()


def build_train_data(
    cfg: C.DataConfig,
    data_path: str,
    tokenizer_path: str,
    training: C.TrainingConfig,
    vocab_size: int,
    rank: int,
    world_size: int,
    pin_memory: bool,
) -> tuple[Iterable[dict], Stateful, str]:
    """(batches, their checkpoint state, the tokenizer) for prepared shards or the JSONL layout.

    Prepared shards have one global position, the same on every rank, so a checkpoint continues
    on any number of ranks. The JSONL reader's position is per rank.
    """
    from mobilellm_train.checkpoint import PerRankState
    from mobilellm_train.data.jsonl import DataError, JsonlTokenDataset, build_dataloader, check_token_id_layout
    from mobilellm_train.data.loader import build_token_loader, parse_sources
    from mobilellm_train.data.shards import TOKENIZER_FILE, is_dataset

    global_batch = C.global_batch_size(training, world_size)
    sources = cfg.sources or (data_path if is_dataset(data_path) else "")
    if sources:
        if not tokenizer_path:  # a prepared folder carries its tokenizer
            candidate = os.path.join(parse_sources(sources)[0][0], TOKENIZER_FILE)
            tokenizer_path = candidate if os.path.isfile(candidate) else ""
        loader = build_token_loader(
            sources, seq_len=training.seq_len, local_batch_size=training.local_batch_size,
            global_batch_size=global_batch, dp_rank=rank, dp_world_size=world_size, seed=training.seed,
            num_workers=cfg.num_workers, pin_memory=pin_memory, doc_mask=cfg.doc_mask, vocab_size=vocab_size,
            tokenizer_path=tokenizer_path, verify_checksums=cfg.verify_checksums,
        )
        return loader, loader, tokenizer_path
    if cfg.doc_mask:
        raise DataError(f"data.doc_mask needs prepared data (mobilellm-prepare); {data_path} is in the JSONL layout")
    check_token_id_layout(data_path, tokenizer_path)
    dataset = JsonlTokenDataset(
        data_path,
        seq_len=training.seq_len,
        vocab_size=vocab_size,
        dp_rank=rank,
        dp_world_size=world_size,
        ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        skip_bad_lines=cfg.skip_bad_lines,
    )
    loader = build_dataloader(dataset, training.local_batch_size, cfg.num_workers, pin_memory=pin_memory)
    return loader, PerRankState(rank, loader), tokenizer_path


def validation_loss(model: torch.nn.Module, batches: Iterable[dict]) -> float:
    """Mean token loss over the fixed validation set, on all ranks (every rank runs the same
    number of forwards, as FSDP needs; padding rows carry labels -100)."""
    import torch

    with torch.no_grad():
        return _validation_loss(model, batches)


def _validation_loss(model: torch.nn.Module, batches: Iterable[dict]) -> float:
    import torch
    import torch.distributed as dist

    device = next(model.parameters()).device
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, token count
    for batch in batches:
        labels = batch["label"].to(device, non_blocking=True)
        positions = batch.get("position_ids")
        loss = model(batch["input"].to(device, non_blocking=True), labels=labels,
                     position_ids=None if positions is None else positions.to(device, non_blocking=True))
        count = (labels != -100).sum()
        sums[0] += torch.where(count > 0, loss.double() * count, 0.0)  # an all-padding batch's mean is NaN
        sums[1] += count
    model.train()
    dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


class RunParts:
    """What a run has started that must stop in order however the run ends: loader workers
    first (they feed nothing any more), then the save in flight (its writer thread runs
    collectives, so the process group must still exist), then the process group. Leaving any of
    them to interpreter exit lets C++ threads die in an arbitrary order, which can abort."""

    def __init__(self) -> None:
        self.data_iter = None
        self.checkpointer: Checkpointer | None = None
        self.lock: RunFolderLock | None = None

    def shut_down_after_error(self) -> None:
        import torch.distributed as dist

        close = getattr(self.data_iter, "close", None) or getattr(self.data_iter, "_shutdown_workers", None)
        if close is not None:
            try:
                close()
            except Exception as e:  # the run is failing already; report the first error, not this
                logger.warning("stopping the data loader: %s: %s", type(e).__name__, e)
        # Workers the error's traceback still holds on to (an error raised in a worker keeps its
        # loader iterator alive) would be ended at exit with SIGTERM, which loader workers ignore
        # (see data.jsonl.ignore_stop_signals), and exit would wait for them forever.
        # They are killed instead, after the loader's SIGCHLD handler (which would turn a killed
        # worker into a new error in place of the one being reported) is put back to the default.
        import multiprocessing
        import signal

        if multiprocessing.active_children():
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            child.kill()
            child.join(timeout=5)
        if self.checkpointer is not None:
            try:
                self.checkpointer.close()
            except Exception as e:
                logger.warning("the checkpoint in flight did not complete: %s: %s", type(e).__name__, e)
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.lock is not None:
            self.lock.release()


def train(cfg: C.Config) -> None:
    """The run; on an error, what it started stops in a safe order before the error goes up."""
    parts = RunParts()
    try:
        run_training(cfg, parts)
    except BaseException:
        parts.shut_down_after_error()
        raise
    if parts.lock is not None:
        parts.lock.release()


def run_training(cfg: C.Config, parts: RunParts) -> None:
    import torch
    import torch.distributed as dist

    from mobilellm_train.checkpoint import (
        Checkpointer,
        ModelState,
        OptimizerState,
        PerRankState,
        RNGState,
        SchedulerState,
        TrainState,
        model_args_fingerprint,
    )
    from mobilellm_train.data.loader import build_val_batches
    from mobilellm_train.evaluation.loading import Tokenizer
    from mobilellm_train.evaluation.report import results_to_scalars
    from mobilellm_train.evaluation.scoring import evaluate_tasks
    from mobilellm_train.evaluation.tasks import TaskDataError, check_task_files, parse_task_names
    from mobilellm_train.metrics import MetricsLogger, detect_peak_flops, flops_per_token, peak_memory_gib
    from mobilellm_train.model import count_params
    from mobilellm_train.optim import build_lr_scheduler, build_optimizer
    from mobilellm_train.parallelize import build_mesh
    from mobilellm_train.plan import check_memory
    from mobilellm_train.profiling import StepProfiler
    from mobilellm_train.resilience import (
        RunFolderLock,
        SpikeDetector,
        StopRequest,
        clear_stale_stop_file,
        exit_with_parent,
        set_train_timeout,
    )

    exit_with_parent()  # under torchrun: a rank never trains on after its launcher died
    dump_folder = cfg.job.dump_folder
    if int(os.environ.get("RANK", "0")) == 0:
        # Before the process group: a busy folder stops the run before any rank waits on it.
        parts.lock = RunFolderLock(dump_folder)
        parts.lock.acquire()
    rank, world_size, device = init_distributed(cfg.comm, cfg.job.dump_folder)
    setup_logging(rank)
    tcfg = cfg.training
    if rank == 0:
        clear_stale_stop_file(cfg.job.stop_file)
    logger.info("%s: %d rank(s) on %s, run folder %s", cfg.job.description, world_size, device.type, dump_folder)

    torch.manual_seed(tcfg.seed)
    global_batch = C.global_batch_size(tcfg, world_size)
    accum_steps = C.grad_accum_steps(tcfg, world_size)
    global_batch_tokens = global_batch * tcfg.seq_len
    total_steps = C.total_steps(tcfg, world_size)
    lr = C.peak_lr(cfg.optimizer, global_batch_tokens)
    if not 0.25 <= lr / cfg.optimizer.lr <= 4:
        logger.warning(
            "the linear scaling rule makes the peak lr %.3g, %.3gx optimizer.lr %.3g (global batch %d tokens "
            "against optimizer.reference_batch_tokens %d); if that is not meant, set --optimizer.lr for this "
            "batch with --optimizer.scale_lr_with_batch false",
            lr, lr / cfg.optimizer.lr, cfg.optimizer.lr, global_batch_tokens, cfg.optimizer.reference_batch_tokens,
        )

    on_gpu = device.type == "cuda"
    model_args = C.build_model_args(cfg.model)
    # Before anything is allocated: a config that cannot fit stops here, not with an OOM mid-compile.
    check_memory(cfg, world_size, device, torch.cuda.get_device_name(device) if on_gpu else "cpu",
                 torch.cuda.get_device_properties(device).total_memory if on_gpu else None)
    profiler = StepProfiler(cfg.profiling, dump_folder, rank, device)
    mesh = build_mesh(device.type, world_size, cfg.parallelism.dp_replicate)
    model = build_model(
        model_args, mesh, device, tcfg, cfg.parallelism, cfg.activation_checkpoint, cfg.compile
    )
    n_flops_per_token = flops_per_token(model_args, tcfg.seq_len)
    logger.info(
        "model %s%s: %s parameters, %.2f GFLOPs/token; global batch %d x %d tokens (%d micro-batches of %d "
        "per rank), %d steps = %.3g tokens, peak lr %.3g",
        "LS-" if model_args.layer_sharing else "", cfg.model.flavor, f"{count_params(model_args):,}",
        n_flops_per_token / 1e9, global_batch, tcfg.seq_len, accum_steps, tcfg.local_batch_size,
        total_steps, total_steps * global_batch_tokens, lr,
    )

    optimizer = build_optimizer(model, cfg.optimizer, lr)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, total_steps)

    data_path, tokenizer_path = resolve_data(cfg.data, dump_folder, rank)
    loader, data_state, tokenizer_path = build_train_data(
        cfg.data, data_path, tokenizer_path, tcfg, model_args.vocab_size, rank, world_size, on_gpu
    )
    val_batches = None
    if cfg.data.val_interval:
        val_batches = build_val_batches(
            cfg.data.val_path, tcfg.seq_len, tcfg.local_batch_size, rank, world_size, cfg.data.val_sequences,
            doc_mask=cfg.data.doc_mask, vocab_size=model_args.vocab_size, tokenizer_path=tokenizer_path,
            verify_checksums=cfg.data.verify_checksums,
        )

    # The task files are found now, so a missing one stops the run before training, not hours in.
    eval_tasks = parse_task_names(cfg.eval.tasks)
    check_task_files(eval_tasks, cfg.eval.data_dir)
    if eval_tasks and not tokenizer_path:
        raise TaskDataError("eval.tasks needs the data's tokenizer: set data.tokenizer_path")
    eval_tokenizer = Tokenizer(tokenizer_path) if eval_tasks else None
    saves_since_eval = 0

    train_state = TrainState(dp_world_size=world_size, model_args=model_args_fingerprint(model_args))
    jsonl_position = isinstance(data_state, PerRankState)
    checkpointer = Checkpointer(
        cfg.checkpoint,
        dump_folder,
        {
            "model": ModelState(model),
            "optimizer": OptimizerState(model, optimizer),
            "lr_scheduler": SchedulerState(scheduler),
            "dataloader": data_state,
            "train_state": train_state,
            "rng": PerRankState(rank, RNGState()),
        },
        rank,
        tokenizer_path=tokenizer_path,
        # The JSONL reader's position belongs to one rank and cannot move to another rank count.
        per_rank=frozenset({"rng", "dataloader"} if jsonl_position else {"rng"}),
        required_per_rank=frozenset({"dataloader"} if jsonl_position else set()),
    )
    parts.checkpointer = checkpointer
    checkpointer.maybe_resume(train_state)
    if train_state.step >= total_steps:
        logger.info("step %d already reaches the budget of %d steps; nothing to do", train_state.step, total_steps)
        checkpointer.close()
        dist.destroy_process_group()
        return
    if rank == 0:
        # Only now, past every refusal: config.toml describes the checkpoints beside it.
        previous = write_effective_config(cfg, dump_folder)
        if previous is not None:
            log_config_change(previous, cfg, world_size, train_state.step)

    # Records past the step resumed from belong to the interrupted run; this run logs them again.
    metrics = MetricsLogger(dump_folder, rank, cfg.metrics.enable_tensorboard, resume_step=train_state.step)
    peak_flops = detect_peak_flops(device, cfg.metrics.peak_tflops)
    stop = StopRequest(cfg.job.stop_file)
    spikes = SpikeDetector(tcfg.spike_threshold, tcfg.spike_window)
    data_iter = parts.data_iter = iter(loader)  # after the resume, so it starts at the restored position

    garbage = GarbageCollection(tcfg.gc_freq, tcfg.gc_full_freq)
    train_begin = last_log_time = time.perf_counter()
    data_wait_s = checkpoint_blocked_s = 0.0
    steps_since_log = rewinds = 0
    nonfinite = NonFiniteSteps(tcfg.on_nonfinite, tcfg.max_skipped_steps, checkpointer.describe_newest)
    interval_loss = torch.zeros((), device=device)  # summed over the steps since the last record
    first_step = True
    while train_state.step < total_steps:
        step = train_state.step + 1
        checkpointer.raise_if_failed()  # a background save that failed stops the run here
        profiler.step_begin(step)
        garbage.collect(step)
        wait_begin = time.perf_counter()
        batches = [next(data_iter) for _ in range(accum_steps)]
        data_wait_s += time.perf_counter() - wait_begin
        loss_sum, grad_norm, skipped = train_step(
            model, optimizer, batches, tcfg.max_norm, before_update=checkpointer.wait_for_staging
        )
        nonfinite.record(step, skipped, grad_norm, loss_sum)
        if first_step:
            set_train_timeout(cfg.comm)
            first_step = False
        step_lr = scheduler.get_last_lr()[0]  # the lr this step used, before the schedule moves on
        scheduler.step()
        train_state.step = step
        train_state.tokens_seen += global_batch_tokens
        steps_since_log += 1
        interval_loss += loss_sum  # on the device: no sync until the next record
        profiler.step_end(step)

        # The spike check reads the loss on the host every step anyway, so it reads the flag too.
        if spikes.enabled and step not in nonfinite.check(step):
            global_loss = loss_sum.clone()
            dist.all_reduce(global_loss)
            is_spike, mean = spikes.is_spike(global_loss.item() / world_size)
            if is_spike:
                logger.warning("step %d: loss spike, %.4f against a mean of %.4f over the last %d steps",
                               step, global_loss.item() / world_size, mean, tcfg.spike_window)
                target = checkpointer.newest_complete_step() if tcfg.spike_rewind else None
                if target is not None and rewinds < tcfg.max_rewinds:
                    # Back to the newest checkpoint, then past the data that led to the spike.
                    checkpointer.load(target, train_state)
                    data_iter = parts.data_iter = iter(loader)
                    metrics.rewind(target)
                    for _ in range((step - target) * accum_steps):
                        next(data_iter)
                    rewinds += 1
                    spikes.reset()
                    logger.warning("rewound to step %d and skipped the data of steps %d-%d (rewind %d of %d)",
                                   target, target + 1, step, rewinds, tcfg.max_rewinds)
                    last_log_time, data_wait_s, steps_since_log = time.perf_counter(), 0.0, 0
                    interval_loss.zero_()
                    continue
                if tcfg.spike_rewind:
                    logger.warning("not rewinding: %s", "no checkpoint yet" if target is None else "max_rewinds reached")

        val_loss = None
        if val_batches is not None and (step % cfg.data.val_interval == 0 or step == total_steps):
            val_loss = validation_loss(model, val_batches)
            logger.info("step %d  validation loss %.4f", step, val_loss)

        if step % cfg.metrics.log_freq == 0 or step == total_steps or val_loss is not None:
            nonfinite.check(step)
            dist.all_reduce(interval_loss)
            now = time.perf_counter()
            interval = now - last_log_time
            tokens_per_second = steps_since_log * global_batch_tokens / world_size / interval
            try:
                metrics.log({
                    "step": step,
                    "loss": interval_loss.item() / world_size / steps_since_log,
                    "lr": step_lr,
                    "grad_norm": grad_norm.item(),
                    "tokens_per_second": tokens_per_second,
                    "mfu": None if peak_flops is None else tokens_per_second * n_flops_per_token / peak_flops,
                    "peak_memory_gib": peak_memory_gib(device),
                    "data_wait_fraction": data_wait_s / interval,
                    "step_time_s": interval / steps_since_log,
                    "tokens_seen": train_state.tokens_seen,
                    "elapsed_s": now - train_begin,
                    "eta_s": (total_steps - step) * interval / steps_since_log,
                    "checkpoint_blocked_s": checkpoint_blocked_s,
                    "skipped_steps": nonfinite.skipped_steps,
                    **({} if val_loss is None else {"val_loss": val_loss}),
                })
            except OSError:
                # A full disk fails the save in flight too: report that, the cause, if it did.
                checkpointer.wait()
                raise
            last_log_time, data_wait_s, steps_since_log = now, 0.0, 0
            interval_loss.zero_()

        # Every rank agrees on the same steps (a multiple of stop_check_freq), so all stop together.
        stop_requested = step % cfg.job.stop_check_freq == 0 and stop.agreed()
        stopping = stop_requested or step == tcfg.stop_at_step
        if cfg.checkpoint.enable and (step % cfg.checkpoint.interval == 0 or step == total_steps or stopping):
            # A step the policy would stop at must not slip into a checkpoint first.
            nonfinite.check(step)
            save_begin = time.perf_counter()
            checkpoint_blocked_s = checkpointer.save(step)
            saves_since_eval += 1
            if eval_tasks and (saves_since_eval >= cfg.eval.interval_checkpoints or step == total_steps):
                # On every rank: FSDP gathers weights inside forward. pad_to_multiple 64 keeps the
                # shapes few, so compiled blocks recompile little.
                results = evaluate_tasks(model, eval_tokenizer, eval_tasks, cfg.eval.data_dir, cfg.eval.batch_size,
                                         cfg.eval.limit, pad_to_multiple=64)
                metrics.log_eval(step, results_to_scalars(results))
                saves_since_eval = 0
            # Keep save and evaluation time out of the throughput figure.
            last_log_time += time.perf_counter() - save_begin
        if stopping:
            reason = stop.reason if stop_requested else "training.stop_at_step"
            logger.info("stopping after step %d (%s); rerun the same command to resume", step, reason)
            break

    checkpointer.close()  # the last save must be on disk before the process ends
    profiler.close()
    stop.restore()
    garbage.close()
    logger.info("%s at step %d of %d, %.3g tokens seen", "finished" if train_state.step >= total_steps else "stopped",
                train_state.step, total_steps, train_state.tokens_seen)
    metrics.close()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = C.load_config(argv)
    except C.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    # Under torchrun, an unexpected exception's traceback lands in the failure summary.
    from torch.distributed.elastic.multiprocessing.errors import record

    record(run)(cfg)


def run(cfg: C.Config) -> None:
    """train(cfg), with the errors a user can act on reported in one line and exit status 1."""
    from mobilellm_train.checkpoint import CheckpointError
    from mobilellm_train.data.jsonl import DataError
    from mobilellm_train.evaluation.tasks import TaskDataError
    from mobilellm_train.resilience import RunFolderError

    try:
        train(cfg)
    except (C.ConfigError, DataError, CheckpointError, NonFiniteError, TaskDataError, RunFolderError) as e:
        # Exit non-zero: torchrun then stops the other ranks instead of leaving them waiting.
        if isinstance(e, RunFolderError):  # raised before logging is set up
            print(f"RunFolderError: {e}", file=sys.stderr)
        else:
            logger.error("%s: %s", type(e).__name__, own_message(e))
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        # Ctrl-C before training started (the loop turns it into a clean stop): nothing to save.
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        raise SystemExit(130) from None


def own_message(e: BaseException) -> str:
    """The error's own words. One raised in a DataLoader worker reaches the training process
    re-raised with the worker's whole traceback as its text; only the last part is the message."""
    text = str(e)
    marker = "Original Traceback (most recent call last):"
    if marker in text:
        tail = text.split(marker, 1)[1]
        m = re.search(rf"^(?:[\w.]+\.)?{type(e).__name__}: (.*)", tail, re.MULTILINE | re.DOTALL)
        if m:
            return m.group(1).strip()
    return text


if __name__ == "__main__":
    main()
