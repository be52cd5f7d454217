"""Chooses, per call, which implementation of an op runs: native CPU, native CUDA, or the torch twin.

CENTERED_MERGE_BACKEND=auto (default) | native | torch forces the choice. With `native`, an op that has no
native implementation for the tensor's device still runs the torch twin.
"""
import os


def implementation(op: str, like):
    """The function implementing `op` for a tensor like `like`."""
    from .ops import reference  # imported here: ops/__init__ imports this module

    return getattr(reference, op)


def describe() -> dict:
    return {"backend": os.environ.get("CENTERED_MERGE_BACKEND", "auto"), "native": False}
