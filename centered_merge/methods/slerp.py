"""Spherical linear interpolation of two models: `slerp` (whole tensors, base at t = 0) and `nuslerp` (weights give t,
optional row/column vectors, optional task vectors relative to a base), with mergekit's meaning for each parameter.

For directions a^ = a/|a|, b^ = b/|b| at angle theta = acos(a^ . b^), slerp(a, b, t) =
    sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b,
applied to the raw (unnormalised) tensors, as mergekit does. Nearly colinear pairs fall back to the linear
interpolation (1 - t) a + t b. All arithmetic is float32 whatever the input dtype.
"""
from __future__ import annotations

import math

import torch

from .base import MergeMethod, numel_of
from .params import Param, use_base_param, weight_param
from .per_model import check_model_count
from .registry import register

# mergekit's slerp treats |cos theta| above this as colinear (and lerps)
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8  # norms at or below this are not divided by (mergekit's `normalize`)
NUSLERP_EPS = 1e-8  # rows with |sin theta| below this are lerped
NUSLERP_NORM_FLOOR = 1e-7  # row norms are clamped to at least this before dividing


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = SLERP_DOT_THRESHOLD,
          eps: float = SLERP_EPS) -> torch.Tensor:
    """Slerp between the whole tensors a (t = 0) and b (t = 1), flattened into one vector each. float32 out.

    A norm <= eps is left undivided (so a zero tensor has cos theta = 0 with anything and is not lerped: slerp of
    (a, 0) is sin((1 - t) pi/2) a, as in mergekit)."""
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    if a32.numel() == 0:
        return a32.clone()
    na, nb = float(torch.linalg.vector_norm(a32)), float(torch.linalg.vector_norm(b32))
    dot = float(torch.dot(a32.reshape(-1), b32.reshape(-1)))
    cos = dot / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))
    if abs(cos) > dot_threshold:
        return torch.lerp(a32, b32, float(t))
    theta = math.acos(cos)
    s = math.sin(theta)
    wa, wb = math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s
    return torch.mul(a32, wa).add_(b32, alpha=wb)


def nuslerp(a: torch.Tensor, b: torch.Tensor, t: float, flatten: bool = True, row_wise: bool = False,
            eps: float = NUSLERP_EPS) -> torch.Tensor:
    """Slerp of a and b vector by vector. float32 out, shaped like a.

    flatten: one vector per tensor. Otherwise the vectors run along the last dimension (each row of a 2-D
    [out, in] weight), or, with row_wise, along the first dimension (each column of it): mergekit's code swaps
    dimension 0 with the last one when nuslerp_row_wise is set. Rows whose |sin theta| < eps are lerped."""
    shape = a.shape
    x, y = a.to(torch.float32), b.to(torch.float32)
    if x.numel() == 0:
        return x.clone()
    transposed = False
    if flatten or x.dim() == 0:
        x, y = x.reshape(1, -1), y.reshape(1, -1)
    elif row_wise:
        x, y, transposed = x.transpose(0, -1), y.transpose(0, -1), True
    nx = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_(min=NUSLERP_NORM_FLOOR)
    ny = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_(min=NUSLERP_NORM_FLOOR)
    cos = (torch.linalg.vecdot(x, y).unsqueeze(-1) / (nx * ny)).clamp_(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    colinear = sin.abs() < eps
    wx = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin)
    wy = torch.where(colinear, float(t), torch.sin(t * theta) / sin)
    out = x * wx + y * wy
    if transposed:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp_t(w0: float, w1: float) -> float:
    """mergekit's interpolation factor from the two per-model weights: w1 / (w0 + w1); 0.5 when the sum is ~0."""
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


@register
class Slerp(MergeMethod):
    """slerp(base, model, t): t = 0 gives the base model, t = 1 the other model (mergekit's `slerp`)."""

    name = "slerp"
    needs_base = True
    summary = "slerp: spherical interpolation from the base (t = 0) to the other model (t = 1)"
    parameters = (Param("t", "float", None, "0 gives the base model, 1 the other model", schedulable=True,
                        required=True),)

    def merge_tensor(self, name, inputs, base):
        check_model_count(self.name, len(inputs), 1, 1,
                          "exactly two models: the base (t = 0) and one other (t = 1)", with_base=True)
        return slerp(base, inputs[0], float(self.values(name, 1).t))

    def plan_tensor(self, name, shape, dtype, num_models):
        n = numel_of(shape)
        return {"lowrank": False, "k": None, "flops": 6 * n, "workspace_bytes": 12 * n}


@register
class NuSlerp(MergeMethod):
    """nuslerp of two models with t = w1 / (w0 + w1); with use_base, of their task vectors, added to the base."""

    name = "nuslerp"
    summary = "nuslerp: slerp of two models (or their task vectors) at t = w1 / (w0 + w1), whole or per row"
    parameters = (
        weight_param(),
        Param("nuslerp_flatten", "bool", True, "slerp the whole tensors (false: each row)"),
        Param("nuslerp_row_wise", "bool", False, "with nuslerp_flatten false: slerp columns instead of rows"),
        use_base_param("slerp the task vectors relative to the base, and add the base"),
    )

    def validate(self):
        # mergekit subtracts the base when a config names base_model; here that is the use_base switch
        self.needs_base = self.params["use_base"]

    def merge_tensor(self, name, inputs, base):
        check_model_count(self.name, len(inputs), 2, 2,
                          "exactly two models (plus, with use_base, a base model distinct from both)")
        w0, w1 = self.values(name, 2).weight
        t = nuslerp_t(w0, w1)
        kw = {"flatten": self.nuslerp_flatten, "row_wise": self.nuslerp_row_wise}
        if base is None:
            return nuslerp(inputs[0], inputs[1], t, **kw)
        base32 = base.to(torch.float32)
        return nuslerp(inputs[0].to(torch.float32) - base32, inputs[1].to(torch.float32) - base32, t,
                       **kw).add_(base32)

    def plan_tensor(self, name, shape, dtype, num_models):
        n = numel_of(shape)
        return {"lowrank": False, "k": None, "flops": 8 * n, "workspace_bytes": 20 * n}
