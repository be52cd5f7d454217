"""Models already in memory: a state dict (name -> Tensor) or an nn.Module."""
from __future__ import annotations

from typing import List, Mapping

import torch

from ..errors import MergeInputError
from .base import TensorInfo, TensorSource


class StateDictSource(TensorSource):
    def __init__(self, obj, label: str):
        self.label = label
        self.config_dir = None
        if isinstance(obj, torch.nn.Module):
            sd = obj.state_dict()
        elif isinstance(obj, Mapping):
            sd = obj
        else:
            raise MergeInputError(f"{label}: expected a path, a state dict or an nn.Module; got {type(obj).__name__}")
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise MergeInputError(f"{label}: entry {bad[0]!r} is a {type(sd[bad[0]]).__name__}, not a tensor")
        # detach: the engine only reads; never hand out tensors that carry autograd history
        self._t = {str(k): v.detach() for k, v in sd.items()}

    def keys(self) -> List[str]:
        return list(self._t)

    def info(self, key: str) -> TensorInfo:
        t = self._t[key]
        return TensorInfo(tuple(t.shape), t.dtype)

    def get(self, key: str) -> torch.Tensor:
        return self._t[key]
