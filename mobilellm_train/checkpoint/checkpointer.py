"""The Checkpointer: saves and restores a run's states with torch.distributed.checkpoint (DCP).

A checkpoint is the folder <dump_folder>/<checkpoint.folder>/step-<N>/ holding everything a run
needs to continue exactly: model, optimizer, lr schedule, data loader, train state and RNG.
Model and optimizer are saved sharded and reshard on load; the data loader and RNG are per rank.
Saves run synchronously or in the background (`checkpoint.async_mode`); a failed save stops the
run at the next step boundary. This file is the run-facing sequence (when to save, wait, verify,
load); which step to resume is in resume.py, the folders and retention in folders.py, checksums
in integrity.py, reading without running code in safe_load.py.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.checkpoint.stateful import Stateful

from mobilellm_train.checkpoint.failures import save_failed_error
from mobilellm_train.checkpoint.folders import (
    apply_retention,
    delete_step_folder,
    folder_state,
    list_checkpoints,
    permission_error,
    remove_partial_step,
    step_path,
)
from mobilellm_train.checkpoint.integrity import ChecksummedWriter, verify_on_all_ranks
from mobilellm_train.checkpoint.initial import load_initial_state
from mobilellm_train.checkpoint.model_loading import checked_load, read_train_state
from mobilellm_train.checkpoint.resume import load_with_fallback, resumable_states, resume_candidates
from mobilellm_train.checkpoint.state import TrainState
from mobilellm_train.config import CheckpointConfig
from mobilellm_train.data.shards import TOKENIZER_FILE
from mobilellm_train.errors import CheckpointError

logger = logging.getLogger("mobilellm_train")

class _KeptStateDictStager(StateDictStager):
    """torch 2.11's DefaultStager closes its StateDictStager after every stage, dropping the
    pinned host buffers (and the copy table: its second save failed). This one stays open until
    the stager is closed, so each save copies into the buffers pinned at the first."""

    def close(self) -> None:
        pass

    def release(self) -> None:
        super().close()


class OrderedStager(DefaultStager):
    """The pinned-memory stager, one for the whole run.

    DefaultStager copies on a stream of its own, from a background thread, without waiting for
    the compute stream (torch 2.11 and 2.13 alike): the copy could read parameters the optimizer
    step is still writing. `stage` (called on the training thread by async_save) therefore records
    an event on the current stream and makes the staging stream wait for it before any copy is
    queued there.
    """

    def __init__(self, options: StagingOptions):
        super().__init__(options)
        old = self._state_dict_stager
        self._state_dict_stager = _KeptStateDictStager(pin_memory=old.pin_memory, share_memory=old.share_memory)
        self.ready: torch.Event | None = None  # the last save's point on the compute stream

    def stage(self, state_dict, **kwargs):
        self.ready = None
        if torch.accelerator.is_available():
            self.ready = torch.Event()
            self.ready.record()  # the current (compute) stream
            stream = getattr(self, "_staging_stream", None)
            if stream is not None:
                stream.wait_event(self.ready)  # queued before any copy: they run after the step
            else:
                self.ready.synchronize()
        return super().stage(state_dict, **kwargs)

    def close(self) -> None:
        super().close()
        self._state_dict_stager.release()


def build_pinned_stager() -> OrderedStager:
    return OrderedStager(StagingOptions(
        use_pinned_memory=True, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=True
    ))


class Checkpointer:
    """Saves and restores the run's `Stateful` objects; rank 0 does the folder bookkeeping.

    `per_rank` names the states that belong to one rank (RNG; the JSONL reader's position).
    `required_per_rank` are those that cannot be carried to another number of ranks: resuming
    such a checkpoint on a different rank count is refused. The others are left fresh there,
    with a warning. `optional` states (the weight EMA) may be missing from a checkpoint: each has a
    `start_fresh(reason)`, called when the run starts without them (a new run, or a checkpoint
    written without one). `save_only` names records written with every step for the tools that
    read them (the QAT scheme) but never loaded at resume: they describe the current run, and a
    step written before they existed has none.
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
        optional: frozenset[str] = frozenset(),
        save_only: frozenset[str] = frozenset(),
    ):
        self.cfg = cfg
        self.folder = os.path.join(dump_folder, cfg.folder)
        self.states = states
        self.rank = rank
        self.tokenizer_path = tokenizer_path
        self.per_rank, self.required_per_rank, self.save_only = per_rank, required_per_rank, save_only
        self.optional = optional & set(states)
        self.async_mode = cfg.async_mode
        if self.async_mode == "async_with_pinned_mem" and not torch.cuda.is_available():
            logger.warning("checkpoint.async_mode=async_with_pinned_mem needs CUDA; using async")
            self.async_mode = "async"
        self.pg = None
        self.stager: DefaultStager | None = None
        if cfg.enable and self.async_mode != "disabled":
            # The background writer runs collectives of its own; a separate gloo group keeps them
            # from interleaving with the training collectives of the main thread.
            self.pg = dist.new_group(backend="gloo")
        self.pending: Future | None = None  # the write of the save in flight
        self.staging: Future | None = None  # its copy to host memory (pinned mode)
        self.pending_step = 0
        self.writer: ChecksummedWriter | None = None  # the writer of the save in flight
        self.protected_step: int | None = None  # a step being loaded: retention must keep it
        self.resumed_train_state: TrainState | None = None  # as the step last loaded stored it

    def path(self, step: int) -> str:
        return step_path(self.folder, step)

    def maybe_resume(self, train_state: TrainState) -> bool:
        """Restore the chosen checkpoint of this run folder, or the initial model weights.

        Returns True when training resumes from a checkpoint of this run.
        """
        steps, may_fall_back = [], False
        if self.cfg.enable and self.cfg.load_step != 0:
            steps, may_fall_back = resume_candidates(self.cfg, self.folder)
        if not steps:
            # No checkpoint of this run is read, but the initial weights still are: silently
            # starting from random weights would be the wrong run.
            loaded = load_initial_state(self.states, self.cfg, self.rank, train_state) if self.cfg.initial_load_path \
                else set()
            for name in sorted(self.optional - loaded):
                self.states[name].start_fresh("a new run" + (f" from {self.cfg.initial_load_path}" if loaded else ""))
            return False
        load_with_fallback(self.folder, steps, lambda step: self.load(step, train_state), self.rank, may_fall_back)
        return True

    def verify(self, step: int) -> None:
        verify_on_all_ranks(self.path(step), self.rank)

    def newest_complete_step(self) -> int | None:
        """The newest complete checkpoint, after the save in flight (if any) has finished: that
        save may be the newest, and finishing it may delete an older one under retention."""
        self.wait()
        complete, _ = list_checkpoints(self.folder)
        return complete[-1] if complete else None

    def describe_newest(self) -> str:
        """One sentence on the newest checkpoint for an error message; says "intact" only after
        checking it (collective when checkpoint.verify is on)."""
        if not self.cfg.enable:
            return "Checkpointing is off."
        try:
            step = self.newest_complete_step()
        except CheckpointError as e:  # the save in flight failed: say so too
            return str(e)
        if step is None:
            return "No checkpoint has been saved yet."
        if not self.cfg.verify:
            return f"The newest checkpoint is {self.path(step)} (not verified: checkpoint.verify is off)."
        try:
            self.verify(step)
        except CheckpointError as e:
            return f"The newest checkpoint does NOT verify: {e}"
        return f"The newest checkpoint, {self.path(step)}, verified intact against its checksums."

    def load(self, step: int, train_state: TrainState) -> None:
        # Retention runs when the save in flight finishes (in wait): it must not delete `step`.
        self.protected_step = step
        try:
            self._load(step, train_state)
        finally:
            self.protected_step = None

    def _load(self, step: int, train_state: TrainState) -> None:
        self.wait()
        path = self.path(step)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} does not exist (it was deleted while the run was going)")
        begin = time.perf_counter()
        if self.cfg.verify:
            self.verify(step)
        expected_world = train_state.dp_world_size
        # Read the train state alone first, so a mismatch is reported in words, not as a
        # shape error from deep inside DCP; it is not read again with the rest (an older
        # checkpoint lacks fields this version stores), but restored from this reading.
        saved = read_train_state(path)
        resumed = {k: v for k, v in self.states.items() if k not in self.save_only}
        states = resumable_states(path, saved, train_state, resumed, self.per_rank, self.required_per_rank,
                                  self.optional)
        checked_load({k: v for k, v in states.items() if k != "train_state"}, path)
        if "train_state" in states:
            # The config stays this run's: the next save records what its steps are trained with.
            states["train_state"].load_state_dict({k: v for k, v in saved.state_dict().items() if k != "config"})
        for name in sorted(self.optional - set(states)):
            self.states[name].start_fresh(f"{path} was written without it")
        train_state.dp_world_size = expected_world
        self.resumed_train_state = saved
        logger.info("resumed from %s (step %d) in %.1fs", path, train_state.step, time.perf_counter() - begin)

    def save(self, step: int) -> float:
        """Save (or start saving) step `step`; returns the seconds training was blocked.

        A failure raises CheckpointError naming the step, the folder and the cause; an async save
        that fails later is reported by `raise_if_failed` at the next step boundary.
        """
        begin = time.perf_counter()
        self.wait()  # one save in flight at a time
        path = self.path(step)
        if self.rank == 0 and os.path.lexists(path):  # a dangling link too
            if not os.path.islink(path) and folder_state(path) == "unreadable":
                raise permission_error(path)
            # The remains of a killed save, or (after a rewind) an older save of this step.
            try:
                delete_step_folder(path)
            except OSError as e:
                raise CheckpointError(f"cannot replace the old {path} before saving step {step}: {e}") from None
        dist.barrier()
        self.pending_step = step
        # The tokenizer goes in before `.metadata`: a step folder is then all that evaluation and
        # export need, and a failed copy (a full disk) fails the save like a failed shard.
        extra = {TOKENIZER_FILE: self.tokenizer_path} if self.tokenizer_path else {}
        self.writer = ChecksummedWriter(path, extra_files=extra if self.rank == 0 else {})
        try:
            if self.async_mode == "disabled":
                dcp.save(self.states, storage_writer=self.writer)
            else:
                result = dcp.async_save(self.states, storage_writer=self.writer, process_group=self.pg,
                                        async_stager=self._stager_for_save())
                if isinstance(result, AsyncSaveResponse):
                    self.staging, self.pending = result.staging_completion, result.upload_completion
                else:
                    self.pending = result
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise self._save_failed(e) from None
        if self.async_mode == "disabled":
            self._finish()
        blocked = time.perf_counter() - begin
        logger.info("checkpoint %s: training blocked %.2fs (%s)", path, blocked, self.async_mode)
        return blocked

    def _stager_for_save(self) -> DefaultStager | None:
        if self.async_mode != "async_with_pinned_mem":
            return None
        if self.stager is None:
            self.stager = build_pinned_stager()
        return self.stager

    def _save_failed(self, error: BaseException) -> CheckpointError:
        self.pending = self.staging = None
        path = self.path(self.pending_step)
        if self.rank == 0:
            remove_partial_step(path)
        return save_failed_error(error, self.pending_step, path, self.folder)

    def raise_if_failed(self) -> None:
        """At a step boundary: a background save that has failed stops the run now, not at the
        next save; one that has succeeded is finished (retention). Never blocks."""
        for future in (self.staging, self.pending):
            if future is not None and future.done():
                if future.exception() is not None:
                    self.wait()  # raises the CheckpointError
                elif future is self.pending:
                    self.wait()

    def wait_for_staging(self) -> None:
        """Pinned mode: parameters may change only once the copy of the last save is done."""
        if self.staging is None:
            return
        staging, self.staging = self.staging, None
        try:
            staging.result()
            # torch 2.11's async_save reports a staging that failed before it returned as done;
            # the stager's own future holds the truth.
            if self.stager is not None:
                self.stager.synchronize_staging()
        except (Exception, CheckpointException) as e:
            raise self._save_failed(e) from None

    def wait(self) -> None:
        """Block until the save in flight, if any, is complete on disk."""
        self.wait_for_staging()
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        try:
            pending.result()
        except (Exception, CheckpointException) as e:
            raise self._save_failed(e) from None
        self._finish()

    def _finish(self) -> None:
        path = self.path(self.pending_step)
        if self.rank == 0:
            apply_retention(self.folder, self.cfg.keep_latest_k, self.protected_step)
        writer = self.writer
        logger.info("checkpoint %s complete (checksums of %.2f GB on this rank: %.2fs%s)", path,
                    writer.checksum_bytes / 1e9, writer.checksum_seconds,
                    "" if self.async_mode == "disabled" else ", in the background")

    def close(self) -> None:
        self.wait()
        if self.stager is not None:
            self.stager.close()
            self.stager = None
