"""Karcher mean (mergekit's `karcher`): the Riemannian barycentre of the models' directions on the unit sphere,
rescaled by the weighted mean of their norms.

Per tensor, with x_i flattened, n_i = |x_i|, directions u_i = x_i / n_i and weights a_i (equal, 1/N, as mergekit
uses; inputs with n_i <= tol are left out of the direction and the remaining weights renormalised):
  start   u = normalised sum_i a_i u_i (the first direction if that sum is shorter than tol);
  repeat  g = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) u), theta_i = acos(u . u_i) (terms with
          theta_i < tol skipped: the log map of each point at u, averaged); stop when |g| < tol;
          u <- cos|g| u + sin|g| g/|g|, renormalised (the exponential map) -- at most max_iter times;
  result  (sum_i a_i n_i) u, the norms of the left-out inputs included (they count as n_i).
Float32 throughout; directions are not stored, each x_i / n_i is formed when needed, and the inputs are read
once per pass, one at a time (at most one alive at once), so memory does not grow with the number of models.
"""
from __future__ import annotations

import math
from collections import abc
from typing import Optional, Sequence

import torch

from .base import MergeMethod, numel_of
from .params import Param, use_base_param
from .registry import register


class _Points(abc.Sequence):
    """The models' tensors, then the base: a sequence that reads `inputs` only when indexed (it may be lazy)."""

    def __init__(self, inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor]):
        self.inputs, self.base = inputs, base

    def __len__(self):
        return len(self.inputs) + (self.base is not None)

    def __getitem__(self, i):
        return self.base if i == len(self.inputs) else self.inputs[i]


def karcher_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """The Karcher mean of `tensors` with `weights` (see the module docstring). float32, shaped like the inputs.

    Streams the inputs: each pass (norms, start, every iteration) reads tensors[i] once and drops it, so at most
    one input is alive beside the two float32 vectors u and g, whatever their number (a lazy sequence such as the
    engine's LazyDeviceInputs copies each to the device when read). Each read is converted to float32 again; the
    arithmetic is the same whatever the sequence, so lists and lazy sequences give the same bits."""
    def flat(i):
        return tensors[i].to(torch.float32).reshape(-1)  # no copy for float32 inputs

    if len(tensors) == 1:
        x = tensors[0]
        return x.to(torch.float32).clone()
    norms = [float(torch.linalg.vector_norm(flat(i))) for i in range(len(tensors))]
    valid = [i for i, n in enumerate(norms) if n > tol]
    first = tensors[0]
    shape, device = first.shape, first.device
    del first
    if not valid:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    total = sum(weights[i] for i in valid)
    alpha = {i: weights[i] / total for i in valid}

    u = torch.zeros(math.prod(shape), dtype=torch.float32, device=device)
    for i in valid:
        u.add_(flat(i), alpha=alpha[i] / norms[i])
    nu = float(torch.linalg.vector_norm(u))
    if nu < tol:
        u = flat(valid[0]) / norms[valid[0]]
    else:
        u.div_(nu)

    g = torch.empty_like(u)
    for _ in range(int(max_iter)):
        g.zero_()
        for i in valid:
            x = flat(i)
            cos = max(-1.0, min(1.0, float(torch.dot(u, x)) / norms[i]))
            theta = math.acos(cos)
            if theta >= tol:
                c = alpha[i] * theta / math.sin(theta)
                g.add_(x, alpha=c / norms[i]).add_(u, alpha=-c * cos)
            del x
        ng = float(torch.linalg.vector_norm(g))
        if ng < tol:
            break
        u.mul_(math.cos(ng)).add_(g, alpha=math.sin(ng) / ng)
        nu = float(torch.linalg.vector_norm(u))
        if nu > tol:
            u.div_(nu)
    scale = sum(w * n for w, n in zip(weights, norms))
    return u.mul_(scale).reshape(shape)


@register
class Karcher(MergeMethod):
    """Equal-weight Karcher mean of the models; with use_base the base model is one more point (mergekit gathers
    the base_model's tensors with the others and karcher averages them all)."""

    name = "karcher"
    summary = "karcher: equal-weight Riemannian (Karcher) mean of the models on the sphere, scaled by the mean norm"
    parameters = (
        Param("max_iter", "int", 10, "iterations of the fixed-point solve", lo=0),
        Param("tol", "float", 1e-5, "stop when the tangent step's norm is below this", lo=0.0),
        use_base_param("count the base model as one more point"),
    )

    def validate(self):
        self.needs_base = self.params["use_base"]

    def merge_tensor(self, name, inputs, base):
        points = _Points(inputs, base)
        return karcher_mean(points, [1.0 / len(points)] * len(points), self.max_iter, float(self.tol))

    def plan_tensor(self, name, shape, dtype, num_models):
        n = numel_of(shape)
        points = num_models + (1 if self.use_base else 0)
        return {"lowrank": False, "k": None, "flops": 4 * n * points * (self.max_iter + 1),
                "workspace_bytes": 4 * n * 3}
