"""pytest-benchmark: one CART matrix's truncated SVD per SVD mode, ViT-B/32 MLP shape.

    .venv/bin/python -m pytest bench/test_bench_cart.py --benchmark-only
(not collected by `make test`, which runs tests/ only)
"""
import math

import pytest
import torch

from centered_merge.linalg import (exact_svd, randomized_lowrank_factors, randomized_svd, sketch, sketch_in,
                                   sketch_width)

M, N, RANK = 3072, 768, 0.12


@pytest.fixture(scope="module")
def centered():
    g = torch.Generator().manual_seed(0)
    r = min(M, N)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -1.0
    return (torch.randn(M, r, generator=g) * s) @ torch.randn(r, N, generator=g) / math.sqrt(r)


K = max(1, math.floor(RANK * min(M, N)))


def test_exact_truncated_svd(benchmark, centered):
    benchmark(lambda: exact_svd(centered, K))


@pytest.mark.parametrize("power_iters", [1, 2, 3])
def test_randomized_svd(benchmark, centered, power_iters):
    g = torch.Generator().manual_seed(0)
    benchmark(lambda: randomized_svd(centered, K, oversample=10, power_iters=power_iters, generator=g))


@pytest.mark.parametrize("sketch_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_lowrank_factors(benchmark, centered, sketch_dtype):
    """The form CART's merge loop uses: factors lt, r with lt^T r the rank-k approximation."""
    omega = sketch_in(sketch((M, N), sketch_width(K), torch.Generator().manual_seed(0), "cpu"), sketch_dtype)
    benchmark(lambda: randomized_lowrank_factors(centered, omega, K, 2, sketch_dtype))
