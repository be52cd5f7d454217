"""TIES-merging (Yadav et al. 2023): trim each task vector to exactly k = kept_count(numel, density) entries of
largest magnitude (ties at the threshold: the lowest flat indices), elect a sign per entry from the weighted sum of
the trimmed vectors, and average the agreeing entries (weighted; normalize divides by the agreeing weights);
theta_0 + lam * that. The trim runs here with torch ops (methods/sparsify.py); ops.ties_merge's fused pass keeps every
entry tied with the k-th magnitude, which is not mergekit's rule, so it is not used until it keeps exactly k."""
from __future__ import annotations

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

