"""Truncated SVDs for CART: exact (full thin SVD, then slice) and randomized (Halko, Martinsson & Tropp 2011).

All computations run in float32 on the matrix's device through torch.linalg (LAPACK/MKL on CPU, cuSOLVER on
GPU). The randomized path is written out here rather than calling torch.svd_lowrank because we need a
Gaussian sketch from a caller-given generator (seeded per tensor name, so results do not depend on processing
order), QR re-orthonormalisation at every power iteration, and the energy mode's adaptive widening.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Tuple, Union

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


SKETCH_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}

# The longest contraction whose int8 x int8 products cannot overflow torch._int_mm's int32 sums (127^2 per term).
INT8_MAX_INNER = (2 ** 31 - 1) // (127 * 127)


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> str:
    # torch has no public query for native bf16 / int8 dot products on the CPU; Linux's CPU flags say it directly.
    # Elsewhere we assume neither and stay in float32.
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _cpu_has_bf16_gemm() -> bool:
    flags = _cpu_flags()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _cpu_has_int8_gemm() -> bool:
    # VNNI (AVX512 or AVX) or AMX int8 dot products, which torch._int_mm's CPU GEMM runs on
    flags = _cpu_flags()
    return any(f in flags for f in (" avx512_vnni", " avx_vnni", " amx_int8"))


def fast_bf16_matmul(device) -> bool:
    """Whether bf16 GEMMs run natively (faster than float32) on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return _cpu_has_bf16_gemm()
    return False


def fast_int8_matmul(device) -> bool:
    """Whether int8 GEMMs with exact int32 sums (torch._int_mm) run natively on `device`: CPUs with VNNI or AMX.
    (On CUDA the range finder stays in bf16: its batched path multiplies (T, m, n) stacks, which _int_mm does
    not take.)"""
    return torch.device(device).type == "cpu" and _cpu_has_int8_gemm()


def resolve_sketch_dtype(choice: str, k: int, rows: int, cols: int, device) -> torch.dtype:
    """The dtype of the range finder's power-iteration GEMMs. "auto": int8 where the CPU multiplies int8 natively
    (VNNI/AMX), else bfloat16 where the hardware multiplies it natively, else float32. The reduced precision only
    *finds* the subspace: the float32 projection that follows (_refined_projection) keeps its rounding floor
    out of the result at every rank, so k does not enter the choice. int8 needs the long side below INT8_MAX_INNER.

    Measured 2026-12-01 (one thread, 768x3072 @ 3072x120: int8 1.73 ms, ~330 Gop/s; bf16 3.28 ms; float32 7.81;
    2048x5632 @ 5632x312: 19.2 / 38.4 / 91.9 ms), with the same rank-k errors as the bf16 range finder on every
    spectrum of tests/test_linalg.py and at the real sizes (docs/measurements.md, CART speed)."""
    if choice != "auto":
        return SKETCH_DTYPES[choice]
    if fast_int8_matmul(device) and max(rows, cols) <= INT8_MAX_INNER:
        return torch.int8
    return torch.bfloat16 if fast_bf16_matmul(device) else torch.float32


def sketch_width(k: int, oversample: Optional[int] = None) -> int:
    """Range-finder width k + p. oversample=None picks p = max(10, ceil(k / 4)).

    Measured on 768x3072 matrices with sigma_i ~ i^-1/2 (the slowest-decaying spectrum where the rank still
    matters; flat spectra are easy), rank-k error / optimal with 2 power iterations at k = 92:
    p = k/10: 1.0069, p = k/4: 1.0038, p = k/2: 1.0018. k/4 keeps a margin of > 2x to the 1.01 bound for
    the cost of 13% more sketch columns than k/10.

    Measured again with the float32 refinement (2026-12-01), share of the bound of tests/test_linalg.py's
    allowance (error - optimal over bound - optimal) used on that spectrum: 2048x5632, k = 245: p = k/4 0.41,
    k/6 0.57, k/8 0.64; 3072x768, k = 92: k/4 0.43, k/8 0.67. k/6 would save 7% of the sketch columns, but on
    bench/bench_cart_speed.py's first block (sigma_i ~ 1/i, k = 92, whose top-k subspace is not sharply
    defined) the merge then moves 13.5% of the low-rank update away from the exact-SVD merge instead of 9.5%
    (k/8: 16.1%), so k/4 stays. (Measured with the two-pass projection; that set now takes the one pass of
    _refined_projection, with which it moves 12.8% at k/4, 2026-12-02.)"""
    p = max(10, math.ceil(k / 4)) if oversample is None else int(oversample)
    return k + p


def power_iterations(k: int, rows: int, cols: int, power_iters: Optional[int] = None) -> int:
    """The number of (reduced-precision) power iterations; None picks it from k / min(rows, cols).

    With p = k/4 (the earlier default), sigma_i ~ i^-1/2, 768x3072, error / optimal: k = min/8 (92): q = 2
    gives 1.0038; k = min/4 (192): q = 2 gives 1.0062, q = 3 1.0025; k = min/2 (384): q = 3 gives 1.0049,
    q = 4 1.0023. So q = 2 up to min/8, 3 up to min/4 and 4 beyond, each < 1.005 there. One iteration fewer
    everywhere (measured again with the float32 refinement, 2026-12-01) breaks the bound of tests/test_linalg.py:
    1/sqrt(i), 3072x768, k = 92 uses 1.34x its allowance."""
    if power_iters is not None:
        return int(power_iters)
    short = min(rows, cols)
    return 2 if 8 * k <= short else (3 if 4 * k <= short else 4)


def exact_svd(a: torch.Tensor, k: Optional[int] = None) -> SVD:
    """Full thin SVD in float32, sliced to the top k triplets (all of them when k is None).

    A wide matrix is factored as its (tall) transpose: LAPACK's SVD through torch ran 2.3-2.7x faster so on this
    CPU (2048x5632: 6.97-7.34 s against 2.64-3.26 s for the transposed view, 2026-12-02), same singular values to
    1.2e-6."""
    a = a.to(torch.float32)
    if a.shape[-2] < a.shape[-1]:
        v, s, uh = torch.linalg.svd(a.mT, full_matrices=False)
        u, vh = uh.mT, v.mT
    else:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    if k is None:
        return u, s, vh
    return u[:, :k], s[:k], vh[:k]


def _orth(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of y's columns (Householder QR). y is handed to LAPACK column-major, the layout it
    factors in: a row-major y cost a hidden transposition, 2048 x 307: 25.0 ms against 19.4 ms plus a 1 ms copy
    (one thread, 2026-12-02)."""
    if y.stride(-2) != 1:
        y = y.mT.contiguous().mT
    return torch.linalg.qr(y, mode="reduced").Q


# A power iteration's basis comes from Cholesky-QR where, its columns normalised, R's diagonal spans at most this
# ratio; otherwise from Householder QR (_orth).
CHOLQR_MAX_RATIO = 100.0


def _iteration_basis(y: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis of span(y) for the next power iteration (not for the result: the final basis is
    _orth's). Cholesky-QR in float32, y R^-1 with R^T R = y^T y after normalising y's columns: it loses
    orthogonality as cond(y)^2 * 2^-24, ~0.07 at the cond(y) ~ 1100 that a 2048 x 5632 task vector's middle
    iteration had, a basis of condition ~1.07, which the next int8 or bf16 rounding (1/254 of a column) does not
    notice; where R's diagonal spans more than CHOLQR_MAX_RATIO (it underestimated cond(y) by up to ~20x there),
    or the factorisation fails, Householder QR. 2048 x 307, one thread: 14 ms against 20 ms for the QR (2026-12-02).
    An LU basis (P L, as some randomized SVDs use between iterations) was cheaper still but broke issue 12's bound
    (up to 5.9x its allowance): L's condition number multiplies the rounding noise."""
    yn = y / torch.linalg.vector_norm(y, dim=-2, keepdim=True).clamp_(min=torch.finfo(y.dtype).tiny)
    r, info = torch.linalg.cholesky_ex(yn.mT @ yn, upper=True)
    if bool((info == 0).all()):
        d = r.diagonal(dim1=-2, dim2=-1)
        if bool((d.amin(-1) * CHOLQR_MAX_RATIO > d.amax(-1)).all()):
            return torch.linalg.solve_triangular(r, yn, upper=True, left=False)
    return _orth(y)


def sketch(shape, width: int, generator: torch.Generator, device) -> torch.Tensor:
    """The Gaussian test matrix for an (m, n) matrix: (max(m, n), width), drawn on the CPU so every device sees
    the same numbers. The range finder works on the matrix's shorter side, so the sketch spans the longer one."""
    omega = torch.randn(max(int(shape[0]), int(shape[1])), width, generator=generator, dtype=torch.float32)
    return omega.to(device)


def sketch_in(omega: torch.Tensor, sketch_dtype: torch.dtype) -> torch.Tensor:
    """The sketch as the range finder's first GEMM takes it, converted once for the T tasks that share it:
    `sketch_dtype` for the float dtypes, int8 per column (_int8_lines) for int8."""
    if sketch_dtype == torch.int8:
        return omega if omega.dtype == torch.int8 else _int8_lines(omega.to(torch.float32), 0)
    return omega.to(sketch_dtype)


def _big_times(big: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """big @ x for a large bf16 `big` and a thin `x`, ordered so that big enters the GEMM in its stored
    row-major layout: when big is a transposed view, (x^T big^T)^T. oneDNN's bf16 GEMM runs ~25% slower when its
    first operand is a transposed view (measured on AVX512-BF16: 1.62 vs 1.24 ms for 768x3072 @ 3072x102), and
    a power iteration multiplies by both a and a^T, so one of the two is always such a view."""
    if big.stride(-1) == 1 or big.stride(-2) != 1:
        return big @ x
    return (x.mT @ big.mT).mT


def _f32_times(big: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """big @ x in float32 as (x^T big^T)^T, whichever way big is stored. MKL's sgemm ran faster so for both
    layouts (768x3072 row-major times 3072x115: 3.58 -> 3.32 ms; its transposed view times 768x115: 4.14 -> 3.51
    ms, load average 0.8), and the result comes out column-major, the layout LAPACK's QR takes without a copy."""
    return (x.mT @ big.mT).mT


INT8_BLOCK = 1 << 19  # float32 entries of _int8_rows's rounding block (2 MiB)


def _abs_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The largest magnitude of each line of x along `dim` (kept as a size-1 dim), from its max and min: no copy
    of x the size of x, as x.abs() would make."""
    return torch.maximum(x.amax(dim, keepdim=True), x.amin(dim, keepdim=True).neg_())


def _int8_rows(a: torch.Tensor, workspace: Optional[dict] = None):
    """a (m x n float32, row- or column-major) as s * q: q int8 in a's layout with |q| <= 127, s (m x 1) each
    row's largest magnitude / 127 (1 for a zero row). Each entry is rounded to 1/254 of its row's largest
    magnitude. Rounded in blocks of INT8_BLOCK entries along a's storage order, so that no float32 temporary as
    large as a is made. With a `workspace` dict, q and the block buffer are kept there and reused by the next
    call of the same layout (fresh ones cost their page faults on every call)."""
    s = _abs_max(a, -1).div_(127.0)
    s = torch.where(s > 0, s, 1.0)
    ws = {} if workspace is None else workspace
    q = ws.get("int8")
    if q is None or q.shape != a.shape or q.stride() != a.stride():
        q = ws["int8"] = torch.empty_like(a, dtype=torch.int8)  # keeps a's strides (dense a)
    dim = 0 if a.stride(-1) == 1 else 1  # along the storage-major dimension
    size, other = a.shape[dim], a.shape[1 - dim]
    step = max(1, min(size, INT8_BLOCK // max(1, other)))  # never a block larger than the matrix
    block = ws.get("block")
    if block is None or block.numel() < step * other:
        block = ws["block"] = torch.empty(step * other, dtype=torch.float32, device=a.device)
    for i in range(0, size, step):
        j = min(step, size - i)
        tmp = block[: j * other].view(j, other) if dim == 0 else block[: j * other].view(j, other).mT
        part = s.narrow(0, i, j) if dim == 0 else s
        torch.div(a.narrow(dim, i, j), part, out=tmp).round_()
        q.narrow(dim, i, j).copy_(tmp)
    return q, s


def _int8_lines(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x (float32 or int32) rounded to int8 with one scale per line along `dim` (dim=0: per column), each line's
    largest magnitude mapped to 127. The scales are dropped: the range finder only needs each thin operand's
    span, and a column scaling of x scales the product's columns, which neither a QR nor the next rounding sees."""
    scale = _abs_max(x, dim).to(torch.float32).div_(127.0).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.div(x, scale).round_().to(torch.int8)


def _rounding_floor(row_norms: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """An estimate of the spectral norm of a rounding-error matrix E with independent entries, from the norms of
    the rows and of the columns of its entries' standard deviations: the largest of each, added (the bound of
    Bandeira and van Handel for independent entries, without its constants and log term). The last dimension is
    reduced; 0-d for a matrix, (T,) for a batch. On the real task vectors of bench/peer's 0.5 B set the true
    ||E||_2 of the int8 copy was 0.78-0.84 of this estimate; tests/test_linalg.py checks int8 and bf16 copies,
    with and without outlier entries."""
    return row_norms.amax(-1) + col_norms.amax(-1)


def _range_finder_int8(a: torch.Tensor, omega: torch.Tensor, power_iters: int, workspace: Optional[dict]):
    """_range_finder with int8 GEMMs (torch._int_mm, exact int32 sums) for a wide float32 `a` (m <= n <=
    INT8_MAX_INNER): a = s q with per-row scales (_int8_rows), and each thin operand rounded to int8 per column
    (_int8_lines). torch._int_mm ran at ~1.8x the bf16 GEMM on AVX512-VNNI (resolve_sketch_dtype); rounding a
    to 1/254 of each row's largest entry is coarser than bf16 for small entries, a floor that the float32
    projection (_refined_projection) deals with as with bf16's. A leading batch dimension runs task by task.
    Returns the basis and the floor: each entry's rounding error is uniform in +-s_i / 2 (standard deviation
    s_i / sqrt(12)), whence _rounding_floor; the thin operands' rounding is not counted (a perturbed basis, which
    the next product with the matrix does not amplify).

    One iteration: Q = orth(y); x^T = int8((s Q)^T q) by rows (a^T Q up to column scales); y = s (q x), i.e.
    a a^T Q up to column scales, which the next QR does not see."""
    if a.dim() == 3:
        found = [_range_finder_int8(x, omega, power_iters, workspace) for x in a]
        return torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found])
    q, s = _int8_rows(a, workspace)
    y = torch.mul(torch._int_mm(q, sketch_in(omega[: a.shape[-1]], torch.int8)), s)
    for _ in range(power_iters):
        xt = torch._int_mm(_int8_lines(_iteration_basis(y).mul_(s), 0).mT, q)  # (w x n) int32: (s Q)^T q
        y = torch.mul(torch._int_mm(q, _int8_lines(xt, 1).mT), s)
    d = s.squeeze(-1) / math.sqrt(12.0)  # each row's entries' standard deviation
    return _orth(y), _rounding_floor(d * math.sqrt(a.shape[-1]), torch.linalg.vector_norm(d, dim=-1, keepdim=True))


def _range_finder(a: torch.Tensor, omega: torch.Tensor, power_iters: int, sketch_dtype: torch.dtype,
                  workspace: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Halko et al.'s range finder for a wide `a` (m <= n): an orthonormal float32 basis (m x w) of a's
    approximate top column space, probed with omega[:n], with `power_iters` subspace iterations (one QR each, on
    the short side), its GEMMs in `sketch_dtype`; and the floor, an estimate of the spectral norm of the error
    made by rounding `a` to `sketch_dtype` (_rounding_floor; 0-d, or (T,) for a batch). bfloat16 runs the GEMMs
    ~2.5x faster where the hardware multiplies bf16 natively, but rounding `a` to bf16 adds noise of ~2^-9 of
    each entry: directions whose sigma_i lie below the floor are lost (measured: error 25x the optimal on
    sigma_i ~ 0.9^i at k = 92 when the projection used the rounded matrix too), which the float32 projection
    (_refined_projection) deals with. int8: _range_finder_int8."""
    if sketch_dtype == torch.int8:
        return _range_finder_int8(a, omega, power_iters, workspace)
    lo = a if sketch_dtype == a.dtype else a.to(sketch_dtype)  # keeps a's layout
    y = _big_times(lo, omega[: a.shape[-1]].to(sketch_dtype)).to(torch.float32)
    for _ in range(power_iters):
        q = _iteration_basis(y).to(sketch_dtype)
        y = _big_times(lo, _big_times(lo.mT, q)).to(torch.float32)
    # round to nearest: relative error within +-u (unit roundoff), standard deviation ~ u |a_ij| / sqrt(3)
    sd = torch.finfo(sketch_dtype).eps / 2 / math.sqrt(3.0)
    floor = _rounding_floor(torch.linalg.vector_norm(a, dim=-1) * sd, torch.linalg.vector_norm(a, dim=-2) * sd)
    return _orth(y), floor


def _top_right(b: torch.Tensor, k: int):
    """The top-k right singular vectors (w x k) of a tall-thin float32 b (m x w) and its singular values,
    from the eigendecomposition of the w x w Gram matrix b^T b, formed and solved in float64.

    A w x w eigenproblem instead of an m x w SVD; float64 keeps the Gram's squared condition number harmless
    (directions down to sigma_i / sigma_1 ~ 1e-7 resolve, while float32 would mix everything below ~3e-4)."""
    evals, evecs = torch.linalg.eigh(_sym_gram64(b))
    top = torch.flip(evecs[..., -k:], dims=(-1,))
    s = torch.flip(evals[..., -k:], dims=(-1,)).clamp_(min=0.0).sqrt_()
    return top.to(b.dtype), s.to(b.dtype)


# Cholesky-QR of z is used when its R's diagonal spans at most this ratio (z's condition number <= ~1e5), so that
# R^-1 loses at most ~kappa^2 * 2^-53 ~ 1e-6 of orthogonality in float64; otherwise z gets a Householder QR.
GRAM_MAX_COND = 1e5

# The one-pass projection (_refined_projection) is kept where the weakest kept direction of q^T a stands at least
# this many times above the range finder's rounding floor. Calibrated 2026-12-02 on the seven spectra, four shapes
# and seven k of tests/test_linalg.py, the digits task vectors and the 768x3072 / 2048x5632 shapes, int8 range
# finder: where the one-pass result broke issue 12's bound (up to 6.8x its allowance), s_k / floor was at most
# 1.83; from 4.3 up it used at most 0.55 of the allowance (0.9^i, 480x160, k = 40), and at most 0.73 at the large
# shapes (1/sqrt(i), 3072x768, k = 92), the randomized SVD's own error rather than the floor's. 10 keeps 5x from
# the worst failure. The real task vectors of bench/peer's 0.5 B set stand 32-45x above the floor, the lab's digits
# ones 8-52x, bench/bench_cart_speed.py's synthetic ViT set 12-15x.
ONE_PASS_MARGIN = 10.0
# ... and where the sketch's weakest direction s_w is at most this share of s_k: with no gap after the k-th
# direction, a randomized SVD needs the extra power step. Calibrated with the above: the one case that broke the
# bound with sigma_k far above the floor (1.03x the allowance: 1/sqrt(i), 300x120, half its rows holding an entry
# 300x the largest, k = 15) had s_w / s_k = 0.966; sigma_i ~ 1/sqrt(i) and the real task vectors of the 0.5 B set,
# whose k = 0.12 min(m, n) and w = 1.25 k put it at ~0.89, used at most 0.73 of the allowance.
ONE_PASS_MAX_FLATNESS = 0.93


class _Projection(NamedTuple):
    """A rank-k approximation of a wide matrix, wide ~= (short @ short_rot) (long @ long_rot)^T, with s its k
    singular values. s_on_short: whether the short side's product is U_k S_k (and the long side's V_k, orthonormal),
    or the short side's is U_k (orthonormal) and the long side's V_k S_k."""
    short: torch.Tensor
    short_rot: torch.Tensor
    long: torch.Tensor
    long_rot: torch.Tensor
    s: torch.Tensor
    s_on_short: bool


def _sym_gram64(x: torch.Tensor) -> torch.Tensor:
    """x^T x in float64 for a tall float32 x (..., rows, w): the lower triangle in row blocks (_gram_lower; 20.8 ms
    against 27.2 ms for the full product at 5632 x 307, one thread, 2026-12-02), mirrored into the upper one."""
    x64 = x.to(torch.float64)
    if x64.dim() == 3:
        g = torch.stack([_gram_lower(t.mT) for t in x64])
    else:
        g = _gram_lower(x64.mT)
    low = g.tril()
    return low + low.tril(-1).mT


def _refined_projection(a: torch.Tensor, q: torch.Tensor, k: int, floor: torch.Tensor) -> _Projection:
    """The rank-k approximation of a wide float32 `a` from the range finder's column basis q (m x w), with
    float32 passes over the exact matrix, so that the range finder's rounding never enters the result.

    First pass: z = a^T q, and the eigendecomposition of z^T z (float64), i.e. the SVD of q^T a = U_B S V_B^T.
    Where every task's k-th singular value of q^T a stands ONE_PASS_MARGIN times above the range finder's rounding
    floor, and the sketch's weakest one at most ONE_PASS_MAX_FLATNESS of it, the result is a's orthogonal
    projection onto span(q U_k), (q U_k)(z U_k)^T, the standard randomized SVD: every kept direction lies far above
    the noise that rounding added to the range finder, so q holds them as a float32 range finder would (measured:
    ONE_PASS_MARGIN). This saves the second pass, ~20% of a task (2048 x 5632, k = 245).

    Otherwise, a second pass: a's best rank-k approximation in the row space span(z), as (b top)(z top)^T with
    b = a z and top (w x k) from the w x w problem below, so that z top is orthonormal and b top = U_k S_k. A
    further power step on the exact matrix: directions the range finder's rounding lost are recovered from the
    exact matrix (0.9^i, 768x3072, k = 92: 2.3x optimal = optimal + 8e-5 ||a||_F, as low as an all-float32 range
    finder gets there: 2.5x).

    How: z is orthonormalised by Cholesky-QR in float64 without forming the basis: with z^T z = R^T R,
    p = z R^-1 is never built; b' = a z is computed instead of a p, and the w x w problem becomes
    R^-T (b'^T b') R^-1, whose eigenvectors V give top = R^-1 V_k over p = z, b = b'. That replaces z's
    n x w Householder QR by a float64 Gram and w x w work: a whole task took 0.85-0.96x the Householder version's
    time at the ViT-B/32 shapes (interleaved, loaded machine; docs/measurements.md, CART speed), with the same errors on the
    accuracy tests. Where z is too ill-conditioned for Cholesky-QR (fast-decaying spectra), z gets the
    Householder QR.
    """
    z = _f32_times(a.mT, q)
    gz = _sym_gram64(z)
    evals, evecs = torch.linalg.eigh(gz)
    s = torch.flip(evals[..., -k:], dims=(-1,)).clamp_(min=0.0).sqrt_()
    weakest = s[..., -1]
    sketch_weakest = evals[..., 0].clamp(min=0.0).sqrt()
    one_pass = (weakest > 0) & (weakest >= ONE_PASS_MARGIN * floor.to(weakest.dtype))
    if bool((one_pass & (sketch_weakest <= ONE_PASS_MAX_FLATNESS * weakest)).all()):
        u = torch.flip(evecs[..., -k:], dims=(-1,)).to(torch.float32)
        return _Projection(q, u, z, u, s.to(torch.float32), s_on_short=False)
    r, info = torch.linalg.cholesky_ex(gz, upper=True)
    if bool((info == 0).all()):
        d = r.diagonal(dim1=-2, dim2=-1)
        if bool((d.amin(-1) * GRAM_MAX_COND > d.amax(-1)).all()):
            b = _f32_times(a, z)
            w_ = torch.linalg.solve_triangular(r.mT, _sym_gram64(b), upper=False)  # R^-T H
            g = torch.linalg.solve_triangular(r.mT, w_.mT, upper=False)  # R^-T H R^-1 (H symmetric)
            evals, evecs = torch.linalg.eigh((g + g.mT) * 0.5)
            top = torch.linalg.solve_triangular(r, torch.flip(evecs[..., -k:], dims=(-1,)), upper=True)
            top = top.to(torch.float32)
            s = torch.flip(evals[..., -k:], dims=(-1,)).clamp_(min=0.0).sqrt_()
            return _Projection(b, top, z, top, s.to(torch.float32), s_on_short=True)
    p = _orth(z)
    b = _f32_times(a, p)
    top, s = _top_right(b, k)
    return _Projection(b, top, p, top, s, s_on_short=True)


def _sketched(a: torch.Tensor, omega: torch.Tensor, k: int, power_iters: int, sketch_dtype: torch.dtype,
              workspace: Optional[dict] = None):
    """The randomized SVD's shared steps on the shorter side of `a` (a^T when a is tall): the _Projection of the
    wide view, and whether it describes a^T (flipped)."""
    flipped = a.shape[-2] > a.shape[-1]
    wide = a.mT if flipped else a
    q, floor = _range_finder(wide, omega, power_iters, sketch_dtype, workspace)
    return _refined_projection(wide, q, k, floor), flipped


def randomized_svd_from_sketch(
    a: torch.Tensor, omega: torch.Tensor, k: int, power_iters: int, sketch_dtype: torch.dtype = torch.float32
) -> SVD:
    """Top-k SVD (U, S, Vh) of `a` (m x n float32) from the range of its shorter side probed with `omega`."""
    pr, flipped = _sketched(a, omega, k, power_iters, sketch_dtype)
    u, v = pr.short @ pr.short_rot, pr.long @ pr.long_rot
    inv = torch.where(pr.s > 0, pr.s, 1.0)[..., None, :]
    if pr.s_on_short:
        u = u / inv
    else:
        v = v / inv
    return (v, pr.s, u.mT) if flipped else (u, pr.s, v.mT)


def randomized_lowrank_factors(
    a: torch.Tensor,
    omega: torch.Tensor,
    k: int,
    power_iters: int,
    sketch_dtype: torch.dtype = torch.float32,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    workspace: Optional[dict] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same rank-k approximation as randomized_svd_from_sketch, as two factors: a ~= lt^T @ r with lt
    (k x m) and r (k x n), without dividing by S (which of the two carries S is the projection's choice,
    _refined_projection).

    `out` = (lt, r) buffers to write into, e.g. row blocks of larger buffers that gather the factors of several
    matrices so that their sum is one GEMM (CART's accumulation).

    `a` may carry a leading batch dimension (T, m, n), e.g. T tasks' matrices of one tensor on a GPU, where one
    batched GEMM/QR/eigh per step replaces T small launches; lt and r are then (T, k, m) and (T, k, n).

    `workspace`: a dict the caller keeps for successive calls (one per thread), in which the int8 range finder
    keeps its copy of the matrix and its rounding block instead of allocating (and page-faulting) fresh ones per
    call.
    """
    pr, flipped = _sketched(a, omega, k, power_iters, sketch_dtype, workspace)
    lt_out, r_out = (None, None) if out is None else out
    short_out, long_out = (r_out, lt_out) if flipped else (lt_out, r_out)
    short_t = torch.matmul(pr.short_rot.mT, pr.short.mT, out=short_out)  # (k x short side)
    long_t = torch.matmul(pr.long_rot.mT, pr.long.mT, out=long_out)  # (k x long side)
    return (long_t, short_t) if flipped else (short_t, long_t)


def randomized_svd(
    a: torch.Tensor,
    k: int,
    oversample: Optional[int] = None,
    power_iters: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    omega: Optional[torch.Tensor] = None,
    sketch_dtype: str = "auto",
) -> SVD:
    """Rank-k SVD of `a` by a randomized range finder of width sketch_width(k, oversample), with
    power_iterations(k, m, n, power_iters) power iterations and the float32 projection (_refined_projection).

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
    q = power_iterations(k, m, n, power_iters)
    return randomized_svd_from_sketch(a.to(torch.float32), omega, k, q, dt)


def energy_rank(s: torch.Tensor, total_energy: float, fraction: float) -> int:
    """Smallest k whose top-k sum of squared singular values reaches fraction * total_energy, or 0 if s falls short."""
    if total_energy <= 0.0:
        return 1
    cum = torch.cumsum(s.double() ** 2, 0)
    hit = torch.nonzero(cum >= fraction * total_energy * (1 - 1e-12))
    return int(hit[0, 0]) + 1 if hit.numel() else 0


# The Gram route (gram_energy_svd) answers only where the weakest kept direction's eigenvalue is at least this share
# of the largest (sigma_k >= ~3e-3 sigma_1). Below that, the float32 Gram's rounding (eps * lambda_1) starts to mix
# the kept directions with the dropped ones: at fraction 0.999999 on sigma_i ~ 0.9^i (lambda_k / lambda_1 ~ 1e-6)
# its rank-k error was 1.07x the optimal, against 1.0000 at every fraction from 0.5 to 0.99 (lambda_k / lambda_1 down
# to ~3e-4), measured 2026-12-02 over the seven spectra and three shapes of tests/test_linalg.py, which checks the
# latter.
GRAM_MIN_EIG = 1e-5


def _gram_lower(w: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """The lower triangle of w @ w^T (w: short x long), in `blocks` row blocks that each multiply only the rows up to
    their own: 10/16 of the full product's work for 4 blocks. torch has no SYRK, and eigh reads only the lower
    triangle (its default UPLO='L'), so the upper one is left unwritten. 2048 x 5632: 0.20 s against 0.38 s for
    w @ w^T (8 blocks 0.19 s; scipy's ssyrk 0.18 s, not a dependency), 2 threads, 2026-12-02."""
    m = w.shape[0]
    g = torch.empty(m, m, dtype=w.dtype, device=w.device)
    step = max(1, -(-m // blocks))
    for i in range(0, m, step):
        j = min(m, i + step)
        torch.matmul(w[i:j], w[:j].mT, out=g[i:j, :j])
    return g


def gram_energy_svd(a: torch.Tensor, fraction: float, total_energy: float) -> Optional[SVD]:
    """energy_svd's exact route without an SVD of `a`: the eigendecomposition of the Gram matrix of a's shorter
    side (float32), the smallest k whose top-k eigenvalues reach fraction * total_energy, and a's projection onto
    those k eigenvectors, whose row (column) norms are the singular values. None where the weakest kept
    eigenvalue is below GRAM_MIN_EIG of the largest: the caller then takes the exact SVD.

    The eigenvectors (the short side's factor) are orthonormal; the other factor's vectors are a's normalised
    projections onto them, orthonormal only as far as the Gram resolves nearly equal singular values (it squares
    their gaps): within 1.9e-4 on tests/test_linalg.py's spectra. Their product, a's projection onto the top-k
    subspace, is what the rank-k error and CART see.

    Why: on a near-full-rank 2048 x 5632 task (the 4 x 0.5 B set of bench/peer needs 28-42% of the directions for
    90% of the energy) the Gram GEMM took 0.29 s (_gram_lower: 0.20 s) and its eigh 0.60 s against 2.67 s for
    LAPACK's thin SVD of the transposed matrix (2 threads, quiet, 2026-12-02); the projection adds one GEMM of
    inner size min(m, n)."""
    wide = a.shape[-2] <= a.shape[-1]
    evals, evecs = torch.linalg.eigh(_gram_lower(a if wide else a.mT))
    evals, evecs = evals.flip(-1).clamp_(min=0.0), evecs.flip(-1)
    k = energy_rank(evals.sqrt(), total_energy, fraction) or len(evals)
    if k < len(evals) and float(evals[k - 1]) < GRAM_MIN_EIG * float(evals[0]):
        return None
    basis = evecs[:, :k]
    if wide:
        sv = basis.mT @ a  # S_k Vh_k
        s = torch.linalg.vector_norm(sv, dim=1)
        return basis, s, sv / torch.where(s > 0, s, 1.0)[:, None]
    us = a @ basis  # U_k S_k
    s = torch.linalg.vector_norm(us, dim=0)
    return us / torch.where(s > 0, s, 1.0), s, basis.mT


def energy_svd(
    a: torch.Tensor,
    fraction: float,
    mode: str = "randomized",
    oversample: Optional[int] = None,
    power_iters: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    start_width: int = 32,
    sketch_dtype: str = "auto",
) -> SVD:
    """Truncated SVD whose rank is the smallest k holding `fraction` of ||a||_F^2 in its sigma^2.

    Randomized mode widens the sketch until its top singular values reach the target energy, then keeps the
    smallest k that does; once the sketch would be half as wide as the matrix, it switches to the Gram route
    (gram_energy_svd: eigh of the short side's Gram matrix), or to the exact SVD where that route declines. After a
    sketch of width w falls short, the energy still missing, spread over directions no stronger than the w-th
    (sigma_i <= sigma_w for i > w), needs at least missing / sigma_w^2 more of them: the next width is at least
    w plus that. Where that bound needs a sketch wider than a quarter of the short side, the Gram route comes at
    once: a tail flat enough to push the bound that far holds more than the bound says, so such a randomized SVD
    usually falls short (the 4 x 0.5 B set of bench/peer, 90% of the energy: 578 of 2048 directions for a q_proj,
    864 for a down_proj; after widths 32 and 66 the bound said 466 and 705, and the randomized SVDs at those
    widths took 0.42 and 1.33 s before the exact ones, 1.64 and 2.64 s; doubling from 32, as before, spent five
    randomized SVDs). With the Gram route those two tasks took 0.91 and 1.03 s in all, against 1.89 and 2.75 s
    with the exact SVD in its place, the same k and rank-k errors equal to the exact ones to 1e-6 (2 threads,
    2026-12-02). The bound uses the sketch's estimates, which run slightly low, so it can overshoot: the Gram
    route then comes early, which costs time, never accuracy. mode="exact" always takes LAPACK's SVD.

    Measured against the Gram route and not taken (2026-12-03, one thread as each task worker runs, task 1 of
    layer 3's gate_proj in bench/peer's 0.5 B set, its 2048 x 5632 view, k = 855 at 90%): an incremental
    randomized QB that stops once ||B||_F^2 = ||Q^T a||_F^2 reaches the fraction (randQB_EI of Yu, Gu and Li,
    2018: blocks of b columns, each deflated against the basis so far and power-iterated on the deflated
    matrix, bf16 range GEMMs, B in float32), i.e. the energy target by construction without a full
    factorisation. b = 128 with one power step took 2.41 s and kept k = 953 (1.11x the minimal k: a flat noise
    tail is captured less well by a random subspace than by its top eigenvectors); two steps 3.06 s, k = 886;
    no step 2.48 s, k = 1121; b = 256 2.26 s, k = 954; the Gram route 2.11 s with the minimal k.
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
            missing = fraction * total - float(s.double().pow(2).sum())
            weakest = float(s[-1]) ** 2 if len(s) else 0.0
            at_least = width + (math.ceil(missing / weakest) if weakest > 0 else min(m, n))
            if sketch_width(at_least, oversample) >= min(m, n) // 4:
                break
            width = max(2 * width, at_least)
        found = gram_energy_svd(a, fraction, total)
        if found is not None:
            return found
    u, s, vh = exact_svd(a)
    k = energy_rank(s, total, fraction) or len(s)
    return u[:, :k], s[:k], vh[:k]
