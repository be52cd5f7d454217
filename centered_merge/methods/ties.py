"""TIES-merging (Yadav et al. 2023) with mergekit's rules: trim each task vector to exactly
k_t = max(1, int(density_t * numel)) entries of largest magnitude (ties at the threshold: the lowest flat indices),
weight them, elect +1 where the weighted sum is >= 0 (else -1), add the agreeing weighted entries (normalize divides
by their weights), theta_0 + lam * that.

merge_tensor runs the whole merge as one op, ops.ties_merge (a native kernel: radix select of each task's
threshold, then one fused election-and-mean pass; its torch twin for lazy inputs or without the extension). It
equals the family's generic path (TaskVectorMerge with `sparsify` below) bit for bit; tests hold both to that.
"""
from __future__ import annotations

from .. import ops
from . import sparsify
from .params import density_param, lam_param, normalize_param, weight_param
from .registry import register
from .task_arithmetic import TaskVectorMerge


@register
class Ties(TaskVectorMerge):
    name = "ties"
    consensus = True
    summary = "TIES: trim each task vector to its top-density magnitudes, elect signs, (weighted) disjoint mean"
    parameters = (
        density_param(0.2, yaml_default=1.0),
        lam_param(1.0, schedulable=True),
        weight_param(),
        normalize_param(True),
    )

    def sparsify(self, tau, name, t, v):
        return sparsify.magnitude(tau, float(v.density[t]))

    def merge_tensor(self, name, inputs, base):
        v = self.values(name, len(inputs))
        return ops.ties_merge(inputs, base, [float(d) for d in v.density], float(v.lam),
                              weights=[float(w) for w in v.weight], normalize=bool(v.get("normalize", False)))
