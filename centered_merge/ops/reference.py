"""Pure-torch twins of every element-wise pass a merge makes.

These are the reference the native kernels are tested against and the fallback when the extension or a GPU is
missing. They favour clarity over speed, but they keep the engine's memory promise: no function here holds T
converted copies of a tensor at once; inputs are read pass by pass.

Conventions shared with the native kernels (csrc/):
- every accumulation is in float32, whatever the input dtype;
- `inputs` is a sequence of same-shaped tensors; reading it by index is allowed to be lazy;
- integer seeds are 64-bit; the DARE mask is a pure function of (seed, flat element index).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..validation import count_nonfinite

F32 = torch.float32


def mean_fp32(
    inputs: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """sum_t weights[t] * inputs[t] in float32 (weights default to 1/T each), into `out` when given (a float32
    buffer of the inputs' shape, reused across calls to spare the allocation and first-touch page faults)."""
    T = len(inputs)
    if T == 0:
        raise ValueError("mean_fp32: argument 'inputs': expected at least one tensor, got an empty sequence")
    if weights is not None and len(weights) != T:
        raise ValueError(f"mean_fp32: argument 'weights': expected {T} weights (one per input), got {len(weights)}")
    if out is None:
        acc = torch.zeros(inputs[0].shape, dtype=F32, device=inputs[0].device)
    else:
        if out.dtype != F32 or tuple(out.shape) != tuple(inputs[0].shape):
            raise ValueError(f"mean_fp32: argument 'out': expected float32 of shape {tuple(inputs[0].shape)}, "
                             f"got {out.dtype} of shape {tuple(out.shape)}")
        acc = out.zero_()
    if weights is None:
        for t in range(T):
            acc.add_(inputs[t])
        return acc.mul_(1.0 / T)
    for t in range(T):
        acc.add_(inputs[t], alpha=float(weights[t]))
    return acc


def center_into(w: torch.Tensor, mean: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = float32(w) - mean, written into the caller's float32 buffer."""
    return torch.sub(w, mean, out=out)


def finalize(x: torch.Tensor, dtype: torch.dtype, add: Optional[torch.Tensor] = None):
    """(x [+ add]) converted to `dtype`, and the number of NaN/Inf values in the converted result.

    Counting after the conversion catches values that overflow the output dtype (e.g. > 65504 in float16).
    """
    y = (x if add is None else x + add).to(dtype)
    return y, count_nonfinite(y)


def into_out(result, out: Optional[torch.Tensor]):
    """(result, count) of finalize, the result copied into the caller's `out` when one is given (it must have the
    result's shape, dtype and device)."""
    y, bad = result
    if out is None:
        return y, bad
    if not isinstance(out, torch.Tensor) or out.shape != y.shape or out.dtype != y.dtype or out.device != y.device:
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a {tuple(y.shape)} {y.dtype} tensor on {y.device}; got {got}")
    out.copy_(y)
    return out, bad


def linear_merge(inputs: Sequence[torch.Tensor], weights: Sequence[float], out_dtype: Optional[torch.dtype] = None,
                 scale: float = 1.0, divisor: float = 1.0, out: Optional[torch.Tensor] = None):
    """(scale * sum_t weights[t] * inputs[t]) / divisor, accumulated in float32 in input order, then scaled
    (unit weights with scale 1/T round exactly as mean_fp32), then divided (raw weights divided by their float32
    sum round exactly as mergekit's normalized linear), converted to `out_dtype` (float32 when None); returns
    (result, number of NaN/Inf values in the result), like finalize. out: a caller's tensor of the result's
    shape, dtype and device to write it into (then returned as the result)."""
    acc = torch.zeros(inputs[0].shape, dtype=F32, device=inputs[0].device)
    for t in range(len(inputs)):
        acc.add_(inputs[t], alpha=float(weights[t]))
    if float(scale) != 1.0:
        acc.mul_(float(scale))
    if float(divisor) != 1.0:
        acc.div_(torch.tensor(float(divisor), dtype=F32))
    return into_out(finalize(acc, out_dtype or F32), out)


def task_arithmetic_merge(inputs: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float], lam: float,
                          out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None):
    """base + lam * sum_t weights[t] * (float32(inputs[t]) - float32(base)), in float32 and in this order
    (task vectors summed one by one, then scaled, then the base added), converted to `out_dtype` (float32 when
    None); returns (result, number of NaN/Inf values in the result). out: as for linear_merge."""
    base32 = base.to(F32)
    acc = torch.zeros_like(base32)
    tau = torch.empty_like(base32)
    for t in range(len(inputs)):
        acc.add_(torch.sub(inputs[t], base32, out=tau), alpha=float(weights[t]))
    return into_out(finalize(acc.mul_(float(lam)).add_(base32), out_dtype or F32), out)


def kept_count(numel: int, density: float) -> int:
    """How many entries TIES keeps per task, mergekit's rule: max(1, int(density * numel)) for 0 < density < 1
    (so any density > 0 keeps at least one), every entry from density 1, none at density <= 0."""
    if numel == 0 or not density > 0.0:
        return 0
    if density >= 1.0:
        return numel
    return min(numel, max(1, int(density * numel)))


def magnitude_threshold(tau: torch.Tensor, density: float) -> float:
    """The k-th largest |tau| with k = kept_count(numel, density) (NaN ranks above +inf, as in torch.kthvalue);
    +inf when nothing is kept, 0 when everything is."""
    n = tau.numel()
    k = kept_count(n, density)
    if k == 0:
        return math.inf
    if k == n:
        return 0.0
    return float(torch.kthvalue(tau.reshape(-1).abs(), n - k + 1).values)


_ABS = 0x7FFFFFFF


def _keep_rule(tau32: torch.Tensor, k: int):
    """(threshold bit pattern, how many entries equal to it are kept) for keeping exactly k entries of tau32.

    Entries are ranked by the bit pattern of |tau| (for non-negative floats it orders like the value, and it
    puts NaN above +inf as torch.kthvalue does); among equal magnitudes the lowest flat indices come first.
    """
    n = tau32.numel()
    if k <= 0:
        return _ABS + 1, 0  # above every pattern: nothing kept
    if k >= n:
        return 0, n
    bits = tau32.reshape(-1).view(torch.int32) & _ABS
    thr = int(torch.kthvalue(bits, n - k + 1).values)
    return thr, k - int((bits > thr).sum())


def _kept(tau32: torch.Tensor, rule) -> torch.Tensor:
    """The boolean mask of the entries a keep rule keeps (NaN entries are ranked but never kept)."""
    thr, need = rule
    if thr > _ABS:
        return torch.zeros(tau32.shape, dtype=torch.bool, device=tau32.device)
    flat = tau32.reshape(-1)
    bits = flat.view(torch.int32) & _ABS
    eq = bits == thr
    rank_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    keep = (bits > thr) | (eq & (torch.cumsum(eq, 0, dtype=rank_dtype) <= need))
    return (keep & (bits <= 0x7F800000)).reshape(tau32.shape)


def top_k_mask(tau: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k entries of float32 `tau` that TIES keeps: the largest |tau|, the lowest flat indices
    first among equal magnitudes, NaN ranked above +inf but never kept."""
    return _kept(tau, _keep_rule(tau, k))


def per_task(value, T: int, what: str):
    """A scalar or a sequence of T values, as a list of T floats."""
    if isinstance(value, (int, float)):
        return [float(value)] * T
    vals = [float(v) for v in value]
    if len(vals) != T:
        raise ValueError(f"ties_merge: argument {what!r}: expected {T} values (one per input), got {len(vals)}")
    return vals


def as_f32_scalars(values):
    """Python floats rounded to float32, as the kernels and torch's float32 ops see them."""
    return torch.tensor(values, dtype=torch.float64).to(F32).tolist()


def ties_merge(inputs: Sequence[torch.Tensor], base: torch.Tensor, density, lam: float,
               weights: Optional[Sequence[float]] = None, normalize: bool = True) -> torch.Tensor:
    """TIES-merging of one tensor, in mergekit's order of operations (its generalized task arithmetic with
    magnitude sparsification and the "sum" consensus, computed in float32):

        tau_t  = float32(x_t) - float32(base)
        s_t    = tau_t at exactly k_t = kept_count(numel, density_t) entries, 0 elsewhere
        d_t    = w_t * s_t                                  (w_t: weights[t], 1 when None)
        sign   = +1 where sum_t d_t >= 0, else -1           (the sum in input order; a zero sum elects +1)
        agree_t = sign(d_t) == sign                         (zero entries never agree)
        mixed  = sum_t (agree_t ? d_t : 0),  divisor = sum_t (agree_t ? w_t : 0)   (in input order)
        out    = base + lam * (normalize ? mixed / (divisor == 0 ? 1 : divisor) : mixed)   (float32)

    `density` is one value or one per input. The trim keeps the largest |tau_t| and, among entries whose
    magnitude equals the k-th largest, the lowest flat indices (deterministic, the same on every device and
    thread count). NaN entries take their place in that ranking (above +inf, as torch.kthvalue orders them) but
    are never kept. Two passes over the inputs, one input at a time, with O(1) float32 buffers in T: pass 1
    trims each task vector and sums the weighted kept values (the sign election); pass 2 recomputes each task
    vector and adds the agreeing ones.
    """
    return _ties_counted(inputs, base, density, lam, weights, normalize)[0]


def _ties_counted(inputs, base, density, lam, weights, normalize):
    """(ties_merge's result, the number of non-finite task-vector entries tau_t over all tasks, kept or dropped:
    counted in pass 1, where each tau_t is formed first)."""
    T = len(inputs)
    ws = as_f32_scalars(per_task(1.0 if weights is None else weights, T, "weights"))
    dens = per_task(density, T, "density")
    lam32 = as_f32_scalars([lam])[0]
    base32 = base.to(F32)
    buf = torch.empty_like(base32)
    rules = {}
    bad_tau = 0

    def trimmed(t):
        nonlocal bad_tau
        center_into(inputs[t], base32, buf)
        if t not in rules:  # pass 1: the keep rule is found here and reused in pass 2; tau_t counted once
            rules[t] = _keep_rule(buf, kept_count(base32.numel(), dens[t]))
            bad_tau += count_nonfinite(buf)
        return torch.where(_kept(buf, rules[t]), buf, 0.0)

    return disjoint_merge(trimmed, T, ws, base32, lam32, normalize), bad_tau


def ties_merge_to(inputs: Sequence[torch.Tensor], base: torch.Tensor, density, lam: float,
                  weights: Optional[Sequence[float]] = None, normalize: bool = True, out_dtype=F32,
                  out: Optional[torch.Tensor] = None):
    """ties_merge converted to out_dtype by finalize, copied into `out` when one is given (as linear_merge's out):
    (result, count) where count = the non-finite values of the result PLUS the non-finite task-vector entries
    tau_t = float32(x_t) - float32(base) of every task, kept or dropped. TIES may drop a NaN/Inf input entry (NaN is
    never kept; an Inf beyond the top k is not), so the result's count alone would miss it; with the task vectors'
    a NaN/Inf in any input or in base (then every tau_t is non-finite there) always makes the count non-zero
    (MergeMethod.counts_nonfinite_inputs). An overflowing tau_t of finite inputs (near float32's range) counts too:
    a non-zero count says "look", and the result's own count is count_nonfinite(result)."""
    merged, bad_tau = _ties_counted(inputs, base, density, lam, weights, normalize)
    y, bad = into_out(finalize(merged, out_dtype), out)
    return y, bad + bad_tau


def disjoint_merge(task, T: int, ws, base32: torch.Tensor, lam32, normalize: bool) -> torch.Tensor:
    """The sign-consensus merge of TIES and its family, in mergekit's order of operations: d_t = w_t * task(t);
    pass 1 elects +1 where sum_t d_t >= 0 (a zero sum too), else -1; pass 2 adds the d_t whose sign agrees (and
    their weights, for normalize); base + lam * that. `task(t)` returns task t's (thinned) float32 task vector and
    is called twice per task, so only one is alive at a time; ws and lam32 are float32-rounded scalars."""
    vote = torch.zeros_like(base32)
    for t in range(T):
        vote.add_(task(t).mul(ws[t]))
    elected = torch.where(vote >= 0, 1.0, -1.0)
    del vote
    mixed = torch.zeros_like(base32)
    divisor = torch.zeros_like(base32) if normalize else None
    for t in range(T):
        d = task(t).mul(ws[t])
        agree = torch.sign(d) == elected
        mixed.add_(torch.where(agree, d, 0.0))
        if divisor is not None:
            divisor.add_(torch.where(agree, ws[t], 0.0))
    if divisor is not None:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return mixed.mul_(lam32).add_(base32)


# --- counter-based RNG for DARE --------------------------------------------------------------------------------
# splitmix64 of (seed + golden * index): a pure function of the flat index, so the mask does not depend on how
# the work is split into threads or CUDA blocks, and CPU and CUDA kernels give the same bits. torch has no
# general uint64 arithmetic, so this twin works in int64 (multiplication wraps the same way) and emulates
# logical right shifts with a mask.
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _i64(u: int) -> int:
    u &= (1 << 64) - 1
    return u - (1 << 64) if u >= (1 << 63) else u


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def dare_uniform(seed: int, numel: int, device=None) -> torch.Tensor:
    """U[0, 1) values (24-bit resolution, float32) for flat indices 0..numel-1 from seed."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    z = idx * _i64(_GOLDEN) + _i64(seed + _GOLDEN)
    z = (z ^ _shr(z, 30)) * _i64(_M1)
    z = (z ^ _shr(z, 27)) * _i64(_M2)
    z = z ^ _shr(z, 31)
    return _shr(z, 40).to(F32) * (1.0 / (1 << 24))


def dare(tau: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Drop each entry of tau with probability p and rescale survivors by 1/(1-p); float32 result.

    Entry i is dropped iff dare_uniform(seed)[i] < p (flat index in row-major order).
    """
    t32 = tau.to(F32)
    if p <= 0.0:
        return t32.clone() if t32 is tau else t32
    u = dare_uniform(seed, t32.numel(), t32.device).reshape(t32.shape)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return torch.where(u < p, 0.0, t32 * scale)
