"""DARE (Yu et al. 2024) + task arithmetic: drop each task-vector entry with probability p, rescale survivors by
1/(1-p), then theta_0 + lam * sum. The mask of model t for tensor `name` comes from (seed, name, t)."""
from __future__ import annotations

from .. import ops
from ..seeding import derive_seed
from .base import check_number
from .registry import register
from .task_arithmetic import TaskArithmetic


@register
class Dare(TaskArithmetic):
    name = "dare"
    needs_base = True
    defaults = {"p": 0.5, "lam": 1.0, "seed": 0}

    def validate(self):
        check_number(self.name, "p", self.params["p"], lo=0.0, hi=1.0, hi_open=True)
        check_number(self.name, "lam", self.params["lam"])

    def task_vector(self, tau, name, t):
        return ops.dare(tau, float(self.p), derive_seed(int(self.seed), name, t))
