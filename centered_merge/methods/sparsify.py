"""Ways to thin a task vector before it is merged, with the rules mergekit users know (its sparsify.py, read for
the facts), each a pure function of the tensor and, for the random ones, of a seed derived from
(seed, tensor name, model index) so that the result depends neither on the order of tensors nor on the process.

All take and return float32 tensors; `tau` is never modified.
"""
from __future__ import annotations

import torch

from .. import ops
from ..ops.reference import dare_uniform, kept_count, top_k_mask

F32 = torch.float32


def magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: keep exactly kept_count(numel, density) entries of largest magnitude (mergekit's
    max(1, int(density * numel))); among equal magnitudes at the threshold, the lowest flat indices, the rule of
    ops.ties_merge (ops.reference.top_k_mask), so the fused TIES op and this path agree bit for bit."""
    if density >= 1.0:
        return tau
    return torch.where(top_k_mask(tau, kept_count(tau.numel(), density)), tau, 0.0)


def rescale_l1(masked: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """masked scaled so that its L1 norm equals the original's (mergekit's `rescale`); unchanged when either norm
    is below eps."""
    before = float(original.abs().sum())
    after = float(masked.abs().sum())
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def random(tau: torch.Tensor, density: float, seed: int, rescale: bool) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (the counter-based mask of ops.dare); with `rescale`, the
    survivors are scaled to the original L1 norm (mergekit's rule), else left as they were."""
    if density >= 1.0:
        return tau
    if density <= 0.0:
        return torch.zeros_like(tau)
    dropped = ops.dare(tau, 1.0 - density, seed)  # survivors already scaled by 1 / density
    if rescale:
        return rescale_l1(dropped, tau)  # the 1 / density factor cancels in the L1 match
    return dropped.mul_(density)


def breadcrumbs(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the gamma fraction of largest magnitudes (outliers) and then the smallest, so that
    int(density * numel) entries remain (fewer outliers are dropped when both do not fit)."""
    if density >= 1.0:
        return tau
    n = tau.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = torch.sort(tau.reshape(-1).abs(), stable=True).indices  # ascending; equal magnitudes by index
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    keep[order[n_bot : n - n_top]] = True
    return torch.where(keep.reshape(tau.shape), tau, 0.0)


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE keep probabilities: along each row (dim 1; a 1-D tensor is one row), entries ranked by
    magnitude get density - epsilon (smallest) rising linearly to density + epsilon (largest)."""
    x = tau.unsqueeze(0) if tau.dim() < 2 else tau
    if x.shape[1] < 2:
        return torch.full_like(tau, density - epsilon)
    order = torch.argsort(x.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ar = torch.arange(x.shape[1], device=x.device).view([1, -1] + [1] * (x.dim() - 2)).expand_as(order)
    ranks.scatter_(1, order, ar.contiguous())
    probs = (density - epsilon) + ranks.to(F32) / (x.shape[1] - 1) * (2 * epsilon)
    return probs.reshape(tau.shape)


def della(tau: torch.Tensor, density: float, epsilon: float, seed: int, rescale: bool) -> torch.Tensor:
    """DELLA: keep each entry with its MAGPRUNE probability (uniform draws of the counter-based RNG below it);
    with `rescale`, survivors are scaled to the original L1 norm (mergekit's rule)."""
    if density >= 1.0:
        return tau
    if density <= 0.0:
        return torch.zeros_like(tau)
    probs = della_probabilities(tau, density, epsilon)
    u = dare_uniform(seed, tau.numel(), tau.device).reshape(tau.shape)
    masked = torch.where(u < probs, tau, 0.0)
    return rescale_l1(masked, tau) if rescale else masked
