"""Task arithmetic: theta_0 + lam * sum_t (theta_t - theta_0)."""
from __future__ import annotations

import torch

from .. import ops
from .base import MergeMethod
from .params import lam_param
from .registry import register


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    needs_base = True
    summary = "task arithmetic: theta_0 + lam * sum_t (theta_t - theta_0)"
    parameters = (lam_param(0.3),)

    def merge_tensor(self, name, inputs, base):
        base32 = base.to(torch.float32)
        # Sum the task vectors one by one (rather than sum(theta_t) - T * theta_0) so the small differences
        # do not cancel against large weights in float32.
        acc = torch.zeros_like(base32)
        tau = torch.empty_like(base32)
        for t in range(len(inputs)):
            acc.add_(self.task_vector(ops.center_into(inputs[t], base32, tau), name, t))
        return acc.mul_(float(self.lam)).add_(base32)

    def task_vector(self, tau: torch.Tensor, name: str, t: int) -> torch.Tensor:
        """What task t adds for tensor `name` (subclasses such as DARE transform it)."""
        return tau
