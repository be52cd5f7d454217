"""The streaming merge engine: checkpoints in, an HF-style directory (or, for api.merge, a dict) out, one tensor
at a time. Modules: request (the one resolved request), inputs (opening and checking the models), reader (the
read-ahead thread), core (the per-tensor checks and merge), plan (dry run), pipeline (the loop and the entry
points), lock (one merge per output), card (README.md). The writer and the shard layout are in centered_merge.io.
"""
from .card import library_version, model_card
from .pipeline import MergeReport, merge_checkpoints, merge_in_memory, plan_merge
from .reader import LazyDeviceInputs
from .request import MergeRequest, build_request, parse_dtype, resolve_device, resolve_method

__all__ = ["MergeReport", "MergeRequest", "build_request", "merge_checkpoints", "merge_in_memory", "plan_merge",
           "parse_dtype", "resolve_device", "resolve_method", "library_version", "model_card", "LazyDeviceInputs"]
