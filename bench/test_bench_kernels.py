"""pytest-benchmark: each native kernel beside its torch twin (same inputs, same group).

    .venv/bin/python -m pytest bench/test_bench_kernels.py --benchmark-group-by=group
    CM_BENCH_NUMEL=33554432 ...   # element count per tensor (default 4 Mi; 32 Mi is the 64 MB-class size)

Not collected by `pytest tests` (pyproject's testpaths). bench/bench_kernels.py prints the summary table.
"""
import os

import pytest
import torch

from centered_merge import _native
from centered_merge.ops import native as N
from centered_merge.ops import reference as R

pytestmark = pytest.mark.skipif(_native.get(warn=False) is None, reason="native extension not built")

NUMEL = int(os.environ.get("CM_BENCH_NUMEL", str(4 << 20)))
ROWS = 1024
SHAPE = (ROWS, max(1, NUMEL // ROWS))
IMPLS = {"native": N, "torch": R}


def _inputs(T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g).to(dtype) for _ in range(T)]


def _run(benchmark, group, fn):
    benchmark.group = group
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("T", [2, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_mean_fp32(benchmark, impl, T, dtype):
    xs = _inputs(T, dtype)
    _run(benchmark, f"mean_fp32 T={T} {dtype}", lambda: IMPLS[impl].mean_fp32(xs))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_center_into(benchmark, impl, dtype):
    w = _inputs(1, dtype)[0]
    mean = torch.randn(SHAPE)
    out = torch.empty(SHAPE)
    _run(benchmark, f"center_into {dtype}", lambda: IMPLS[impl].center_into(w, mean, out))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_finalize(benchmark, impl, dtype):
    x, add = torch.randn(SHAPE), torch.randn(SHAPE)
    _run(benchmark, f"finalize -> {dtype}", lambda: IMPLS[impl].finalize(x, dtype, add))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_ties_merge(benchmark, impl):
    base = torch.randn(SHAPE).to(torch.bfloat16)
    xs = [(base.float() + 0.01 * d).to(torch.bfloat16) for d in _inputs(4, torch.float32, seed=1)]
    _run(benchmark, "ties_merge T=4 bf16 density=0.2", lambda: IMPLS[impl].ties_merge(xs, base, 0.2, 1.0))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_dare(benchmark, impl):
    tau = _inputs(1, torch.bfloat16)[0]
    _run(benchmark, "dare p=0.9 bf16", lambda: IMPLS[impl].dare(tau, 0.9, 1234))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_linear_merge(benchmark, impl):
    xs = _inputs(4, torch.bfloat16)
    _run(benchmark, "linear_merge T=4 bf16 -> bf16",
         lambda: IMPLS[impl].linear_merge(xs, [0.25] * 4, torch.bfloat16))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_task_arithmetic_merge(benchmark, impl):
    xs, base = _inputs(4, torch.bfloat16), _inputs(1, torch.bfloat16, seed=9)[0]
    _run(benchmark, "task_arithmetic_merge T=4 bf16 -> bf16",
         lambda: IMPLS[impl].task_arithmetic_merge(xs, base, [1.0] * 4, 0.3, torch.bfloat16))
