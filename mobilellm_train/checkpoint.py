"""Distributed checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is the folder <dump_folder>/<checkpoint.folder>/step-<N>/ holding everything a run
needs to continue exactly: model, optimizer, lr schedule, data loader, train state and RNG.
Model and optimizer are saved sharded and reshard on load; the data loader and RNG are per rank.
A checkpoint is complete once DCP has written its `.metadata` file, which happens after every
rank's shards are on disk; folders without it are never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.stateful import Stateful

from mobilellm_train.config import CheckpointConfig
from mobilellm_train.data.shards import TOKENIZER_FILE  # a step folder names its tokenizer as a dataset does
from mobilellm_train.hf import HFCheckpointError, is_hf_folder, load_hf_into_model, unfuse_projections
from mobilellm_train.model import MobileLLM, ModelArgs

logger = logging.getLogger("mobilellm_train")

_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


@dataclass
class TrainState(Stateful):
    """Where training stands, plus what a checkpoint must match to be resumed."""

    step: int = 0
    tokens_seen: int = 0
    dp_world_size: int = 1
    model_args: str = ""
    """The model's fields as JSON (one value, so DCP stores it as one item)."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        for key, value in state_dict.items():
            setattr(self, key, value)


class ModelState(Stateful):
    """Full-FQN model state; FSDP shards it and DCP reshards it to any number of ranks."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class SchedulerState(Stateful):
    """The schedule is a pure function of the step, so its state is the step it is at."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return {"last_epoch": self.scheduler.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.scheduler.last_epoch = state_dict["last_epoch"]
        # Recompute the optimizer's lr for that step, as `scheduler.step()` would have.
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_lr()):
            group["lr"] = lr
        self.scheduler._last_lr = [g["lr"] for g in self.scheduler.optimizer.param_groups]


class PerRankState(Stateful):
    """Per-rank state (data position, RNG) stored as one pickled value under a rank-specific key.

    The rank key stops DCP from de-duplicating the ranks' copies into one; pickling keeps DCP
    from flattening nested lists (a token buffer) into thousands of items whose count must
    match on load.
    """

    def __init__(self, rank: int, obj: Stateful):
        self.key, self.obj = f"rank_{rank}", obj

    def state_dict(self) -> dict:
        return {self.key: pickle.dumps(self.obj.state_dict())}

    def load_state_dict(self, state_dict: dict) -> None:
        self.obj.load_state_dict(pickle.loads(state_dict[self.key]))


class RNGState(Stateful):
    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        random.setstate(state_dict["python"])
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def list_checkpoints(folder: str) -> tuple[list[int], list[int]]:
    """(complete steps, incomplete steps) found in `folder`, each sorted ascending."""
    complete, incomplete = [], []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = _STEP_DIR.match(name)
            if m:
                step = int(m.group(1))
                (complete if is_complete(os.path.join(folder, name)) else incomplete).append(step)
    return sorted(complete), sorted(incomplete)


class Checkpointer:
    """Saves and restores the run's `Stateful` objects; rank 0 does the folder bookkeeping.

    `per_rank` names the states that belong to one rank (RNG; the JSONL reader's position).
    `required_per_rank` are those that cannot be carried to another number of ranks: resuming
    such a checkpoint on a different rank count is refused. The others are left fresh there,
    with a warning.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        dump_folder: str,
        states: dict[str, Stateful],
        rank: int,
        tokenizer_path: str = "",
        per_rank: frozenset[str] = frozenset(),
        required_per_rank: frozenset[str] = frozenset(),
    ):
        self.cfg = cfg
        self.folder = os.path.join(dump_folder, cfg.folder)
        self.states = states
        self.rank = rank
        self.tokenizer_path = tokenizer_path
        self.per_rank, self.required_per_rank = per_rank, required_per_rank
        self.async_mode = cfg.async_mode
        if self.async_mode == "async_with_pinned_mem" and not torch.cuda.is_available():
            logger.warning("checkpoint.async_mode=async_with_pinned_mem needs CUDA; using async")
            self.async_mode = "async"
        self.pg = None
        self.stager = None
        if cfg.enable and self.async_mode != "disabled":
            # The background writer runs collectives of its own; a separate gloo group keeps them
            # from interleaving with the training collectives of the main thread.
            self.pg = dist.new_group(backend="gloo")
        if self.async_mode == "async_with_pinned_mem":
            self.stager = DefaultStager(StagingOptions(
                use_pinned_memory=True, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=True
            ))
        self.pending: Future | None = None  # the write of the save in flight
        self.staging: Future | None = None  # its copy to host memory (pinned mode)
        self.pending_step = 0

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step}")

    def maybe_resume(self, train_state: TrainState) -> bool:
        """Restore the chosen checkpoint of this run folder, or the initial model weights.

        Returns True when training resumes from a checkpoint of this run.
        """
        if not self.cfg.enable or self.cfg.load_step == 0:
            return False
        complete, incomplete = list_checkpoints(self.folder)
        for step in incomplete:
            logger.warning("ignoring incomplete checkpoint %s (no .metadata: its save did not finish)", self.path(step))
        if self.cfg.load_step > 0:
            if self.cfg.load_step not in complete:
                raise CheckpointError(
                    f"checkpoint.load_step={self.cfg.load_step}: no complete checkpoint {self.path(self.cfg.load_step)} "
                    f"(complete ones: {complete or 'none'})"
                )
            newer = [s for s in complete if s > self.cfg.load_step]
            if newer:
                raise CheckpointError(
                    f"checkpoint.load_step={self.cfg.load_step}, but {self.folder} holds newer checkpoints {newer} "
                    "that continuing would overwrite; move them away or train into a new --job.dump_folder"
                )
            step = self.cfg.load_step
        elif complete:
            step = complete[-1]
        else:
            if self.cfg.initial_load_path:
                self.load_model_only(self.cfg.initial_load_path)
            return False
        self.load(step, train_state)
        return True

    def newest_complete_step(self) -> int | None:
        complete, _ = list_checkpoints(self.folder)
        return complete[-1] if complete else None

    def load(self, step: int, train_state: TrainState) -> None:
        self.wait()
        path = self.path(step)
        begin = time.perf_counter()
        expected_args, expected_world = train_state.model_args, train_state.dp_world_size
        # Read the train state alone first, so a mismatch is reported in words, not as a
        # shape error from deep inside DCP.
        saved = TrainState()
        _checked_load({"train_state": saved}, path)
        ours, theirs = json.loads(expected_args), json.loads(saved.model_args or "{}")
        # max_seq_len only sizes the RoPE tables, so a checkpoint may continue at another length.
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if k != "max_seq_len" and theirs.get(k) != v}
        if diff:
            raise CheckpointError(
                f"{path} was written for another model: (checkpoint, this run) differ in {diff}"
            )
        states = self.states
        if saved.dp_world_size != expected_world:
            if self.required_per_rank:
                raise CheckpointError(
                    f"{path} was written by {saved.dp_world_size} data-parallel ranks and this run has "
                    f"{expected_world}: the JSONL data reader cannot continue its position on another "
                    "rank count. Resume on the same number of ranks, convert the data to shards "
                    "(mobilellm-prepare) whose position moves between rank counts, or start a new run "
                    f"folder with --checkpoint.initial_load_path {path} to keep the weights only."
                )
            states = {k: v for k, v in states.items() if k not in self.per_rank}
            logger.warning(
                "resuming a checkpoint of %d ranks on %d: model and optimizer reshard; %s start fresh",
                saved.dp_world_size, expected_world, ", ".join(sorted(self.per_rank)) or "nothing",
            )
        _checked_load(states, path)
        train_state.dp_world_size = expected_world
        logger.info("resumed from %s (step %d) in %.1fs", path, train_state.step, time.perf_counter() - begin)

    def load_model_only(self, path: str) -> None:
        if is_hf_folder(path):
            try:
                load_hf_into_model(self.states["model"].model, path)
            except HFCheckpointError as e:
                raise CheckpointError(f"checkpoint.initial_load_path: {e}") from None
            logger.info("initialised model weights from the Hugging Face folder %s", path)
            return
        if not is_complete(path):
            raise CheckpointError(f"checkpoint.initial_load_path={path} is not a complete DCP checkpoint (no .metadata)")
        _checked_load({"model": self.states["model"]}, path)
        logger.info("initialised model weights from %s", path)

    def save(self, step: int) -> float:
        """Save (or start saving) step `step`; returns the seconds training was blocked."""
        begin = time.perf_counter()
        self.wait()  # one save in flight at a time
        path = self.path(step)
        if self.rank == 0 and os.path.isdir(path):
            # The remains of a killed save, or (after a rewind) an older save of this step:
            # unmark it first, so that no crash in between leaves a "complete" mix of two saves.
            if is_complete(path):
                os.remove(os.path.join(path, ".metadata"))
            shutil.rmtree(path)
        dist.barrier()
        if self.async_mode == "disabled":
            dcp.save(self.states, checkpoint_id=path)
            self.pending_step = step
            self._finish()
        else:
            result = dcp.async_save(self.states, checkpoint_id=path, process_group=self.pg, async_stager=self.stager)
            if isinstance(result, AsyncSaveResponse):
                self.staging, self.pending = result.staging_completion, result.upload_completion
            else:
                self.pending = result
            self.pending_step = step
        blocked = time.perf_counter() - begin
        logger.info("checkpoint %s: training blocked %.2fs (%s)", path, blocked, self.async_mode)
        return blocked

    def wait_for_staging(self) -> None:
        """Pinned mode: parameters may change only once the copy of the last save is done."""
        if self.staging is not None:
            self.staging.result()
            self.staging = None

    def wait(self) -> None:
        """Block until the save in flight, if any, is complete on disk."""
        self.wait_for_staging()
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        try:
            pending.result()
        except Exception as e:
            raise CheckpointError(f"saving {self.path(self.pending_step)} failed: {type(e).__name__}: {e}") from e
        self._finish()

    def _finish(self) -> None:
        path = self.path(self.pending_step)
        if self.rank == 0:
            if self.tokenizer_path:
                # A step folder is then all that evaluation and export need.
                shutil.copyfile(self.tokenizer_path, os.path.join(path, TOKENIZER_FILE))
            self._purge()
        logger.info("checkpoint %s complete", path)

    def _purge(self) -> None:
        """Delete the oldest complete checkpoints beyond keep_latest_k. It runs only after a save
        completed, so the newest complete checkpoint is always kept and none is in flight."""
        if self.cfg.keep_latest_k == 0:
            return
        complete, _ = list_checkpoints(self.folder)
        for step in complete[: -self.cfg.keep_latest_k]:
            shutil.rmtree(self.path(step), ignore_errors=True)

    def close(self) -> None:
        self.wait()


def has_unfused_projections(path: str) -> bool:
    """Whether a checkpoint holds separate wq/wk/wv and w1/w3 weights: the layout of checkpoints
    written before the blocks fused them into wqkv and w13."""
    try:
        keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception:  # unreadable metadata is reported by the load itself
        return False
    return any(k.startswith("model.") and k.endswith(".attention.wq.weight") for k in keys)


def _checked_load(states: dict, path: str) -> None:
    """dcp.load inside a process group or in a lone process (eval, export), reporting a damaged
    checkpoint as such."""
    if isinstance(states.get("model"), ModelState) and has_unfused_projections(path):
        # A sharded fused weight is not the concatenation of its parts' shards, so this cannot
        # be loaded in place; the lone-process loader (eval, export) can, and export writes the
        # Hugging Face layout that a new run starts from.
        raise CheckpointError(
            f"{path} stores separate q/k/v and gate/up projection weights (attention.wq/wk/wv, "
            "feed_forward.w1/w3), the layout from before they were fused into attention.wqkv and "
            "feed_forward.w13; training cannot resume it. Keep its weights by exporting it (mobilellm-export "
            f"--checkpoint {path} --out <folder>, which reads either layout) and starting a new run folder "
            "with --checkpoint.initial_load_path <folder>; the optimizer state and data position start fresh."
        )
    try:
        if dist.is_initialized():
            dcp.load(states, checkpoint_id=path)
        else:
            with warnings.catch_warnings():  # DCP warns that it assumes a single process
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(states, checkpoint_id=path, no_dist=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {str(e)[:500]}): a shard may be truncated or "
            "missing, or the checkpoint was written for another model. Move this folder away to resume "
            "from the one before it."
        ) from e


def model_args_fingerprint(args: ModelArgs) -> str:
    """The model's fields as JSON, stored in the train state: a checkpoint says what it holds."""
    return json.dumps(dataclasses.asdict(args), sort_keys=True)


def read_model_args(path: str) -> ModelArgs:
    """The ModelArgs a checkpoint was written with; needs no process group."""
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete DCP checkpoint (no .metadata)")
    saved = TrainState()
    _checked_load({"train_state": saved}, path)
    return ModelArgs(**json.loads(saved.model_args))


def load_model_from_checkpoint(path: str, device: str | torch.device = "cpu") -> MobileLLM:
    """A plain (unsharded, fp32) MobileLLM with the weights of a DCP checkpoint step folder, on
    one process: for evaluation, generation and export."""
    args = read_model_args(path)
    with torch.device("meta"):
        model = MobileLLM(args)
    model.to_empty(device=device)
    model.init_weights()  # RoPE tables; every weight is overwritten below
    state = model.state_dict()
    # The state dict's tensors share the parameters' memory and DCP loads into them in place, so
    # an older checkpoint with separate q/k/v and gate/up weights loads through views of the
    # fused weights: exact, with no copy.
    target = unfuse_projections(state, args) if has_unfused_projections(path) else state
    _checked_load({"model": target}, path)
    model.load_state_dict(state)
    return model.eval()
