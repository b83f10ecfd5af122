"""Distributed checkpoints with torch.distributed.checkpoint (DCP): the public names.

A checkpoint is the folder <dump_folder>/<checkpoint.folder>/step-<N>/ holding everything a run
needs to continue exactly: model, optimizer, lr schedule, data loader, train state and RNG.
Model and optimizer are saved sharded and reshard on load; the data loader and RNG are per rank.
A checkpoint is complete once DCP has written its `.metadata` file, which happens after every
rank's shards are on disk; folders without it are never loaded.

Loading never runs code from the folder, crashes on it or reads outside it: `.metadata` is
scanned (size, nesting, nothing changed but fresh instances), read by an unpickler that accepts
only DCP's metadata classes and rebuilt as plain DCP objects; every other stored value is read
with `torch.load(weights_only=True)`, and the per-rank state (RNG, the JSONL reader's position)
is JSON. Each rank writes `__<rank>_manifest.json`, the size and CRC-32 of every shard it wrote,
and the coordinator `__metadata_manifest.json` for `.metadata` and the tokenizer, before
`.metadata` marks the step complete; loads check every file they read against them
(`checkpoint.verify`). Names are plain names of the step folder; links inside it are refused.

The package, one concern per file:
    safe_load.py      the restricted `.metadata` unpickler, the DCP reader and planner that run no code
    integrity.py      manifests and CRC-32: written on save (ChecksummedWriter), checked on load
    state.py          the Stateful wrappers (train state, model, optimizer, schedule, per-rank JSON, RNG)
    folders.py        step folders: naming, completeness, listing, deletion, retention
    resume.py         which step a run resumes from; falling back past steps that fail to load
    failures.py       failed saves and loads in words
    model_loading.py  the one checked dcp.load; the plain model (its weights or its EMA) for eval,
                      generate, export and averaging
    initial.py        a new run from another run's step: its weights, or a branch's optimizer too
    checkpointer.py   the Checkpointer: save (sync or async), load, resume, wait, close
Import from here (`mobilellm_train.checkpoint`); the files are free to move.
"""

from mobilellm_train.checkpoint.checkpointer import Checkpointer
from mobilellm_train.checkpoint.failures import describe_save_failure
from mobilellm_train.checkpoint.folders import (
    is_complete,
    list_checkpoints,
    scan_checkpoints,
)
from mobilellm_train.checkpoint.integrity import (
    MANIFEST_GLOB,
    METADATA_MANIFEST,
    ChecksummedWriter,
    file_crc32,
    read_verified_index,
    verify_checkpoint,
)
from mobilellm_train.checkpoint.model_loading import (
    checked_load,
    has_unfused_projections,
    load_model_from_checkpoint,
    load_weights_into,
    model_args_fingerprint,
    read_model_args,
    read_train_state,
    stored_states,
)
from mobilellm_train.checkpoint.safe_load import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    read_metadata,
)
from mobilellm_train.checkpoint.state import (
    ModelState,
    OptimizerState,
    PerRankState,
    RNGState,
    SchedulerState,
    TrainState,
    decode_state,
    encode_state,
)
from mobilellm_train.data.shards import TOKENIZER_FILE
from mobilellm_train.errors import CheckpointError

_checked_load = checked_load  # its name before the package; tests and older callers use it

__all__ = [
    "MANIFEST_GLOB", "METADATA_MANIFEST", "TOKENIZER_FILE", "CheckpointError", "Checkpointer", "ChecksummedWriter", "ModelState",
    "OptimizerState", "PerRankState", "RNGState", "SafeFileSystemReader", "SafeLoadPlanner", "SchedulerState",
    "TrainState", "checked_load", "decode_state", "describe_save_failure", "encode_state", "file_crc32",
    "has_unfused_projections", "is_complete", "list_checkpoints", "load_model_from_checkpoint", "load_weights_into",
    "model_args_fingerprint", "read_metadata", "read_model_args", "read_train_state", "read_verified_index",
    "scan_checkpoints", "stored_states",
    "verify_checkpoint",
]
