"""Distributed checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is the folder <dump_folder>/<checkpoint.folder>/step-<N>/ holding everything a run
needs to continue exactly: model, optimizer, lr schedule, data loader, train state and RNG.
Model and optimizer are saved sharded and reshard on load; the data loader and RNG are per rank.
A checkpoint is complete once DCP has written its `.metadata` file, which happens after every
rank's shards are on disk; folders without it are never loaded.

Loading never runs code from the folder: `.metadata` is read by an unpickler that accepts only
DCP's metadata classes, every other stored value with `torch.load(weights_only=True)`, and the
per-rank state (RNG, the JSONL reader's position) is JSON. Each rank also writes
`__<rank>_manifest.json`, the size and CRC-32 of every file it wrote, before `.metadata` marks the
step complete; loads check the files against it (`checkpoint.verify`).
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import glob
import json
import logging
import numbers
import os
import pickle
import random
import re
import shutil
import time
import warnings
import zlib
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
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.stateful import Stateful

from mobilellm_train.config import CheckpointConfig
from mobilellm_train.errors import CheckpointError
from mobilellm_train.data.shards import TOKENIZER_FILE  # a step folder names its tokenizer as a dataset does
from mobilellm_train.hf import HFCheckpointError, is_hf_folder, load_hf_into_model, unfuse_projections
from mobilellm_train.model import MobileLLM, ModelArgs

logger = logging.getLogger("mobilellm_train")

_TORCH_VERSION = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])

_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def _tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "args", None), "tie_embeddings", False))


class ModelState(Stateful):
    """Full-FQN model state; FSDP shards it and DCP reshards it to any number of ranks.

    A tied output projection is the embedding itself, so it is stored once, as
    `tok_embeddings.weight`; loading that key restores both.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        state = get_model_state_dict(self.model)
        if _tied(self.model):
            state.pop("output.weight", None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # Not strict when tied: output.weight is absent on purpose (DCP has already checked that
        # every key asked for was in the checkpoint).
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=not _tied(self.model)))


class OptimizerState(Stateful):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class SchedulerState(Stateful):
    """The schedule is a pure function of the step, so its state is the step it is at."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return {"last_epoch": self.scheduler.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.scheduler.last_epoch = state_dict["last_epoch"]
        # Recompute the optimizer's lr for that step, as `scheduler.step()` would have. From the
        # lambdas directly: get_lr() outside step() makes torch warn on every resume.
        lrs = [base * fn(self.scheduler.last_epoch) for fn, base in zip(self.scheduler.lr_lambdas, self.scheduler.base_lrs)]
        for group, lr in zip(self.scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = [g["lr"] for g in self.scheduler.optimizer.param_groups]


def encode_state(obj) -> str:
    """A per-rank state (nested dicts, lists, tuples, numbers, strings, bytes, tensors) as JSON.

    Every container is tagged ({"dict": [[key, value], ...]}, {"tuple": [...]}, ...), so tuples,
    non-string keys and tensors come back as they were, and reading it back runs no code.
    """
    return json.dumps(_encode(obj), separators=(",", ":"))


def _encode(x):
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x)
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"tensor": [str(t.dtype).removeprefix("torch."), list(t.shape), base64.b64encode(raw).decode()]}
    if isinstance(x, (bytes, bytearray)):
        return {"bytes": base64.b64encode(bytes(x)).decode()}
    if isinstance(x, list):
        return {"list": [_encode(v) for v in x]}
    if isinstance(x, tuple):
        return {"tuple": [_encode(v) for v in x]}
    if isinstance(x, dict):
        return {"dict": [[_encode(k), _encode(v)] for k, v in x.items()]}
    raise TypeError(f"a per-rank checkpoint state cannot hold a {type(x).__name__}")


def decode_state(text: str):
    """The inverse of encode_state."""
    return _decode(json.loads(text))


def _decode(x):
    if not isinstance(x, dict):
        return x
    if len(x) != 1:
        raise ValueError(f"malformed per-rank state entry with keys {sorted(x)}")
    (kind, v), = x.items()
    if kind == "list":
        return [_decode(i) for i in v]
    if kind == "tuple":
        return tuple(_decode(i) for i in v)
    if kind == "dict":
        return {_decode(k): _decode(i) for k, i in v}
    if kind == "bytes":
        return base64.b64decode(v)
    if kind == "tensor":
        dtype_name, shape, data = v
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {dtype_name!r}")
        raw = base64.b64decode(data)
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone()
    raise ValueError(f"unknown per-rank state entry {kind!r}")


class PerRankState(Stateful):
    """Per-rank state (data position, RNG) stored as one JSON string under a rank-specific key.

    The rank key stops DCP from de-duplicating the ranks' copies into one; one string keeps DCP
    from flattening nested lists (a token buffer) into thousands of items whose count must
    match on load. JSON, not pickle: loading a checkpoint must not run code from it.
    """

    def __init__(self, rank: int, obj: Stateful):
        self.key, self.obj = f"rank_{rank}", obj

    def state_dict(self) -> dict:
        return {self.key: encode_state(self.obj.state_dict())}

    def load_state_dict(self, state_dict: dict) -> None:
        value = state_dict[self.key]
        if not isinstance(value, str):
            raise CheckpointError(
                f"per-rank entry {self.key} is a {type(value).__name__}, not this version's JSON: the "
                "checkpoint predates it and stored this state pickled, which is not loaded because "
                "unpickling can run code. Start a new run folder with --checkpoint.initial_load_path "
                "to keep its weights."
            )
        try:
            state = decode_state(value)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"per-rank entry {self.key} is damaged: {e}") from None
        self.obj.load_state_dict(state)


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


def _folder_state(path: str) -> str:
    """'complete', 'incomplete' or 'unreadable' (listing it fails: permissions)."""
    try:
        names = os.listdir(path)
    except PermissionError:
        return "unreadable"
    except FileNotFoundError:  # removed meanwhile
        return "incomplete"
    return "complete" if ".metadata" in names else "incomplete"


def scan_checkpoints(folder: str) -> tuple[list[int], list[int], list[int]]:
    """(complete, incomplete, unreadable) steps found in `folder`, each sorted ascending."""
    found: dict[str, list[int]] = {"complete": [], "incomplete": [], "unreadable": []}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = _STEP_DIR.match(name)
            if m:
                found[_folder_state(os.path.join(folder, name))].append(int(m.group(1)))
    return sorted(found["complete"]), sorted(found["incomplete"]), sorted(found["unreadable"])


def list_checkpoints(folder: str) -> tuple[list[int], list[int]]:
    """(complete steps, incomplete steps) found in `folder`, each sorted ascending; unreadable
    step folders are in neither."""
    complete, incomplete, _ = scan_checkpoints(folder)
    return complete, incomplete


def _permission_error(path: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: permission denied. This checkpoint folder cannot be read, so it is neither loaded "
        "nor deleted; fix its permissions (chmod -R u+rwX) or move it out of the checkpoint folder, "
        "then rerun."
    )


# Everything DCP's `.metadata` pickle refers to (torch 2.11 and 2.13 write the same classes);
# anything else, a function above all, is refused before it is looked up.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "_MEM_FORMAT_ENCODING", "StorageMeta", "MetadataIndex",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name in torch's namespace
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")


def read_metadata(path: str) -> Metadata:
    """The DCP index `<path>/.metadata`, unpickled without running anything from it."""
    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except PermissionError:
        raise _permission_error(file) from None
    except Exception as e:  # a crafted or damaged pickle raises nearly anything
        raise CheckpointError(
            f"{file} is not a valid checkpoint index ({type(e).__name__}: {str(e)[:300]}); it was refused "
            "unread, because only checkpoint metadata types are accepted (unpickling anything else can "
            "run code). The folder is damaged or was not written by DCP."
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file} is not a DCP checkpoint index (it holds a {type(metadata).__name__})")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        # Data files sit beside .metadata: a path elsewhere would read files outside the folder.
        if not isinstance(name, str) or name != os.path.basename(name) or name.startswith("."):
            raise CheckpointError(f"{file} names the data file {name!r}, which is not a file of this folder")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's filesystem reader with `.metadata` read by the restricted unpickler (or given, when
    the caller has read it already)."""

    def __init__(self, path: str, metadata: Metadata | None = None):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError("per-rank DCP metadata files are not supported")
        metadata = self._metadata if self._metadata is not None else read_metadata(str(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values (ints, strings: train state, per-rank JSON) are read with
    torch.load(weights_only=True); DCP's default unpickles them unrestricted."""

    def __init__(self, path: str):
        super().__init__()
        self.folder = path

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            info = self.metadata.storage_data.get(read_item.storage_index)
            where = getattr(info, "relative_path", "?")
            raise CheckpointError(
                f"{os.path.join(self.folder, where)}: the stored value {fqn!r} was refused "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); only plain values and tensors are "
                "loaded from a checkpoint, never code"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


MANIFEST_GLOB = "__*_manifest.json"
_CHUNK_BYTES = 8 << 20


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


class ChecksummedWriter(FileSystemWriter):
    """DCP's filesystem writer that records the size and CRC-32 of every file this rank wrote in
    `__<rank>_manifest.json`.

    It runs inside write_data, that is in the background writer of an async save, and before the
    coordinator writes `.metadata`: a complete step always has its manifests. CRC-32 (zlib) reads
    about 1 GB/s per core, the fastest check in the standard library; it catches flipped bits and
    truncation, not deliberate edits (the manifest sits beside the data).
    """

    def __init__(self, path: str):
        super().__init__(path)
        self.checksum_seconds = 0.0
        self.checksum_bytes = 0

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        results = future.wait()  # FileSystemWriter writes synchronously; the future is done
        begin = time.perf_counter()
        files = {}
        for name in sorted({r.storage_data.relative_path for r in results}):
            full = os.path.join(str(self.path), name)
            files[name] = {"bytes": os.path.getsize(full), "crc32": f"{file_crc32(full):08x}"}
        self.checksum_bytes = sum(f["bytes"] for f in files.values())
        manifest = os.path.join(str(self.path), f"{plan.storage_data.prefix}manifest.json")
        with open(manifest + ".tmp", "w") as f:
            json.dump({"format": 1, "algorithm": "crc32", "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(manifest + ".tmp", manifest)
        self.checksum_seconds = time.perf_counter() - begin
        return future


def verify_checkpoint(path: str, rank: int = 0, world_size: int = 1) -> int:
    """Check a step folder's files against its manifests; this rank checks every world_size-th
    file. Raises CheckpointError naming the first bad file; returns the bytes checked."""
    metadata = read_metadata(path)
    manifests = sorted(glob.glob(os.path.join(glob.escape(path), MANIFEST_GLOB)))
    if not manifests:
        raise CheckpointError(
            f"{path} has no checksum manifests ({MANIFEST_GLOB}): it was written by an older version or "
            "they were removed, so it cannot be verified. Set --checkpoint.verify false (or pass "
            "--no-verify to export, eval and generate) to load it unchecked."
        )
    expected: dict[str, dict] = {}
    for manifest in manifests:
        try:
            with open(manifest) as f:
                entries = json.load(f)["files"]
            for name, entry in entries.items():
                expected[name] = {"bytes": int(entry["bytes"]), "crc32": str(entry["crc32"])}
        except PermissionError:
            raise _permission_error(manifest) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{manifest} is damaged ({type(e).__name__}: {e})") from None
    for name in sorted({info.relative_path for info in metadata.storage_data.values()} - set(expected)):
        raise CheckpointError(f"{os.path.join(path, name)} has no checksum in any manifest of {path}")
    checked = 0
    for name in sorted(expected)[rank::world_size]:
        file, want = os.path.join(path, name), expected[name]
        try:
            size = os.path.getsize(file)
            crc = f"{file_crc32(file):08x}" if size == want["bytes"] else None
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing (its manifest lists it)") from None
        except PermissionError:
            raise _permission_error(file) from None
        if size != want["bytes"]:
            raise CheckpointError(f"{file} is damaged: {size} bytes, {want['bytes']} when written (truncated?)")
        if crc != want["crc32"]:
            raise CheckpointError(
                f"{file} is damaged: its CRC-32 is {crc}, {want['crc32']} when written; the data changed on disk"
            )
        checked += size
    return checked


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
        self.pending: Future | None = None  # the write of the save in flight
        self.staging: Future | None = None  # its copy to host memory (pinned mode)
        self.pending_step = 0
        self.writer: ChecksummedWriter | None = None  # the writer of the save in flight
        self.protected_step: int | None = None  # a step being loaded: retention must keep it

    def _stager_for_save(self) -> DefaultStager | None:
        """The pinned-memory stager of the next save. torch 2.11's DefaultStager fails on its second
        save (it clears its copy table after the first), so before 2.12 each save gets a fresh one;
        later versions keep one, and with it the pinned buffers, for the whole run."""
        if self.async_mode != "async_with_pinned_mem":
            return None
        if self.stager is not None and _TORCH_VERSION >= (2, 12):
            return self.stager
        if self.stager is not None:
            self.stager.close()
        self.stager = DefaultStager(StagingOptions(
            use_pinned_memory=True, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=True
        ))
        return self.stager

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step}")

    def maybe_resume(self, train_state: TrainState) -> bool:
        """Restore the chosen checkpoint of this run folder, or the initial model weights.

        Returns True when training resumes from a checkpoint of this run.
        """
        if not self.cfg.enable or self.cfg.load_step == 0:
            # No checkpoint of this run is read, but the initial weights still are: silently
            # starting from random weights would be the wrong run.
            if self.cfg.initial_load_path:
                self.load_model_only(self.cfg.initial_load_path)
            return False
        complete, incomplete, unreadable = scan_checkpoints(self.folder)
        for step in incomplete:
            logger.warning("ignoring incomplete checkpoint %s (no .metadata: its save did not finish)", self.path(step))
        if unreadable and (not complete or unreadable[-1] > complete[-1] or self.cfg.load_step in unreadable):
            # It may be the newest checkpoint: resuming an older one would later overwrite it.
            raise _permission_error(self.path(unreadable[-1]))
        for step in unreadable:
            logger.warning("%s; it is older than the checkpoint resumed and is left alone", _permission_error(self.path(step)))
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
            step = self._newest_verified(complete)
        else:
            if self.cfg.initial_load_path:
                self.load_model_only(self.cfg.initial_load_path)
            return False
        self.load(step, train_state)
        return True

    def _newest_verified(self, complete: list[int]) -> int:
        """The newest complete checkpoint whose files match their checksums. Newer ones that do
        not are renamed step-<N>.corrupt (kept for inspection, out of the way of retention and of
        the saves that will reach their step again)."""
        if not self.cfg.verify:
            return complete[-1]
        failed = []
        for step in reversed(complete):
            try:
                self.verify(step)
            except CheckpointError as e:
                failed.append((step, str(e)))
                continue
            for bad, problem in failed:
                moved = self._set_aside(bad)
                logger.warning("%s; moved to %s and falling back to step %d", problem, moved, step)
            return step
        raise CheckpointError(
            f"no checkpoint in {self.folder} verifies against its checksums: "
            + "; ".join(problem for _, problem in failed)
            + ". Nothing was loaded or changed; restore the damaged files, move the folders away to "
            "start over, or set --checkpoint.verify false to load the newest one unchecked."
        )

    def _set_aside(self, step: int) -> str:
        moved = base = self.path(step) + ".corrupt"
        n = 1
        while os.path.exists(moved):
            n += 1
            moved = f"{base}{n}"
        dist.barrier()  # every rank has finished reading it
        if self.rank == 0:
            os.rename(self.path(step), moved)
        dist.barrier()
        return moved

    def verify(self, step: int) -> None:
        self.verify_path(self.path(step))

    def verify_path(self, path: str) -> None:
        """Check a step folder against its checksums, the files split over the ranks (collective).
        Raises the same CheckpointError on every rank if any file does not match."""
        begin = time.perf_counter()
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        problem, checked = "", 0
        try:
            checked = verify_checkpoint(path, self.rank, world_size)
        except CheckpointError as e:
            problem = str(e)
        if world_size > 1:
            problems: list = [None] * world_size
            dist.all_gather_object(problems, problem)
            problem = next((p for p in problems if p), "")
        if problem:
            raise CheckpointError(problem)
        logger.info("verified %s against its checksums (%.2f GB on this rank) in %.1fs",
                    path, checked / 1e9, time.perf_counter() - begin)

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
        if self.cfg.verify:
            try:
                self.verify_path(path)
            except CheckpointError as e:
                raise CheckpointError(f"checkpoint.initial_load_path: {e}") from None
        _checked_load({"model": self.states["model"]}, path)
        logger.info("initialised model weights from %s", path)

    def save(self, step: int) -> float:
        """Save (or start saving) step `step`; returns the seconds training was blocked.

        A failure raises CheckpointError naming the step, the folder and the cause; an async save
        that fails later is reported by `raise_if_failed` at the next step boundary.
        """
        begin = time.perf_counter()
        self.wait()  # one save in flight at a time
        path = self.path(step)
        if self.rank == 0 and os.path.isdir(path):
            if _folder_state(path) == "unreadable":
                raise _permission_error(path)
            # The remains of a killed save, or (after a rewind) an older save of this step:
            # unmark it first, so that no crash in between leaves a "complete" mix of two saves.
            try:
                if is_complete(path):
                    os.remove(os.path.join(path, ".metadata"))
                shutil.rmtree(path)
            except OSError as e:
                raise CheckpointError(f"cannot replace the old {path} before saving step {step}: {e}") from None
        dist.barrier()
        self.pending_step = step
        self.writer = ChecksummedWriter(path)
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

    def _save_failed(self, error: BaseException) -> CheckpointError:
        self.pending = self.staging = None
        path = self.path(self.pending_step)
        older = [s for s in list_checkpoints(self.folder)[0] if s != self.pending_step]
        return CheckpointError(
            f"saving the checkpoint of step {self.pending_step} to {path} failed: {describe_save_failure(error, path)}. "
            f"Every older checkpoint is kept ({', '.join(map(str, older)) or 'none yet'}); the incomplete {path} "
            "is never loaded. Fix the cause, then rerun the same command to resume"
            + (f" from step {older[-1]}." if older else ".")
        )

    def raise_if_failed(self) -> None:
        """At a step boundary: a background save that has failed stops the run now, not at the
        next save; one that has succeeded is finished (retention, tokenizer copy). Never blocks."""
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
            if self.tokenizer_path:
                # A step folder is then all that evaluation and export need.
                shutil.copyfile(self.tokenizer_path, os.path.join(path, TOKENIZER_FILE))
            self._purge()
        writer = self.writer
        logger.info("checkpoint %s complete (checksums of %.2f GB on this rank: %.2fs%s)", path,
                    writer.checksum_bytes / 1e9, writer.checksum_seconds,
                    "" if self.async_mode == "disabled" else ", in the background")

    def _purge(self) -> None:
        """Delete the oldest complete checkpoints beyond keep_latest_k. It runs only after a save
        completed, so the newest complete checkpoint is always kept and none is in flight; a step
        being loaded and unreadable folders are never deleted."""
        if self.cfg.keep_latest_k == 0:
            return
        complete, _ = list_checkpoints(self.folder)
        for step in complete[: -self.cfg.keep_latest_k]:
            if step == self.protected_step:
                continue
            path = self.path(step)
            try:
                os.remove(os.path.join(path, ".metadata"))  # unmarked first: never a "complete" half
                shutil.rmtree(path)
            except OSError as e:
                logger.warning("retention could not delete %s: %s", path, e)

    def close(self) -> None:
        self.wait()
        if self.stager is not None:
            self.stager.close()
            self.stager = None


def describe_save_failure(error: BaseException, path: str) -> str:
    """The cause of a failed save in words: the first OS error found in DCP's per-rank failures
    and exception chains, with ENOSPC and friends spelled out."""
    causes, seen = [], set()
    stack = [error]
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        causes.append(e)
        if isinstance(e, CheckpointException):
            for rank, failure in sorted(e.failures.items()):
                exc = failure[0] if isinstance(failure, tuple) else failure
                if exc is not None:
                    exc._failed_rank = rank  # noqa: SLF001  (for the message only)
                    stack.append(exc)
        stack += [e.__cause__, e.__context__]
    root = next((c for c in causes if isinstance(c, OSError) and c.errno), None)
    if root is None:
        root = next((c for c in causes if not isinstance(c, CheckpointException)), error)
    rank = getattr(root, "_failed_rank", None)
    where = f" on rank {rank}" if rank is not None else ""
    if isinstance(root, OSError) and root.errno:
        return f"{os.strerror(root.errno)}{where} ({type(root).__name__}: {root})"
    text = f"{type(root).__name__}{where}: {str(root).strip()[:500]}"
    # torch's zip writer loses errno ("unexpected pos", "file write failed"): a full file
    # system is the usual cause, so look.
    try:
        usage = shutil.disk_usage(os.path.dirname(path.rstrip("/")) or ".")
    except OSError:
        return text
    if usage.free < max(64 << 20, usage.total // 200):
        return (f"{os.strerror(errno.ENOSPC)}{where}: the file system holding {path} has {usage.free:,} bytes "
                f"free ({text})")
    return text


def _find_checkpoint_error(error: BaseException) -> CheckpointError | None:
    """A CheckpointError of ours (e.g. a refused value) that DCP wrapped into a CheckpointException."""
    if isinstance(error, CheckpointError):
        return error
    if isinstance(error, CheckpointException):
        for failure in error.failures.values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            found = _find_checkpoint_error(exc) if exc is not None else None
            if found is not None:
                return found
    for nested in (error.__cause__, error.__context__):
        if nested is not None and nested is not error:
            found = _find_checkpoint_error(nested)
            if found is not None:
                return found
    return None


def has_unfused_projections(path: str) -> bool:
    """Whether a checkpoint holds separate wq/wk/wv and w1/w3 weights: the layout of checkpoints
    written before the blocks fused them into wqkv and w13."""
    try:
        return _is_unfused(read_metadata(path))
    except CheckpointError:  # unreadable or refused metadata is reported by the load itself
        return False


def _is_unfused(metadata: Metadata) -> bool:
    return any(k.startswith("model.") and k.endswith(".attention.wq.weight") for k in metadata.state_dict_metadata)


def _checked_load(states: dict, path: str) -> None:
    """dcp.load inside a process group or in a lone process (eval, export), through the reader
    and planner that run no code from the folder, reporting a damaged checkpoint as such."""
    # Read here, once: inside dcp.load, DCP would fold our refusal into an error of its own.
    metadata = read_metadata(path)
    if isinstance(states.get("model"), ModelState) and _is_unfused(metadata):
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
    reader, planner = SafeFileSystemReader(path, metadata), SafeLoadPlanner(path)
    try:
        if dist.is_initialized():
            dcp.load(states, storage_reader=reader, planner=planner)
        else:
            with warnings.catch_warnings():  # DCP warns that it assumes a single process
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(states, storage_reader=reader, planner=planner, no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        ours = _find_checkpoint_error(e)
        if ours is not None:
            raise CheckpointError(str(ours)) from None
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


def load_model_from_checkpoint(path: str, device: str | torch.device = "cpu", verify: bool = True) -> MobileLLM:
    """A plain (unsharded, fp32) MobileLLM with the weights of a DCP checkpoint step folder, on
    one process: for evaluation, generation and export. `verify` checks the files against their
    checksums first."""
    if verify and is_complete(path):
        verify_checkpoint(path)
    args = read_model_args(path)
    with torch.device("meta"):
        model = MobileLLM(args)
    model.to_empty(device=device)
    model.init_weights()  # RoPE tables; every weight is overwritten below
    state = model.state_dict()
    if args.tie_embeddings:
        state.pop("output.weight")  # stored once, as the embedding
    # The state dict's tensors share the parameters' memory and DCP loads into them in place, so
    # an older checkpoint with separate q/k/v and gate/up weights loads through views of the
    # fused weights: exact, with no copy.
    target = unfuse_projections(state, args) if has_unfused_projections(path) else state
    _checked_load({"model": target}, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"output.weight"} if args.tie_embeddings else set()):
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    return model.eval()
