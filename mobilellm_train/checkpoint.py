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
from torch.distributed.checkpoint.stateful import Stateful

from mobilellm_train.config import CheckpointConfig
from mobilellm_train.model import MobileLLM, ModelArgs

logger = logging.getLogger("mobilellm_train")

_STEP_DIR = re.compile(r"^step-(\d+)$")
TOKENIZER_FILE = "tokenizer.model"


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
    """Saves and restores the run's `Stateful` objects; rank 0 does the folder bookkeeping."""

    def __init__(
        self, cfg: CheckpointConfig, dump_folder: str, states: dict[str, Stateful], rank: int, tokenizer_path: str = ""
    ):
        self.cfg = cfg
        self.folder = os.path.join(dump_folder, cfg.folder)
        self.states = states
        self.rank = rank
        self.tokenizer_path = tokenizer_path

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

    def load(self, step: int, train_state: TrainState) -> None:
        path = self.path(step)
        begin = time.perf_counter()
        expected_args, expected_world = train_state.model_args, train_state.dp_world_size
        # Read the train state alone first, so a mismatch is reported in words, not as a
        # shape error from deep inside DCP.
        saved = TrainState()
        dcp.load({"train_state": saved}, checkpoint_id=path)
        ours, theirs = json.loads(expected_args), json.loads(saved.model_args or "{}")
        # max_seq_len only sizes the RoPE tables, so a checkpoint may continue at another length.
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if k != "max_seq_len" and theirs.get(k) != v}
        if diff:
            raise CheckpointError(
                f"{path} was written for another model: (checkpoint, this run) differ in {diff}"
            )
        if saved.dp_world_size != expected_world:
            raise CheckpointError(
                f"{path} was written by {saved.dp_world_size} data-parallel ranks and this run has "
                f"{expected_world}: the JSONL data reader cannot continue its position on another "
                "rank count. Resume on the same number of ranks, or start a new run folder with "
                f"--checkpoint.initial_load_path {path} to keep the weights only."
            )
        dcp.load(self.states, checkpoint_id=path)
        logger.info("resumed from %s (step %d) in %.1fs", path, train_state.step, time.perf_counter() - begin)

    def load_model_only(self, path: str) -> None:
        if not is_complete(path):
            raise CheckpointError(f"checkpoint.initial_load_path={path} is not a complete DCP checkpoint (no .metadata)")
        dcp.load({"model": self.states["model"]}, checkpoint_id=path)
        logger.info("initialised model weights from %s", path)

    def save(self, step: int) -> None:
        path = self.path(step)
        begin = time.perf_counter()
        if self.rank == 0 and os.path.isdir(path) and not is_complete(path):
            shutil.rmtree(path)  # the remains of a save that was killed
        dist.barrier()
        dcp.save(self.states, checkpoint_id=path)
        logger.info("saved checkpoint %s in %.1fs", path, time.perf_counter() - begin)
        if self.rank == 0:
            if self.tokenizer_path:
                # A step folder is then all that evaluation and export need.
                shutil.copyfile(self.tokenizer_path, os.path.join(path, TOKENIZER_FILE))
            self._purge()

    def _purge(self) -> None:
        """Delete the oldest complete checkpoints beyond keep_latest_k; the newest always stays."""
        if self.cfg.keep_latest_k == 0:
            return
        complete, _ = list_checkpoints(self.folder)
        for step in complete[: -self.cfg.keep_latest_k]:
            shutil.rmtree(self.path(step), ignore_errors=True)


def model_args_fingerprint(args: ModelArgs) -> str:
    """The model's fields as JSON, stored in the train state: a checkpoint says what it holds."""
    return json.dumps(dataclasses.asdict(args), sort_keys=True)


def _load_anywhere(state: dict, path: str) -> None:
    """dcp.load inside a process group, or in a lone process (where DCP warns that it assumes so)."""
    if dist.is_initialized():
        dcp.load(state, checkpoint_id=path)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)


def read_model_args(path: str) -> ModelArgs:
    """The ModelArgs a checkpoint was written with; needs no process group."""
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete DCP checkpoint (no .metadata)")
    saved = TrainState()
    _load_anywhere({"train_state": saved}, path)
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
    _load_anywhere({"model": state}, path)
    model.load_state_dict(state)
    return model.eval()
