"""DARE (Yu et al. 2024): drop task-vector entries at random, then merge.

- `dare`: the paper's form: drop each entry with probability p, rescale survivors by 1/(1-p), task arithmetic.
- `dare_linear` / `dare_ties` (mergekit's): keep each entry with probability `density`; with `rescale` (default on)
  survivors are scaled back to the task vector's L1 norm, as mergekit does; then the weighted sum (dare_linear) or
  TIES's sign consensus (dare_ties).
The mask of model t for tensor `name` comes from the counter-based RNG seeded by (seed, name, t): the same bits on
any process, thread count or tensor order.
"""
from __future__ import annotations

from .. import ops
from ..seeding import derive_seed
from . import sparsify
from .params import Param, lam_param, random_mask_params, seed_param, weight_param
from .registry import register
from .task_arithmetic import TaskVectorMerge


@register
class Dare(TaskVectorMerge):
    name = "dare"
    summary = "DARE + task arithmetic: drop task-vector entries with probability p, rescale by 1/(1-p)"
    parameters = (
        Param("p", "float", 0.5, "probability of dropping each task-vector entry", lo=0.0, hi=1.0, hi_open=True,
              schedulable=True),
        lam_param(1.0, schedulable=True),
        weight_param(),
        seed_param(),
    )

    def sparsify(self, tau, name, t, v):
        return ops.dare(tau, float(v.p), derive_seed(int(v.seed), name, t))


class _MergekitDare(TaskVectorMerge):
    def sparsify(self, tau, name, t, v):
        return sparsify.random(tau, float(v.density[t]), derive_seed(int(v.seed), name, t), bool(v.rescale))


def _dare_params(normalize: bool):
    return random_mask_params(normalize)


@register
class DareLinear(_MergekitDare):
    name = "dare_linear"
    summary = "DARE, linear: random keep with probability density (L1 rescale), weighted sum"
    parameters = _dare_params(False)


@register
class DareTies(_MergekitDare):
    name = "dare_ties"
    consensus = True
    summary = "DARE + TIES: random keep with probability density (L1 rescale), sign consensus, weighted mean"
    parameters = _dare_params(False)
