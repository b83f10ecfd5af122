"""Reading a checkpoint without running code from it: the `.metadata` index and stored values.

DCP's own reader unpickles `.metadata` and every non-tensor value unrestricted, so a crafted
checkpoint could run anything on load. Here `.metadata` (`read_metadata`) is size-checked, its
opcodes scanned without building anything (nesting depth, entries per container, string keys;
NEWOBJ only of DCP's classes; changes only to fresh instances, never to a class, a constant or an
enum member), unpickled by an unpickler that accepts only DCP's metadata classes (enums as a
lookup by value), and rebuilt field by field as fresh DCP objects, sizes and offsets checked
against their tensors and storage transforms refused; stored values go through
`torch.load(weights_only=True)` (`SafeLoadPlanner`). Kept apart from the rest of checkpointing
because this is the security boundary: what may be unpickled is decided here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import io
import math
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
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    (_METADATA_MODULE, name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "_MEM_FORMAT_ENCODING", "StorageMeta", "MetadataIndex",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name in torch's namespace
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}
# The classes DCP builds with NEWOBJ (then BUILD): its dataclasses. Nothing else is made that way;
# in particular an enum is only ever looked up by value (NEWOBJ on an enum class returns the
# shared member, and the BUILD after it would rewrite that member for the whole process).
_NEW_CLASSES = {f"{_METADATA_MODULE} {name}" for name in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "StorageMeta", "MetadataIndex",
)} | {"torch.distributed.checkpoint.filesystem _StorageInfo"}
_INDEX_CLASS = f"{_METADATA_MODULE} MetadataIndex"
_ORDERED_DICT = "collections OrderedDict"


# Bounds on `.metadata`: a real index grows with tensors x ranks (measured 2026-12-03: 17 KB for
# the tests' 2-layer model with AdamW on one rank; 8.1 MB for 900 sharded tensors on 64 ranks) and
# nests 11 deep in both. Deep nesting crashes the interpreter in C code that recurses (hashing,
# comparing, freeing), so it is refused before anything is built. Its largest container,
# storage_data, holds one entry per stored chunk: tensors x ranks, 57,600 in that 64-rank index.
METADATA_MAX_BYTES = 1 << 30
METADATA_MAX_DEPTH = 64
METADATA_MAX_ENTRIES = 1 << 22  # per list, dict, set or tuple
# A stored tensor's elements (offsets are checked to lie inside it): 1.5B parameters is 2^31.
METADATA_MAX_ELEMENTS = 1 << 40

_MARK = object()


class _Node:
    """What the scan knows of one object the unpickler would build: how deep it nests, where it
    came from ("atom": a constant or a value looked up or made, never changed; "str"; "global";
    "new": a NEWOBJ instance; "list", "dict", "set": fresh containers), its name (a string's value,
    a global's "module name", the class of a "new" one), its entries, and whether it is already
    inside another object (then it may no longer change)."""

    __slots__ = ("depth", "kind", "name", "entries", "sealed")

    def __init__(self, depth: int, kind: str, name: str = "", entries: int = 0):
        self.depth, self.kind, self.name, self.entries, self.sealed = depth, kind, name, entries, False


_ATOM = _Node(0, "atom")  # scalars other than strings: never changed, so one node serves them all

# Opcode name -> what the scan does with it (one dict lookup per opcode, not a chain of tests).
_ACTIONS = {name: "atom" for name in (
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT",
    "BINFLOAT", "BINBYTES", "BINBYTES8", "SHORT_BINBYTES", "BYTEARRAY8",
)} | {name: "str" for name in (
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINUNICODE",
)} | {name: "memo" for name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT")} | {
    name: "get" for name in ("GET", "BINGET", "LONG_BINGET")} | {
    name: "skip" for name in ("PROTO", "FRAME")} | {
    "EMPTY_LIST": "empty", "EMPTY_DICT": "empty", "EMPTY_SET": "empty",
    "TUPLE1": "tuple", "TUPLE2": "tuple", "TUPLE3": "tuple", "TUPLE": "marked tuple", "FROZENSET": "marked tuple",
    "LIST": "marked container", "DICT": "marked container", "EMPTY_TUPLE": "empty tuple",
    "APPEND": "add", "SETITEM": "add", "APPENDS": "marked add", "SETITEMS": "marked add", "ADDITEMS": "marked add",
    "MARK": "mark", "POP": "pop", "POP_MARK": "pop mark", "DUP": "dup", "BUILD": "build",
    "GLOBAL": "global", "STACK_GLOBAL": "global", "REDUCE": "call", "NEWOBJ": "call", "NEWOBJ_EX": "call",
    "STOP": "stop",
}  # anything else (PERSID, EXT*, INST, OBJ, buffers): nothing DCP writes, refused
_CONTAINER_OF = {"EMPTY_LIST": "list", "LIST": "list", "EMPTY_DICT": "dict", "DICT": "dict", "EMPTY_SET": "set"}
_ADDS_TO = {"APPEND": "list", "APPENDS": "list", "SETITEM": "dict", "SETITEMS": "dict", "ADDITEMS": "set",
            "DICT": "dict", "FROZENSET": "set"}


def _check_keys(opcode: str, items: list) -> None:
    """Dict keys and set members are what DCP writes: strings, or MetadataIndex instances as the
    keys of storage_data (whose hash the unpickler cannot be made to compute, see _IndexKey). Any
    other key could be one of many of equal hash, which a dict inserts in quadratic time."""
    kind = _ADDS_TO.get(opcode)
    if kind not in ("dict", "set"):
        return
    keys = items[::2] if kind == "dict" else items
    for key in keys:
        if key.kind != "str" and not (key.kind == "new" and key.name == _INDEX_CLASS):
            raise pickle.UnpicklingError(f"{opcode} with a key or member that is not a string (DCP writes none)")


def _contain(items: list, kind: str, max_depth: int, name: str = "") -> _Node:
    """The node of an object made of `items` (sealed by it); a dict's entries are its pairs."""
    depth = 0
    for item in items:
        if item is _MARK:
            raise pickle.UnpicklingError("unbalanced MARK")
        item.sealed = True
        if item.depth > depth:
            depth = item.depth
    if depth >= max_depth:
        raise pickle.UnpicklingError(f"objects nested more than {max_depth} deep")
    entries = len(items) // 2 if kind == "dict" else len(items)
    if entries > METADATA_MAX_ENTRIES:
        raise pickle.UnpicklingError(f"a container of more than {METADATA_MAX_ENTRIES:,} entries")
    return _Node(depth + 1, kind, name, entries)


def _mutate(target, items: list, max_depth: int, kind: str) -> None:
    """APPEND, SETITEM, ADDITEMS (to a fresh container of `kind`), BUILD (to a fresh NEWOBJ
    instance): allowed only on an object nothing holds yet, so no later change can deepen an
    object already counted, and no object can come to contain itself."""
    if not isinstance(target, _Node) or target.sealed or target.kind != kind:
        raise pickle.UnpicklingError("the pickle changes an object after using it, or changes a class or a constant")
    if target in items:  # _Node compares by identity
        raise pickle.UnpicklingError("the pickle makes an object contain itself")
    added = _contain(items, kind, max_depth)
    target.depth = max(target.depth, added.depth)
    target.entries += added.entries
    if target.entries > METADATA_MAX_ENTRIES:
        raise pickle.UnpicklingError(f"a container of more than {METADATA_MAX_ENTRIES:,} entries")


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


def _global(opcode: str, arg, stack: list) -> _Node:
    if opcode == "GLOBAL":
        return _Node(0, "global", arg)
    module, name = _pop(stack, 2)
    if module.kind != "str" or name.kind != "str":
        raise pickle.UnpicklingError("STACK_GLOBAL of a name that is not a string")
    return _Node(0, "global", f"{module.name} {name.name}")


def _call(opcode: str, parts: list, max_depth: int) -> _Node:
    """REDUCE, NEWOBJ, NEWOBJ_EX of a global: NEWOBJ only of DCP's classes; a REDUCE's result is
    a value looked up or made (a torch.Size, a layout, an enum member) that nothing may change
    after, except an empty OrderedDict, which its SETITEMS then fill."""
    callee = parts[0]
    if callee.kind != "global":
        raise pickle.UnpicklingError(f"{opcode} of something not looked up by name")
    if opcode != "REDUCE":
        if callee.name not in _NEW_CLASSES:
            raise pickle.UnpicklingError(f"{opcode} of {callee.name!r}: only DCP's metadata classes are built that "
                                         "way (an enum or a constant never)")
        return _contain(parts[1:], "new", max_depth, callee.name)
    if callee.name == _ORDERED_DICT:
        if parts[1].kind != "empty tuple":
            raise pickle.UnpicklingError("an OrderedDict made from arguments (DCP's are filled by SETITEMS)")
        return _contain(parts[1:], "dict", max_depth)
    return _contain(parts[1:], "atom", max_depth)


def scan_pickle(data: bytes, max_depth: int = METADATA_MAX_DEPTH) -> None:
    """Check, without building anything, that `data` is a pickle of plain nesting at most
    `max_depth` deep, containers of at most METADATA_MAX_ENTRIES entries keyed by strings (or
    MetadataIndex), that calls only what it looks up by name (checked by find_class), builds
    with NEWOBJ only DCP's classes, and changes only fresh instances and containers: never a
    class, a constant, an enum member or an object it has already used. Raises
    pickle.UnpicklingError."""
    stack: list = []
    memo: dict = {}
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        action = _ACTIONS.get(name)
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
        elif action == "str":
            stack.append(_Node(0, "str", arg if type(arg) is str else ""))
        elif action == "mark":
            stack.append(_MARK)
        elif action == "skip":
            continue
        elif action == "empty":
            stack.append(_Node(1, _CONTAINER_OF[name]))
        elif action == "empty tuple":
            stack.append(_Node(1, "empty tuple"))
        elif action == "tuple":
            stack.append(_contain(_pop(stack, int(name[-1])), "atom", max_depth))
        elif action in ("marked tuple", "marked container"):
            items = _pop_mark(stack)
            _check_keys(name, items)
            stack.append(_contain(items, _CONTAINER_OF.get(name, "atom"), max_depth))
        elif action in ("add", "marked add"):
            items = _pop(stack, 2 if name == "SETITEM" else 1) if action == "add" else _pop_mark(stack)
            _check_keys(name, items)
            _mutate(stack[-1] if stack else None, items, max_depth, _ADDS_TO[name])
        elif action == "build":
            state = _pop(stack, 1)
            target = stack[-1] if stack else None
            if not isinstance(target, _Node) or target.kind != "new":
                raise pickle.UnpicklingError("BUILD of something other than a new instance (a class, a constant)")
            _mutate(target, state, max_depth, "new")
        elif action == "global":
            stack.append(_global(name, arg, stack))
        elif action == "call":
            stack.append(_call(name, _pop(stack, 3 if name == "NEWOBJ_EX" else 2), max_depth))
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
            raise pickle.UnpicklingError(f"opcode {name} is not used by checkpoint indexes")
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
    """An item of state_dict_metadata: bytes, or a tensor of at most METADATA_MAX_ELEMENTS whose
    chunks lie inside it."""
    if type(x) is BytesStorageMetadata:
        return _instance(x, BytesStorageMetadata, where, {})
    md = _instance(x, TensorStorageMetadata, where, {"properties": _properties, "size": _size, "chunks": _chunks})
    if any(n < 0 for n in md.size) or math.prod(md.size) > METADATA_MAX_ELEMENTS:
        raise ValueError(f"{where} is a tensor of size {tuple(md.size)}: more than {METADATA_MAX_ELEMENTS:,} elements "
                         "or a negative size")
    for i, chunk in enumerate(md.chunks):
        if len(chunk.offsets) != len(md.size) or len(chunk.sizes) != len(md.size) or any(
                o < 0 or n < 0 or o + n > s for o, n, s in zip(chunk.offsets, chunk.sizes, md.size)):
            raise ValueError(f"{where}.chunks[{i}] (offsets {tuple(chunk.offsets)}, sizes {tuple(chunk.sizes)}) is "
                             f"not inside the tensor of size {tuple(md.size)}")
    return md


class _IndexKey:
    """What the unpickler builds in place of a MetadataIndex (the keys of storage_data): a plain
    object hashed by identity. MetadataIndex hashes its offsets, and offsets of equal hash can be
    crafted, which would make unpickling storage_data quadratic; rebuild_metadata makes the real
    MetadataIndex once its offsets are checked to lie inside their tensor, where too few offsets
    exist for many to share a hash."""


def _index(x, where: str, items: dict) -> MetadataIndex:
    """A storage_data key as a MetadataIndex, naming an item of `items` (state_dict_metadata),
    with the offset of a point inside that tensor (none for bytes)."""
    if type(x) is not _IndexKey:
        raise ValueError(f"{where} is a {type(x).__name__}, not a MetadataIndex")
    fields = vars(x)
    unknown = set(fields) - {"fqn", "offset", "index"}
    if unknown:
        raise ValueError(f"{where} (MetadataIndex) has undeclared fields {sorted(map(repr, unknown))[:5]}")
    fqn = _str(fields.get("fqn"), f"{where}.fqn")
    offset = _optional(_size)(fields.get("offset"), f"{where}.offset")
    item = items.get(fqn)
    if item is None:
        raise ValueError(f"{where} names {fqn[:200]!r}, which state_dict_metadata does not list")
    size = getattr(item, "size", None)
    if (offset is None) != (size is None) or size is not None and (
            len(offset) != len(size) or any(not 0 <= o <= max(n - 1, 0) for o, n in zip(offset, size))):
        raise ValueError(f"{where}: the offset {offset if offset is None else tuple(offset)} of {fqn[:200]!r} is not a "
                         f"point of {'its tensor of size ' + str(tuple(size)) if size is not None else 'a bytes item'}")
    return MetadataIndex(fqn, offset, _optional(_int)(fields.get("index"), f"{where}.index"))


def _storage_info(x, where: str) -> _StorageInfo:
    info = _instance(x, _StorageInfo, where, {"relative_path": _str, "offset": _int, "length": _int})
    if info.offset < 0 or info.length < 0:
        raise ValueError(f"{where} has a negative offset or length")
    # Storage transforms (compression, ...) are DCP extensions the trainer never writes; a
    # decompressor on crafted input can expand a small slice to many GiB before anything checks it.
    if getattr(info, "transform_descriptors", None):
        raise ValueError(f"{where} asks for the storage transforms {list(info.transform_descriptors)[:5]!r}, which "
                         "this trainer never writes")
    return info


def _mapping(x, where: str, key, value) -> dict:
    if type(x) is not dict:
        raise ValueError(f"{where} holds a {type(x).__name__} where a dict belongs")
    return {key(k, f"{where} key"): value(v, f"{where}[{k!r:.80}]") for k, v in x.items()}


def rebuild_metadata(loaded) -> Metadata:
    """A fresh Metadata holding exactly what the unpickled `loaded` declares; ValueError if it
    holds anything else."""
    items = _mapping(_fields(loaded, Metadata, "the index").get("state_dict_metadata"), "the index.state_dict_metadata",
                     _str, _storage_metadata)
    return _instance(loaded, Metadata, "the index", {
        "state_dict_metadata": lambda x, w: items,
        # Keys checked one by one before any is hashed (see _IndexKey).
        "storage_data": lambda x, w: _mapping(x, w, lambda k, kw: _index(k, kw, items), _storage_info),
        "storage_meta": _optional(lambda x, w: _instance(x, StorageMeta, w, {})),
    })


def _lookup_by_value(enum_class: type[enum.Enum]):
    """An enum class as the unpickler may use it: a function that looks a member up by value.
    NEWOBJ of a function fails, so no pickle can reach the class or a member to change it."""
    def lookup(value):
        return enum_class(value)
    return lookup


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == (_METADATA_MODULE, "MetadataIndex"):
            return _IndexKey
        if (module, name) in _METADATA_GLOBALS:
            found = super().find_class(module, name)
            return _lookup_by_value(found) if isinstance(found, type) and issubclass(found, enum.Enum) else found
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
