"""Weight averaging (a uniform or weighted model soup): sum_t w_t * theta_t with weights summing to one."""
from __future__ import annotations

from .. import ops
from ..errors import MergeConfigError
from .base import MergeMethod
from .registry import register


@register
class WeightAverage(MergeMethod):
    name = "weight_average"
    defaults = {"weights": None}

    def validate(self):
        w = self.params["weights"]
        if w is None:
            return
        try:
            w = [float(x) for x in w]
        except (TypeError, ValueError):
            raise MergeConfigError(f"weight_average: weights must be a list of numbers; got {w!r}") from None
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise MergeConfigError(f"weight_average: weights must be >= 0 with a positive sum; got {w}")
        self.params["weights"] = w

    def normalized_weights(self, num_models: int):
        w = self.params["weights"]
        if w is None:
            return None
        if len(w) != num_models:
            raise MergeConfigError(f"weight_average: {len(w)} weights given for {num_models} models")
        total = sum(w)
        return [x / total for x in w]

    def merge_tensor(self, name, inputs, base=None):
        return ops.mean_fp32(inputs, self.normalized_weights(len(inputs)))
