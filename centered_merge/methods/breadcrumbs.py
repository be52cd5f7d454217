"""Model Breadcrumbs (Davari & Belilovsky 2023): per task, drop the gamma fraction of largest-magnitude entries
(outliers) and the smallest ones, so that int(density * numel) remain; then the weighted sum (`breadcrumbs`) or
TIES's sign consensus (`breadcrumbs_ties`)."""
from __future__ import annotations

from . import sparsify
from .params import Param, density_param, lam_param, normalize_param, weight_param
from .registry import register
from .task_arithmetic import TaskVectorMerge


class _Breadcrumbs(TaskVectorMerge):
    parameters = (
        density_param(1.0, lo_open=False),
        Param("gamma", "float", 0.01, "fraction of largest-magnitude entries dropped as outliers", lo=0.0, hi=1.0,
              per_model=True, schedulable=True),
        weight_param(),
        lam_param(1.0, schedulable=True),
        normalize_param(False),
    )

    def sparsify(self, tau, name, t, v):
        return sparsify.breadcrumbs(tau, float(v.density[t]), float(v.gamma[t]))


@register
class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"
    summary = "Model Breadcrumbs: drop outliers (gamma) and small entries (to density), weighted sum"


@register
class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    consensus = True
    summary = "Model Breadcrumbs + TIES sign consensus"
