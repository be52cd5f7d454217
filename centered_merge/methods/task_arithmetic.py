"""Task arithmetic and the family built on it (mergekit's "generalized task arithmetic"):

    tau_t   = theta_t - theta_0                                  (task vectors; theta_0 = the base model)
    s_t     = sparsify(tau_t)                                    (identity here; TIES, DARE, ... thin it)
    mixed   = sum_t w_t s_t                                      (no consensus)
            = sum_t w_t s_t m_t,  m_t = [sign(w_t s_t) = elected] (with a sign consensus, TIES-style: elected
                                                                  = +1 where sum_t w_t s_t >= 0, else -1)
    mixed  /= sum_t w_t m_t  where normalize                     (a zero divisor counts as 1)
    out     = theta_0 + lam * mixed

Per-model `weight` and `density` (and the family's other per-model values) may differ between models and vary per
tensor (a gradient over the layers, a filter list). Task vectors are formed one at a time (two passes over the
inputs with a consensus; random masks are recomputed from their seed), so memory stays a few float32 copies of one
tensor whatever T is. Plain task arithmetic (no thinning, no consensus) is one pass of the fused
ops.task_arithmetic_merge, which reads each input once and writes the output dtype directly.
"""
from __future__ import annotations

import torch

from .. import ops
from ..ops.reference import as_f32_scalars, disjoint_merge
from .base import MergeMethod, numel_of
from .params import lam_param, normalize_param, weight_param
from .registry import register

F32 = torch.float32


class TaskVectorMerge(MergeMethod):
    """The shared engine of the family. Subclasses set `consensus` and implement `sparsify`."""

    needs_base = True
    consensus = False  # elect a sign per entry (sum of the weighted thinned task vectors) and keep agreeing entries

    def sparsify(self, tau: torch.Tensor, name: str, t: int, v) -> torch.Tensor:
        """Task t's thinned task vector for tensor `name` (float32; may return tau itself); v: resolved values."""
        return tau

    def merge_tensor(self, name, inputs, base):
        T = len(inputs)
        v = self.values(name, T)
        base32 = base.to(F32)
        weights = [float(w) for w in v.weight]
        normalize = bool(v.get("normalize", False))
        tau = torch.empty_like(base32)

        def task(t):
            return self.sparsify(ops.center_into(inputs[t], base32, tau), name, t, v)

        if not self.consensus:
            mixed = torch.zeros_like(base32)
            for t in range(T):
                mixed.add_(task(t), alpha=weights[t])
            if normalize:
                total = sum(weights)
                mixed.div_(total if abs(total) >= 1e-8 else 1.0)
            return mixed.mul_(float(v.lam)).add_(base32)
        # mergekit's order of operations (its generalized task arithmetic), the same function as the TIES twin's
        return disjoint_merge(task, T, as_f32_scalars(weights), base32, as_f32_scalars([float(v.lam)])[0], normalize)

    def plan_tensor(self, name, shape, dtype, num_models):
        n = numel_of(shape)
        passes = 2 if self.consensus else 1
        return {"lowrank": False, "k": None, "flops": 4 * passes * n * num_models, "workspace_bytes": 4 * n * 5}


@register
class TaskArithmetic(TaskVectorMerge):
    name = "task_arithmetic"
    summary = "task arithmetic: theta_0 + lam * sum_t w_t (theta_t - theta_0)"
    counts_nonfinite_inputs = True  # the fused kernel (ops) sums every input element
    writes_into = True
    elementwise = True
    parameters = (
        lam_param(0.3, schedulable=True, yaml_default=1.0),
        weight_param(),
        normalize_param(False),
    )

    def merge_tensor_to(self, name, inputs, base, dtype, out=None):
        v = self.values(name, len(inputs))
        weights = [float(w) for w in v.weight]
        if v.normalize:  # folded into the weights: one pass (a zero divisor counts as 1, as in the family)
            total = sum(weights)
            weights = [w / (total if abs(total) >= 1e-8 else 1.0) for w in weights]
        return ops.task_arithmetic_merge(inputs, base, weights, float(v.lam), dtype, out=out)

    def merge_tensor(self, name, inputs, base):
        return self.merge_tensor_to(name, inputs, base, F32)[0]

