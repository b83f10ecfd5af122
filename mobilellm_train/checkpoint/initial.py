"""Starting a new run from another run's step (`checkpoint.initial_load_path`): its weights, or
with `checkpoint.initial_load_optimizer` an annealing branch, which also takes the step's AdamW
moments and step counts (and its weight EMA when both runs keep one).

A branch continues the source run's optimizer exactly: its first update is the one the source run
would make next under the same lr and batch. What defines the branch is its own: the schedule
(typically lr_scheduler.warmup_steps 0 and a linear decay over the branch's steps), the data
(read from its start), the step count and every optimizer setting of this run's config (lr,
betas, eps, weight decay: a value the source saved is logged when it differs, never used). The
source folder is only read. A source of another model shape, without optimizer state (a Hugging
Face folder, an average of steps), or whose optimizer state does not fit this run's parameter
groups, is refused in words before anything is loaded.
"""

from __future__ import annotations

import logging

from torch.distributed.checkpoint.stateful import Stateful

from mobilellm_train.checkpoint.folders import is_complete
from mobilellm_train.checkpoint.integrity import verify_on_all_ranks
from mobilellm_train.checkpoint.model_loading import checked_load, load_initial_weights, stored_states
from mobilellm_train.checkpoint.resume import model_difference
from mobilellm_train.checkpoint.safe_load import read_metadata
from mobilellm_train.checkpoint.state import OptimizerState, TrainState
from mobilellm_train.config import CheckpointConfig
from mobilellm_train.errors import CheckpointError, CheckpointMismatchError
from mobilellm_train.hf import is_hf_folder

logger = logging.getLogger("mobilellm_train")

_KEY = "checkpoint.initial_load_path"


def load_initial_state(states: dict[str, Stateful], cfg: CheckpointConfig, rank: int,
                       expected: TrainState) -> set[str]:
    """Load the start of a new run from `cfg.initial_load_path` into `states` (collective); returns
    the names of the states loaded ("model", and for a branch "optimizer" and perhaps "ema")."""
    path = cfg.initial_load_path
    if is_hf_folder(path) and not is_complete(path):
        if cfg.initial_load_optimizer:
            raise CheckpointMismatchError(
                f"{_KEY}={path} is a Hugging Face folder: it holds no optimizer state, so it cannot start a "
                "branch (checkpoint.initial_load_optimizer); set that to false to start from its weights")
        load_initial_weights(states["model"], path, cfg.verify, rank)
        return {"model"}
    if not is_complete(path):
        raise CheckpointError(f"{_KEY}={path} is not a complete DCP checkpoint (no .metadata)")
    if cfg.verify:
        try:
            verify_on_all_ranks(path, rank)
        except CheckpointError as e:
            raise CheckpointError(f"{_KEY}: {e}") from None
    source = TrainState()
    checked_load({"train_state": source}, path)
    diff = model_difference(source.model_args, expected.model_args)
    if diff:
        raise CheckpointMismatchError(
            f"{_KEY}={path} was written for another model: (checkpoint, this run) differ in {diff}")
    if not cfg.initial_load_optimizer:
        load_initial_weights(states["model"], path, verify=False, rank=rank)  # verified above
        return {"model"}
    return _load_branch(states, path, source)


def _load_branch(states: dict[str, Stateful], path: str, source: TrainState) -> set[str]:
    stored = stored_states(path)
    if "optimizer" not in stored:
        raise CheckpointMismatchError(
            f"{_KEY}={path} holds weights only (no optimizer state: an average of steps), so it cannot start a "
            "branch (checkpoint.initial_load_optimizer); set that to false to start from its weights")
    optimizer_state: OptimizerState = states["optimizer"]
    check_optimizer_fits(path, optimizer_state)
    optimizer = optimizer_state.optimizer
    ours = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    names = ["model", "optimizer"] + (["ema"] if "ema" in states and "ema" in stored else [])
    checked_load({name: states[name] for name in names}, path)
    _keep_our_settings(optimizer, ours)
    logger.info(
        "branch of %s (step %d, %.4g tokens): weights, AdamW moments and step counts%s loaded; this run's "
        "schedule, data (from its start), step count and optimizer settings apply", path, source.step,
        source.tokens_seen, " and weight EMA" if "ema" in names else "")
    return set(names)


def check_optimizer_fits(path: str, optimizer_state: OptimizerState) -> None:
    """Refuse, naming the difference, optimizer state of `path` that does not fit this run: other
    parameter groups (their number, or which parameters each holds), or parameters without state."""
    ours = optimizer_state.state_dict()  # creates the moments of a fresh optimizer, as a load does
    keys = set(read_metadata(path).state_dict_metadata)
    count = sum(1 for key in keys if key.startswith("optimizer.param_groups.") and key.endswith(".params"))
    prefix = f"{_KEY}: the optimizer state of {path} does not fit this run"
    if count != len(ours["param_groups"]):
        raise CheckpointMismatchError(f"{prefix}: {count} parameter groups there, {len(ours['param_groups'])} here")
    theirs = {"optimizer": {"param_groups": [{"params": []} for _ in range(count)]}}
    checked_load(theirs, path)
    for i, (there, here) in enumerate(zip(theirs["optimizer"]["param_groups"], ours["param_groups"])):
        there_names, here_names = set(there["params"]), set(here["params"])
        if there_names != here_names:
            raise CheckpointMismatchError(
                f"{prefix}: parameter group {i} holds other parameters (only there: "
                f"{sorted(there_names - here_names)[:5]}; only here: {sorted(here_names - there_names)[:5]})")
    missing = sorted(f"optimizer.state.{name}.{key}" for name, state in ours["state"].items() for key in state
                     if f"optimizer.state.{name}.{key}" not in keys)
    if missing:
        raise CheckpointMismatchError(f"{prefix}: it has no {', '.join(missing[:5])}"
                                      + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def _keep_our_settings(optimizer, ours: list[dict]) -> None:
    """Put back this run's group settings over the ones the load copied from the source."""
    for i, (group, settings) in enumerate(zip(optimizer.param_groups, ours)):
        changed = {k: (group.get(k), v) for k, v in settings.items() if k not in ("lr", "initial_lr") and group.get(k) != v}
        if changed:
            logger.info("branch: parameter group %d keeps this run's %s (the source's: %s)", i,
                        ", ".join(f"{k} {v[1]}" for k, v in changed.items()),
                        ", ".join(f"{k} {v[0]}" for k, v in changed.items()))
        group.update(settings)
