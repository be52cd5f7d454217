"""DELLA (Deep et al. 2024): MAGPRUNE keeps each entry with a probability that rises with its magnitude rank in
its row, from density - epsilon to density + epsilon; survivors are scaled back to the task vector's L1 norm
(`rescale`, mergekit's rule); then TIES's sign consensus (`della`) or the weighted sum (`della_linear`).
Random draws: the counter-based RNG seeded by (seed, tensor name, model index)."""
from __future__ import annotations

from ..errors import MergeConfigError
from ..seeding import derive_seed
from . import sparsify
from .params import Param, random_mask_params
from .registry import register
from .task_arithmetic import TaskVectorMerge


class _Della(TaskVectorMerge):
    def sparsify(self, tau, name, t, v):
        d, e = float(v.density[t]), float(v.epsilon[t])
        if d < 1.0 and not (0.0 < d - e and d + e < 1.0):
            raise MergeConfigError(f"{self.name}: density - epsilon and density + epsilon must lie in (0, 1) "
                                   f"(tensor {name!r}, model {t}: density {d:g}, epsilon {e:g})")
        return sparsify.della(tau, d, e, derive_seed(int(v.seed), name, t), bool(v.rescale))


def _della_params(normalize: bool):
    return random_mask_params(
        normalize,
        Param("epsilon", "float", 0.15, "half-width of the keep probabilities around density", lo=0.0, hi=1.0,
              per_model=True, schedulable=True),
    )


@register
class Della(_Della):
    name = "della"
    consensus = True
    summary = "DELLA: magnitude-ranked random keep (density +- epsilon, L1 rescale), sign consensus, weighted mean"
    parameters = _della_params(True)


@register
class DellaLinear(_Della):
    name = "della_linear"
    summary = "DELLA, linear: magnitude-ranked random keep (density +- epsilon, L1 rescale), weighted sum"
    parameters = _della_params(False)
