"""Checks that a set of models can be merged, with errors that name the model and the tensor.

Shared by the in-memory API and the streaming engine, so both refuse the same inputs with the same words.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import MergeInputError

FLOAT = "float"
PASSTHROUGH = "passthrough"


def check_key_sets(key_lists: Sequence[Sequence[str]], sources: Sequence[str]) -> None:
    """Raise if the models do not hold the same tensor names; the message lists what each model lacks or adds."""
    sets = [set(k) for k in key_lists]
    union = set().union(*sets)
    problems = []
    for keys, src in zip(sets, sources):
        missing = sorted(union - keys)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            problems.append(f"{src} lacks {len(missing)} tensor(s) the others have: {shown}")
    if problems:
        raise MergeInputError("models do not have the same tensors:\n  " + "\n  ".join(problems))


def check_group(name: str, tensors: Sequence[torch.Tensor], sources: Sequence[str]) -> str:
    """Validate the tensors that share one name across models; say how to merge them.

    Returns "float" when all are floating point with one shape, "passthrough" when none is floating point and
    all are equal (integer buffers such as position ids are copied through unchanged). Raises otherwise.
    """
    first, src0 = tensors[0], sources[0]
    for t, src in zip(tensors[1:], sources[1:]):
        if tuple(t.shape) != tuple(first.shape):
            raise MergeInputError(
                f"tensor {name!r} has shape {tuple(first.shape)} in {src0} but {tuple(t.shape)} in {src}"
            )
    floats = [t.is_floating_point() for t in tensors]
    if all(floats):
        return FLOAT
    if not any(floats):
        for t, src in zip(tensors[1:], sources[1:]):
            if t.dtype != first.dtype or not torch.equal(t, first):
                raise MergeInputError(
                    f"tensor {name!r} is not floating point ({first.dtype}) and differs between {src0} and {src}; "
                    "only float tensors can be merged"
                )
        return PASSTHROUGH
    bad = [f"{src} ({t.dtype})" for t, src in zip(tensors, sources) if not t.is_floating_point()]
    raise MergeInputError(
        f"tensor {name!r} is floating point in some models but not in {', '.join(bad)}; cannot merge it"
    )


def count_nonfinite(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    """Number of NaN/Inf values, cheaply: min and max in one reduction pass over the stored dtype (no float32
    copy; NaN propagates through both, an Inf shows as an extreme). Only when something is found do we count
    exactly, in chunks so that the boolean temporaries stay small."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    try:
        lo, hi = torch.aminmax(t)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return 0
    except (RuntimeError, NotImplementedError):  # dtypes without a min/max kernel (float8): count directly
        pass
    flat = t.reshape(-1)
    bad = 0
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk]
        bad += int(part.numel() - torch.isfinite(part).sum().item())
    return bad


def check_finite(name: str, tensor: torch.Tensor, source: str) -> None:
    """Raise if `tensor` holds NaN or Inf, naming the tensor, the source and how many bad values."""
    bad = count_nonfinite(tensor)
    if bad:
        raise MergeInputError(
            f"tensor {name!r} in {source} holds {bad} NaN/Inf value(s) of {tensor.numel()}; "
            "pass allow_nonfinite=True (CLI: --allow-nonfinite) to merge anyway"
        )
