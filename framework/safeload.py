"""Loading checkpoint bytes without running code from them.

A checkpoint folder is not a trust boundary: anyone who can write it can also rewrite
manifest.json, so hashes prove integrity, not authorship. pickle runs whatever a file tells
it to, so nothing here hands checkpoint bytes to an unrestricted unpickler:

- DCP's `.metadata` (torch's FileSystemReader reads it with plain `pickle.load`) goes through
  `RestrictedUnpickler`, which rebuilds only the classes our own saves contain (DCP's metadata
  dataclasses, torch.Size, dtypes, a path) and refuses every other global;
- DCP's non-tensor items (optimizer hyperparameters; DefaultLoadPlanner reads them with
  `torch.load(weights_only=False)`) and every tensor go through `torch.load(weights_only=True)`;
- `.pt` files (RNG state) through `load_pt`, which is `torch.load(weights_only=True)`.

DeepSpeed writes and reads its own pickles (`torch.load(weights_only=False)` inside
`load_checkpoint`); our ZeRO engine therefore never calls it and saves DCP instead
(framework/parallel/zero.py). tests/unit/test_safeload.py holds the static check that no other
`torch.load` / `pickle.load` / `Unpickler` is in framework/.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from framework.errors import CheckpointError

_DCP = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS = frozenset(
    {
        (_DCP, "Metadata"),
        (_DCP, "MetadataIndex"),
        (_DCP, "StorageMeta"),
        (_DCP, "TensorProperties"),
        (_DCP, "TensorStorageMetadata"),
        (_DCP, "BytesStorageMetadata"),
        (_DCP, "ChunkStorageMetadata"),
        (_DCP, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # maps a layout's name to torch's own object
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }
)
"""(module, name) of every global a DCP `.metadata` written by our engines refers to (listed
from saves of every strategy); torch dtypes (`torch.float32`, ...) are allowed by value."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked the unpickler for something our saves never contain."""


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only ALLOWED_GLOBALS and torch dtypes."""

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refusing to load global {module}.{name}: not a class our checkpoints contain"
        )


def _refusal(path: Path | str, err: BaseException) -> Exception:
    return CheckpointError(
        f"{path}: refused to load ({err}). Our saves never contain this: the file was written by "
        "something else or tampered with; nothing from it was executed. Use another checkpoint."
    )


def load_pt(path: Path):
    """torch.load of a small `.pt` file we wrote (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None


class _TracingFileSystem(FileSystem):
    """Remembers the file last opened, so that an error while reading names it."""

    last_path: Path | None = None

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        self.last_path = Path(path)
        with super().create_stream(path, mode) as stream:
            yield stream


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata goes through RestrictedUnpickler."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.fs = _TracingFileSystem()
        self.refused: Exception | None = None
        """The first refusal: DCP rewraps errors (or tries other files after one), dcp_load
        raises this one."""

    def _refuse(self, path, err: BaseException) -> Exception:
        self.refused = self.refused or _refusal(path, err)
        return self.refused

    def read_metadata(self, *args, **kwargs):
        # Same steps as FileSystemReader.read_metadata (torch 2.13), pickle.load replaced
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = RestrictedUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise self._refuse(path, e) from None
        if not isinstance(metadata, Metadata):
            raise self._refuse(path, TypeError(f"holds a {type(metadata).__name__}, not DCP Metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
            # a tensor or item that does not unpickle under weights_only, or bytes that are not
            # torch.save output at the offsets the metadata names
            raise self._refuse(self.fs.last_path or self.path, e) from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items are read with weights_only=True."""

    def load_bytes(self, read_item, value):
        # The same as DefaultLoadPlanner.load_bytes, which unpickles with weights_only=False
        obj = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def dcp_load(state: dict, path: Path) -> None:
    """torch.distributed.checkpoint.load into `state` (in place) without unrestricted pickle."""
    with warnings.catch_warnings():  # DCP warns that a single process loads without a group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        reader = SafeFileSystemReader(path)
        try:
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
        except (CheckpointException, AssertionError, CheckpointError):
            if reader.refused is not None:  # DCP wraps each rank's failure; surface ours as it is
                raise reader.refused from None
            raise
