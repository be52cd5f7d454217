"""The in-memory entry points: merge() and cart() over state dicts or nn.Modules."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch

from .engine import merge_in_memory, resolve_method
from .errors import MergeConfigError, MergeInputError
from .methods import MergeMethod

StateDict = Mapping[str, torch.Tensor]
ModelLike = Union[StateDict, torch.nn.Module]


def as_state_dict(model: ModelLike, what: str) -> Dict[str, torch.Tensor]:
    """name -> tensor for a state dict or an nn.Module (detached; no copy)."""
    if isinstance(model, torch.nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, Mapping):
        for k, v in model.items():
            if not isinstance(v, torch.Tensor):
                raise MergeInputError(f"{what}: entry {k!r} is a {type(v).__name__}, not a tensor")
        return dict(model)
    raise MergeInputError(f"{what} is a {type(model).__name__}; expected a state dict or an nn.Module")


def merge(
    models: Sequence[ModelLike],
    method: Union[str, MergeMethod] = "cart",
    base: Optional[ModelLike] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    allow_nonfinite: bool = False,
    **params,
) -> Dict[str, torch.Tensor]:
    """Merge T models held in memory into one state dict.

    models: state dicts (name -> tensor) or nn.Modules with the same tensor names and shapes.
    method: a registered method name (see centered_merge.methods.available()) or a MergeMethod instance.
    base: the pretrained model, for methods built on task vectors (task_arithmetic, ties, dare); CART and
        weight averaging do not use it.
    out_dtype: dtype of the merged float tensors (default: the first model's dtype for each tensor).
    device: where to compute (default: where the tensors are); results come back on the CPU.
    params: the method's parameters, e.g. rank=0.1, lam=2.0 for CART.

    It runs the streaming engine's pipeline (same checks, same per-tensor core) over the models in memory.
    """
    m = resolve_method(method, params)
    if models is None or len(models) == 0:
        raise MergeConfigError("no models to merge (T = 0)")
    sds = [as_state_dict(x, f"model {i}") for i, x in enumerate(models)]
    base_sd = as_state_dict(base, "base") if (base is not None and m.needs_base) else None
    return merge_in_memory(sds, m, base_sd, out_dtype=out_dtype, device=device, allow_nonfinite=allow_nonfinite)


def cart(models: Sequence[ModelLike], rank=0.12, lam: float = 2.0, **kwargs) -> Dict[str, torch.Tensor]:
    """CART merge of `models`: merge(models, "cart", rank=rank, lam=lam, ...). See methods/cart.py."""
    return merge(models, "cart", rank=rank, lam=lam, **kwargs)
