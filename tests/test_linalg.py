import math
import functools

import pytest
import torch

from centered_merge import linalg
from centered_merge.errors import MergeConfigError
from centered_merge.linalg import (
    INT8_MAX_INNER,
    _int8_rows,
    energy_rank,
    energy_svd,
    exact_svd,
    fast_bf16_matmul,
    fast_int8_matmul,
    gram_energy_svd,
    power_iterations,
    randomized_lowrank_factors,
    randomized_svd,
    randomized_svd_from_sketch,
    resolve_rank,
    resolve_sketch_dtype,
    sketch_in,
)

from conftest import decaying_matrix


def _err(a, usv):
    u, s, vh = usv
    return torch.linalg.matrix_norm(a.double() - ((u * s) @ vh).double()).item()


def spectrum_matrix(m, n, kind, seed=0):
    """An m x n float32 matrix with random singular vectors and the singular values of `kind`."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    i = torch.arange(1, r + 1, dtype=torch.float64)
    s = {
        "1/i": 1 / i,
        "1/sqrt(i)": i ** -0.5,
        "0.97^i": 0.97 ** i,
        "0.9^i": 0.9 ** i,
        "0.5^i": 0.5 ** i,
        "rank16+noise": torch.where(i <= 16, 1.0, 1e-3),  # a LoRA-like fine-tune: exact low rank plus noise
        "flat": torch.ones_like(i),
    }[kind]
    return ((u * s) @ v.T).to(torch.float32)


def assert_near_optimal(a, usv, k, what):
    """Issue 12's bound: rank-k error <= max(1.01 x optimal, optimal + 2e-4 ||a||_F)."""
    sv = torch.linalg.svdvals(a.double())
    opt = sv[k:].pow(2).sum().sqrt().item()
    got = _err(a, usv)
    bound = max(1.01 * opt, opt + 2e-4 * sv.pow(2).sum().sqrt().item())
    assert got <= bound, (what, k, got / max(opt, 1e-30), (got - opt) / sv.norm().item())


SPECTRA = ["1/i", "1/sqrt(i)", "0.97^i", "0.9^i", "0.5^i", "rank16+noise", "flat"]


@pytest.mark.parametrize("sketch_dtype", ["auto", "bfloat16"])
@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (200, 200)])
@pytest.mark.parametrize("kind", SPECTRA)
def test_default_randomized_svd_is_near_optimal_on_every_spectrum(shape, kind, sketch_dtype):
    """Default settings (int8 or bf16 range finding where the CPU has it, float32 refinement), k from 1 to min/2;
    also bf16 explicitly (the GPU's default and the previous CPU one)."""
    a = spectrum_matrix(*shape, kind, seed=sum(shape))
    half = min(shape) // 2
    for k in sorted({1, 2, 5, half // 8, half // 4, half // 2, half}):
        usv = randomized_svd(a, k, generator=torch.Generator().manual_seed(k), sketch_dtype=sketch_dtype)
        assert_near_optimal(a, usv, k, (kind, sketch_dtype))


@pytest.mark.parametrize("sketch_dtype", ["auto", "bfloat16"])
@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
@pytest.mark.parametrize("kind", ["1/sqrt(i)", "0.9^i"])
def test_randomized_svd_is_near_optimal_with_outlier_entries(shape, kind, sketch_dtype):
    """A few entries 30-300x the largest (outlier features): rows that hold one are rounded coarsely by the int8
    range finder's per-row scales, which the refinement must still absorb."""
    for frac, mag in ((0.02, 30.0), (0.1, 100.0), (0.5, 300.0)):
        a = spectrum_matrix(*shape, kind, seed=5)
        g = torch.Generator().manual_seed(6)
        rows = torch.randperm(shape[0], generator=g)[: max(1, int(frac * shape[0]))]
        a[rows, torch.randint(0, shape[1], (len(rows),), generator=g)] += mag * a.abs().max()
        half = min(shape) // 2
        for k in sorted({1, 5, half // 4, half}):
            usv = randomized_svd(a, k, generator=torch.Generator().manual_seed(k), sketch_dtype=sketch_dtype)
            assert_near_optimal(a, usv, k, (kind, frac, sketch_dtype))


@pytest.mark.parametrize("sketch_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("kind", ["1/sqrt(i)", "0.9^i", "0.5^i"])
def test_each_sketch_dtype_is_near_optimal(kind, sketch_dtype):
    """bf16 range finding has no rounding floor once refined in float32: the fast-decaying spectra where the bf16
    sketch alone gave 25x the optimal error now meet the same bound as float32."""
    a = spectrum_matrix(480, 160, kind, seed=3)
    for k in (1, 8, 20, 40, 80):
        usv = randomized_svd(a, k, generator=torch.Generator().manual_seed(k), sketch_dtype=sketch_dtype)
        assert_near_optimal(a, usv, k, (kind, sketch_dtype))


@functools.lru_cache(maxsize=1)  # trained once for the test's parametrizations
def _digits_task_vectors(tasks=4, steps=40):
    """Real fine-tune differences: a small MLP trained on scikit-learn's digits, then fine-tuned `steps` Adam
    steps on each of `tasks` class subsets; returns each weight matrix's centered task matrices."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 192),
                              torch.nn.ReLU(), torch.nn.Linear(192, 10))

    def train(model, xs, ys, n, lr):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs), ys).backward()
            opt.step()

    train(net, x, y, 30, 1e-2)
    tuned = []
    for t in range(tasks):
        ft = __import__("copy").deepcopy(net)
        keep = (y % tasks) == t
        train(ft, x[keep], y[keep], steps, 3e-3)
        tuned.append([p.detach().clone() for p in ft.parameters() if p.dim() == 2])
    out = []
    for mats in zip(*tuned):
        mean = torch.stack(mats).mean(0)
        out.extend(w - mean for w in mats if min(w.shape) >= 64)
    return out


@pytest.mark.parametrize("sketch_dtype", ["auto", "bfloat16"])
def test_default_randomized_svd_is_near_optimal_on_real_task_vectors(sketch_dtype):
    for i, c in enumerate(_digits_task_vectors()):
        for k in sorted({1, 4, min(c.shape) // 8, min(c.shape) // 4, min(c.shape) // 2}):
            usv = randomized_svd(c, k, generator=torch.Generator().manual_seed(i), sketch_dtype=sketch_dtype)
            assert_near_optimal(c, usv, k, (c.shape, sketch_dtype))


@pytest.mark.parametrize("wide", [False, True])  # a wide matrix is factored as its transpose
def test_exact_svd_is_optimal_and_orthonormal(wide):
    a = decaying_matrix(80, 50, seed=3)
    a = a.T.contiguous() if wide else a
    u, s, vh = exact_svd(a, 10)
    assert u.shape == (a.shape[0], 10) and vh.shape == (10, a.shape[1])
    assert torch.allclose(u.T @ u, torch.eye(10), atol=1e-5)
    assert torch.allclose(vh @ vh.T, torch.eye(10), atol=1e-5)
    full_s = torch.linalg.svdvals(a.double())
    assert torch.allclose(s.double(), full_s[:10], rtol=1e-5)
    opt = full_s[10:].pow(2).sum().sqrt().item()
    assert abs(_err(a, (u, s, vh)) - opt) <= 1e-5 * max(1.0, opt)
    u, s, vh = exact_svd(a)  # all triplets: a itself
    assert torch.allclose((u * s) @ vh, a, atol=1e-5)


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


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (200, 200)])
@pytest.mark.parametrize("kind", SPECTRA)
def test_gram_route_picks_the_exact_k_and_is_near_optimal(shape, kind):
    """energy_svd's Gram route (eigh of the short side's Gram matrix): the same k as the exact spectrum gives and
    issue 12's rank-k bound, on every spectrum class, wide, tall and square, at the fractions people use; also
    orthonormal factors and the exact singular values."""
    a = spectrum_matrix(*shape, kind, seed=sum(shape))
    sv = torch.linalg.svdvals(a.double())
    total = sv.pow(2).sum().item()
    for fraction in (0.5, 0.9, 0.99):
        found = gram_energy_svd(a, fraction, total)
        if found is None:  # only where the weakest kept direction is below the Gram's trusted range
            assert sv[energy_rank(sv, total, fraction) - 1] ** 2 < 1e-4 * sv[0] ** 2, (kind, fraction)
            continue
        u, s, vh = found
        k = len(s)
        assert abs(k - energy_rank(sv, total, fraction)) <= (1 if kind == "flat" else 0), (kind, fraction)
        assert u.shape == (shape[0], k) and vh.shape == (k, shape[1])
        # the eigenvectors (short side) are orthonormal; the other side's vectors are a's normalised projections,
        # which mix where singular values nearly coincide (the Gram squares their gaps): <= 1.9e-4 here
        basis, other = (u.mT @ u, vh @ vh.mT) if shape[0] <= shape[1] else (vh @ vh.mT, u.mT @ u)
        assert torch.allclose(basis, torch.eye(k), atol=1e-5)
        assert torch.allclose(other, torch.eye(k), atol=1e-3)
        assert torch.allclose(s.double(), sv[:k], rtol=1e-4, atol=1e-6 * sv[0].item())
        assert_near_optimal(a, found, k, (kind, fraction))


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (1, 7), (7, 1)])
def test_gram_route_edge_shapes_and_a_zero_matrix(shape):
    """Small and one-row / one-column matrices, and all-zero ones (k = 1, factors of zeros, no division by a zero
    sigma)."""
    g = torch.Generator().manual_seed(7)
    for a in (torch.randn(shape, generator=g), torch.zeros(shape)):
        total = a.double().pow(2).sum().item()
        u, s, vh = gram_energy_svd(a, 0.9, total)
        assert u.shape[0] == shape[0] and vh.shape[1] == shape[1] and len(s) >= 1
        assert torch.isfinite(u).all() and torch.isfinite(vh).all()
        if total == 0:
            assert len(s) == 1 and not ((u * s) @ vh).any()
        elif min(shape) == 1:
            assert torch.allclose((u * s) @ vh, a, atol=1e-6)  # a rank-1 matrix: all of it
        else:
            assert_near_optimal(a, (u, s, vh), len(s), shape)


def test_gram_route_declines_where_its_rounding_would_show():
    """At a fraction that keeps directions below GRAM_MIN_EIG of the largest eigenvalue (here sigma_i ~ 0.5^i,
    99.99999999% of the energy: sigma_k ~ 1e-5 sigma_1), the float32 Gram no longer resolves them; the route
    says so, and energy_svd then takes the exact SVD, which still meets the bound."""
    a = spectrum_matrix(200, 120, "0.5^i", seed=1)
    sv = torch.linalg.svdvals(a.double())
    total = sv.pow(2).sum().item()
    assert gram_energy_svd(a, 1 - 1e-10, total) is None
    usv = energy_svd(a, 1 - 1e-10, generator=torch.Generator().manual_seed(0))
    assert_near_optimal(a, usv, len(usv[1]), "fallback")


def test_energy_mode_takes_the_gram_route_on_a_near_full_rank_matrix(monkeypatch):
    """A flat spectrum needs 90% of its directions: the randomized search stops at once and the Gram route answers;
    LAPACK's SVD is not called."""
    a = spectrum_matrix(150, 400, "flat", seed=4)
    calls = []
    monkeypatch.setattr(linalg, "exact_svd", lambda *x, **y: calls.append(1))
    u, s, vh = energy_svd(a, 0.9, generator=torch.Generator().manual_seed(0))
    assert not calls and len(s) == energy_rank(torch.linalg.svdvals(a.double()), a.double().pow(2).sum().item(), 0.9)
    assert_near_optimal(a, (u, s, vh), len(s), "gram route")


def test_auto_sketch_dtype_rule():
    assert resolve_sketch_dtype("float32", 5, 100, 100, "cpu") == torch.float32
    assert resolve_sketch_dtype("bfloat16", 50, 100, 100, "cpu") == torch.bfloat16
    assert resolve_sketch_dtype("int8", 50, 100, 100, "cpu") == torch.int8
    want = torch.bfloat16 if fast_bf16_matmul("cpu") else torch.float32
    if fast_int8_matmul("cpu"):
        # a long side whose int32 sums could overflow stays with the float dtype
        assert resolve_sketch_dtype("auto", 5, 100, INT8_MAX_INNER + 1, "cpu") == want
        want = torch.int8
    for k in (1, 25, 50):  # the float32 refinement removes the reduced precision's floor at every k
        assert resolve_sketch_dtype("auto", k, 100, 100, "cpu") == want


@pytest.mark.parametrize("layout", ["row-major", "column-major", "empty", "1xn", "zero rows"])
def test_int8_rows_round_each_entry_to_its_rows_scale(layout, monkeypatch):
    """a = s q with |q| <= 127, each entry within half a step (s) of a, in a's layout; reused buffers."""
    g = torch.Generator().manual_seed(0)
    a = {"row-major": lambda: torch.randn(37, 2000, generator=g),
         "column-major": lambda: torch.randn(2000, 37, generator=g).mT,
         "empty": lambda: torch.empty(0, 5),
         "1xn": lambda: torch.randn(1, 9, generator=g),
         "zero rows": lambda: torch.cat([torch.zeros(3, 50), torch.randn(2, 50, generator=g) * 1e-30]),
         }[layout]()
    monkeypatch.setattr(linalg, "INT8_BLOCK", 3000)  # several rounding blocks, the last one partial
    workspace = {}
    for ws in (None, workspace, workspace):  # without, then with a workspace whose buffers the second call reuses
        q, s = _int8_rows(a, ws)
        assert q.dtype == torch.int8 and q.shape == a.shape and q.stride() == a.stride()
        if ws is not None:
            assert q.data_ptr() == ws["int8"].data_ptr()
        if a.numel():
            assert int(q.abs().max()) <= 127
            assert bool(((q.double() * s.double() - a.double()).abs() <= 0.5 * s.double() * (1 + 1e-6)).all())
            nonzero = a.abs().amax(1) > 0
            assert bool((q.abs().amax(1)[nonzero] == 127).all())  # each row's largest entry uses the full range


def test_power_iterations_grow_with_the_rank_ratio():
    assert [power_iterations(k, 800, 3000) for k in (1, 100, 101, 200, 201, 400)] == [2, 2, 3, 3, 4, 4]
    assert power_iterations(300, 800, 3000, power_iters=1) == 1


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (150, 150)])
@pytest.mark.parametrize("sketch_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_lowrank_factors_equal_the_svd_route(shape, sketch_dtype):
    """CART's factor form lt^T r is the same rank-k matrix as U S Vh, and writes into the given buffers."""
    a = decaying_matrix(*shape, seed=7)
    k, w = 12, 22
    omega = torch.randn(max(shape), w, generator=torch.Generator().manual_seed(1))
    u, s, vh = randomized_svd_from_sketch(a, omega, k, 2, sketch_dtype)
    lt, r = randomized_lowrank_factors(a, omega, k, 2, sketch_dtype)
    assert lt.shape == (k, shape[0]) and r.shape == (k, shape[1])
    # the sketch converted once (as CART does for its T tasks) gives the same factors
    shared = randomized_lowrank_factors(a, sketch_in(omega, sketch_dtype), k, 2, sketch_dtype)
    assert torch.equal(shared[0], lt) and torch.equal(shared[1], r)
    want = (u * s) @ vh
    assert torch.allclose(lt.mT @ r, want, atol=1e-5 * want.abs().max().item())
    bufs = (torch.full((k, shape[0]), float("nan")), torch.full((k, shape[1]), float("nan")))
    got = randomized_lowrank_factors(a, omega, k, 2, sketch_dtype, out=bufs)
    assert got[0].data_ptr() == bufs[0].data_ptr() and got[1].data_ptr() == bufs[1].data_ptr()
    assert torch.equal(bufs[0], lt) and torch.equal(bufs[1], r)
    workspace = {}
    for _ in range(2):  # a kept workspace (the int8 copy reused) gives the same factors
        again = randomized_lowrank_factors(a, omega, k, 2, sketch_dtype, workspace=workspace)
        assert torch.equal(again[0], lt) and torch.equal(again[1], r)


@pytest.mark.parametrize("sketch_dtype", [torch.float32, torch.int8, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_lowrank_factors_batched_over_tasks_equal_one_at_a_time(shape, sketch_dtype):
    """The batched form (T, m, n) CART uses on GPUs gives each task's factors as the one-matrix call does
    (bfloat16: the sketch dtype it has there)."""
    a = torch.stack([decaying_matrix(*shape, seed=s) for s in range(3)])
    omega = torch.randn(max(shape), 22, generator=torch.Generator().manual_seed(1))
    lt, r = randomized_lowrank_factors(a, omega, 12, 2, sketch_dtype)
    assert lt.shape == (3, 12, shape[0]) and r.shape == (3, 12, shape[1])
    for t in range(3):
        lt1, r1 = randomized_lowrank_factors(a[t], omega, 12, 2, sketch_dtype)
        want = lt1.mT @ r1
        assert torch.allclose(lt[t].mT @ r[t], want, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("sketch_dtype", [torch.int8, torch.bfloat16])
@pytest.mark.parametrize("outliers", [False, True])
def test_rounding_floor_estimates_the_rounded_copys_error(sketch_dtype, outliers):
    """_rounding_floor, from the row scales (int8) or row norms (bf16) alone, is close to the spectral norm of
    the error that rounding the matrix to the sketch dtype makes, and not below it by much (the one-pass check
    compares the kept directions with it)."""
    a = spectrum_matrix(400, 1000, "1/sqrt(i)", seed=2)
    if outliers:
        a[::7, 3] += 50 * a.abs().max()
    omega = linalg.sketch(a.shape, 40, torch.Generator().manual_seed(0), "cpu")
    _, floor = linalg._range_finder(a, sketch_in(omega, sketch_dtype), 1, sketch_dtype)
    if sketch_dtype == torch.int8:
        q, s = _int8_rows(a)
        err = a - s * q.float()
    else:
        err = a - a.to(torch.bfloat16).float()
    ratio = torch.linalg.matrix_norm(err, 2).item() / floor.item()
    assert 0.5 < ratio < 1.1, ratio


def _projection(a, k, sketch_dtype=torch.int8):
    omega = linalg.sketch(a.shape, linalg.sketch_width(k), torch.Generator().manual_seed(k), "cpu")
    return linalg._sketched(a, sketch_in(omega, sketch_dtype), k, power_iterations(k, *a.shape), sketch_dtype)[0]


def test_one_pass_projection_only_far_above_the_floor_and_with_a_gap():
    """The one float32 pass is kept where every kept direction stands far above the range finder's rounding floor
    and the spectrum falls after k; below the floor (0.9^i at k = 60: sigma_k ~ 2e-3 sigma_1) or without a gap
    (half the rows holding a 300x outlier: ~60 nearly equal top singular values) the second pass runs."""
    assert not _projection(spectrum_matrix(300, 120, "1/sqrt(i)", seed=1), 15).s_on_short  # one pass
    assert _projection(spectrum_matrix(300, 120, "0.9^i", seed=1), 60).s_on_short  # below the floor
    a = spectrum_matrix(300, 120, "1/sqrt(i)", seed=5)
    g = torch.Generator().manual_seed(6)
    rows = torch.randperm(300, generator=g)[:150]
    a[rows, torch.randint(0, 120, (150,), generator=g)] += 300 * a.abs().max()
    assert _projection(a, 15).s_on_short  # no gap after k


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_either_projection_gives_orthonormal_factors_and_meets_the_bound(monkeypatch, one_pass, shape):
    """Each branch of _refined_projection, forced, gives the rank-k SVD's form (U and V orthonormal, S carried by
    one side of CART's factors) and issue 12's bound on a spectrum both apply to."""
    if one_pass:
        monkeypatch.setattr(linalg, "ONE_PASS_MARGIN", 0.0)
        monkeypatch.setattr(linalg, "ONE_PASS_MAX_FLATNESS", float("inf"))
    else:
        monkeypatch.setattr(linalg, "ONE_PASS_MARGIN", float("inf"))
    a = spectrum_matrix(*shape, "1/i", seed=4)
    k = 20
    assert _projection(a, k).s_on_short is not one_pass
    u, s, vh = randomized_svd(a, k, generator=torch.Generator().manual_seed(3))
    eye = torch.eye(k)
    assert torch.allclose(u.mT @ u, eye, atol=1e-4) and torch.allclose(vh @ vh.mT, eye, atol=1e-4)
    assert_near_optimal(a, (u, s, vh), k, ("forced", one_pass))
    omega = linalg.sketch(shape, linalg.sketch_width(k), torch.Generator().manual_seed(3), "cpu")
    lt, r = randomized_lowrank_factors(a, omega, k, power_iterations(k, *shape),
                                       linalg.resolve_sketch_dtype("auto", k, *shape, "cpu"))
    want = (u * s) @ vh
    assert torch.allclose(lt.mT @ r, want, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("cond, cholesky", [(1e1, True), (1e3, False), (1e7, False)])
def test_iteration_basis_spans_y_and_is_well_conditioned(monkeypatch, cond, cholesky):
    """The power iterations' basis: Cholesky-QR where y is well enough conditioned (R's diagonal within
    CHOLQR_MAX_RATIO), Householder QR beyond; either way a basis of condition number near 1 that spans y as far as
    float32 resolves it."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(500, 40, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
    y = ((u * torch.logspace(0, -math.log10(cond), 40, dtype=torch.float64)) @ v.T).float()
    y = y * (torch.rand(40, generator=g) * 100 + 1)  # column scales, as the int8 iterations leave them
    householder = []
    orth = linalg._orth
    monkeypatch.setattr(linalg, "_orth", lambda x: householder.append(1) or orth(x))
    b = linalg._iteration_basis(y)
    assert bool(householder) is not cholesky
    sv = torch.linalg.svdvals(b.double())
    assert sv[0] / sv[-1] < 1.2
    if cond <= 1e3:  # beyond, y's own float32 rounding already blurs its weakest directions
        qy = torch.linalg.qr(y.double()).Q
        resid = b.double() - qy @ (qy.T @ b.double())
        assert resid.norm() / b.double().norm() < 1e-4
