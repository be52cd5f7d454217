"""Native implementations of the element-wise ops: torch tensors in, DLPack capsules to centered_merge._C.

Same signatures and semantics as centered_merge/ops/reference.py (the spec). These wrappers make non-contiguous
inputs contiguous, allocate outputs with torch (so CUDA memory comes from torch's caching allocator) and pass
the caller's current CUDA stream. They are called only for calls that the ops table
(centered_merge/ops/table.py) found covered by the kernel; they never fall back to the twins themselves.
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


def _counter(like: torch.Tensor):
    """(capsule, tensor) of a one-element int64 non-finite counter on CUDA; (None, None) on the CPU."""
    if like.device.type != "cuda":
        return None, None
    c = torch.zeros(1, dtype=torch.int64, device=like.device)
    return _cap(c), c


def mean_fp32(inputs: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    T = len(inputs)
    if weights is not None:
        weights = [float(w) for w in weights]
    first = inputs[0]
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
    dst = out if out.is_contiguous() else torch.empty(out.shape, dtype=F32, device=out.device)
    _C().center_into(_cap(_contig(w)), _cap(_contig(mean)), _cap(dst), stream=_stream(out))
    if dst is not out:
        out.copy_(dst)
    return out


def finalize(x: torch.Tensor, dtype: torch.dtype, add: Optional[torch.Tensor] = None):
    return _finalize(x, dtype, add)


def _finalize(x: torch.Tensor, dtype: torch.dtype, add: Optional[torch.Tensor] = None, counter=None):
    """finalize; on CUDA its count is added to `counter` when one is given (a count already there is included)."""
    C = _C()
    xc = _contig(x)
    out = None
    if dtype != F32 or add is not None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    args = (_cap(xc), None if add is None else _cap(_contig(add)), None if out is None else _cap(out))
    if x.device.type == "cuda":
        counter = _counter(x)[1] if counter is None else counter
        C.finalize(*args, stream=_stream(x), counter=_cap(counter))
        count = int(counter.item())
    else:
        count = int(C.finalize(*args))
    return (x if out is None else out), count


def _ties(inputs, base, density, lam, weights, normalize, out_dtype, out=None, counter=None):
    """(out, count). CPU: count = the non-finite values written plus the non-finite task-vector entries x_t - base
    (all tasks, kept or dropped). CUDA (float32 out): the kernel adds the latter to `counter` (a fresh one when None,
    not read) and count is None; the output's count is finalize's (ties_merge_to)."""
    C = _C()
    T = len(inputs)
    ks = [reference.kept_count(base.numel(), d) for d in reference.per_task(density, T, "density")]
    xs = [_contig(inputs[t]) for t in range(T)]
    bc = _contig(base)
    if out is None:  # else the caller's buffer (checked by the table: shape, dtype, device, contiguous, no overlap)
        out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    ws = ccap = None
    if base.device.type == "cuda":
        ws = _cap(torch.empty(C.ties_workspace_bytes(T, base.numel()), dtype=torch.uint8, device=base.device))
        ccap = _cap(_counter(out)[1] if counter is None else counter)
    bad = C.ties_merge([_cap(x) for x in xs], _cap(bc), _cap(out), ks, float(lam), stream=_stream(out), workspace=ws,
                       weights=None if weights is None else [float(w) for w in weights], normalize=bool(normalize),
                       counter=ccap)
    return out, None if bad is None else int(bad)


def ties_merge(inputs: Sequence[torch.Tensor], base: torch.Tensor, density, lam: float,
               weights: Optional[Sequence[float]] = None, normalize: bool = True) -> torch.Tensor:
    return _ties(inputs, base, density, lam, weights, normalize, F32)[0]


def ties_merge_to(inputs: Sequence[torch.Tensor], base: torch.Tensor, density, lam: float,
                  weights: Optional[Sequence[float]] = None, normalize: bool = True, out_dtype=F32,
                  out: Optional[torch.Tensor] = None):
    """TIES written in out_dtype (into `out` when given), with its count: the non-finite values written plus the
    non-finite task-vector entries (as reference.ties_merge_to). On the CPU one kernel does both; on CUDA the
    kernel writes float32 and counts the task-vector entries into a counter that finalize (the conversion, copied
    into `out`) then adds the output's count to, read once."""
    if base.device.type != "cpu":
        counter = _counter(base)[1]
        y32, _ = _ties(inputs, base, density, lam, weights, normalize, F32, counter=counter)
        return reference.into_out(_finalize(y32, out_dtype, counter=counter), out)
    return _ties(inputs, base, density, lam, weights, normalize, out_dtype, out)


def dare(tau: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    p = float(p)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    out = torch.empty(tau.shape, dtype=F32, device=tau.device)
    _C().dare(_cap(_contig(tau)), _cap(out), min(p, 1.0), scale, int(seed) & _U64, stream=_stream(out))
    return out


def _fused(inputs, base, weights, lam, out_dtype, divisor=1.0, out=None):
    C = _C()
    first = inputs[0] if base is None else base
    if out is None:  # else the caller's buffer (checked by the table: shape, dtype, device, contiguous, no overlap)
        out = torch.empty(first.shape, dtype=out_dtype or F32, device=first.device)
    xs = [_contig(x) for x in inputs]
    ccap, counter = _counter(out)
    bad = C.linear_merge([_cap(x) for x in xs], [float(w) for w in weights],
                         None if base is None else _cap(_contig(base)), float(lam), _cap(out),
                         stream=_stream(out), counter=ccap, divisor=float(divisor))
    return out, int(counter.item()) if counter is not None else int(bad)


def linear_merge(inputs: Sequence[torch.Tensor], weights: Sequence[float], out_dtype: Optional[torch.dtype] = None,
                 scale: float = 1.0, divisor: float = 1.0, out: Optional[torch.Tensor] = None):
    return _fused(inputs, None, weights, scale, out_dtype, divisor, out)


def task_arithmetic_merge(inputs: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float], lam: float,
                          out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None):
    return _fused(inputs, base, weights, lam, out_dtype, out=out)
