"""Linear merge (mergekit's `linear`, a weighted model soup): sum_t w_t theta_t, divided by sum_t w_t when
normalize is on (the default). Weights may differ per model and vary per tensor (gradients, filter lists).
One pass of the fused ops.linear_merge, which writes the output dtype directly; with normalize, the raw weights
and a final division by their float32 sum, mergekit's order of operations, so that it rounds as mergekit does."""
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
    counts_nonfinite_inputs = True  # the fused kernel (ops) sums every input element
    writes_into = True
    elementwise = True

    def weights(self, name, num_models):
        """(the weights, the divisor): the raw weights and their float32 sum with normalize, else 1."""
        v = self.values(name, num_models)
        w = [float(x) for x in v.weight]
        if not v.normalize:
            return w, 1.0
        total = sum(w)
        if abs(total) < 1e-8:
            raise MergeConfigError(f"linear: the weights of tensor {name!r} sum to {total:g}; cannot normalize")
        return w, float(torch.tensor(w, dtype=torch.float32).sum())  # as mergekit sums them

    def merge_tensor_to(self, name, inputs, base, dtype, out=None):
        w, divisor = self.weights(name, len(inputs))
        return ops.linear_merge(inputs, w, dtype, divisor=divisor, out=out)

    def merge_tensor(self, name, inputs, base=None):
        return self.merge_tensor_to(name, inputs, base, torch.float32)[0]
