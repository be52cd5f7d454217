"""The element-wise merge kernels for any array library that speaks DLPack (torch, numpy, cupy, jax, ...).

Each function takes arrays that implement ``__dlpack__`` (all on one device), runs the same op as the merge
methods do (centered_merge.ops: the native kernel where it applies, its torch twin otherwise, chosen by the ops
table), and returns arrays of the library of its first array argument, exchanged without a copy::

    import numpy as np
    from centered_merge import kernels
    m = kernels.mean([np.ones(4, np.float32), np.zeros(4, np.float16)])   # numpy float32 array
    y, bad = kernels.finalize(m, "float16")                                 # numpy float16 array, NaN/Inf count

Dtypes: inputs float32, float16 or bfloat16 (float64 is converted to float32 first); results float32 unless
an output dtype is asked for. numpy has no bfloat16, so a bfloat16 result cannot be returned as a numpy array
(a ValueError says so). cupy arrays need the optional extra: ``pip install centered_merge[cupy]``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from . import ops

__all__ = ["mean", "center", "finalize", "ties", "dare", "linear", "task_arithmetic"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _to_torch(x, fn: str, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if not hasattr(x, "__dlpack__"):
        raise TypeError(f"kernels.{fn}: argument '{name}': expected an array with __dlpack__ (torch, numpy, cupy, "
                        f"jax, ...), got {type(x).__name__}")
    try:
        return torch.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"kernels.{fn}: argument '{name}': could not be exchanged through DLPack: {e}") from None


def _seq(xs, fn: str, name: str):
    if isinstance(xs, (str, bytes)) or not isinstance(xs, Sequence) or len(xs) == 0:
        raise TypeError(f"kernels.{fn}: argument '{name}': expected a non-empty list of arrays")
    return [_to_torch(x, fn, f"{name}[{i}]") for i, x in enumerate(xs)]


def _dtype(d, fn: str, name: str) -> Optional[torch.dtype]:
    if d is None:
        return None
    if isinstance(d, torch.dtype) and d in _DTYPES.values():
        return d
    # numpy / cupy dtypes (.name), their scalar types (np.float16.__name__), strings ("float16", "torch.float16")
    key = getattr(d, "name", None) or getattr(d, "__name__", None) or str(d)
    key = str(key).replace("torch.", "")
    if key in _DTYPES:
        return _DTYPES[key]
    raise ValueError(f"kernels.{fn}: argument '{name}': expected float32, float16 or bfloat16, got {d!r}")


def _back(t: torch.Tensor, like, fn: str):
    """t as an array of the library `like` comes from (torch tensors come back as they are)."""
    if isinstance(like, torch.Tensor):
        return t
    root = type(like).__module__.split(".", 1)[0]
    lib = sys.modules.get(root)
    if root == "jax" or root == "jaxlib":
        import jax.dlpack  # noqa: PLC0415

        return jax.dlpack.from_dlpack(t)
    if lib is None or not hasattr(lib, "from_dlpack"):
        raise TypeError(f"kernels.{fn}: cannot return a {type(like).__name__}: its library has no from_dlpack")
    if root == "numpy" and t.dtype == torch.bfloat16:
        raise ValueError(f"kernels.{fn}: numpy has no bfloat16; ask for float32 or float16, or pass torch tensors")
    return lib.from_dlpack(t.detach())


def mean(inputs, weights: Optional[Sequence[float]] = None, out=None):
    """float32 sum_t weights[t] * inputs[t] (weights default to 1/T each), into `out` (a float32 array of the
    inputs' shape, reused across calls) when given; returns an array of out's library then, else the inputs'."""
    xs = _seq(inputs, "mean", "inputs")
    ot = None if out is None else _to_torch(out, "mean", "out")
    return _back(ops.mean_fp32(xs, weights, ot), inputs[0] if out is None else out, "mean")


def center(w, mean, out=None):
    """float32(w) - mean (mean float32), into `out` (a float32 array, reused across calls) when given."""
    wt, mt = _to_torch(w, "center", "w"), _to_torch(mean, "center", "mean")
    ot = torch.empty(wt.shape, dtype=torch.float32, device=wt.device) if out is None else _to_torch(out, "center", "out")
    return _back(ops.center_into(wt, mt, ot), w if out is None else out, "center")


def finalize(x, dtype, add=None):
    """(x [+ add]) converted to dtype, and the number of NaN/Inf values in the result."""
    xt = _to_torch(x, "finalize", "x")
    at = None if add is None else _to_torch(add, "finalize", "add")
    y, bad = ops.finalize(xt, _dtype(dtype, "finalize", "dtype"), at)
    return _back(y, x, "finalize"), int(bad)


def ties(inputs, base, density: float, lam: float):
    """TIES-merging: float32 base + lam * disjoint mean of the trimmed task vectors (exactly k kept per task)."""
    xs, bt = _seq(inputs, "ties", "inputs"), _to_torch(base, "ties", "base")
    return _back(ops.ties_merge(xs, bt, float(density), float(lam)), base, "ties")


def dare(tau, p: float, seed: int):
    """DARE: float32 tau with each entry dropped with probability p (a function of seed and index), rescaled."""
    return _back(ops.dare(_to_torch(tau, "dare", "tau"), float(p), int(seed)), tau, "dare")


def linear(inputs, weights: Sequence[float], out_dtype=None):
    """Fused weighted linear merge sum_t w_t W_t in one pass, written as out_dtype; returns (array, NaN/Inf)."""
    xs = _seq(inputs, "linear", "inputs")
    y, bad = ops.linear_merge(xs, [float(w) for w in weights], _dtype(out_dtype, "linear", "out_dtype"))
    return _back(y, inputs[0], "linear"), int(bad)


def task_arithmetic(inputs, base, weights: Sequence[float], lam: float, out_dtype=None):
    """Fused task arithmetic base + lam * sum_t w_t (W_t - base) in one pass; returns (array, NaN/Inf count)."""
    xs, bt = _seq(inputs, "task_arithmetic", "inputs"), _to_torch(base, "task_arithmetic", "base")
    y, bad = ops.task_arithmetic_merge(xs, bt, [float(w) for w in weights], float(lam),
                                       _dtype(out_dtype, "task_arithmetic", "out_dtype"))
    return _back(y, base, "task_arithmetic"), int(bad)
