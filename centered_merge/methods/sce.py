"""SCE (Wan et al., FuseChat 2024): Select the entries whose task vectors vary most across models (top
select_topk fraction of the per-entry variance), Calculate each model's weight as its share of the mean squared
(selected) task vector, Erase entries whose sign disagrees with the elected one (the sign of the sum; a zero sum
elects +, as in mergekit), and take the
weighted mean of what is left: theta_0 + sum_t c_t s_t m_t / sum_t c_t m_t.

Passes over the inputs, each forming one task vector at a time: mean, variance, votes and weights, the mean of
the agreeing entries; memory stays a few float32 copies of the tensor whatever T is.
"""
from __future__ import annotations

import torch

from .. import ops
from .base import MergeMethod, numel_of
from .params import Param
from .registry import register
from .sparsify import top_k_mask

F32 = torch.float32


@register
class Sce(MergeMethod):
    name = "sce"
    needs_base = True
    summary = "SCE: keep the highest-variance entries, weights from squared task vectors, sign consensus, mean"
    parameters = (
        Param("select_topk", "float", 1.0, "fraction of entries (by variance across models) kept", lo=0.0, hi=1.0,
              schedulable=True),
    )

    def merge_tensor(self, name, inputs, base):
        T = len(inputs)
        v = self.values(name, T)
        base32 = base.to(F32)
        tau = torch.empty_like(base32)
        keep = None
        topk = float(v.select_topk)
        if topk < 1.0:
            mean = torch.zeros_like(base32)
            for t in range(T):
                mean.add_(ops.center_into(inputs[t], base32, tau))
            mean.div_(T)
            var = torch.zeros_like(base32)
            for t in range(T):
                var.add_((ops.center_into(inputs[t], base32, tau) - mean).square_())
            del mean
            k = int(int(torch.count_nonzero(var)) * topk) if topk > 0 else 0
            keep = top_k_mask(var, k)
            del var

        def task(t):
            s = ops.center_into(inputs[t], base32, tau)
            return s if keep is None else s.masked_fill_(~keep, 0.0)

        votes = torch.zeros_like(base32)
        energy = []
        for t in range(T):
            s = task(t)
            votes.add_(s)
            energy.append(float(s.square().mean()) if s.numel() else 0.0)
        # mergekit's rule: a zero sum elects + (as for the TIES family, methods/task_arithmetic.py)
        elected = torch.where(votes >= 0, 1.0, -1.0)
        del votes
        total = sum(energy)
        weights = [1.0 / T] * T if abs(total) < 1e-6 else [e / total for e in energy]
        num = torch.zeros_like(base32)
        den = torch.zeros_like(base32)
        for t in range(T):
            s = task(t)
            agree = (torch.sign(s) == elected) & (s != 0)
            num.add_(torch.where(agree, s, 0.0), alpha=weights[t])
            den.add_(agree.to(F32), alpha=weights[t])
        return num.div_(den.clamp_(min=1e-6)).add_(base32)

    def plan_tensor(self, name, shape, dtype, num_models):
        n = numel_of(shape)
        return {"lowrank": False, "k": None, "flops": 16 * n * num_models, "workspace_bytes": 4 * n * 6}
