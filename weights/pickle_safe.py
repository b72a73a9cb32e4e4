"""Read PyTorch pickle checkpoints without executing pickled code.

`torch.save` writes a zip archive: `<name>/data.pkl` (the object graph) and `<name>/data/<key>`
(raw storage bytes). This reader rebuilds tensors and plain containers only. Any other global the
pickle names (Lightning callbacks, argparse Namespaces, optimizer classes...) becomes an inert
`Skipped` placeholder that records its name and is never imported or called.

Used once, by `osdface weights convert`; nothing at serve time unpickles.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from model.errors import UnsafePickleError, WeightsError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


class Skipped:
    """Stands in for any object the pickle builds from a class or function we do not trust."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Skipped({self.qualname})"


def _skipped_class(qualname: str) -> type[Skipped]:
    """A fresh inert class per untrusted global; REDUCE and NEWOBJ both just instantiate it."""
    return type("Skipped", (Skipped,), {"qualname": qualname})


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(
    storage: torch.Tensor,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    if storage.numel() == 0 or (len(size) == 0 and storage.numel() <= offset):
        return torch.empty(size, dtype=storage.dtype)
    return storage.as_strided(size, stride, offset).clone()


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool = False, *_: Any) -> torch.Tensor:
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("torch", "Size"): torch.Size,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: io.BytesIO, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(data)
        self._archive = archive
        self._prefix = prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _skipped_class(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unexpected storage type {storage_type!r}")
        raw = self._archive.read(f"{self._prefix}data/{key}")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0)
        if storage_type.dtype != torch.uint8:
            flat = (
                flat.view(storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
            )
        if flat.numel() != numel and storage_type.dtype != torch.uint8:
            raise WeightsError(f"storage {key}: {flat.numel()} elements, header says {numel}")
        return flat


def load_checkpoint(path: Path) -> Any:
    """Read a `torch.save` zip checkpoint, rebuilding tensors and skipping everything else.

    Raises:
        WeightsNotFoundError is not raised here; callers check existence.
        WeightsError: the file is truncated, not a zip checkpoint, or inconsistent.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pkl) != 1:
                raise WeightsError(f"{path}: not a torch zip checkpoint (no single data.pkl)")
            prefix = pkl[0][: -len("data.pkl")]
            data = io.BytesIO(archive.read(pkl[0]))
            return _RestrictedUnpickler(data, archive, prefix).load()
    except (zipfile.BadZipFile, EOFError, KeyError, pickle.UnpicklingError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable or truncated checkpoint ({e})") from e


def tensors_only(obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a (possibly nested) state dict, as a flat {name: tensor}."""
    if not isinstance(obj, dict):
        raise WeightsError(f"expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
