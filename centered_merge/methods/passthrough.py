"""Passthrough (mergekit's): one model's tensors copied unchanged, each optionally multiplied by a per-tensor
`scale` (a gradient or filter list lets a config scale some layers)."""
from __future__ import annotations

from .. import ops
from ..errors import MergeConfigError
from .base import MergeMethod
from .params import Param
from .registry import register


@register
class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "passthrough: copy one model's tensors (times scale, default 1)"
    parameters = (
        Param("scale", "float", 1.0, "factor applied to the copied tensor", per_model=True, schedulable=True),
    )

    def merge_tensor(self, name, inputs, base=None):
        if len(inputs) != 1:
            raise MergeConfigError(f"passthrough takes exactly one model per tensor; got {len(inputs)} for {name!r}")
        scale = float(self.values(name, 1).scale[0])
        return ops.mean_fp32(inputs, [scale])
