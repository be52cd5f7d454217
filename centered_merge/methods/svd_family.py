"""What the task-vector SVD merges (TSV-M, Iso-C, Iso-CTS) share: the top-k SVD in exact or randomized mode,
the polar factor (nearest matrix with orthonormal columns), the parameter checks, and the per-tensor frame
"base + alpha * merged task vector" with the mean task vector for tensors that are not treated as matrices.

The math of each method is a plain function of float32 matrices (tsv.py, iso.py) so it can be tested against a
textbook reference and reused outside the method classes.
"""
from __future__ import annotations

import torch

from .. import ops
from ..linalg import SKETCH_DTYPES, exact_svd, randomized_svd, sketch_width
from ..seeding import generator
from ..selection import PRESETS, make_selector, matrix_shape
from .base import MergeMethod, numel_of
from .params import Param, seed_param

SVD_MODES = ("randomized", "exact")


def top_svd(a: torch.Tensor, k: int, svd: str = "exact", oversample=None, power_iters: int = 2,
            seed: int = 0, name: str = "", sketch_dtype: str = "auto"):
    """Top-k (U, S, Vh) of a float32 matrix: exact (top_svd_exact), or linalg's randomized range finder
    (which itself falls back to the exact thin SVD when its sketch would be as wide as the matrix is thin)."""
    if svd == "randomized":
        return randomized_svd(a, k, oversample, power_iters, generator=generator(int(seed), name),
                              sketch_dtype=sketch_dtype)
    return top_svd_exact(a, k)


# The Gram routes below replace SVDs of tall (m x w, m >> w) matrices by the eigendecomposition of their w x w
# Gram matrix, formed in float64: on a 32000 x 2048 matrix (a Llama embedding; TSV-M's concatenated U there is as
# large) LAPACK's SVD spends most of its time on the m x w side, the Gram costs one GEMM (bench/bench_svd_family.py).
# float64 keeps the Gram's squared condition number harmless: at eigenvalue ratios >= GRAM_MIN_RATIO
# (kappa <= 1e4) its rounding (1e-16 kappa^2 <= 1e-8) stays below float32's, so the results equal the SVD's to
# float32 accuracy; below that (rank-deficient or nearly so, e.g. a zero task vector) the SVD is used.
GRAM_MIN_RATIO = 1e-8
_BLOCK_BYTES = 64 << 20  # float64 row blocks of the long side: memory stays at one such block beyond the fp32 data


def _row_blocks(rows: int, cols: int):
    step = max(256, _BLOCK_BYTES // (8 * max(cols, 1)))
    return range(0, rows, step), step


def _tall(a: torch.Tensor) -> torch.Tensor:
    """a as a tall matrix: a^T (a view) when a is wide."""
    return a.mT if a.shape[-2] < a.shape[-1] else a


def gram64(a: torch.Tensor) -> torch.Tensor:
    """The short side's Gram matrix in float64 (a^T a for a tall a, a a^T for a wide one), summed over row blocks
    of the long side so that no float64 copy of `a` is made."""
    t = _tall(a)
    starts, step = _row_blocks(t.shape[0], t.shape[1])
    g = torch.zeros(t.shape[1], t.shape[1], dtype=torch.float64, device=a.device)
    for i in starts:
        blk = t[i:i + step].to(torch.float64)
        g.addmm_(blk.mT, blk)
    return g


def times64(a: torch.Tensor, x: torch.Tensor, out=None) -> torch.Tensor:
    """For a tall `a` (m x w) and a float64 (w x c) `x`: a @ x, multiplied in float64 by row blocks, as float32;
    for a wide `a` (w x n): x^T @ a, i.e. (a^T @ x)^T. So the short side of `a` is the one contracted.
    out=a (when c = w) writes the result over `a`: each row block is read before it is overwritten."""
    t = _tall(a)
    if out is None:
        res = torch.empty(t.shape[0], x.shape[1], dtype=torch.float32, device=a.device)
    else:
        res = _tall(out)
    starts, step = _row_blocks(t.shape[0], max(t.shape[1], x.shape[1]))
    for i in starts:
        res[i:i + step] = t[i:i + step].to(torch.float64) @ x
    if out is not None:
        return out
    return res.mT if t is not a else res


def short_eigh(a: torch.Tensor):
    """(lambda, W): the short side's Gram eigenvalues (descending, clamped at 0) and eigenvectors (float64); the
    squared singular values of `a` and its right (tall a) or left (wide a) singular vectors."""
    lam, w = torch.linalg.eigh(gram64(a))
    return lam.flip(0).clamp_(min=0.0), w.flip(1)


def _well_conditioned(lam: torch.Tensor, k: int) -> bool:
    return lam.numel() > 0 and bool(lam[0] > 0) and bool(lam[k - 1] >= GRAM_MIN_RATIO * lam[0])


def inv_sqrt_gram(a: torch.Tensor):
    """(G^{-1/2}, sqrt(lambda)) for the short side's Gram G of `a`, float64, or None when G is too close to
    singular for the Gram route (see GRAM_MIN_RATIO)."""
    lam, w = short_eigh(a)
    if not _well_conditioned(lam, lam.numel()):
        return None
    s = lam.sqrt()
    return (w / s) @ w.mT, s


def top_svd_exact(a: torch.Tensor, k: int):
    """The top-k (U, S, Vh) of a float32 matrix, equal to the exact thin SVD's to float32 accuracy: from the
    short side's float64 Gram (eigh) and one float64 product for the long side's vectors; the exact thin SVD
    itself where the k-th singular value is too small for that (see GRAM_MIN_RATIO)."""
    if a.numel() == 0 or k <= 0:
        return exact_svd(a, k)
    lam, w = short_eigh(a)
    if not _well_conditioned(lam, k):
        return exact_svd(a, k)
    s = lam[:k].sqrt()
    long_side = times64(a, w[:, :k] / s)  # a v_i / s_i (tall) or (u_i^T a / s_i) (wide)
    short_side = w[:, :k].to(torch.float32)
    s = s.to(torch.float32)
    if a.shape[-2] < a.shape[-1]:
        return short_side, s, long_side
    return long_side, s, short_side.mT


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor W Z^T of a = W S Z^T (the nearest matrix with orthonormal columns, or rows
    when a is wide): what TSV-M and Iso-CTS use to decorrelate the concatenated singular vectors. a (G^{-1/2})
    from the short side's Gram (G^{-1/2} a for a wide a), the SVD where G is nearly singular."""
    return polar_and_singular_values(a)[0]


def polar_(a: torch.Tensor) -> torch.Tensor:
    """polar(a) written over `a` (one float64 row block of extra memory on the Gram route instead of a copy)."""
    return polar_and_singular_values(a, inplace=True)[0]


def polar_and_singular_values(a: torch.Tensor, inplace: bool = False):
    """(polar(a), singular values of a), as polar() computes them (Iso-C needs both of one matrix); with
    inplace=True the polar factor is written over `a`."""
    got = inv_sqrt_gram(a) if a.numel() else None
    if got is None:
        w, s, zh = torch.linalg.svd(a, full_matrices=False)
        p = w @ zh
        return (a.copy_(p) if inplace else p), s
    return times64(a, got[0], out=a if inplace else None), got[1].to(torch.float32)


def task_vectors_mean(inputs, base32: torch.Tensor) -> torch.Tensor:
    """mean_t (theta_t - theta_0), summed task vector by task vector so small differences do not cancel."""
    acc = torch.zeros_like(base32)
    tau = torch.empty_like(base32)
    for w in inputs:
        acc.add_(ops.center_into(w, base32, tau))
    return acc.div_(len(inputs))


class TaskVectorSVDMethod(MergeMethod):
    """Frame of the three methods: out = base + alpha * f(tau_1..tau_T) for selected matrices, and
    out = base + alpha * mean_t tau_t for every other float tensor (as the papers' code does).

    Subclasses set `name`, `parameters` (alpha_param, SELECT_PARAMS and, where used, randomized_params()) and implement `merge_matrix`
    (float32 (m, n) task vectors -> merged task vector) and `matrix_plan`."""

    needs_base = True

    def validate(self):
        p = self.params  # single values were checked by their declarations
        self.selector = make_selector(p["select"], p["include"], p["exclude"])

    def svd_kwargs(self, name: str) -> dict:
        p = self.params
        return {"svd": p.get("svd", "exact"), "oversample": p.get("oversample"),
                "power_iters": p.get("power_iters", 2), "seed": p.get("seed", 0), "name": name,
                "sketch_dtype": p.get("sketch_dtype", "auto")}

    def is_matrix(self, name: str, shape, num_models: int) -> bool:
        return self.selector(name, shape)

    def merge_tensor(self, name, inputs, base):
        base32 = base.to(torch.float32)
        shape = tuple(base32.shape)
        if not self.is_matrix(name, shape, len(inputs)):
            return task_vectors_mean(inputs, base32).mul_(float(self.alpha)).add_(base32)
        m, c = matrix_shape(shape)
        b2 = base32.reshape(m, c)
        buf = torch.empty_like(b2)

        def tau(t: int) -> torch.Tensor:
            # task t's vector in one reused buffer: the methods read the T task vectors one at a time and keep
            # only their sum or their truncated factors, so memory does not grow with T
            return ops.center_into(inputs[t].reshape(m, c), b2, buf)

        merged = self.merge_matrix(tau, len(inputs), (m, c), name)
        return merged.mul_(float(self.alpha)).add_(b2).reshape(shape)

    def merge_matrix(self, tau, num_models: int, shape, name: str) -> torch.Tensor:
        """The merged task vector (float32, shape = (m, n)) from tau(t), t < num_models, each valid only until the
        next call: a new tensor, or the buffer tau returns once no task vector is read any more."""
        raise NotImplementedError

    def plan_tensor(self, name, shape, dtype, num_models):
        n = numel_of(shape)
        if not self.is_matrix(name, shape, num_models):
            return {"lowrank": False, "k": None, "flops": 2 * n * num_models, "workspace_bytes": 8 * n}
        m, c = matrix_shape(shape)
        k, svd_flops = self.matrix_plan(m, c, num_models)
        # base, one task-vector buffer, the result, and the gathered factors (at most (m + n) min(m, n) floats),
        # plus the Gram routes' float64 Gram, eigenvectors and G^{-1/2} (3 r^2) and one float64 row block
        r = min(m, c)
        return {"lowrank": True, "k": k, "flops": int(num_models * n + svd_flops),
                "workspace_bytes": 4 * (3 * n + (m + c) * r) + 8 * 3 * r * r + min(_BLOCK_BYTES, 8 * n)}

    def matrix_plan(self, m: int, n: int, num_models: int):
        """(k, flops of the SVDs) for an (m, n) matrix."""
        raise NotImplementedError


def svd_flops(m: int, n: int, k: int, svd: str, oversample, power_iters: int) -> int:
    """Rough flop count of one top-k SVD of an (m, n) matrix in the given mode."""
    small, big = min(m, n), max(m, n)
    if svd == "randomized" and sketch_width(k, oversample) < small:
        w = sketch_width(k, oversample)
        return (2 * power_iters + 2) * 2 * m * n * w + (power_iters + 1) * 4 * small * w * w + 2 * w * w * big
    return 4 * big * small * small + 8 * small ** 3


def alpha_param(default: float) -> Param:
    return Param("alpha", "float", default, "scale of the merged task vector")


SELECT_PARAMS = (
    Param("select", "choice", "all2d", "which tensors are treated as matrices", choices=PRESETS),
    Param("include", "patterns", None, "regexes of tensors treated as matrices as well (beat select)"),
    Param("exclude", "patterns", None, "regexes of tensors never treated as matrices (beat include)"),
)


def randomized_params(svd: str = "randomized"):
    return (
        Param("svd", "choice", svd, "SVD flavour", choices=SVD_MODES),
        Param("oversample", "int", None, "extra sketch columns of the randomized SVD", lo=0),
        Param("power_iters", "int", 2, "power iterations of the randomized SVD", lo=0),
        Param("sketch_dtype", "choice", "auto", "dtype of the randomized SVD's sketch GEMMs",
              choices=tuple(SKETCH_DTYPES)),
        seed_param("seed of the randomized SVD's test matrices (per tensor name)"),
    )
