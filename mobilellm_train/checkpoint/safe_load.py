"""Reading a checkpoint without running code from it: the `.metadata` index and stored values.

DCP's own reader unpickles `.metadata` and every non-tensor value unrestricted, so a crafted
checkpoint could run anything on load. Here `.metadata` is read by an unpickler that accepts
only DCP's metadata classes (`read_metadata`), and stored values go through
`torch.load(weights_only=True)` (`SafeLoadPlanner`). Kept apart from the rest of checkpointing
because this is the security boundary: what may be unpickled is decided here and nowhere else.
"""

from __future__ import annotations

import os
import pickle

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

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
        raise permission_error(file) from None
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
