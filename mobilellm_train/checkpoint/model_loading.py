"""Loading from a step folder: the one `dcp.load` call every load goes through, and the plain
model that evaluation, generation and export read from a checkpoint.

`checked_load` loads any of the run's states through the reader and planner of safe_load,
refuses the pre-fusion weight layout for an in-place (sharded) load, and turns DCP's wrapped
failures into one CheckpointError. `load_model_from_checkpoint` needs no process group: it is
what the tools use; `load_initial_weights` starts a run from another's weights
(checkpoint.initial_load_path). Separate from the Checkpointer, which adds the run's
bookkeeping (which step, verification, resharding checks) on top.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from mobilellm_train.checkpoint.failures import find_checkpoint_error
from mobilellm_train.checkpoint.folders import is_complete, permission_error
from mobilellm_train.checkpoint.integrity import verify_checkpoint, verify_on_all_ranks
from mobilellm_train.checkpoint.safe_load import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    read_metadata,
)
from mobilellm_train.checkpoint.state import ModelState, TrainState, model_args_from_json
from mobilellm_train.errors import CheckpointError, CheckpointMismatchError
from mobilellm_train.hf import (
    HFCheckpointError,
    is_hf_folder,
    load_hf_into_model,
    unfuse_projections,
)
from mobilellm_train.model import MobileLLM, ModelArgs, count_params

logger = logging.getLogger("mobilellm_train")


def has_unfused_projections(path: str) -> bool:
    """Whether a checkpoint holds separate wq/wk/wv and w1/w3 weights: the layout of checkpoints
    written before the blocks fused them into wqkv and w13."""
    try:
        return _is_unfused(read_metadata(path))
    except CheckpointError:  # unreadable or refused metadata is reported by the load itself
        return False


def _is_unfused(metadata: Metadata) -> bool:
    return any(k.startswith("model.") and k.endswith(".attention.wq.weight") for k in metadata.state_dict_metadata)


def stored_states(path: str) -> set[str]:
    """The states a checkpoint holds ("model", "optimizer", "ema", ...), from its index."""
    return {key.split(".", 1)[0] for key in read_metadata(path).state_dict_metadata}


def checked_load(states: dict, path: str) -> None:
    """dcp.load inside a process group or in a lone process (eval, export), through the reader
    and planner that run no code from the folder, reporting a damaged checkpoint as such."""
    # Read here, once: inside dcp.load, DCP would fold our refusal into an error of its own.
    metadata = read_metadata(path)
    if isinstance(states.get("model"), ModelState) and _is_unfused(metadata):
        # A sharded fused weight is not the concatenation of its parts' shards, so this cannot
        # be loaded in place; the lone-process loader (eval, export) can, and export writes the
        # Hugging Face layout that a new run starts from.
        raise CheckpointMismatchError(
            f"{path} stores separate q/k/v and gate/up projection weights (attention.wq/wk/wv, "
            "feed_forward.w1/w3), the layout from before they were fused into attention.wqkv and "
            "feed_forward.w13; training cannot resume it. Keep its weights by exporting it (mobilellm-export "
            f"--checkpoint {path} --out <folder>, which reads either layout) and starting a new run folder "
            "with --checkpoint.initial_load_path <folder>; the optimizer state and data position start fresh."
        )
    reader, planner = SafeFileSystemReader(path, metadata), SafeLoadPlanner(path)
    try:
        if dist.is_initialized():
            dcp.load(states, storage_reader=reader, planner=planner)
        else:
            with warnings.catch_warnings():  # DCP warns that it assumes a single process
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(states, storage_reader=reader, planner=planner, no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        ours = find_checkpoint_error(e)
        if ours is not None:  # a refused value or state: named with the step it was read from
            raise type(ours)(str(ours) if path in str(ours) else f"{path}: {ours}") from None
        denied = find_checkpoint_error(e, PermissionError)
        if denied is not None:
            raise permission_error(denied.filename or path) from None
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {str(e)[:500]}): a shard may be truncated or "
            "missing, or the checkpoint was written for another model. Move this folder away to resume "
            "from the one before it."
        ) from e


def model_args_fingerprint(args: ModelArgs) -> str:
    """The model's fields as JSON, stored in the train state: a checkpoint says what it holds."""
    return json.dumps(dataclasses.asdict(args), sort_keys=True)


def read_train_state(path: str) -> TrainState:
    """The train state a checkpoint holds, read alone (no process group needed) and checked as
    TrainState.load_state_dict checks it. A field of this version that an older checkpoint lacks
    keeps its default rather than failing the load."""
    keys = read_metadata(path).state_dict_metadata
    stored = {fqn.split(".", 1)[1] for fqn in keys if fqn.startswith("train_state.")}
    values = {k: v for k, v in TrainState().state_dict().items() if k in stored}
    checked_load({"train_state": values}, path)  # DCP fills the dict in place
    state = TrainState()
    try:
        state.load_state_dict(values)  # each value checked
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return state


def read_model_args(path: str) -> ModelArgs:
    """The ModelArgs a checkpoint was written with (checked: state.model_args_from_json); needs no
    process group. The model they describe must fit in the bytes the step folder holds, at 2 bytes
    a parameter at least: the model is allocated before any weight is read, so a few crafted bytes
    must not ask for terabytes."""
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete DCP checkpoint (no .metadata)")
    saved = read_train_state(path)
    if not saved.model_args:
        raise CheckpointError(f"{path}: the train state records no model shape (model_args)")
    try:
        args = model_args_from_json(saved.model_args)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    names = {info.relative_path for info in read_metadata(path).storage_data.values()}
    files = [os.path.join(path, name) for name in names]
    stored = sum(os.lstat(file).st_size for file in files if os.path.lexists(file))
    if 2 * count_params(args) > stored:
        raise CheckpointError(
            f"{path}: the train state's model_args describe {count_params(args):,} parameters, but the step's data "
            f"files hold {stored:,} bytes; the checkpoint is damaged or was not written by this trainer"
        )
    return args


WEIGHT_SOURCES = ("model", "ema")  # the weights a step folder may hold: the model's, the EMA's


def load_model_from_checkpoint(path: str, device: str | torch.device = "cpu", verify: bool = True,
                               weights: str = "model") -> MobileLLM:
    """A plain (unsharded, fp32) MobileLLM with the weights of a DCP checkpoint step folder, on
    one process: for evaluation, generation and export. `verify` checks the files against their
    checksums first; `weights` "ema" takes the weight EMA (training.ema_decay) instead."""
    if verify and is_complete(path):
        verify_checkpoint(path)
    args = read_model_args(path)
    with torch.device("meta"):
        model = MobileLLM(args)
    model.to_empty(device=device)
    model.init_weights()  # RoPE tables; every weight is overwritten below
    load_weights_into(model, path, weights)
    return model.eval()


def load_weights_into(model: MobileLLM, path: str, weights: str = "model") -> None:
    """Overwrite a plain model's weights, in place, with a step folder's (`weights`: "model" or "ema")."""
    if weights not in WEIGHT_SOURCES:
        raise ValueError(f"weights {weights!r}: choose one of {', '.join(WEIGHT_SOURCES)}")
    if weights != "model" and weights not in stored_states(path):
        raise CheckpointError(f"{path} holds no weight EMA (it was trained with training.ema_decay 0, or "
                              "it is an average of steps); leave out --weights ema to use its weights")
    args = model.args
    state = model.state_dict()
    if args.tie_embeddings:
        state.pop("output.weight")  # stored once, as the embedding
    # The state dict's tensors share the parameters' memory and DCP loads into them in place, so
    # an older checkpoint with separate q/k/v and gate/up weights loads through views of the
    # fused weights: exact, with no copy.
    target = unfuse_projections(state, args) if weights == "model" and has_unfused_projections(path) else state
    checked_load({weights: target}, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"output.weight"} if args.tie_embeddings else set()):
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing}, unexpected {unexpected})")


def load_initial_weights(model: ModelState, path: str, verify: bool, rank: int,
                         key: str = "checkpoint.initial_load_path") -> None:
    """checkpoint.initial_load_path: the weights of a Hugging Face folder or of a DCP step folder
    (verified first when `verify`, collective), into the run's model; nothing else of that run.
    `key` names the setting in messages (distill.teacher loads its teacher the same way)."""
    if is_hf_folder(path):
        try:
            load_hf_into_model(model.model, path)
        except HFCheckpointError as e:
            raise CheckpointError(f"{key}: {e}") from None
        logger.info("initialised model weights from the Hugging Face folder %s (%s)", path, key)
        return
    if not is_complete(path):
        raise CheckpointError(f"{key}={path} is not a complete DCP checkpoint (no .metadata)")
    if verify:
        try:
            verify_on_all_ranks(path, rank)
        except CheckpointError as e:
            raise CheckpointError(f"{key}: {e}") from None
    checked_load({"model": model}, path)
    logger.info("initialised model weights from %s (%s)", path, key)
