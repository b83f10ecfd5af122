"""Reading a checkpoint without running code from it: the `.metadata` index and stored values.

DCP's own reader unpickles `.metadata` and every non-tensor value unrestricted, so a crafted
checkpoint could run anything on load. Here `.metadata` (`read_metadata`) is size-checked, its
opcodes scanned without building anything (nesting depth; changes only to fresh instances, never
to a class or a constant), unpickled by an unpickler that accepts only DCP's metadata classes,
and rebuilt field by field as fresh DCP objects; stored values go through
`torch.load(weights_only=True)` (`SafeLoadPlanner`). Kept apart from the rest of checkpointing
because this is the security boundary: what may be unpickled is decided here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import os
import pathlib
import pickle
import pickletools
import stat

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from mobilellm_train.checkpoint.folders import permission_error
from mobilellm_train.errors import CheckpointError

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


# Bounds on `.metadata`: a real index grows with tensors x ranks (measured 2026-12-03: 17 KB for
# the tests' 2-layer model with AdamW on one rank; 8.1 MB for 900 sharded tensors on 64 ranks) and
# nests 11 deep in both. Deep nesting crashes the interpreter in C code that recurses (hashing,
# comparing, freeing), so it is refused before anything is built.
METADATA_MAX_BYTES = 1 << 30
METADATA_MAX_DEPTH = 64

_MARK = object()


class _Node:
    """What the scan knows of one object the unpickler would build: how deep it nests, where it
    came from ("atom", "global", "new": a NEWOBJ instance, "made": a call's result, "container")
    and whether it is already inside another object (then it may no longer change)."""

    __slots__ = ("depth", "kind", "sealed")

    def __init__(self, depth: int, kind: str):
        self.depth, self.kind, self.sealed = depth, kind, False


_ATOM = _Node(0, "atom")  # scalars: never changed, so one node serves them all
_GLOBAL = _Node(0, "global")

# Opcode name -> what the scan does with it (one dict lookup per opcode, not a chain of tests).
_ACTIONS = {name: "atom" for name in (
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT",
    "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "BINUNICODE8",
    "SHORT_BINUNICODE", "BINBYTES", "BINBYTES8", "SHORT_BINBYTES", "BYTEARRAY8",
)} | {name: "memo" for name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT")} | {
    name: "get" for name in ("GET", "BINGET", "LONG_BINGET")} | {
    name: "skip" for name in ("PROTO", "FRAME")} | {
    name: "empty" for name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET")} | {
    "TUPLE1": "tuple", "TUPLE2": "tuple", "TUPLE3": "tuple", "TUPLE": "marked tuple", "FROZENSET": "marked tuple",
    "LIST": "marked container", "DICT": "marked container", "EMPTY_TUPLE": "empty tuple",
    "APPEND": "add", "SETITEM": "add", "APPENDS": "marked add", "SETITEMS": "marked add", "ADDITEMS": "marked add",
    "MARK": "mark", "POP": "pop", "POP_MARK": "pop mark", "DUP": "dup", "BUILD": "build",
    "GLOBAL": "global", "STACK_GLOBAL": "global", "REDUCE": "call", "NEWOBJ": "call", "NEWOBJ_EX": "call",
    "STOP": "stop",
}  # anything else (PERSID, EXT*, INST, OBJ, buffers): nothing DCP writes, refused


def _contain(items: list, kind: str, max_depth: int) -> _Node:
    depth = 0
    for item in items:
        if item is _MARK:
            raise pickle.UnpicklingError("unbalanced MARK")
        item.sealed = True
        if item.depth > depth:
            depth = item.depth
    if depth >= max_depth:
        raise pickle.UnpicklingError(f"objects nested more than {max_depth} deep")
    return _Node(depth + 1, kind)


def _mutate(target, items: list, max_depth: int) -> None:
    """APPEND, SETITEM, ADDITEMS, BUILD: allowed only on an object nothing holds yet, so no later
    change can deepen an object already counted, and no object can come to contain itself."""
    if not isinstance(target, _Node) or target.sealed or target.kind in ("atom", "global"):
        raise pickle.UnpicklingError("the pickle changes an object after using it, or changes a class or a constant")
    if target in items:  # _Node compares by identity
        raise pickle.UnpicklingError("the pickle makes an object contain itself")
    target.depth = max(target.depth, _contain(items, "", max_depth).depth)


def _pop_mark(stack: list) -> list:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1:]
            del stack[i:]
            return items
    raise pickle.UnpicklingError("unbalanced MARK")


def _pop(stack: list, n: int) -> list:
    if len(stack) < n:
        raise pickle.UnpicklingError("stack underflow")
    items = stack[len(stack) - n:]
    del stack[len(stack) - n:]
    if _MARK in items:
        raise pickle.UnpicklingError("unbalanced MARK")
    return items


def scan_pickle(data: bytes, max_depth: int = METADATA_MAX_DEPTH) -> None:
    """Check, without building anything, that `data` is a pickle of plain nesting at most
    `max_depth` deep that calls only what it looks up by name (checked by find_class) and that
    changes only fresh instances: never a class, a constant, or an object it has already used.
    Raises pickle.UnpicklingError."""
    stack: list = []
    memo: dict = {}
    for opcode, arg, _ in pickletools.genops(data):
        action = _ACTIONS.get(opcode.name)
        if action == "memo":
            if not stack or stack[-1] is _MARK:
                raise pickle.UnpicklingError("memoizing nothing")
            if arg is not None and not 0 <= arg <= len(memo):  # the unpickler sizes its memo by the index
                raise pickle.UnpicklingError(f"memo index {arg} out of sequence")
            memo[len(memo) if arg is None else arg] = stack[-1]
        elif action == "get":
            if arg not in memo:
                raise pickle.UnpicklingError(f"memo key {arg} missing")
            stack.append(memo[arg])
        elif action == "atom":
            stack.append(_ATOM)
        elif action == "mark":
            stack.append(_MARK)
        elif action == "skip":
            continue
        elif action == "empty":
            stack.append(_Node(1, "container"))
        elif action == "empty tuple":
            stack.append(_Node(1, "atom"))
        elif action == "tuple":
            stack.append(_contain(_pop(stack, int(opcode.name[-1])), "atom", max_depth))
        elif action == "marked tuple":
            stack.append(_contain(_pop_mark(stack), "atom", max_depth))
        elif action == "marked container":
            stack.append(_contain(_pop_mark(stack), "container", max_depth))
        elif action in ("add", "marked add"):
            items = _pop(stack, 2 if opcode.name == "SETITEM" else 1) if action == "add" else _pop_mark(stack)
            _mutate(stack[-1] if stack else None, items, max_depth)
        elif action == "build":
            state = _pop(stack, 1)
            target = stack[-1] if stack else None
            if not isinstance(target, _Node) or target.kind != "new":
                raise pickle.UnpicklingError("BUILD of something other than a new instance (a class, a constant)")
            _mutate(target, state, max_depth)
        elif action == "global":
            if opcode.name == "STACK_GLOBAL":
                _pop(stack, 2)
            stack.append(_GLOBAL)
        elif action == "call":
            parts = _pop(stack, 3 if opcode.name == "NEWOBJ_EX" else 2)
            if parts[0] is not _GLOBAL:
                raise pickle.UnpicklingError(f"{opcode.name} of something not looked up by name")
            stack.append(_contain(parts[1:], "made" if opcode.name == "REDUCE" else "new", max_depth))
        elif action == "pop":
            _pop(stack, 1) if stack and stack[-1] is not _MARK else _pop_mark(stack)
        elif action == "pop mark":
            _pop_mark(stack)
        elif action == "dup":
            stack.append(_pop(stack, 1)[0])
            stack.append(stack[-1])
        elif action == "stop":
            break
        else:
            raise pickle.UnpicklingError(f"opcode {opcode.name} is not used by checkpoint indexes")
    else:
        raise pickle.UnpicklingError("no STOP opcode")
    if len(stack) != 1 or stack[0] is _MARK:
        raise pickle.UnpicklingError("the pickle does not end with exactly one object")


# --- The index rebuilt as plain instances of DCP's classes. A pickle that passed the scan and the
# unpickler's name check can still give an instance extra attributes, a class in the wrong place
# or a value of the wrong kind; everything DCP later reads from the index is therefore copied,
# field by field, into fresh objects, and anything else is refused (ValueError).

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


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")


_SCANNED: dict[bytes, None] = {}  # SHA-256 of index bytes that passed the scan


def _read_bounded(file: str) -> bytes:
    """The bytes of a regular file of the step folder, never through a symlink, size checked
    before reading (a device or a huge file would read forever)."""
    fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{file} is not a regular file; it was not read")
        if st.st_size > METADATA_MAX_BYTES:
            raise CheckpointError(f"{file} is {st.st_size:,} bytes, more than any checkpoint index "
                                  f"({METADATA_MAX_BYTES:,}); it was not read")
        return f.read(METADATA_MAX_BYTES + 1)


def read_metadata(path: str) -> Metadata:
    """The DCP index `<path>/.metadata`, unpickled without running anything from it, rebuilt as
    plain instances of DCP's classes holding only their declared fields."""
    file = os.path.join(path, ".metadata")
    try:
        if os.path.islink(file):
            raise CheckpointError(f"{file} is a symbolic link; links inside a step folder are not followed")
        data = _read_bounded(file)
        key = hashlib.sha256(data).digest()  # not a CRC: a crafted file could match one
        if key not in _SCANNED:  # a load reads the index 3 times: scan the same bytes once
            scan_pickle(data)
            _SCANNED[key] = None
            while len(_SCANNED) > 64:
                del _SCANNED[next(iter(_SCANNED))]
        loaded = _MetadataUnpickler(io.BytesIO(data)).load()
        metadata = rebuild_metadata(loaded)
    except CheckpointError:
        raise
    except PermissionError:
        raise permission_error(file) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{file} is a symbolic link; links inside a step folder are not followed") from None
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {e})") from None
    except Exception as e:  # a crafted or damaged pickle raises nearly anything
        raise CheckpointError(
            f"{file} is not a valid checkpoint index ({type(e).__name__}: {str(e)[:300]}); it was refused "
            "unread, because only checkpoint metadata types are accepted (unpickling anything else can "
            "run code). The folder is damaged or was not written by DCP."
        ) from None
    names = set()
    for info in metadata.storage_data.values():
        name = info.relative_path
        # Data files sit beside .metadata: a path elsewhere would read files outside the folder.
        if name != os.path.basename(name) or name.startswith(".") or not name:
            raise CheckpointError(f"{file} names the data file {name!r}, which is not a file of this folder")
        names.add(name)
    for name in sorted(names):
        if os.path.islink(os.path.join(path, name)):
            raise CheckpointError(f"{os.path.join(path, name)} is a symbolic link; links inside a step folder "
                                  "are not followed")
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
