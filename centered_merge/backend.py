"""Chooses, per call, which implementation of an op runs: native CPU, native CUDA, or the torch twin.

CENTERED_MERGE_BACKEND=auto (default) | native | torch forces the choice:
- torch:  always the pure-torch twins (centered_merge.ops.reference);
- auto / native: the native kernels (centered_merge._C) for float32/float16/bfloat16 tensors on the CPU, and on
  CUDA when the extension was built with its CUDA kernels and its runtime sees a GPU; the torch twin otherwise.
  `native` differs from `auto` only in intent: an op or device without a native kernel still runs the torch twin.
A missing or broken extension never raises: it gives one NativeFallbackWarning and the torch twins run.
The variable is read at every call, so tests and benchmarks can switch it on the fly.
"""
from __future__ import annotations

import os

import torch

from . import _native

ENV = "CENTERED_MERGE_BACKEND"
MODES = ("auto", "native", "torch")
OPS = ("mean_fp32", "center_into", "finalize", "ties_merge", "dare")
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mode() -> str:
    m = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {os.environ.get(ENV)!r}")
    return m


def choose(op: str, like) -> str:
    """'native-cpu', 'native-cuda' or 'torch': what `implementation(op, like)` runs for a tensor like `like`."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    if mode() == "torch":
        return "torch"
    if _native.get() is None:
        return "torch"
    if not isinstance(like, torch.Tensor) or like.dtype not in _NATIVE_DTYPES:
        return "torch"
    dev = like.device.type
    if dev == "cpu":
        return "native-cpu"
    if dev == "cuda" and _native.cuda_usable():
        return "native-cuda"
    return "torch"


def implementation(op: str, like):
    """The function implementing `op` for a tensor like `like`."""
    from .ops import reference  # imported here: ops/__init__ imports this module

    if choose(op, like) == "torch":
        return getattr(reference, op)
    from .ops import native

    return getattr(native, op)


def describe() -> dict:
    """What runs where, and why (for build_info(), logs and the model card)."""
    m = mode()
    C = _native.get(warn=False)
    d = {"backend": m, "native": C is not None, "native_error": _native.error()}
    if m == "torch" or C is None:
        d.update(cpu="torch", cuda="torch")
        return d
    d["cpu"] = "native"
    if _native.cuda_usable():
        d["cuda"] = "native"
    else:
        d["cuda"] = "torch"
        d["cuda_native_why_not"] = _native.cuda_why_not()
    return d
