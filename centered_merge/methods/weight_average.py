"""Weight averaging (a uniform or weighted model soup): sum_t w_t * theta_t / sum_t w_t.

One pass of the fused ops.linear_merge, which writes the output dtype directly: the normalised weights, or for the
plain mean unit weights and a final 1/T (the sum, then the scale: the rounding of a mean)."""
from __future__ import annotations

import torch

from .. import ops
from ..errors import MergeConfigError
from .base import MergeMethod
from .params import Param
from .registry import register


@register
class WeightAverage(MergeMethod):
    name = "weight_average"
    summary = "weight averaging (model soup): sum_t w_t * theta_t / sum_t w_t"
    counts_nonfinite_inputs = True  # the fused kernel (ops) sums every input element
    writes_into = True
    elementwise = True
    parameters = (
        Param("weight", "float", 1.0, "each model's weight (normalised to sum to one)", lo=0.0, per_model=True,
              aliases=("weights",), flag="--weights"),
    )

    def validate(self):
        w = self.params["weight"]
        if isinstance(w, list) and sum(w) <= 0:
            raise MergeConfigError(f"weight_average: weights must have a positive sum; got {w}")

    def normalized_weights(self, num_models: int):
        w = self.params["weight"]
        if not isinstance(w, list):
            return None  # one weight for all: the plain mean
        if len(w) != num_models:
            raise MergeConfigError(f"weight_average: {len(w)} weights given for {num_models} models")
        total = sum(w)
        return [x / total for x in w]

    def merge_tensor_to(self, name, inputs, base, dtype, out=None):
        T = len(inputs)
        w = self.normalized_weights(T)
        if w is None:
            return ops.linear_merge(inputs, [1.0] * T, dtype, scale=1.0 / T, out=out)
        return ops.linear_merge(inputs, w, dtype, out=out)

    def merge_tensor(self, name, inputs, base=None):
        return self.merge_tensor_to(name, inputs, base, torch.float32)[0]
