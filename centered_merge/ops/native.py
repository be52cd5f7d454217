"""Native implementations of the element-wise ops: torch tensors in, DLPack capsules to centered_merge._C.

Same signatures and semantics as centered_merge/ops/reference.py (the spec). These wrappers make non-contiguous
inputs contiguous, allocate outputs with torch (so CUDA memory comes from torch's caching allocator), pass the
caller's current CUDA stream, and fall back to the torch twin for what the kernels do not cover (float64 or
other dtypes, broadcasting, more than 64 TIES inputs). They are only called when centered_merge.backend chose
native, i.e. when the extension loaded.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.dlpack import to_dlpack

from .. import _native
from . import reference

F32 = torch.float32
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MEAN_GROUP = 16  # inputs per kernel call; later groups accumulate onto the first (same rounding order)
_U64 = (1 << 64) - 1


def _C():
    return _native.get()


def _cap(t: torch.Tensor):
    return to_dlpack(t.detach())


def _stream(t: torch.Tensor) -> int:
    return int(torch.cuda.current_stream(t.device).cuda_stream) if t.device.type == "cuda" else 0


def _contig(t: torch.Tensor) -> torch.Tensor:
    if t.dtype not in NATIVE_DTYPES and t.is_floating_point():
        t = t.to(F32)  # e.g. float64: converted here, the kernel reads float32
    return t if t.is_contiguous() else t.contiguous()


def mean_fp32(inputs: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    T = len(inputs)
    if T == 0:
        raise ValueError("mean_fp32: argument 'inputs': expected at least one tensor, got an empty sequence")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != T:
            raise ValueError(f"mean_fp32: argument 'weights': expected {T} weights (one per input), got {len(weights)}")
    first = inputs[0]
    if out is not None and (out.dtype != F32 or out.shape != first.shape or out.device != first.device
                            or not out.is_contiguous()):
        return reference.mean_fp32(inputs, weights, out)  # torch's rules and messages for a mismatched out
    if out is None:
        out = torch.empty(first.shape, dtype=F32, device=first.device)
    C = _C()
    stream = _stream(out)
    out_cap = _cap(out)
    for g0 in range(0, T, MEAN_GROUP):
        g1 = min(T, g0 + MEAN_GROUP)
        chunk = [_contig(inputs[t]) for t in range(g0, g1)]
        C.mean_fp32([_cap(x) for x in chunk], None if weights is None else weights[g0:g1], out_cap,
                    accumulate=g0 > 0, scale=1.0 / T, apply_scale=weights is None and g1 == T,
                    stream=stream, index_base=g0)
        del chunk
    return out


def center_into(w: torch.Tensor, mean: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if (mean.dtype != F32 or out.dtype != F32 or w.dtype not in NATIVE_DTYPES or w.shape != mean.shape
            or out.shape != mean.shape or not (w.device == mean.device == out.device)):
        return reference.center_into(w, mean, out)  # broadcasting, other dtypes, device errors: torch's rules
    dst = out if out.is_contiguous() else torch.empty(out.shape, dtype=F32, device=out.device)
    _C().center_into(_cap(_contig(w)), _cap(_contig(mean)), _cap(dst), stream=_stream(out))
    if dst is not out:
        out.copy_(dst)
    return out


def finalize(x: torch.Tensor, dtype: torch.dtype, add: Optional[torch.Tensor] = None):
    if (x.dtype != F32 or dtype not in NATIVE_DTYPES
            or (add is not None and (add.dtype != F32 or add.shape != x.shape or add.device != x.device))):
        return reference.finalize(x, dtype, add)
    C = _C()
    xc = _contig(x)
    out = None
    if dtype != F32 or add is not None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    args = (_cap(xc), None if add is None else _cap(_contig(add)), None if out is None else _cap(out))
    if x.device.type == "cuda":
        counter = torch.zeros(1, dtype=torch.int64, device=x.device)
        C.finalize(*args, stream=_stream(x), counter=_cap(counter))
        count = int(counter.item())
    else:
        count = int(C.finalize(*args))
    return (x if out is None else out), count


def ties_merge(inputs: Sequence[torch.Tensor], base: torch.Tensor, density: float, lam: float) -> torch.Tensor:
    C = _C()
    T = len(inputs)
    if T == 0 or T > C.MAX_INPUTS or base.dtype not in NATIVE_DTYPES:
        return reference.ties_merge(inputs, base, density, lam)
    k = reference.kept_count(base.numel(), density)
    xs = [_contig(inputs[t]) for t in range(T)]
    bc = _contig(base)
    out = torch.empty(base.shape, dtype=F32, device=base.device)
    ws = None
    if base.device.type == "cuda":
        ws = _cap(torch.empty(C.ties_workspace_bytes(T), dtype=torch.uint8, device=base.device))
    C.ties_merge([_cap(x) for x in xs], _cap(bc), _cap(out), int(k), float(lam), stream=_stream(out), workspace=ws)
    return out


def dare(tau: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    p = float(p)
    if p <= 0.0 or tau.dtype not in NATIVE_DTYPES or p != p:
        return reference.dare(tau, p, seed)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    out = torch.empty(tau.shape, dtype=F32, device=tau.device)
    _C().dare(_cap(_contig(tau)), _cap(out), min(p, 1.0), scale, int(seed) & _U64, stream=_stream(out))
    return out
