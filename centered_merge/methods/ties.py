"""TIES-merging (Yadav et al. 2023): trim each task vector to its top-density magnitudes, elect a sign per entry,
average the kept entries that agree with it, and add lam times that to the base. The passes live in ops."""
from __future__ import annotations

from .. import ops
from .base import MergeMethod, numel_of
from .params import Param, lam_param
from .registry import register


@register
class Ties(MergeMethod):
    name = "ties"
    needs_base = True
    summary = "TIES: trim each task vector to its top-density magnitudes, elect signs, disjoint mean"
    parameters = (
        Param("density", "float", 0.2, "fraction of each task vector's entries kept", lo=0.0, hi=1.0, lo_open=True),
        lam_param(1.0),
    )

    def merge_tensor(self, name, inputs, base):
        return ops.ties_merge(inputs, base, float(self.density), float(self.lam))

    def plan_tensor(self, name, shape, dtype, num_models):
        n = numel_of(shape)
        return {"lowrank": False, "k": None, "flops": 12 * n * num_models, "workspace_bytes": 4 * n * 5}
