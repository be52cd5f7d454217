"""Linear merge (mergekit's `linear`, a weighted model soup): sum_t w_t theta_t, divided by sum_t w_t when
normalize is on (the default). Weights may differ per model and vary per tensor (gradients, filter lists).
One pass of the fused ops.linear_merge (normalised weights), which writes the output dtype directly."""
from __future__ import annotations

import torch

from .. import ops
from ..errors import MergeConfigError
from .base import MergeMethod
from .registry import register
from .params import normalize_param, weight_param


@register
class Linear(MergeMethod):
    name = "linear"
    summary = "linear: sum_t w_t theta_t (/ sum_t w_t with normalize)"
    parameters = (weight_param(), normalize_param(True))

    def weights(self, name, num_models):
        v = self.values(name, num_models)
        w = [float(x) for x in v.weight]
        if v.normalize:
            total = sum(w)
            if abs(total) < 1e-8:
                raise MergeConfigError(f"linear: the weights of tensor {name!r} sum to {total:g}; cannot normalize")
            w = [x / total for x in w]
        return w

    def merge_tensor_to(self, name, inputs, base, dtype):
        return ops.linear_merge(inputs, self.weights(name, len(inputs)), dtype)

    def merge_tensor(self, name, inputs, base=None):
        return self.merge_tensor_to(name, inputs, base, torch.float32)[0]
