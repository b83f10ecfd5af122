"""Which checkpoint a run resumes from, and falling back past damaged ones.

The choice depends only on the step folders on disk and the checkpoint config: an explicit
`load_step`, else the newest complete step that verifies; newer damaged steps are moved aside
as step-<N>.corrupt. Unreadable and incomplete folders are reported here, and so is a checkpoint
that does not fit the run (another model; per-rank state that cannot move to another rank
count). Separate from the Checkpointer so the resume policy, fallback included, is read and
changed in one place.
"""

from __future__ import annotations

import json
import logging
import os

import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from mobilellm_train.checkpoint.folders import (
    corrupt_destination,
    permission_error,
    scan_checkpoints,
    step_path,
)
from mobilellm_train.checkpoint.integrity import verify_on_all_ranks
from mobilellm_train.checkpoint.state import TrainState
from mobilellm_train.config import CheckpointConfig
from mobilellm_train.errors import CheckpointError

logger = logging.getLogger("mobilellm_train")


def choose_resume_step(cfg: CheckpointConfig, folder: str, rank: int) -> int | None:
    """The step of `folder` to resume (collective: verification and moving damaged steps aside
    involve every rank); None when there is no complete checkpoint to resume."""
    complete, incomplete, unreadable = scan_checkpoints(folder)
    for step in incomplete:
        logger.warning("ignoring incomplete checkpoint %s (no .metadata: its save did not finish)", step_path(folder, step))
    if unreadable and (not complete or unreadable[-1] > complete[-1] or cfg.load_step in unreadable):
        # It may be the newest checkpoint: resuming an older one would later overwrite it.
        raise permission_error(step_path(folder, unreadable[-1]))
    for step in unreadable:
        logger.warning("%s; it is older than the checkpoint resumed and is left alone", permission_error(step_path(folder, step)))
    if cfg.load_step > 0:
        if cfg.load_step not in complete:
            raise CheckpointError(
                f"checkpoint.load_step={cfg.load_step}: no complete checkpoint {step_path(folder, cfg.load_step)} "
                f"(complete ones: {complete or 'none'})"
            )
        newer = [s for s in complete if s > cfg.load_step]
        if newer:
            raise CheckpointError(
                f"checkpoint.load_step={cfg.load_step}, but {folder} holds newer checkpoints {newer} "
                "that continuing would overwrite; move them away or train into a new --job.dump_folder"
            )
        return cfg.load_step
    if complete:
        return newest_verified(folder, complete, rank) if cfg.verify else complete[-1]
    return None


def newest_verified(folder: str, complete: list[int], rank: int) -> int:
    """The newest complete checkpoint whose files match their checksums. Newer ones that do not
    are renamed step-<N>.corrupt (kept for inspection, out of the way of retention and of the
    saves that will reach their step again)."""
    failed = []
    for step in reversed(complete):
        try:
            verify_on_all_ranks(step_path(folder, step), rank)
        except CheckpointError as e:
            failed.append((step, str(e)))
            continue
        for bad, problem in failed:
            moved = set_aside(step_path(folder, bad), rank)
            logger.warning("%s; moved to %s and falling back to step %d", problem, moved, step)
        return step
    raise CheckpointError(
        f"no checkpoint in {folder} verifies against its checksums: "
        + "; ".join(problem for _, problem in failed)
        + ". Nothing was loaded or changed; restore the damaged files, move the folders away to "
        "start over, or set --checkpoint.verify false to load the newest one unchecked."
    )


def set_aside(path: str, rank: int) -> str:
    """Rename a damaged step folder out of the way (rank 0, once every rank has finished reading
    it); returns where it went."""
    moved = corrupt_destination(path)
    dist.barrier()  # every rank has finished reading it
    if rank == 0:
        os.rename(path, moved)
    dist.barrier()
    return moved


def resumable_states(path: str, saved: TrainState, expected: TrainState, states: dict[str, Stateful],
                     per_rank: frozenset[str], required_per_rank: frozenset[str]) -> dict[str, Stateful]:
    """The states to load from the checkpoint at `path`, whose train state is `saved`, into a run
    whose train state is `expected`: all of them, or without the per-rank ones on another number of
    ranks. A checkpoint of another model, or per-rank state that cannot move, is refused in words."""
    ours, theirs = json.loads(expected.model_args), json.loads(saved.model_args or "{}")
    # max_seq_len only sizes the RoPE tables, so a checkpoint may continue at another length.
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if k != "max_seq_len" and theirs.get(k) != v}
    if diff:
        raise CheckpointError(
            f"{path} was written for another model: (checkpoint, this run) differ in {diff}"
        )
    if saved.dp_world_size == expected.dp_world_size:
        return states
    if required_per_rank:
        raise CheckpointError(
            f"{path} was written by {saved.dp_world_size} data-parallel ranks and this run has "
            f"{expected.dp_world_size}: the JSONL data reader cannot continue its position on another "
            "rank count. Resume on the same number of ranks, convert the data to shards "
            "(mobilellm-prepare) whose position moves between rank counts, or start a new run "
            f"folder with --checkpoint.initial_load_path {path} to keep the weights only."
        )
    logger.warning(
        "resuming a checkpoint of %d ranks on %d: model and optimizer reshard; %s start fresh",
        saved.dp_world_size, expected.dp_world_size, ", ".join(sorted(per_rank)) or "nothing",
    )
    return {k: v for k, v in states.items() if k not in per_rank}
