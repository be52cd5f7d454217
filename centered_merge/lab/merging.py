"""The lab's one door to the library: every merge goes through ``centered_merge.merge``.

For CART, the CNN's conv kernels (out, in, kh, kw) are added to the low-rank selection with ``include=``; the
library then treats each as the (out, in*kh*kw) matrix, the usual matrix view of a convolution. Linear
layers' weights are selected by the library's default preset; biases are averaged.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

import centered_merge as cm

StateDict = Dict[str, torch.Tensor]

CONV_INCLUDE = r"(^|\.)conv\d+\.weight$"


def matrix_view(sd: StateDict) -> StateDict:
    """Tensors with more than two dimensions as (shape[0], rest) matrices (for the spectrum analysis)."""
    return {k: (v.reshape(v.shape[0], -1) if v.dim() > 2 else v) for k, v in sd.items()}


def merge(models: Sequence[StateDict], method: str, base: Optional[StateDict] = None,
          **params) -> StateDict:
    """Merge state dicts with ``centered_merge.merge(models, method=..., base=..., **params)``."""
    if not models:
        raise ValueError("merge needs at least one model")
    if method == "cart" and "include" not in params:
        params = {**params, "include": CONV_INCLUDE}
    return cm.merge(list(models), method=method, base=base, **params)
