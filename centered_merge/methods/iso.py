"""Iso-C and Iso-CTS — isotropic merging (Marczak et al., "No Task Left Behind", ICML 2025).

Iso-C, for each matrix W (task vectors tau_t = W_t - W_0, shape (m, n), r = min(m, n)):
    U S V^T = SVD(sum_t tau_t)
    out = W_0 + alpha * mean(S) U V^T                  (every singular value replaced by their mean)
Iso-CTS keeps the top k_c directions of the sum (the common subspace) and adds each task's top s directions
of its task vector with the common subspace projected out, s = round((r - floor(f r)) / T), k_c = r - T s:
    U_c S_c V_c^T = SVD_{k_c}(sum_t tau_t)
    U_t S_t V_t^T = SVD_s((I - U_c U_c^T) tau_t)
    U = [U_c, U_1 .. U_T], V likewise, sigma = mean of all k_c + T s singular values kept
    out = W_0 + alpha * sigma polar(U) polar(V)^T
Every other float tensor: out = W_0 + alpha * mean_t tau_t (as in FusionBench's implementation).

Iso-C keeps the whole spectrum, so there is no truncation for a randomized range finder to approximate: it needs
all singular values of the sum and its polar factor U V^T, both from the eigendecomposition of the sum's short-side
Gram matrix in float64 (svd_family.polar_and_singular_values; the SVD where that is nearly singular). Iso-CTS's
common subspace (most of the spectrum) is exact in both modes (svd_family.top_svd_exact); its per-task truncated
SVDs run exact (default) or randomized. Memory per matrix: the base, the sum, one task-vector buffer and the
gathered factors.
"""
from __future__ import annotations

import torch

from .params import Param
from .registry import register
from .svd_family import (SELECT_PARAMS, TaskVectorSVDMethod, alpha_param, polar_, polar_and_singular_values,
                          randomized_params, svd_flops, top_svd, top_svd_exact)


def summed(tau, num_models: int) -> torch.Tensor:
    acc = tau(0).clone()
    for t in range(1, num_models):
        acc.add_(tau(t))
    return acc


def iso_c_matrix(tau, num_models: int) -> torch.Tensor:
    """The Iso-C merged task vector: mean(S) U V^T of the summed task vectors' full thin SVD."""
    p, s = polar_and_singular_values(summed(tau, num_models), inplace=True)  # over the sum
    return p.mul_(s.mean())


def iso_cts_sizes(m: int, n: int, num_models: int, common_fraction: float):
    """(k_c, s): the common subspace's size and each task's, with k_c + T s = min(m, n) as in FusionBench
    (k_c starts at floor(f r) and moves so the task-specific part divides evenly among the T tasks)."""
    r = min(m, n)
    per_task = round((r - int(r * common_fraction)) / num_models)
    per_task = min(per_task, r // num_models)
    return r - num_models * per_task, per_task


def iso_cts_matrix(tau, num_models: int, shape, common_fraction: float, **svd_kw) -> torch.Tensor:
    """The Iso-CTS merged task vector from tau(t) (float32 `shape` = (m, n), each read twice: for the sum, then
    alone)."""
    m, n = shape
    k_c, per_task = iso_cts_sizes(m, n, num_models, common_fraction)
    name = svd_kw.pop("name", "")
    r = k_c + num_models * per_task
    first = summed(tau, num_models) if k_c else tau(0)
    # U, S and V gathered into preallocated factors (no per-task copies and concatenation)
    u_cat = first.new_empty(m, r)
    s_cat = first.new_empty(r)
    vh_cat = first.new_empty(r, n)
    w = None
    if k_c:
        # The common subspace is most of the spectrum (0.8 by default) and, once made isotropic, each of its
        # directions counts as much as the top one, so a range finder's error in its weak tail directions would
        # show in full; its sketch would be nearly as wide as the matrix anyway. Exact here, in both modes.
        u_c, s_c, vh_c = top_svd_exact(first, k_c)
        u_cat[:, :k_c], s_cat[:k_c], vh_cat[:k_c] = u_c, s_c, vh_c
        del u_c, s_c, vh_c
    del first
    u_c = u_cat[:, :k_c]
    for t in range(num_models if per_task else 0):
        w = tau(t)
        if k_c:
            w.sub_(u_c @ (u_c.mT @ w))  # in the reused buffer: the task vector is not needed again
        u, s, vh = top_svd(w, per_task, name=f"{name}/task", **svd_kw)
        lo = k_c + t * per_task
        u_cat[:, lo:lo + per_task], s_cat[lo:lo + per_task], vh_cat[lo:lo + per_task] = u, s, vh
        del u, s, vh
    sigma = s_cat.mean()
    # the product goes into tau's buffer when the task loop used it (no task vector is read after it)
    return torch.matmul(polar_(u_cat), polar_(vh_cat), out=w).mul_(sigma)


@register
class IsoC(TaskVectorSVDMethod):
    name = "iso_c"
    # alpha 1.5: FusionBench's published ViT-B/32 and ViT-L/14 eight-task commands for Iso-C.
    summary = ("Iso-C: SVD of the summed task matrix with an isotropic (mean) spectrum, scaled by alpha, by default on "
               "every 2-D tensor, embeddings and LM head included (select all2d, as the papers' code); the mean task "
               "vector elsewhere")
    parameters = (alpha_param(1.5),) + SELECT_PARAMS

    def merge_matrix(self, tau, num_models, shape, name):
        return iso_c_matrix(tau, num_models)

    def matrix_plan(self, m, n, num_models):
        r = min(m, n)
        return r, svd_flops(m, n, r, "exact", None, 0) + 2 * m * n * r


@register
class IsoCTS(TaskVectorSVDMethod):
    name = "iso_cts"
    # alpha 1.5 and a common subspace of 0.8 of the spectrum: FusionBench's ViT-B/32 eight-task command and
    # its iso_cts.yaml. svd "exact" by default: the isotropic spectrum weighs every kept direction as much as the
    # top one, so the range finder's error in weak directions shows in full (on decaying test matrices the
    # randomized result differs from the exact one by 5% with 2 power iterations, 0.7% with 4:
    # tests/test_svd_family.py), whereas CART and TSV-M keep the singular values and with them Eckart-Young's bound.
    summary = ("Iso-CTS: Iso-C's common subspace plus task-specific directions orthogonal to it, by default on every "
               "2-D tensor, embeddings and LM head included (select all2d, as the papers' code); the mean task vector "
               "elsewhere")
    parameters = ((alpha_param(1.5),
                   Param("common_fraction", "float", 0.8, "fraction of the spectrum given to the common subspace",
                         lo=0.0, hi=1.0, lo_open=True))
                  + randomized_params("exact") + SELECT_PARAMS)

    def merge_matrix(self, tau, num_models, shape, name):
        return iso_cts_matrix(tau, num_models, shape, float(self.common_fraction), **self.svd_kwargs(name))

    def matrix_plan(self, m, n, num_models):
        k_c, s = iso_cts_sizes(m, n, num_models, float(self.common_fraction))
        flops = (svd_flops(m, n, k_c, self.svd, self.oversample, self.power_iters) if k_c else 0)
        flops += num_models * (svd_flops(m, n, s, self.svd, self.oversample, self.power_iters) + 4 * m * n * k_c)
        r = min(m, n)
        return k_c, flops + 4 * (m + n) * r * r
