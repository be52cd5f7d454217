"""TSV-M — Task Singular Vectors: Merging (Gargiulo et al., CVPR 2025).

For each matrix W (task vectors tau_t = W_t - W_0, t = 1..T, shape (m, n), k = floor(min(m, n) / T)):
    U_t S_t V_t^T = SVD_k(tau_t)                      (each task's top-k singular triplets)
    U = [U_1 .. U_T], S = diag(S_1 .. S_T), V = [V_1 .. V_T]     (T k <= min(m, n) columns)
    out = W_0 + alpha * polar(U) S polar(V)^T        (polar: the nearest orthonormal-column matrix)
polar(U) = U (U^T U)^{-1/2}, from the eigendecomposition of the (T k x T k) Gram matrix in float64
(svd_family.polar): the same factor as an SVD of the (m x T k) U gives, without that SVD.
Every other float tensor (biases, norms, and matrices thinner than T, where k would be 0):
    out = W_0 + alpha * mean_t tau_t
as in the authors' code and FusionBench's. Memory per matrix: the base, one task-vector buffer, and the gathered
factors, (m + n) T k <= (m + n) min(m, n) floats, whatever T is.
"""
from __future__ import annotations

import torch

from ..selection import matrix_shape
from .registry import register
from .svd_family import SELECT_PARAMS, TaskVectorSVDMethod, alpha_param, polar_, randomized_params, svd_flops, top_svd


def tsv_rank(m: int, n: int, num_models: int) -> int:
    """Each task's share of the spectrum: floor(min(m, n) / T)."""
    return min(m, n) // num_models


def tsv_merge_matrix(tau, num_models: int, k: int, **svd_kw) -> torch.Tensor:
    """The TSV-M merged task vector from tau(t) (float32 (m, n), read once each), keeping k triplets per task.
    The factors are gathered into one preallocated U, S and V (no per-task copies and concatenation), U is made
    orthonormal in place, and the product is written into tau's buffer, free once the last task is read: beyond
    that buffer, memory holds U and V once, (m + n) T k floats."""
    u_cat = s_cat = vh_cat = w = None
    for t in range(num_models):
        w = tau(t)
        u, s, vh = top_svd(w, k, **svd_kw)
        if u_cat is None:
            u_cat = u.new_empty(w.shape[0], num_models * k)
            s_cat = s.new_empty(num_models * k)
            vh_cat = vh.new_empty(num_models * k, w.shape[1])
        u_cat[:, t * k:(t + 1) * k] = u
        s_cat[t * k:(t + 1) * k] = s
        vh_cat[t * k:(t + 1) * k] = vh
        del u, s, vh
    polar_(u_cat).mul_(s_cat)
    return torch.matmul(u_cat, polar_(vh_cat), out=w)


@register
class TSVMerge(TaskVectorSVDMethod):
    name = "tsv"
    # alpha 1.0: the authors' setting (TSV-M needs no scaling search) and FusionBench's default.
    summary = ("TSV-M: each task's top 1/T singular triplets, singular vectors decorrelated (polar), scaled by alpha, "
               "by default on every 2-D tensor, embeddings and LM head included (select all2d, as the papers' code); "
               "the mean task vector elsewhere")
    parameters = (alpha_param(1.0),) + randomized_params() + SELECT_PARAMS

    def is_matrix(self, name, shape, num_models):
        if not self.selector(name, shape):
            return False
        return tsv_rank(*matrix_shape(shape), num_models) >= 1

    def merge_matrix(self, tau, num_models, shape, name):
        m, n = shape
        return tsv_merge_matrix(tau, num_models, tsv_rank(m, n, num_models), **self.svd_kwargs(name))

    def matrix_plan(self, m, n, num_models):
        k = tsv_rank(m, n, num_models)
        t = num_models * k
        polar_flops = 4 * m * t * t + 4 * n * t * t
        return k, num_models * svd_flops(m, n, k, self.svd, self.oversample, self.power_iters) + polar_flops
