import pytest
import torch

from centered_merge.errors import MergeConfigError
from centered_merge.linalg import (
    energy_rank,
    energy_svd,
    exact_svd,
    fast_bf16_matmul,
    randomized_lowrank_factors,
    randomized_svd,
    randomized_svd_from_sketch,
    resolve_rank,
    resolve_sketch_dtype,
)

from conftest import decaying_matrix


def _err(a, usv):
    u, s, vh = usv
    return torch.linalg.matrix_norm(a.double() - ((u * s) @ vh).double()).item()


@pytest.mark.parametrize("shape", [(240, 96), (96, 240), (160, 160), (400, 48), (48, 400), (640, 320), (320, 640)])
@pytest.mark.parametrize("decay", ["power", "exp"])
def test_randomized_error_within_2_percent_of_optimal(shape, decay):
    """Default settings: rank-k Frobenius error <= 1.02 x the exact truncated SVD's (Eckart-Young optimum)."""
    a = decaying_matrix(*shape, decay=decay, seed=sum(shape))
    sv = torch.linalg.svdvals(a.double())
    half = min(shape) // 2
    for k in sorted({1, 2, 5, half // 4, half // 2, half}):
        g = torch.Generator().manual_seed(k)
        opt = sv[k:].pow(2).sum().sqrt().item()  # Eckart-Young
        got = _err(a, randomized_svd(a, k, generator=g))
        assert got <= 1.02 * opt + 1e-6, (shape, decay, k, got / opt)


def test_exact_svd_is_optimal_and_orthonormal():
    a = decaying_matrix(80, 50, seed=3)
    u, s, vh = exact_svd(a, 10)
    assert torch.allclose(u.T @ u, torch.eye(10), atol=1e-5)
    assert torch.allclose(vh @ vh.T, torch.eye(10), atol=1e-5)
    full_s = torch.linalg.svdvals(a.double())
    opt = full_s[10:].pow(2).sum().sqrt().item()
    assert abs(_err(a, (u, s, vh)) - opt) <= 1e-5 * max(1.0, opt)


def test_randomized_is_deterministic_for_a_generator():
    a = decaying_matrix(100, 60, seed=1)
    r1 = randomized_svd(a, 8, generator=torch.Generator().manual_seed(5))
    r2 = randomized_svd(a, 8, generator=torch.Generator().manual_seed(5))
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "rank, rows, cols, k",
    [(0.12, 768, 3072, 92), (1.0, 10, 20, 10), (0.01, 10, 20, 1), (5, 10, 20, 5), (50, 10, 20, 10), (1, 7, 9, 1)],
)
def test_resolve_rank(rank, rows, cols, k):
    assert resolve_rank(rank, rows, cols) == k


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, 0, -3, True, "0.1", float("nan")])
def test_resolve_rank_rejects(bad):
    with pytest.raises(MergeConfigError, match="rank"):
        resolve_rank(bad, 10, 10)


@pytest.mark.parametrize("mode", ["exact", "randomized"])
def test_energy_mode_picks_smallest_k(mode):
    a = decaying_matrix(400, 300, decay="exp", seed=2)
    s_full = torch.linalg.svdvals(a.double())
    total = s_full.pow(2).sum().item()
    want = energy_rank(s_full, total, 0.9)
    u, s, vh = energy_svd(a, 0.9, mode=mode, generator=torch.Generator().manual_seed(0))
    # the randomized sketch slightly underestimates sigma, so it may need one or two more directions
    assert want <= len(s) <= want + 2
    assert (s.double().pow(2).sum() / total).item() >= 0.9 - 1e-4


@pytest.mark.parametrize("sketch_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(640, 320), (320, 640)])
def test_each_sketch_dtype_within_2_percent_at_cart_ranks(shape, sketch_dtype):
    """Forced float32 or bfloat16 range finding, at the ranks 'auto' would use it for (k <= min/4)."""
    a = decaying_matrix(*shape, decay="power", seed=7)
    sv = torch.linalg.svdvals(a.double())
    for k in (1, 8, 32, min(shape) // 4):
        opt = sv[k:].pow(2).sum().sqrt().item()
        got = _err(a, randomized_svd(a, k, generator=torch.Generator().manual_seed(k), sketch_dtype=sketch_dtype))
        assert got <= 1.02 * opt, (k, got / opt)


def test_auto_sketch_dtype_rule():
    assert resolve_sketch_dtype("float32", 5, 100, 100, "cpu") == torch.float32
    assert resolve_sketch_dtype("bfloat16", 50, 100, 100, "cpu") == torch.bfloat16
    assert resolve_sketch_dtype("auto", 30, 100, 100, "cpu") == torch.float32  # k > min/4: always float32
    want = torch.bfloat16 if fast_bf16_matmul("cpu") else torch.float32
    assert resolve_sketch_dtype("auto", 25, 100, 100, "cpu") == want


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (150, 150)])
@pytest.mark.parametrize("sketch_dtype", [torch.float32, torch.bfloat16])
def test_lowrank_factors_equal_the_svd_route(shape, sketch_dtype):
    """CART's factor form lt^T r is the same rank-k matrix as U S Vh, and writes into the given buffers."""
    a = decaying_matrix(*shape, seed=7)
    k, w = 12, 22
    omega = torch.randn(max(shape), w, generator=torch.Generator().manual_seed(1))
    u, s, vh = randomized_svd_from_sketch(a, omega, k, 2, sketch_dtype)
    lt, r = randomized_lowrank_factors(a, omega, k, 2, sketch_dtype)
    assert lt.shape == (k, shape[0]) and r.shape == (k, shape[1])
    want = (u * s) @ vh
    assert torch.allclose(lt.mT @ r, want, atol=1e-5 * want.abs().max().item())
    bufs = (torch.full((k, shape[0]), float("nan")), torch.full((k, shape[1]), float("nan")))
    got = randomized_lowrank_factors(a, omega, k, 2, sketch_dtype, out=bufs)
    assert got[0].data_ptr() == bufs[0].data_ptr() and got[1].data_ptr() == bufs[1].data_ptr()
    assert torch.equal(bufs[0], lt) and torch.equal(bufs[1], r)
