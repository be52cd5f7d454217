"""TIES-merging (Yadav et al. 2023): trim each task vector to exactly k = kept_count(numel, density) entries of
largest magnitude (ties at the threshold: the lowest flat indices), elect a sign per entry from the weighted sum of
the trimmed vectors, and average the agreeing entries (weighted; normalize divides by the agreeing weights);
theta_0 + lam * that. With equal weights, one density and normalize on, the fused ops.ties_merge pass runs."""
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
        w, d = v.weight, v.density
        if v.normalize and len(set(w)) == 1 and w[0] > 0 and len(set(d)) == 1:
            # equal positive weights cancel in the normalised mean: the fused two-pass kernel gives the same result
            return ops.ties_merge(inputs, base, float(d[0]), float(v.lam))
        return super().merge_tensor(name, inputs, base)
