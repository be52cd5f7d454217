"""Parameter checks shared by the geometric methods: a list of per-model weights, and on/off switches.

Kept apart from the math (plain functions in each method's module) so that a parameter declaration can replace
these checks without touching the formulas.
"""
from __future__ import annotations

import math
from typing import List, Optional

from ..errors import MergeConfigError


def check_weights(method: str, weights) -> Optional[List[float]]:
    """None, or `weights` as a list of finite floats (one per model; the count is checked per merge)."""
    if weights is None:
        return None
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise MergeConfigError(f"{method}: weights must be a list of numbers (one per model); got {weights!r}")
    out = []
    for x in weights:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
            raise MergeConfigError(f"{method}: weights must be finite numbers; got {list(weights)!r}")
        out.append(float(x))
    if not out:
        raise MergeConfigError(f"{method}: weights is an empty list")
    return out


def weights_for(method: str, weights: Optional[List[float]], num_models: int) -> List[float]:
    """The weights for `num_models` models: as given (count checked), or 1.0 each when none were given."""
    if weights is None:
        return [1.0] * num_models
    if len(weights) != num_models:
        raise MergeConfigError(f"{method}: {len(weights)} weights given for {num_models} models")
    return list(weights)


def check_flag(method: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise MergeConfigError(f"{method}: {key} must be true or false; got {value!r}")
    return value


def check_model_count(method: str, num_models: int, lo: int, hi: Optional[int], what: str,
                      with_base: bool = False) -> None:
    """Raise MergeConfigError unless lo <= num_models <= hi (hi None: no upper bound); num_models excludes the base."""
    if num_models < lo or (hi is not None and num_models > hi):
        got = f"the base and {num_models} other model(s)" if with_base else f"{num_models} model(s)"
        raise MergeConfigError(f"{method} merges {what}; got {got}")
