"""Readers and the writer of the streaming engine.

`open_model(x)` turns what a user passes as a model (a path to a .safetensors file, an HF directory, a torch
.bin/.pt file, a state dict or an nn.Module) into a TensorSource that hands out tensors one at a time.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import MergeInputError
from .base import TensorInfo, TensorSource
from .hf_dir import HFDirectory
from .memory import StateDictSource
from .safetensors_reader import SafetensorsFile
from .torch_bin import TorchFile
from .writer import ShardedWriter, parse_size

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

__all__ = ["TensorInfo", "TensorSource", "HFDirectory", "StateDictSource", "SafetensorsFile", "TorchFile",
           "ShardedWriter", "open_model", "parse_size"]


def open_model(model, *, trust_pickle: bool = False, index: int = 0) -> TensorSource:
    """A lazy TensorSource for one model; `index` numbers in-memory models in messages."""
    if isinstance(model, TensorSource):
        return model
    if isinstance(model, (str, Path)):
        p = Path(model).expanduser()
        if p.is_dir():
            return HFDirectory(p, trust_pickle=trust_pickle, label=str(model))
        if not p.exists():
            raise MergeInputError(f"{model}: file or directory not found")
        if p.suffix == ".safetensors":
            return SafetensorsFile(p, label=str(model))
        if p.suffix in TORCH_SUFFIXES:
            return TorchFile(p, trust_pickle=trust_pickle, label=str(model))
        raise MergeInputError(f"{model}: unknown checkpoint format (expected a directory, .safetensors, "
                              f"or one of {', '.join(TORCH_SUFFIXES)})")
    return StateDictSource(model, label=f"model #{index + 1} ({'nn.Module' if hasattr(model, 'state_dict') else 'state dict'})")
