import os

import pytest
import torch

# Tests run on small tensors: one thread is as fast and does not stall when other processes share the cores.
torch.set_num_threads(1)


def decaying_matrix(m, n, decay="power", seed=0, dtype=torch.float32):
    """A random m x n matrix with a prescribed decaying spectrum (power law or exponential)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    i = torch.arange(1, r + 1, dtype=torch.float64)
    s = i ** -1.0 if decay == "power" else torch.exp(-i / (0.1 * r))
    return ((u * s) @ v.T).to(dtype)


@pytest.fixture
def make_models():
    """T random state dicts shaped like a tiny transformer block, as perturbations of one base."""

    def _make(T=4, dtype=torch.float32, seed=0, scale=0.05):
        g = torch.Generator().manual_seed(seed)
        shapes = {
            "blocks.0.attn.in_proj_weight": (48, 16),
            "blocks.0.attn.out_proj.weight": (16, 16),
            "blocks.0.attn.out_proj.bias": (16,),
            "blocks.0.ln_1.weight": (16,),
            "blocks.0.mlp.c_fc.weight": (64, 16),
            "blocks.0.mlp.c_proj.weight": (16, 64),
            "embed.weight": (10, 16),
        }
        base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        models = [
            {k: (v + scale * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()} for _ in range(T)
        ]
        return {k: v.to(dtype) for k, v in base.items()}, models

    return _make
