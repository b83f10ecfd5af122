"""The Stateful wrappers a checkpoint holds: train state, model, optimizer, lr schedule, and the
per-rank states (data position, RNG) stored as tagged JSON.

Each wrapper says how one part of the run becomes a state dict and back; DCP and the
checkpointer only move those dicts. Separate so a new piece of run state is added here without
reading how checkpoints are written, verified or retained. Per-rank state is JSON, not pickle:
loading a checkpoint must not run code from it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import numbers
import random
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from mobilellm_train.errors import CheckpointError, parse_json
from mobilellm_train.hf import MAX_DIM, MAX_LAYERS, MAX_POSITIONS, MAX_ROPE_ELEMENTS, MAX_VOCAB
from mobilellm_train.model import ModelArgs


@dataclass
class TrainState(Stateful):
    """Where training stands, plus what a checkpoint must match to be resumed."""

    step: int = 0
    tokens_seen: int = 0
    dp_world_size: int = 1
    model_args: str = ""
    """The model's fields as JSON (one value, so DCP stores it as one item)."""
    config: str = ""
    """The run's effective config as TOML (config.to_toml) when the step was trained: what a
    resume compares its own config with (run_config.py). Empty in checkpoints that predate it."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Each value checked before it is kept: a damaged or crafted train state must not hand the
        run a step that is a string, no ranks, or a model shape nothing can build (CheckpointError
        naming the key)."""
        kinds = {f.name: {"int": int, "str": str}.get(f.type) for f in dataclasses.fields(self)}
        for key, value in state_dict.items():
            kind, least = kinds.get(key), 1 if key == "dp_world_size" else 0
            if kind is not None and (type(value) is not kind or kind is int and value < least):
                raise CheckpointError(f"the train state's {key} is {value!r:.100}, not a "
                                      f"{'count' if kind is int else 'string'}; the checkpoint is damaged")
            if key == "model_args" and value:
                model_args_from_json(value)
            setattr(self, key, value)


# The shape a checkpoint records is held to the ceilings of a Hugging Face config.json (hf.py):
# export, eval and generate build the model from it before any weight is read.
_MODEL_ARGS_LIMITS = {"dim": MAX_DIM, "n_layers": MAX_LAYERS, "n_heads": MAX_DIM, "n_kv_heads": MAX_DIM,
                      "ffn_dim": MAX_DIM, "vocab_size": MAX_VOCAB, "max_seq_len": MAX_POSITIONS}


def model_args_from_json(text: str) -> ModelArgs:
    """The ModelArgs of a train state's model_args (JSON), every key known, of its field's type,
    sizes from 1 to their ceiling, floats finite and positive; CheckpointError naming the key."""
    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"the train state's model_args {why}; the checkpoint is damaged or was not written "
                               "by this trainer")

    try:
        fields = parse_json(text)
    except ValueError as e:
        raise refuse(f"is not JSON ({str(e)[:200]})") from None
    if not isinstance(fields, dict):
        raise refuse(f"is a JSON {type(fields).__name__}, not an object")
    kinds = {f.name: f.type for f in dataclasses.fields(ModelArgs)}
    for key, value in fields.items():
        kind = kinds.get(key)
        if kind is None:
            raise refuse(f"has the key {key[:100]!r}, which is not a field of the model")
        if kind == "bool":
            ok = type(value) is bool
        elif kind == "float":
            ok = type(value) in (int, float) and 0 < value < math.inf
        elif kind == "int":
            ok = type(value) is int and 1 <= value <= _MODEL_ARGS_LIMITS.get(key, 1 << 31)
        else:  # a field of another kind: a plain JSON scalar, checked by ModelArgs itself
            ok = isinstance(value, (str, int, float)) and len(str(value)) <= 1000
        if not ok:
            limit = (f"an integer from 1 to {_MODEL_ARGS_LIMITS.get(key, 1 << 31)}" if kind == "int" else
                     "a finite positive number" if kind == "float" else "true or false")
            raise refuse(f"{key} = {value!r:.100}; expected {limit} (the ceilings of a Hugging Face config.json)")
    try:
        args = ModelArgs(**fields)
    except (ValueError, TypeError) as e:
        raise refuse(f"describe no model ({str(e)[:200]})") from None
    if args.max_seq_len * args.head_dim > MAX_ROPE_ELEMENTS:
        raise refuse(f"max_seq_len {args.max_seq_len} x head_dim {args.head_dim} exceeds {MAX_ROPE_ELEMENTS} "
                     "(rotary tables of over 1 GiB)")
    return args


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
    return _decode(parse_json(text))  # nesting bounded: _decode recurses


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
