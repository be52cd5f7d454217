"""DARE (Yu et al. 2024) + task arithmetic: drop each task-vector entry with probability p, rescale survivors by
1/(1-p), then theta_0 + lam * sum. The mask of model t for tensor `name` comes from (seed, name, t)."""
from __future__ import annotations

from .. import ops
from ..seeding import derive_seed
from .params import Param, lam_param, seed_param
from .registry import register
from .task_arithmetic import TaskArithmetic


@register
class Dare(TaskArithmetic):
    name = "dare"
    needs_base = True
    summary = "DARE + task arithmetic: drop task-vector entries with probability p, rescale by 1/(1-p)"
    parameters = (
        Param("p", "float", 0.5, "probability of dropping each task-vector entry", lo=0.0, hi=1.0, hi_open=True),
        lam_param(1.0),
        seed_param(),
    )

    def task_vector(self, tau, name, t):
        return ops.dare(tau, float(self.p), derive_seed(int(self.seed), name, t))
