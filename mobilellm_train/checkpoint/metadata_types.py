"""DCP's checkpoint index rebuilt as plain instances of its classes, holding only their declared
fields with values of the declared kinds.

The restricted unpickler (safe_load.py) decides which classes a `.metadata` pickle may name; a
pickle can still give an instance extra attributes, a class in the wrong place or a value of the
wrong kind. Everything DCP later reads from the index is therefore copied here, field by field,
into fresh objects, and anything else is refused (ValueError, reported by the caller with the
file's name). Used by `safe_load.read_metadata` only.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

_SCALARS = (str, int, float, bool, type(None), bytes)


def _fields(obj, cls, where: str) -> dict:
    """The fields an unpickled `cls` instance holds, none of them undeclared."""
    if type(obj) is not cls:
        raise ValueError(f"{where} is a {type(obj).__name__}, not a {cls.__name__}")
    state = vars(obj)
    unknown = set(state) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{where} ({cls.__name__}) has undeclared fields {sorted(map(repr, unknown))[:5]}")
    return dict(state)


def _plain(x, where: str):
    """Plain data (scalars, tuples, lists, dicts, torch.Size, paths) copied into fresh objects."""
    if type(x) in _SCALARS:
        return x
    if type(x) is torch.Size:
        return torch.Size(_int(i, where) for i in x)
    if type(x) in (tuple, list):
        return type(x)(_plain(i, where) for i in x)
    if type(x) in (set, frozenset):
        return type(x)(_plain(i, where) for i in x)
    if type(x) is dict:
        return {_plain(k, where): _plain(v, where) for k, v in x.items()}
    if isinstance(x, pathlib.PurePath):
        return os.fspath(x)
    raise ValueError(f"{where} holds a {type(x).__name__}")


def _int(x, where: str) -> int:
    if type(x) is not int:
        raise ValueError(f"{where} holds a {type(x).__name__} where an integer belongs")
    return x


def _str(x, where: str) -> str:
    if type(x) is not str:
        raise ValueError(f"{where} holds a {type(x).__name__} where a string belongs")
    return x


def _optional(check):
    return lambda x, where: None if x is None else check(x, where)


def _size(x, where: str) -> torch.Size:
    if type(x) is not torch.Size:
        raise ValueError(f"{where} holds a {type(x).__name__} where a torch.Size belongs")
    return _plain(x, where)


def _of_kind(kind):
    def check(x, where: str):
        if not isinstance(x, kind):
            raise ValueError(f"{where} holds a {type(x).__name__} where a {kind.__name__} belongs")
        return x
    return check


def _bool(x, where: str) -> bool:
    if type(x) is not bool:
        raise ValueError(f"{where} holds a {type(x).__name__} where a bool belongs")
    return x


def _instance(obj, cls, where: str, checks: dict):
    """A fresh `cls` from the declared fields of `obj`, each through its check (plain data for
    fields without one)."""
    fields = _fields(obj, cls, where)
    return cls(**{k: checks.get(k, _plain)(v, f"{where}.{k}") for k, v in fields.items()})


def _chunk(x, where: str) -> ChunkStorageMetadata:
    return _instance(x, ChunkStorageMetadata, where, {"offsets": _size, "sizes": _size})


def _properties(x, where: str) -> TensorProperties:
    return _instance(x, TensorProperties, where, {
        "dtype": _of_kind(torch.dtype), "layout": _of_kind(torch.layout),
        "memory_format": _of_kind(torch.memory_format), "requires_grad": _bool, "pin_memory": _bool,
    })


def _chunks(x, where: str) -> list:
    if type(x) is not list:
        raise ValueError(f"{where} holds a {type(x).__name__} where a list of chunks belongs")
    return [_chunk(c, f"{where}[{i}]") for i, c in enumerate(x)]


def _storage_metadata(x, where: str):
    if type(x) is BytesStorageMetadata:
        return _instance(x, BytesStorageMetadata, where, {})
    return _instance(x, TensorStorageMetadata, where, {"properties": _properties, "size": _size, "chunks": _chunks})


def _index(x, where: str) -> MetadataIndex:
    fields = _fields(x, MetadataIndex, where)
    return MetadataIndex(_str(fields.get("fqn"), f"{where}.fqn"), _optional(_size)(fields.get("offset"), where),
                         _optional(_int)(fields.get("index"), where))


def _storage_info(x, where: str) -> _StorageInfo:
    info = _instance(x, _StorageInfo, where, {"relative_path": _str, "offset": _int, "length": _int})
    if info.offset < 0 or info.length < 0:
        raise ValueError(f"{where} has a negative offset or length")
    return info


def _mapping(x, where: str, key, value) -> dict:
    if type(x) is not dict:
        raise ValueError(f"{where} holds a {type(x).__name__} where a dict belongs")
    return {key(k, f"{where} key"): value(v, f"{where}[{k!r:.80}]") for k, v in x.items()}


def rebuild_metadata(loaded) -> Metadata:
    """A fresh Metadata holding exactly what the unpickled `loaded` declares; ValueError if it
    holds anything else."""
    return _instance(loaded, Metadata, "the index", {
        "state_dict_metadata": lambda x, w: _mapping(x, w, _str, _storage_metadata),
        "storage_data": lambda x, w: _mapping(x, w, _index, _storage_info),
        "storage_meta": _optional(lambda x, w: _instance(x, StorageMeta, w, {})),
    })
