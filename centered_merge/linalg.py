"""Truncated SVDs for CART: exact (full thin SVD, then slice) and randomized (Halko, Martinsson & Tropp 2011).

All computations run in float32 on the matrix's device through torch.linalg (LAPACK/MKL on CPU, cuSOLVER on
GPU). The randomized path is written out here rather than calling torch.svd_lowrank because we need a
Gaussian sketch from a caller-given generator (seeded per tensor name, so results do not depend on processing
order), QR re-orthonormalisation at every power iteration, and the energy mode's adaptive widening.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple, Union

import torch

from .errors import MergeConfigError

SVD = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (m,k), S (k,), Vh (k,n)


def resolve_rank(rank: Union[int, float], rows: int, cols: int) -> int:
    """k for a (rows, cols) matrix.

    float r in (0, 1]: k = max(1, floor(r * min(rows, cols))) as in the CART paper; int k >= 1: min(k, min(rows, cols)).
    Note that 1 (int) means rank one while 1.0 (float) means full rank.
    """
    full = min(rows, cols)
    if isinstance(rank, bool):
        raise MergeConfigError(f"rank must be a float ratio in (0, 1] or an int >= 1; got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise MergeConfigError(f"rank as an absolute int must be >= 1; got {rank}")
        return min(rank, full)
    if isinstance(rank, float):
        if not (0.0 < rank <= 1.0) or math.isnan(rank):
            raise MergeConfigError(f"rank as a ratio must be in (0, 1]; got {rank}")
        return max(1, min(full, math.floor(rank * full + 1e-9)))
    raise MergeConfigError(f"rank must be a float ratio in (0, 1] or an int >= 1; got {type(rank).__name__} {rank!r}")


SKETCH_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_gemm() -> bool:
    # torch has no public query for native bf16 dot products on the CPU; Linux's CPU flags say it directly
    # (AVX512-BF16 or AMX-BF16). Elsewhere we assume not and stay in float32.
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def fast_bf16_matmul(device) -> bool:
    """Whether bf16 GEMMs run natively (faster than float32) on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return _cpu_has_bf16_gemm()
    return False


def resolve_sketch_dtype(choice: str, k: int, rows: int, cols: int, device) -> torch.dtype:
    """The dtype of the range finder's GEMMs. "auto": bfloat16 where the hardware multiplies it natively and
    k <= min(rows, cols) / 4 (at larger k the bf16 noise floor, ~1e-4 sigma_1, nears the optimal error and
    costs more than 2%), float32 otherwise."""
    if choice != "auto":
        return SKETCH_DTYPES[choice]
    if 4 * k <= min(rows, cols) and fast_bf16_matmul(device):
        return torch.bfloat16
    return torch.float32


def sketch_width(k: int, oversample: Optional[int] = None) -> int:
    """Range-finder width k + p. oversample=None picks p = max(10, ceil(k / 10)): a fixed 10 is Halko et al.'s
    usual choice, but at large k (a third of the matrix and more) the error then drifts past 2% of optimal on
    slowly decaying spectra; growing p with k keeps it within 2% (tests/test_linalg.py)."""
    p = max(10, math.ceil(k / 10)) if oversample is None else int(oversample)
    return k + p


def exact_svd(a: torch.Tensor, k: Optional[int] = None) -> SVD:
    """Full thin SVD in float32, sliced to the top k triplets (all of them when k is None)."""
    u, s, vh = torch.linalg.svd(a.to(torch.float32), full_matrices=False)
    if k is None:
        return u, s, vh
    return u[:, :k], s[:k], vh[:k]


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def sketch(shape, width: int, generator: torch.Generator, device) -> torch.Tensor:
    """The Gaussian test matrix for an (m, n) matrix: (max(m, n), width), drawn on the CPU so every device sees
    the same numbers. The range finder works on the matrix's shorter side, so the sketch spans the longer one."""
    omega = torch.randn(max(int(shape[0]), int(shape[1])), width, generator=generator, dtype=torch.float32)
    return omega.to(device)


def _top_eigvecs(b: torch.Tensor, k: int):
    """The top-k left singular vectors of a short-wide sketch b (w x n, w small) and their singular values,
    from the eigendecomposition of the w x w Gram matrix b b^T.

    Much cheaper than a LAPACK SVD of b (a w x w eigenproblem instead of a w x n bidiagonalisation). Float32
    suffices: the Gram matrix squares the condition number, so directions with sigma_i / sigma_1 below ~3e-4
    come out as arbitrary orthonormal mixtures, but the rank-k result top top^T b is an exact orthogonal
    projection of b whatever those vectors are, and such directions carry at most ~1e-7 of the energy.
    Float64 here (Gram, eigh and the product with b) took about an eighth of CART's time on ViT-sized matrices
    and changed no error by more than rounding (tests/test_linalg.py holds the 2% bound either way).
    """
    evals, evecs = torch.linalg.eigh(b @ b.mT)
    top = torch.flip(evecs[:, -k:], dims=(1,))
    s = torch.flip(evals[-k:], dims=(0,)).clamp_(min=0.0).sqrt_()
    return top, s


def _range_basis(a: torch.Tensor, omega: torch.Tensor, power_iters: int, sketch_dtype: torch.dtype) -> torch.Tensor:
    """Orthonormal basis (m x w) of the range of a wide float32 `a` (m <= n), probed with omega[:n].

    Halko et al.'s range finder with `power_iters` subspace iterations, one QR per iteration (after a a^T),
    which in float32 keeps every direction whose sigma_i / sigma_1 exceeds ~1e-4, far beyond the ranks CART
    keeps. Running on the shorter side makes every QR one of an m x w block.

    sketch_dtype=torch.bfloat16 runs the sketch and the power iterations (the GEMMs that only *find* the
    subspace) in bfloat16, ~2.5x faster where the hardware multiplies bf16 natively. The basis is
    orthonormalised in float32 and everything after it (the projection Q^T a, the small eigenproblem, the
    factors) is float32, so bf16 rounding (~2^-9 of each entry) can only tilt the subspace by about that much:
    the rank-k error stays within 2% of optimal (tests/test_linalg.py).
    """
    lo = a if sketch_dtype == a.dtype else a.to(sketch_dtype)  # keeps a's layout
    y = _big_times(lo, omega[: a.shape[1]].to(sketch_dtype)).to(a.dtype)
    for _ in range(power_iters):
        q = _orth(y).to(sketch_dtype)
        y = _big_times(lo, _big_times(lo.mT, q)).to(a.dtype)
    return _orth(y)


def _big_times(big: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """big @ x for a large `big` and a thin `x`, ordered so that big enters the GEMM in its stored row-major
    layout: when big is a transposed view, (x^T big^T)^T. oneDNN's bf16 GEMM runs ~25% slower when its first
    operand is a transposed view (measured on AVX512-BF16: 1.62 vs 1.24 ms for 768x3072 @ 3072x102), and a
    power iteration multiplies by both a and a^T, so one of the two is always such a view."""
    if big.stride(-1) == 1 or big.stride(-2) != 1:
        return big @ x
    return (x.mT @ big.mT).mT


def _sketched(a: torch.Tensor, omega: torch.Tensor, k: int, power_iters: int, sketch_dtype: torch.dtype):
    """The randomized SVD's shared steps, on the shorter side of `a` (a^T when a is tall): the range basis q,
    the projection b = q^T a, and b's top-k left singular vectors `top` (w x k) and values s. Returns
    (q, b, top, s, flipped), flipped telling whether they describe a^T."""
    flipped = a.shape[0] > a.shape[1]
    wide = a.mT if flipped else a
    q = _range_basis(wide, omega, power_iters, sketch_dtype)
    b = q.mT @ wide
    top, s = _top_eigvecs(b, k)
    return q, b, top, s, flipped


def randomized_svd_from_sketch(
    a: torch.Tensor, omega: torch.Tensor, k: int, power_iters: int, sketch_dtype: torch.dtype = torch.float32
) -> SVD:
    """Top-k SVD (U, S, Vh) of `a` (m x n float32) from the range of its shorter side probed with `omega`."""
    q, b, top, s, flipped = _sketched(a, omega, k, power_iters, sketch_dtype)
    u, vh = q @ top, (top.mT @ b) / torch.where(s > 0, s, 1.0)[:, None]
    return (vh.mT, s, u.mT) if flipped else (u, s, vh)


def randomized_lowrank_factors(
    a: torch.Tensor,
    omega: torch.Tensor,
    k: int,
    power_iters: int,
    sketch_dtype: torch.dtype = torch.float32,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same rank-k approximation as randomized_svd_from_sketch, as two factors: a ~= lt^T @ r with lt
    (k x m) and r (k x n), i.e. lt^T = U_k and r = S_k Vh_k, without the division by S and re-multiplication.

    `out` = (lt, r) buffers to write into, e.g. row blocks of larger buffers that gather the factors of several
    matrices so that their sum is one GEMM (CART's accumulation).
    """
    q, b, top, _, flipped = _sketched(a, omega, k, power_iters, sketch_dtype)
    lt_out, r_out = (None, None) if out is None else out
    basis_out, proj_out = (r_out, lt_out) if flipped else (lt_out, r_out)
    basis_t = torch.mm(top.mT, q.mT, out=basis_out)  # (k x short side) = U_k^T of the wide view
    proj = torch.mm(top.mT, b, out=proj_out)  # (k x long side) = S_k Vh_k of the wide view
    return (proj, basis_t) if flipped else (basis_t, proj)


def randomized_svd(
    a: torch.Tensor,
    k: int,
    oversample: Optional[int] = None,
    power_iters: int = 2,
    generator: Optional[torch.Generator] = None,
    omega: Optional[torch.Tensor] = None,
    sketch_dtype: str = "auto",
) -> SVD:
    """Rank-k SVD of `a` by a randomized range finder of width sketch_width(k, oversample).

    Falls back to the exact SVD when the sketch would be at least as wide as the matrix is thin (no saving).
    Pass `omega` to reuse one sketch for several matrices of the same shape.
    """
    m, n = a.shape
    width = sketch_width(k, oversample)
    if width >= min(m, n):
        return exact_svd(a, k)
    if omega is None:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        omega = sketch((m, n), width, generator, a.device)
    dt = resolve_sketch_dtype(sketch_dtype, k, m, n, a.device)
    return randomized_svd_from_sketch(a.to(torch.float32), omega, k, power_iters, dt)


def energy_rank(s: torch.Tensor, total_energy: float, fraction: float) -> int:
    """Smallest k whose top-k sum of squared singular values reaches fraction * total_energy, or 0 if s falls short."""
    if total_energy <= 0.0:
        return 1
    cum = torch.cumsum(s.double() ** 2, 0)
    hit = torch.nonzero(cum >= fraction * total_energy * (1 - 1e-12))
    return int(hit[0, 0]) + 1 if hit.numel() else 0


def energy_svd(
    a: torch.Tensor,
    fraction: float,
    mode: str = "randomized",
    oversample: Optional[int] = None,
    power_iters: int = 2,
    generator: Optional[torch.Generator] = None,
    start_width: int = 32,
    sketch_dtype: str = "auto",
) -> SVD:
    """Truncated SVD whose rank is the smallest k holding `fraction` of ||a||_F^2 in its sigma^2.

    Randomized mode widens the sketch (doubling) until its top singular values reach the target energy, then
    keeps the smallest k that does; once the sketch would be half as wide as the matrix, it switches to exact.
    """
    a = a.to(torch.float32)
    m, n = a.shape
    total = float(torch.linalg.matrix_norm(a.double() if a.device.type == "cpu" else a) ** 2)
    if mode == "randomized":
        width = start_width
        while sketch_width(width, oversample) < min(m, n) // 2:
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            u, s, vh = randomized_svd(a, width, oversample, power_iters, generator=g, sketch_dtype=sketch_dtype)
            k = energy_rank(s, total, fraction)
            if k:
                return u[:, :k], s[:k], vh[:k]
            width *= 2
    u, s, vh = exact_svd(a)
    k = energy_rank(s, total, fraction) or len(s)
    return u[:, :k], s[:k], vh[:k]
