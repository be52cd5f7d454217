"""The one table of element-wise ops: for each op its torch reference, its native function, and when the native
one applies. Everything else about dispatch is derived from it (the public functions of centered_merge.ops,
build_info()'s kernel list, the tests' op list).

Which implementation runs for a call is decided here, in `choose`, and nowhere else:
  1. centered_merge.backend.native_allowed(device): the mode switch, a missing extension, the CUDA gate;
  2. for the ops whose kernel reads all T inputs at once (`reads_all`): the inputs must be resident, a list or
     tuple of tensors. Any other sequence (the engine's LazyDeviceInputs, which copies an input to the device
     when it is read) goes to the torch twin, which reads one input at a time, so at most one or two inputs
     exist at once whatever T; the twins give the kernels' bits, so the result does not depend on the path;
  3. the op's `applies(*args)`: whether the kernel covers this call (dtypes, shapes, aliasing, input count).
     When it does not, the torch twin runs and applies torch's own rules and messages.
The native functions (ops/native.py) assume all three hold; they never fall back themselves.

Adding a kernel: the C++ kernel and binding (csrc/), its twin in ops/reference.py, its wrapper in ops/native.py,
one Op row below, and tests.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from .. import _native, backend
from . import native, reference

NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
F32 = torch.float32


def _extent(t: torch.Tensor):
    """(first byte, one past the last byte) that `t` can touch; None for an empty tensor."""
    if t.numel() == 0:
        return None
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        if stride >= 0:
            hi += (size - 1) * stride
        else:
            lo += (size - 1) * stride
    base, e = t.data_ptr(), t.element_size()
    return base + lo * e, base + (hi + 1) * e


def overlaps(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """Whether two tensors may share memory (conservative: overlapping address ranges on one device)."""
    if a is None or b is None or a.device != b.device:
        return False
    ea, eb = _extent(a), _extent(b)
    return ea is not None and eb is not None and ea[0] < eb[1] and eb[0] < ea[1]


def _native_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in NATIVE_DTYPES


def _f32_out_for(out, like) -> bool:
    return (isinstance(out, torch.Tensor) and out.dtype == F32 and out.shape == like.shape
            and out.device == like.device and out.is_contiguous())


# --- when each native kernel applies (same arguments as the op) ---------------------------------------------
def _mean_applies(inputs, weights=None, out=None) -> bool:
    if len(inputs) == 0 or not _native_float(inputs[0]):
        return False
    if weights is not None and len(weights) != len(inputs):
        return False  # the twin's error
    if out is not None:
        # a mismatched out gets torch's rules and messages; an out that is also an input is the twin's to handle
        if not _f32_out_for(out, inputs[0]) or any(overlaps(out, x) for x in inputs):
            return False
    return True


def _center_applies(w, mean, out) -> bool:
    return (_native_float(w) and isinstance(mean, torch.Tensor) and mean.dtype == F32
            and isinstance(out, torch.Tensor) and out.dtype == F32
            and w.shape == mean.shape == out.shape and w.device == mean.device == out.device
            and not overlaps(out, w) and not overlaps(out, mean))


def _finalize_applies(x, dtype, add=None) -> bool:
    if not (isinstance(x, torch.Tensor) and x.dtype == F32 and dtype in NATIVE_DTYPES):
        return False
    return add is None or (isinstance(add, torch.Tensor) and add.dtype == F32 and add.shape == x.shape
                           and add.device == x.device)


def _ties_applies(inputs, base, density, lam, weights=None, normalize=True) -> bool:
    C = _native.get(warn=False)
    T = len(inputs)
    return (C is not None and 0 < T <= C.MAX_INPUTS and _native_float(base)
            and all(isinstance(x, torch.Tensor) and x.shape == base.shape and x.device == base.device for x in inputs)
            and (isinstance(density, (int, float)) or len(density) == T)
            and (weights is None or (len(weights) == T and all(math.isfinite(float(w)) for w in weights)))
            and math.isfinite(float(lam)))


def _ties_to_applies(inputs, base, density, lam, weights=None, normalize=True, out_dtype=F32) -> bool:
    return out_dtype in NATIVE_DTYPES and _ties_applies(inputs, base, density, lam, weights, normalize)


def _dare_applies(tau, p, seed) -> bool:
    p = float(p)
    return _native_float(tau) and p > 0.0 and p == p


def _out_for(out, like, dtype, others) -> bool:
    """Whether a caller's `out` is one the fused kernels write into: like's shape and device, `dtype`,
    contiguous, sharing no memory with an input (anything else goes to the twin: its check and message)."""
    return out is None or (isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == like.shape
                           and out.device == like.device and out.is_contiguous()
                           and not any(overlaps(out, x) for x in others))


def _linear_applies(inputs, weights, out_dtype=None, scale=1.0, divisor=1.0, out=None) -> bool:
    C = _native.get(warn=False)
    return (C is not None and 0 < len(inputs) <= C.MAX_INPUTS and len(weights) == len(inputs)
            and _native_float(inputs[0]) and (out_dtype is None or out_dtype in NATIVE_DTYPES)
            and _out_for(out, inputs[0], out_dtype or F32, inputs))


def _task_arithmetic_applies(inputs, base, weights, lam, out_dtype=None, out=None) -> bool:
    C = _native.get(warn=False)
    return (C is not None and 0 < len(inputs) <= C.MAX_INPUTS and len(weights) == len(inputs)
            and _native_float(base) and (out_dtype is None or out_dtype in NATIVE_DTYPES)
            and _out_for(out, base, out_dtype or F32, list(inputs) + [base]))


@dataclass(frozen=True)
class Op:
    name: str
    reference: Callable  # the torch twin: the spec, and what runs when the native kernel does not apply
    native: Callable     # the native wrapper (ops/native.py); called only when `applies` holds
    applies: Callable    # (*args, **kwargs) -> bool, same arguments as the op
    like: Callable       # (*args, **kwargs) -> the tensor whose device decides
    reads_all: bool = False  # the kernel reads every input of its first argument (a sequence) at once


def resident(inputs) -> bool:
    """Whether a sequence of inputs is materialised (a list or tuple): reading all of it at once costs nothing
    more. Other sequences may create each input when it is indexed (LazyDeviceInputs)."""
    return isinstance(inputs, (list, tuple))


def _inputs_arg(args, kwargs):
    return args[0] if args else kwargs.get("inputs")


def _like_mean(inputs, *a, **k):
    return inputs[0] if len(inputs) else None


OPS: Dict[str, Op] = {op.name: op for op in (
    Op("mean_fp32", reference.mean_fp32, native.mean_fp32, _mean_applies, _like_mean, reads_all=True),
    Op("center_into", reference.center_into, native.center_into, _center_applies, lambda w, *a, **k: w),
    Op("finalize", reference.finalize, native.finalize, _finalize_applies, lambda x, *a, **k: x),
    Op("ties_merge", reference.ties_merge, native.ties_merge, _ties_applies, lambda inputs, base, *a, **k: base,
       reads_all=True),
    Op("ties_merge_to", reference.ties_merge_to, native.ties_merge_to, _ties_to_applies,
       lambda inputs, base, *a, **k: base, reads_all=True),
    Op("dare", reference.dare, native.dare, _dare_applies, lambda tau, *a, **k: tau),
    Op("linear_merge", reference.linear_merge, native.linear_merge, _linear_applies, _like_mean, reads_all=True),
    Op("task_arithmetic_merge", reference.task_arithmetic_merge, native.task_arithmetic_merge,
       _task_arithmetic_applies, lambda inputs, base, *a, **k: base, reads_all=True),
)}


def choose(name: str, *args, **kwargs) -> str:
    """'native-cpu', 'native-cuda' or 'torch': which implementation `name(*args, **kwargs)` runs."""
    op = OPS.get(name)
    if op is None:
        raise ValueError(f"unknown op {name!r}; expected one of {', '.join(OPS)}")
    if op.reads_all and not resident(_inputs_arg(args, kwargs)):
        return "torch"  # decided before `like` or `applies` index the inputs (each read may be a device copy)
    like = op.like(*args, **kwargs)
    if not isinstance(like, torch.Tensor) or not backend.native_allowed(like.device.type):
        return "torch"
    if not op.applies(*args, **kwargs):
        return "torch"
    return "native-" + like.device.type


def _dispatcher(op: Op) -> Callable:
    @functools.wraps(op.reference)
    def call(*args, **kwargs):
        impl = op.reference if choose(op.name, *args, **kwargs) == "torch" else op.native
        return impl(*args, **kwargs)

    return call


DISPATCH: Dict[str, Callable] = {name: _dispatcher(op) for name, op in OPS.items()}
