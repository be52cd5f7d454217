"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models", arXiv 2403.19522),
as mergekit's `model_stock` computes it.

With the base w_0 and N >= 2 fine-tuned models w_i, task vectors tau_i = w_i - w_0 and cos theta the mean over the
N(N-1)/2 pairs of cos(tau_i, tau_j) (the paper uses one angle; mergekit averages the pairwise cosines, and so do
we), the interpolation ratio is the paper's
    t = N cos theta / (1 + (N - 1) cos theta)
and the merge w_H = t * mean_i w_i + (1 - t) * w_0 = w_0 + t * mean_i tau_i.
filter_wise: one ratio per row (vectors along the last dimension; a 1-D tensor is one row) instead of one per
tensor. The norm product in each cosine is floored at 1e-6 and the cosine clamped to [-1, 1], as in mergekit.
Negative mean cosines give t < 0 (the formula's value; mergekit applies it too), and cos theta = -1/(N - 1) makes t
infinite: the merge then stops on the non-finite result, naming the tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import MergeMethod, numel_of
from .params import Param
from .per_model import check_model_count
from .registry import register

NORM_PRODUCT_FLOOR = 1e-6


def model_stock_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """The paper's interpolation ratio t for N models whose task vectors meet at mean cosine `cos`."""
    return n * cos / (1 + (n - 1) * cos)


def mean_pairwise_cosine(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs i < j of the row-wise cosines of `vectors` (each [rows, n]); shape [rows, 1]."""
    norms = [torch.linalg.vector_norm(v, dim=-1) for v in vectors]
    total = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            dot = torch.linalg.vecdot(vectors[i], vectors[j])
            total += (dot / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_FLOOR)).clamp(-1.0, 1.0)
            pairs += 1
    return (total / pairs).unsqueeze(-1)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """w_0 + t * mean_i (w_i - w_0) with Model Stock's ratio t (see the module docstring). float32 out."""
    base32 = base.to(torch.float32)
    if base32.numel() == 0:
        return base32.clone()
    rows = (-1, base32.shape[-1]) if filter_wise and base32.dim() >= 2 else (1, -1)
    w0 = base32.reshape(rows)
    taus = [t.to(torch.float32).reshape(rows) - w0 for t in tensors]
    ratio = model_stock_ratio(mean_pairwise_cosine(taus), len(taus))
    mean_tau = taus[0]
    for tau in taus[1:]:
        mean_tau.add_(tau)
    return mean_tau.mul_(ratio / len(taus)).add_(w0).reshape(base.shape)


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    needs_base = True
    summary = "model_stock: base + t (average - base), t from the models' mean pairwise cosine (Jang et al. 2024)"
    parameters = (Param("filter_wise", "bool", False, "one ratio per row instead of per tensor"),)


    def merge_tensor(self, name, inputs, base):
        check_model_count(self.name, len(inputs), 2, None, "the base model and at least two other models",
                          with_base=True)
        return model_stock(base, inputs, self.filter_wise)

    def plan_tensor(self, name, shape, dtype, num_models):
        n = numel_of(shape)
        return {"lowrank": False, "k": None, "flops": n * (num_models * (num_models + 3)),
                "workspace_bytes": 4 * n * (num_models + 2)}
