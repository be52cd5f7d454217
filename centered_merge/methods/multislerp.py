"""Multi-SLERP (mergekit's `multislerp`): a weighted spherical average of T models, optionally of their task vectors
relative to a base.

mergekit's steps, per tensor (x_i flattened, minus the base when one is used; weights w_i, divided by their sum
when normalize_weights):
  u_i = x_i / (|x_i| + eps);  m = sum_i w_i u_i;  m^ = m / |m|
  tangent sum  g = sum_i w_i (u_i - (u_i . m^) m^);  result = (m^ cos|g| + g sin|g| / |g|) * sum_i w_i |x_i|
The tangent sum is zero identically: g = m - (m . m^) m^ = m - |m| m^ = 0, so the exponential map leaves m^ where
it is (mergekit adds eps to |g|, so cos and sin(|g|)/|g| are 1 to float32 precision). We therefore compute the
closed form result = m^ * sum_i w_i |x_i| (a test checks it against the step-by-step form).
If |m| < eps (antipodal inputs that cancel): with two models the weighted sum w_0 x_0 + w_1 x_1 (mergekit's
fallback), otherwise an error. One model: returned as it is (mergekit does not subtract and re-add the base).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import MergeConfigError, MergeInputError
from .base import MergeMethod, numel_of
from .params import Param, use_base_param, weight_param
from .registry import register

MULTISLERP_EPS = 1e-8


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: Optional[torch.Tensor] = None,
               normalize_weights: bool = True, eps: float = MULTISLERP_EPS, name: str = "tensor") -> torch.Tensor:
    """The Multi-SLERP of `tensors` (float32 out); see the module docstring. One float32 temporary per input."""
    if len(tensors) == 1:
        return tensors[0].to(torch.float32).clone()
    w = [float(x) for x in weights]
    if normalize_weights:
        total = sum(w)
        if total == 0.0:
            raise MergeConfigError("multislerp: the weights sum to 0 and cannot be normalised")
        w = [x / total for x in w]
    base32 = base.to(torch.float32) if base is not None else None

    def point(i):
        x = tensors[i].to(torch.float32)
        return x - base32 if base32 is not None else x

    mean = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    avg_norm = 0.0
    for i, wi in enumerate(w):
        x = point(i)
        n = float(torch.linalg.vector_norm(x))
        mean.add_(x, alpha=wi / (n + eps))
        avg_norm += wi * n
        del x
    mean_norm = float(torch.linalg.vector_norm(mean))
    if not mean_norm >= eps:
        if len(tensors) != 2:
            raise MergeInputError(
                f"multislerp: tensor {name!r}: the weighted sum of the models' directions is zero (antipodal "
                "tensors whose weights balance out); use different weights"
            )
        out = point(0).mul_(w[0]).add_(point(1), alpha=w[1])
    else:
        out = mean.mul_(avg_norm / mean_norm)
    return out.add_(base32) if base32 is not None else out


@register
class MultiSlerp(MergeMethod):
    name = "multislerp"
    summary = "multislerp: weighted spherical average of several models (or task vectors)"
    parameters = (
        weight_param(),
        Param("normalize_weights", "bool", True, "divide the weights by their sum"),
        Param("eps", "float", MULTISLERP_EPS, "norms below this are not divided by", lo=0.0),
        use_base_param("average the task vectors relative to the base, and add the base"),
    )

    def validate(self):
        w = self.params["weight"]
        if isinstance(w, list) and all(isinstance(x, float) for x in w) and self.params["normalize_weights"] \
                and sum(w) == 0.0:
            raise MergeConfigError(f"multislerp: weights {w} sum to 0 and cannot be normalised")
        # mergekit works on task vectors when a config names base_model; here that is the use_base switch
        self.needs_base = self.params["use_base"]

    def merge_tensor(self, name, inputs, base):
        w = [float(x) for x in self.values(name, len(inputs)).weight]
        if self.normalize_weights and sum(w) == 0.0:
            raise MergeConfigError(f"multislerp: the weights of tensor {name!r} sum to 0 and cannot be normalised")
        return multislerp(inputs, w, base, self.normalize_weights, float(self.eps), name)

    def plan_tensor(self, name, shape, dtype, num_models):
        n = numel_of(shape)
        return {"lowrank": False, "k": None, "flops": 5 * n * num_models, "workspace_bytes": 16 * n}
