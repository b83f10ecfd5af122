"""Which checkpoint a run resumes from, and falling back past damaged ones.

The choice depends only on the step folders on disk and the checkpoint config: an explicit
`load_step`, else the newest complete step that verifies and loads; newer damaged steps are
moved aside as step-<N>.corrupt. Unreadable and incomplete folders are reported here, and so is a checkpoint
that does not fit the run (another model; per-rank state that cannot move to another rank
count). Separate from the Checkpointer so the resume policy, fallback included, is read and
changed in one place.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from mobilellm_train.checkpoint.folders import (
    corrupt_destination,
    permission_error,
    scan_checkpoints,
    step_path,
)
from mobilellm_train.checkpoint.model_loading import stored_states
from mobilellm_train.checkpoint.state import TrainState
from mobilellm_train.config import CheckpointConfig
from mobilellm_train.errors import CheckpointAccessError, CheckpointError, CheckpointMismatchError

logger = logging.getLogger("mobilellm_train")


def resume_candidates(cfg: CheckpointConfig, folder: str) -> tuple[list[int], bool]:
    """The steps of `folder` to try, newest first, and whether a step that fails to load may be
    passed over for the next (an automatic resume) or stops the run (an explicit load_step)."""
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
        return [cfg.load_step], False
    return complete[::-1], True


def _agreed(problem: tuple[str, str] | None) -> tuple[str, str] | None:
    """The first problem any rank had (collective when a process group of several ranks is up):
    every rank falls back, or stops, together."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems: list = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    return problem


def load_with_fallback(folder: str, steps: list[int], load: Callable[[int], None], rank: int,
                       fall_back: bool) -> int:
    """Load the first of `steps` (newest first) that loads, through `load(step)` (verification
    included); returns it. A step that fails for damage (checksums, an index or value that does
    not parse or does not load) is passed over when `fall_back`, and renamed step-<N>.corrupt once
    an older one has loaded. A permission problem or a checkpoint that does not fit the run stops
    at once: an older step would not be better, and nothing is renamed."""
    failed = []
    for step in steps:
        problem = None
        try:
            load(step)
        except CheckpointError as e:
            kind = ("access" if isinstance(e, CheckpointAccessError) else
                    "mismatch" if isinstance(e, CheckpointMismatchError) else "damage")
            problem = (kind, str(e))
        problem = _agreed(problem)
        if problem is None:
            for bad, text in failed:
                moved = set_aside(step_path(folder, bad), rank)
                logger.warning("%s; moved to %s and falling back to step %d", text, moved, step)
            return step
        kind, text = problem
        if kind != "damage" or not fall_back:
            raise {"access": CheckpointAccessError, "mismatch": CheckpointMismatchError}.get(kind, CheckpointError)(text)
        failed.append((step, text))
    raise CheckpointError(
        f"no checkpoint in {folder} loads: " + "; ".join(text for _, text in failed)
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


def model_difference(saved_model_args: str, expected_model_args: str) -> dict:
    """{field: (checkpoint's, this run's)} for the model fields that differ; max_seq_len only sizes
    the RoPE tables, so a checkpoint may continue at another length."""
    ours, theirs = json.loads(expected_model_args), json.loads(saved_model_args or "{}")
    return {k: (theirs.get(k), v) for k, v in ours.items() if k != "max_seq_len" and theirs.get(k) != v}


def resumable_states(path: str, saved: TrainState, expected: TrainState, states: dict[str, Stateful],
                     per_rank: frozenset[str], required_per_rank: frozenset[str],
                     optional: frozenset[str] = frozenset()) -> dict[str, Stateful]:
    """The states to load from the checkpoint at `path`, whose train state is `saved`, into a run
    whose train state is `expected`: all of them, or without the per-rank ones on another number of
    ranks, or without the `optional` ones the checkpoint lacks (the caller starts those afresh). A
    checkpoint of another model, a weights-only one, or per-rank state that cannot move, is refused
    in words."""
    # The saved train state's model_args were checked as it loaded (TrainState.load_state_dict).
    diff = model_difference(saved.model_args, expected.model_args)
    if diff:
        raise CheckpointMismatchError(
            f"{path} was written for another model: (checkpoint, this run) differ in {diff}"
        )
    stored = stored_states(path)
    if "optimizer" in states and "optimizer" not in stored:
        raise CheckpointMismatchError(
            f"{path} holds weights only (no optimizer state or data position: an average of steps, "
            "mobilellm-average), so a run cannot resume it; move it out of the checkpoint folder, and "
            f"start a new run folder from it with --checkpoint.initial_load_path {path}"
        )
    unused = sorted(stored - set(states))
    if unused:
        logger.warning("%s also holds %s, which this run does not keep (e.g. training.ema_decay 0 drops the "
                       "weight EMA): its next checkpoints will not have them", path, ", ".join(unused))
    states = {k: v for k, v in states.items() if k in stored or k not in optional}
    if saved.dp_world_size == expected.dp_world_size:
        return states
    if required_per_rank:
        raise CheckpointMismatchError(
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
