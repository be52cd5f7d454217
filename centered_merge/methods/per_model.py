"""The model-count check shared by the geometric methods (single values are checked by their declarations)."""
from __future__ import annotations

from typing import Optional

from ..errors import MergeConfigError


def check_model_count(method: str, num_models: int, lo: int, hi: Optional[int], what: str,
                      with_base: bool = False) -> None:
    """Raise MergeConfigError unless lo <= num_models <= hi (hi None: no upper bound); num_models excludes the base."""
    if num_models < lo or (hi is not None and num_models > hi):
        got = f"the base and {num_models} other model(s)" if with_base else f"{num_models} model(s)"
        raise MergeConfigError(f"{method} merges {what}; got {got}")
