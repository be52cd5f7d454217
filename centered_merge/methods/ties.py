"""TIES-merging (Yadav et al. 2023) with mergekit's rules: trim each task vector to exactly
k_t = max(1, int(density_t * numel)) entries of largest magnitude (ties at the threshold: the lowest flat indices),
weight them, elect +1 where the weighted sum is >= 0 (else -1), add the agreeing weighted entries (normalize divides
by their weights), theta_0 + lam * that.

merge_tensor_to runs the whole merge as one op, ops.ties_merge_to (a native kernel: the exact k-th magnitude of
each task by a sampled band or a radix select, then one fused election-and-mean pass that writes the output dtype
and counts NaN/Inf in the output and in the task vectors; its torch twin, ties_merge + finalize, for lazy inputs
or without the extension). Since that count sees every non-finite input, the engine skips its up-front scan. It
equals the family's generic path (TaskVectorMerge with `sparsify` below) bit for bit; tests hold both to that.
"""
from __future__ import annotations

import torch

from .. import ops
from . import sparsify
from .params import density_param, lam_param, normalize_param, weight_param
from .registry import register
from .task_arithmetic import TaskVectorMerge


@register
class Ties(TaskVectorMerge):
    name = "ties"
    consensus = True
    writes_into = True  # the engine's reused output buffers (no fresh pages per tensor)
    # ops.ties_merge_to's count adds the non-finite task-vector entries x_t - base of every task, kept or dropped,
    # on every path (CPU and CUDA kernels, the twin), so a NaN/Inf input or base entry always makes it non-zero
    counts_nonfinite_inputs = True
    summary = "TIES: trim each task vector to its top-density magnitudes, elect signs, (weighted) disjoint mean"
    parameters = (
        density_param(0.2, yaml_default=1.0),
        lam_param(1.0, schedulable=True),
        weight_param(),
        normalize_param(True),
    )

    def sparsify(self, tau, name, t, v):
        return sparsify.magnitude(tau, float(v.density[t]))

    def merge_tensor_to(self, name, inputs, base, dtype, out=None):
        # one kernel that writes the output dtype (into `out` when given) and counts NaN/Inf (no float32 tensor, no
        # finalize pass)
        v = self.values(name, len(inputs))
        return ops.ties_merge_to(inputs, base, [float(d) for d in v.density], float(v.lam),
                                 weights=[float(w) for w in v.weight], normalize=bool(v.get("normalize", False)),
                                 out_dtype=dtype, out=out)

    def merge_tensor(self, name, inputs, base):
        return self.merge_tensor_to(name, inputs, base, torch.float32)[0]
