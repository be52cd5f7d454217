"""Merge methods, one module each, behind one registry."""
from . import cart, dare, task_arithmetic, ties, weight_average  # noqa: F401  (registers the methods)
from . import iso, tsv  # noqa: F401  (the task-vector SVD family)
from . import slerp  # noqa: F401  (registers slerp, nuslerp)
from . import multislerp  # noqa: F401
from . import karcher  # noqa: F401
from . import model_stock  # noqa: F401
from .base import MergeMethod
from .registry import available, get_method, method_class, register

__all__ = ["MergeMethod", "available", "get_method", "method_class", "register"]
