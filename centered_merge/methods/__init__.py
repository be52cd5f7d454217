"""Merge methods, one module each, behind one registry."""
from . import (  # noqa: F401  (registers the methods)
    breadcrumbs, cart, dare, della, iso, karcher, linear, model_stock, multislerp, passthrough, sce, slerp,
    task_arithmetic, ties, tsv, weight_average,
)
from .base import MergeMethod
from .registry import available, get_method, method_class, register

__all__ = ["MergeMethod", "available", "get_method", "method_class", "register"]
