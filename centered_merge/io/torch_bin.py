"""PyTorch checkpoints (.bin / .pt / .pth) through torch.load.

By default only `weights_only=True` loading is used: it unpickles tensors and plain containers and refuses
anything else, so a checkpoint cannot run code. Files saved in the zip format (torch >= 1.6) are loaded with
`mmap=True`, so their tensors are views of the file, like safetensors. Full unpickling runs only when the caller
passes trust_pickle=True (CLI: --trust-pickle).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Dict

import torch

from ..errors import MergeInputError
from .base import FileGuard, check_regular_file
from .memory import StateDictSource


def _flatten(obj, prefix="") -> Dict[str, torch.Tensor]:
    """A checkpoint's tensors by name: a plain state dict, or one nested under 'state_dict' / 'model'."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        return {}
    if prefix == "" and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), (dict, torch.nn.Module)):
                return _flatten(obj[key])
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[prefix + str(k)] = v
    return out


def load_torch_file(path: Path, trust_pickle: bool = False, mmap: bool | None = None) -> Dict[str, torch.Tensor]:
    """The tensors of a torch checkpoint; views of an mmap for zip-format files (unless mmap=False), in memory for
    legacy ones."""
    path = Path(path)
    check_regular_file(path)  # a FIFO or device would block torch.load or read without end
    zipped = zipfile.is_zipfile(path)  # legacy (pre-1.6) files cannot be mapped: they are read whole
    mmap = zipped if mmap is None else (mmap and zipped)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise MergeInputError(f"{path}: cannot unpickle ({str(e).splitlines()[0]})") from None
        raise MergeInputError(
            f"{path}: this checkpoint needs full pickle loading, which can run arbitrary code; "
            "if you trust the file, pass --trust-pickle (API: trust_pickle=True)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise MergeInputError(f"{path}: not a readable torch checkpoint, truncated or corrupt "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    tensors = _flatten(obj)
    if not tensors:
        raise MergeInputError(f"{path}: holds no tensors (expected a state dict)")
    return tensors


class TorchFile(StateDictSource):
    """One torch checkpoint file. The dict of (mmap-backed) tensors is held; their bytes are paged in lazily.

    A zip-format file is memory-mapped only under a file read lease (FileGuard), which keeps other processes from
    truncating or rewriting it while the merge reads it (a shrinking map would kill the process with SIGBUS);
    where no lease is granted it is read whole into memory instead."""

    def __init__(self, path, trust_pickle: bool = False, label: str | None = None):
        self.path = Path(path)
        self._guard = FileGuard(self.path)
        try:
            leased = self._guard.take_lease()
            # once loaded (memory-mapped where the format allows), a torch file is a state dict
            super().__init__(load_torch_file(self.path, trust_pickle, mmap=leased), label or str(self.path))
            self._guard.check()
        except BaseException:
            self._guard.close()
            raise
        self.mmapped = leased and zipfile.is_zipfile(self.path)

    def get(self, key: str) -> torch.Tensor:
        self._guard.check(key)
        return super().get(key)

    def check_unchanged(self) -> None:
        self._guard.check()

    def file_of(self, key: str) -> str:
        return str(self.path)

    def close(self) -> None:
        self._t = {}
        self._guard.close()
