"""The in-memory entry points: merge() and cart() over state dicts or nn.Modules."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch

from . import ops
from .errors import MergeConfigError, MergeInputError
from .methods import MergeMethod, get_method
from .validation import FLOAT, check_finite, check_group, check_key_sets

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


def resolve_method(method: Union[str, MergeMethod], params: dict) -> MergeMethod:
    if isinstance(method, MergeMethod):
        if params:
            raise MergeConfigError("pass parameters either to the method object or to merge(), not both")
        return method
    return get_method(method, **params)


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
    """
    m = resolve_method(method, params)
    if models is None or len(models) == 0:
        raise MergeConfigError("no models to merge (T = 0)")
    sds = [as_state_dict(x, f"model {i}") for i, x in enumerate(models)]
    sources = [f"model {i}" for i in range(len(sds))]
    base_sd = None
    if m.needs_base:
        if base is None:
            raise MergeConfigError(f"method {m.name!r} needs a base model (base=...)")
        base_sd = as_state_dict(base, "base")
        check_key_sets([list(sd) for sd in sds] + [list(base_sd)], sources + ["base"])
    else:
        check_key_sets([list(sd) for sd in sds], sources)
    dev = torch.device(device) if device is not None else None

    merged: Dict[str, torch.Tensor] = {}
    for name in sds[0]:
        group = [sd[name] for sd in sds]
        group_sources = list(sources)
        if base_sd is not None:
            group.append(base_sd[name])
            group_sources.append("base")
        kind = check_group(name, group, group_sources)
        if kind != FLOAT:
            merged[name] = group[0].clone()
            continue
        if not allow_nonfinite:
            for t, src in zip(group, group_sources):
                check_finite(name, t, src)
        if dev is not None:
            group = [t.to(dev) for t in group]
        inputs = group[: len(sds)]
        base_t = group[len(sds)] if base_sd is not None else None
        result = m.merge_tensor(name, inputs, base_t)
        out, nonfinite = ops.finalize(result, out_dtype or inputs[0].dtype)
        if nonfinite and not allow_nonfinite:
            raise MergeInputError(
                f"merged tensor {name!r} has {nonfinite} NaN/Inf value(s) (overflow in "
                f"{out_dtype or inputs[0].dtype}?); pass allow_nonfinite=True to keep them"
            )
        merged[name] = out.cpu() if out.device.type != "cpu" else out
    return merged


def cart(models: Sequence[ModelLike], rank=0.12, lam: float = 2.0, **kwargs) -> Dict[str, torch.Tensor]:
    """CART merge of `models`: merge(models, "cart", rank=rank, lam=lam, ...). See methods/cart.py."""
    return merge(models, "cart", rank=rank, lam=lam, **kwargs)
