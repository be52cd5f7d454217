"""Every native kernel equals its torch twin (centered_merge/ops/reference.py is the spec).

Across input dtypes (bfloat16, float16, float32), shapes (empty, one element, one row, odd sizes, a size large
enough for the multi-threaded path with a ragged last block), T in {1, 2, 8}, non-contiguous inputs, and
values (random, zeros, huge enough to overflow float32 sums, NaN/Inf). The kernels round exactly like the
twins' eager ops, so results are compared bit for bit (NaN positions must match; NaN payloads may differ).
CUDA tests run the CUDA kernels against the same twins and against the CPU kernels; they skip without a GPU.
"""
import math

import pytest
import torch

from centered_merge import _native
from centered_merge.ops import native as N
from centered_merge.ops import reference as R

pytestmark = pytest.mark.skipif(_native.get(warn=False) is None,
                                reason=f"native extension not built: {_native.error()}")
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and _native.cuda_usable()),
                          reason="needs a CUDA GPU and the extension's CUDA kernels")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DT_IDS = ["bf16", "fp16", "fp32"]
# empty, empty 2-D, one element, one row, odd 2-D, 3-D; BIG has > 32768 elements (the multi-threaded path, with
# a ragged last block) and gets its own, smaller grid of tests below.
SHAPES = [(0,), (0, 5), (1,), (1, 7), (37, 129), (3, 5, 7)]
BIG = (181, 191)
VALUES = ["randn", "zeros", "huge", "nonfinite"]
TS = [1, 2, 8]


@pytest.fixture(autouse=True)
def _threads(request):
    # Small tensors run on one thread (the kernels and torch would too, below their grain sizes; on a shared,
    # oversubscribed 2-core machine every extra OpenMP barrier costs a scheduler time slice). The large shape
    # runs with two threads, so the multi-threaded paths (block split, per-thread histograms) are tested.
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    big = math.prod(params.get("shape", (0,))) >= 32768
    before = torch.get_num_threads()
    torch.set_num_threads(2 if big else 1)
    yield
    torch.set_num_threads(before)


def make(shape, dtype, values="randn", seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if values == "zeros":
        x.zero_()
    elif values == "huge":  # near the dtype's max: sums of a few overflow float32 (for bf16/fp32)
        big = torch.finfo(dtype).max
        x = torch.where(x >= 0, 1.0, -1.0) * big * (0.5 + 0.5 * torch.rand(shape, generator=g))
    elif values == "nonfinite":
        flat = x.view(-1)
        i = torch.arange(flat.numel())
        flat[(i + seed) % 7 == 0] = float("nan")
        flat[(i + seed) % 11 == 0] = float("inf")
        flat[(i + seed) % 13 == 0] = float("-inf")
    return x.to(dtype).to(device)


def same(a, b, ctx=""):
    assert a.shape == b.shape, (ctx, a.shape, b.shape)
    assert a.dtype == b.dtype, (ctx, a.dtype, b.dtype)
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{ctx}: {m}" if ctx else m)


def noncontig(x, how):
    """A non-contiguous view with the same values as x."""
    if how == "transposed" and x.dim() == 2:
        return x.t().contiguous().t()
    if how == "strided":
        big = torch.stack([x, torch.full_like(x, 123.0)], dim=-1)
        return big[..., 0]
    return x


# --- T-way mean --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_mean(dtype, shape, values):
    for T in TS:
        xs = [make(shape, dtype, values, seed=t) for t in range(T)]
        same(N.mean_fp32(xs), R.mean_fp32(xs), f"T={T}")
        w = [0.5 / (t + 1) - 0.1 for t in range(T)]
        same(N.mean_fp32(xs, w), R.mean_fp32(xs, w), f"T={T} weighted")


@pytest.mark.parametrize("mixed", [False, True], ids=["bf16", "mixed"])
@pytest.mark.parametrize("T", [17, 40])
def test_mean_many_inputs_in_groups(T, mixed):
    # more inputs than one kernel call takes: later groups accumulate onto the first, same rounding order
    xs = [make((33, 65), DTYPES[t % 3] if mixed else torch.bfloat16, seed=t) for t in range(T)]
    same(N.mean_fp32(xs), R.mean_fp32(xs))
    w = [math.sin(t) for t in range(T)]
    same(N.mean_fp32(xs, w), R.mean_fp32(xs, w))


@pytest.mark.parametrize("how", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_mean_noncontiguous_and_mixed_dtypes(dtype, how):
    xs = [noncontig(make((37, 129), dtype, seed=t), how) for t in range(3)]
    assert not xs[0].is_contiguous()
    same(N.mean_fp32(xs), R.mean_fp32(xs))
    mixed = [make((37, 129), d, seed=i) for i, d in enumerate(DTYPES)]
    same(N.mean_fp32(mixed), R.mean_fp32(mixed))


def test_mean_rejects_bad_weights():
    from centered_merge import ops

    for f in (N.mean_fp32, R.mean_fp32, ops.mean_fp32):
        with pytest.raises(ValueError, match="mean_fp32: argument 'weights'"):
            f([torch.zeros(3)] * 2, [1.0])
    for f in (R.mean_fp32, ops.mean_fp32):
        with pytest.raises(ValueError, match="mean_fp32: argument 'inputs'"):
            f([])


# --- centering ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_center_into(dtype, shape):
    for values in VALUES:
        w = make(shape, dtype, values, seed=1)
        mean = make(shape, torch.float32, values, seed=2)
        out = torch.full(shape, 7.0)
        res = N.center_into(w, mean, out)
        assert res is out
        same(out, R.center_into(w, mean, torch.empty(shape)), values)


@pytest.mark.parametrize("how", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_center_into_noncontiguous(dtype, how):
    w = noncontig(make((37, 129), dtype, seed=1), how)
    mean = noncontig(make((37, 129), torch.float32, seed=2), how)
    out = noncontig(torch.zeros(37, 129), how)  # the caller's buffer may be a strided view too
    N.center_into(w, mean, out)
    same(out, R.center_into(w, mean, torch.empty(37, 129)))


def test_center_into_reuses_the_buffer():
    out = torch.empty(50, 3)
    ptr = out.data_ptr()
    for t in range(3):
        w = make((50, 3), torch.bfloat16, seed=t)
        N.center_into(w, torch.ones(50, 3), out)
        assert out.data_ptr() == ptr
        same(out, w.float() - 1)


# --- finalize (low-rank accumulate epilogue + output conversion + NaN/Inf count) ---------------------------
@pytest.mark.parametrize("with_add", [False, True], ids=["x", "x+add"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_finalize(dtype, shape, with_add):
    for values in VALUES:
        x = make(shape, torch.float32, values, seed=3)
        if values == "huge":
            x = x * 3e-34  # ~1e5: overflows float16 on conversion (counted in float32: finite, as the twin does)
        add = make(shape, torch.float32, "randn", seed=4) if with_add else None
        y, n = N.finalize(x, dtype, add)
        y_ref, n_ref = R.finalize(x, dtype, add)
        same(y, y_ref, values)
        assert n == n_ref, values
        if values == "nonfinite" and x.numel() > 20:
            assert n > 0


def test_finalize_rounding_edges():
    # ties to even, subnormals, overflow thresholds of both half types
    edge = torch.tensor([65504.0, 65519.99, 65520.0, 6.1e-5, 6.0e-8, 2.9e-8, 3.0e-8, -0.0, 1.0 + 2**-11,
                         1.0 + 3 * 2**-11, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.3895e38, 3.4e38, 1e-40])
    x = torch.cat([edge, -edge, torch.randn(4000) * torch.logspace(-30, 30, 4000)])
    for dtype in (torch.float16, torch.bfloat16):
        y, n = N.finalize(x, dtype)
        y_ref, n_ref = R.finalize(x, dtype)
        same(y, y_ref)
        assert torch.equal(y.view(torch.int16), y_ref.view(torch.int16))
        assert n == n_ref == int((~torch.isfinite(y_ref)).sum())


def test_finalize_counts_overflow_of_the_output_dtype():
    x = torch.tensor([1.0, 7e4, -1e5, 65504.0, 3.0e38, float("nan")])
    assert N.finalize(x, torch.float16)[1] == R.finalize(x, torch.float16)[1] == 4
    assert N.finalize(x, torch.bfloat16)[1] == R.finalize(x, torch.bfloat16)[1] == 1
    assert N.finalize(x, torch.float32)[1] == 1


def test_finalize_fp32_without_add_returns_x_like_the_twin():
    x = torch.randn(10)
    y, n = N.finalize(x, torch.float32)
    assert y is x and n == 0


@pytest.mark.parametrize("how", ["transposed", "strided"])
def test_finalize_noncontiguous(how):
    x = noncontig(make((37, 129), torch.float32, "nonfinite", seed=5), how)
    add = noncontig(make((37, 129), torch.float32, seed=6), how)
    y, n = N.finalize(x, torch.bfloat16, add)
    y_ref, n_ref = R.finalize(x, torch.bfloat16, add)
    same(y, y_ref)
    assert n == n_ref


# --- TIES --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_ties(dtype, shape, density, values):
    base = make(shape, dtype, "randn" if values != "zeros" else "zeros", seed=100)
    for T in TS:
        xs = [make(shape, dtype, values, seed=t) for t in range(T)]
        same(N.ties_merge(xs, base, density, 0.7), R.ties_merge(xs, base, density, 0.7), f"T={T}")


@pytest.mark.parametrize("density", [1e-4, 0.05, 0.5, 0.999])
def test_ties_thresholds_with_ties_and_signs(density):
    # many equal magnitudes (ties at the threshold keep all of them), mixed signs, a float32 base with bf16 inputs
    g = torch.Generator().manual_seed(7)
    base = torch.randn(211, 97, generator=g)
    xs = [(base + torch.randint(-3, 4, (211, 97), generator=g).float() * 0.25).to(torch.bfloat16) for _ in range(5)]
    same(N.ties_merge(xs, base, density, 1.3), R.ties_merge(xs, base, density, 1.3))


def _tied_task_vectors(shape, T, seed, zero_frac=0.0):
    """bf16 task vectors over a zero base with only a few distinct magnitudes: thousands of exact ties."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(T):
        mag = torch.randint(1, 4, shape, generator=g).float() * 0.0625
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        x = mag * sign
        x[torch.rand(shape, generator=g) < zero_frac] = 0.0
        xs.append(x.to(torch.bfloat16))
    return xs


MID = (64, 520)  # > 32768 elements: the multi-threaded path with several blocks
WIDE = (1030, 1031)  # >= 2^20 elements: the CPU TIES kernel's two 16-bit radix digits, in several chunks


@pytest.mark.parametrize("impl, density, shape",
                         [(i, d, s) for i in ("native", "reference") for d in (1e-3, 0.1, 0.37, 0.9)
                          for s in [(1, 7), (37, 129), MID]] + [("native", d, WIDE) for d in (1e-3, 0.37)])
def test_ties_keeps_exactly_k_lowest_index_first(impl, density, shape):
    # one task, lam = 1, a zero base and no zero entries: the output is nonzero exactly where TIES kept an entry
    (x,) = _tied_task_vectors(shape, 1, seed=3)
    base = torch.zeros(shape, dtype=torch.bfloat16)
    f = N.ties_merge if impl == "native" else R.ties_merge
    out = f([x], base, density, 1.0)
    kept = (out != 0).reshape(-1)
    k = R.kept_count(x.numel(), density)
    assert int(kept.sum()) == k
    mag = x.float().abs().reshape(-1)
    thr = mag[kept].min()
    assert bool((mag[~kept] <= thr).all())  # the largest magnitudes are kept ...
    eq = (mag == thr).nonzero().reshape(-1)
    kept_eq = kept[eq]
    # ... and among those equal to the smallest kept one, a prefix of the flat order
    assert bool(kept_eq[: int(kept_eq.sum())].all()) and not bool(kept_eq[int(kept_eq.sum()):].any())


@pytest.mark.parametrize("density", [1e-3, 0.2, 0.8])
@pytest.mark.parametrize("shape", [(37, 129), MID], ids=str)
def test_ties_many_ties_bit_exact(density, shape):
    xs = _tied_task_vectors(shape, 5, seed=11, zero_frac=0.1)
    base = torch.zeros(shape, dtype=torch.bfloat16)
    same(N.ties_merge(xs, base, density, 0.9), R.ties_merge(xs, base, density, 0.9))
    base32 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    xs = [(base32 + x.float()).to(torch.bfloat16) for x in xs]
    same(N.ties_merge(xs, base32, density, 0.9), R.ties_merge(xs, base32, density, 0.9))


@pytest.mark.parametrize("how", ["transposed", "strided"])
def test_ties_noncontiguous(how):
    base = noncontig(make((37, 129), torch.bfloat16, seed=9), how)
    xs = [noncontig(make((37, 129), torch.bfloat16, seed=t), how) for t in range(3)]
    same(N.ties_merge(xs, base, 0.3, 1.0), R.ties_merge(xs, base, 0.3, 1.0))


# per-model weights (negative and zero too) and densities, normalize on and off: mergekit's order of operations
TIES_WEIGHTED = [
    ("equal", None, 0.3, True),
    ("weights", [0.7, 0.3], 0.3, True),
    ("unnormalized", [0.7, 0.5], 0.3, False),
    ("per-task density", [1.0, 2.0], [0.1, 0.9], True),
    ("negative and zero weights", [-0.5, 0.0], [0.5, 0.2], True),
    ("density 0 and 1", [0.4, 0.6], [0.0, 1.0], False),
]


def _ties_case(name, T):
    _, w, d, norm = next(c for c in TIES_WEIGHTED if c[0] == name)
    ws = None if w is None else [w[t % len(w)] * (1 + t // len(w)) for t in range(T)]
    ds = d if isinstance(d, float) else [d[t % len(d)] for t in range(T)]
    return ws, ds, norm


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("case", [c[0] for c in TIES_WEIGHTED])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_ties_weighted(dtype, shape, case, values):
    base = make(shape, dtype, "randn" if values != "zeros" else "zeros", seed=100)
    for T in TS:
        ws, ds, norm = _ties_case(case, T)
        xs = [make(shape, dtype, values, seed=t) for t in range(T)]
        same(N.ties_merge(xs, base, ds, 0.7, ws, norm), R.ties_merge(xs, base, ds, 0.7, ws, norm), f"T={T}")


@pytest.mark.parametrize("case", [c[0] for c in TIES_WEIGHTED])
@pytest.mark.parametrize("shape", [(37, 129), MID], ids=str)
def test_ties_weighted_many_ties_and_zero_votes(case, shape):
    # few distinct magnitudes and weights that cancel exactly (0.5 * 2x - 1.0 * x): zero votes elect +1
    xs = _tied_task_vectors(shape, 4, seed=5, zero_frac=0.1)
    xs[1] = (xs[0].float() * 0.5).to(torch.bfloat16)
    base = torch.zeros(shape, dtype=torch.bfloat16)
    ws, ds, norm = _ties_case(case, 4)
    same(N.ties_merge(xs, base, ds, 1.1, ws, norm), R.ties_merge(xs, base, ds, 1.1, ws, norm))
    same(N.ties_merge(xs, base, 0.5, 1.0, [-1.0, 2.0, 0.0, 0.0]), R.ties_merge(xs, base, 0.5, 1.0, [-1.0, 2.0, 0.0, 0.0]))


@pytest.mark.parametrize("case", ["weights", "per-task density"])
def test_ties_wide_digits_many_ties(case):
    xs = _tied_task_vectors(WIDE, 3, seed=5, zero_frac=0.1)
    base = torch.zeros(WIDE, dtype=torch.bfloat16)
    ws, ds, norm = _ties_case(case, 3)
    same(N.ties_merge(xs, base, ds, 1.1, ws, norm), R.ties_merge(xs, base, ds, 1.1, ws, norm))


# The radix select stops after a digit when the k-th largest |tau| lies below the chosen bin's "impure" entries (a
# non-zero bit under the digit): the threshold is then the bin's smallest value. Magnitudes built so that the
# threshold's bin holds pure values (exactly 2^-10) under a few impure ones (2^-10 (1 + j 2^-20)), both below
# and above the cut, with thousands of ties, signs mixed and positions shuffled: the bits are the twin's whether
# the k-th largest falls among the pure entries (the select stops) or among the impure ones (the next digit).
def _pure_bin_task_vectors(n, T, seed):
    g = torch.Generator().manual_seed(seed)
    xs = []
    for t in range(T):
        mag = torch.full((n,), 2.0 ** -14)                      # small: below the threshold's bin
        a, i, p = n // 20, n // 50, n // 5                      # 5% above, 2% impure, 20% pure
        mag[:a] = 2.0 ** -8 * (1 + torch.rand(a, generator=g))
        mag[a:a + i] = 2.0 ** -10 * (1 + torch.randint(1, 400, (i,), generator=g).float() * 2.0 ** -20)
        mag[a + i:a + i + p] = 2.0 ** -10
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        xs.append((mag * sign)[torch.randperm(n, generator=g)])
    return xs


@pytest.mark.parametrize("n", [40_000, WIDE[0] * WIDE[1]], ids=["three-digit", "wide"])
@pytest.mark.parametrize("density", [0.15, 0.06, 0.0701, [0.15, 0.06, 0.27]],
                         ids=["among pure", "among impure", "last impure", "per task"])
def test_ties_radix_stops_at_a_pure_bin(n, density):
    xs = _pure_bin_task_vectors(n, 3, seed=21)
    base = torch.zeros(n)
    for d in (torch.float32, torch.bfloat16):
        ys = [x.to(d) for x in xs]
        same(N.ties_merge(ys, base.to(d), density, 0.8), R.ties_merge(ys, base.to(d), density, 0.8), str(d))


# >= 2^20 elements: the CPU kernel's sampled select (a band around each task's k-th magnitude from 2^16 sampled
# positions, one counting sweep) settles the threshold, or hands the task to the radix select when the band misses
# or overflows; either way the bits are the twin's.
def _wide_task_vectors(kind, T, seed):
    g = torch.Generator().manual_seed(seed)
    n = WIDE[0] * WIDE[1]
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    xs = []
    for t in range(T):
        tau = torch.randn(n, generator=g) * 0.01
        if kind == "clustered":  # one chunk full of magnitudes at the quantile: its band buffer overflows
            tau[: n // 6] = 0.0128 * (1 + torch.rand(n // 6, generator=g) * 1e-3)
        elif kind == "sorted":  # magnitudes follow position: sampled strata see a skewed share
            tau = torch.sort(tau.abs())[0] * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        elif kind == "nonfinite":
            tau[t::997] = float("nan")
            tau[5 + t::1231] = float("inf") * (-1) ** t
        x = base.float() + tau
        xs.append(x.to(torch.bfloat16).reshape(WIDE))
    return xs, base.reshape(WIDE)


@pytest.mark.parametrize("kind", ["randn", "clustered", "sorted", "nonfinite"])
@pytest.mark.parametrize("density", [1e-6, 0.2, [0.05, 0.5, 0.999]])
def test_ties_wide_sampled_select_bit_exact(kind, density):
    xs, base = _wide_task_vectors(kind, 3, seed=11)
    same(N.ties_merge(xs, base, density, 0.9), R.ties_merge(xs, base, density, 0.9), kind)
    if kind == "randn":  # float32 and float16 inputs, weights, unnormalized
        same(N.ties_merge([x.float() for x in xs], base.float(), density, 0.9, [0.5, -1.0, 2.0], False),
             R.ties_merge([x.float() for x in xs], base.float(), density, 0.9, [0.5, -1.0, 2.0], False))
        same(N.ties_merge([x.half() for x in xs], base, density, 0.9), R.ties_merge([x.half() for x in xs], base, density, 0.9))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(0,), (1, 7), (37, 129), WIDE], ids=str)
def test_ties_merge_to_writes_the_dtype_and_counts(out_dtype, shape):
    """ties_merge_to = finalize(ties_merge): the same bits, and kernel and twin give the same count (the output's
    plus the task vectors' non-finite entries; NaN inputs, and values beyond float16's range that overflow only on
    conversion)."""
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    xs = [(base.float() + torch.randn(shape, generator=g) * 0.01).to(torch.bfloat16) for _ in range(3)]
    if base.numel():
        xs[0].view(-1)[::101] = float("nan")
        xs[1].view(-1)[3::211] = 9e4  # kept (largest magnitude), beyond float16
    for w, norm in ((None, True), ([0.5, -1.0, 2.0], False)):
        got, bad = N.ties_merge_to(xs, base, [0.2, 0.5, 0.9], 1.3, w, norm, out_dtype)
        want, want_bad = R.ties_merge_to(xs, base, [0.2, 0.5, 0.9], 1.3, w, norm, out_dtype)
        same(got, want)
        assert bad == want_bad


def _nonfinite_tau(xs, base):
    """The non-finite task-vector entries float32(x_t) - float32(base), all tasks (what the TIES count adds)."""
    return sum(int((~torch.isfinite(x.float() - base.float())).sum()) for x in xs)


def _ties_nonfinite_case(where, dtype, shape, T=3, seed=0):
    """Inputs, base, density and the expected count for a NaN/Inf placed `where` (see the test below)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    xs = [(base.float() + torch.randn(shape, generator=g) * 0.01).to(dtype) for _ in range(T)]
    n = base.numel()
    density = [0.3] * T
    if n == 0 or where == "clean":
        return xs, base, density
    a, b = 0, n - 1
    if where == "nan":  # NaN is ranked but never kept: dropped wherever it is
        xs[1].view(-1)[a] = float("nan")
    elif where == "inf kept":  # the largest magnitude: kept
        xs[0].view(-1)[b] = float("inf")
    elif where == "-inf dropped":  # two equal magnitudes, one kept: the lowest flat index keeps, the other drops
        xs[T - 1].view(-1)[a] = float("-inf")
        xs[T - 1].view(-1)[b] = float("-inf")
        density[T - 1] = 1.5 / n  # k = 1
    elif where == "inf dropped":
        for p in (a, b):
            xs[0].view(-1)[p] = float("inf")
        density[0] = 1.5 / n
    elif where == "base nan":  # every tau_t is NaN there
        base.view(-1)[b] = float("nan")
    elif where == "base inf":
        base.view(-1)[a] = float("-inf")
    elif where == "tau overflow":  # finite inputs whose difference overflows float32 (bf16/fp32 only)
        big = torch.finfo(dtype).max
        base.view(-1)[a] = -big
        xs[1].view(-1)[a] = big
    return xs, base, density


NONFINITE_WHERE = ["clean", "nan", "inf kept", "-inf dropped", "inf dropped", "base nan", "base inf", "tau overflow"]


@pytest.mark.parametrize("where", NONFINITE_WHERE)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(0,), (1, 7), (37, 129), MID], ids=str)
def test_ties_merge_to_counts_nonfinite_task_vector_entries(shape, dtype, out_dtype, where):
    """The count is the result's non-finite values plus the non-finite tau_t of every task, kept or dropped: the
    same on the kernel and the twin, and non-zero whenever an input or the base holds NaN/Inf, also where TIES drops
    the entry and the result is finite (what lets the engine skip its up-front scan of TIES's inputs)."""
    if where == "tau overflow" and dtype == torch.float16:
        pytest.skip("float16 inputs cannot overflow a float32 difference")
    xs, base, density = _ties_nonfinite_case(where, dtype, shape)
    want_tau = _nonfinite_tau(xs, base)
    for w, norm in ((None, True), ([0.5, -1.0, 2.0], False)):
        got, bad = N.ties_merge_to(xs, base, density, 1.3, w, norm, out_dtype)
        want, want_bad = R.ties_merge_to(xs, base, density, 1.3, w, norm, out_dtype)
        same(got, want, where)
        out_bad = int((~torch.isfinite(got.float())).sum())
        assert bad == want_bad == out_bad + want_tau, (where, bad, want_bad, out_bad, want_tau)
    if base.numel() == 0 or where == "clean":
        assert want_tau == 0 and bad == 0
        return
    expect_tau = {"nan": 1, "inf kept": 1, "-inf dropped": 2, "inf dropped": 2, "base nan": 3, "base inf": 3,
                  "tau overflow": 1}[where]
    assert want_tau == expect_tau, where
    if where in ("nan",):  # dropped, so the result is clean and only the task vector's entry counts
        assert out_bad == 0 and bad == 1
    if where in ("-inf dropped", "inf dropped"):  # one kept (non-finite result there), one dropped
        assert out_bad == 1 and bad == 3


@pytest.mark.parametrize("how", ["transposed", "strided"])
def test_ties_merge_to_counts_noncontiguous_and_mixed_dtypes(how):
    base = noncontig(make((37, 129), torch.bfloat16, seed=9), how)
    xs = [noncontig(make((37, 129), dt, "nonfinite" if t == 1 else "randn", seed=t), how)
          for t, dt in enumerate(DTYPES)]
    got, bad = N.ties_merge_to(xs, base, [0.2, 0.5, 0.3], 0.8, [0.5, -1.0, 2.0], False, torch.bfloat16)
    want, want_bad = R.ties_merge_to(xs, base, [0.2, 0.5, 0.3], 0.8, [0.5, -1.0, 2.0], False, torch.bfloat16)
    same(got, want)
    assert bad == want_bad == int((~torch.isfinite(got.float())).sum()) + _nonfinite_tau(xs, base)
    assert _nonfinite_tau(xs, base) > 0


def test_ties_merge_to_counts_on_the_wide_path():
    """>= 2^20 elements (sampled select, several chunks and threads): NaN (never kept) and Inf in every task."""
    xs, base = _wide_task_vectors("nonfinite", 3, seed=2)
    got, bad = N.ties_merge_to(xs, base, 0.2, 0.9, out_dtype=torch.bfloat16)
    want, want_bad = R.ties_merge_to(xs, base, 0.2, 0.9, out_dtype=torch.bfloat16)
    same(got, want)
    assert bad == want_bad == int((~torch.isfinite(got.float())).sum()) + _nonfinite_tau(xs, base)


def test_ties_zero_vote_elects_plus_and_zero_entries_never_count():
    base = torch.zeros(4)
    xs = [torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([-1.0, 0.0, -2.0, 0.0])]
    for f in (N.ties_merge, R.ties_merge):
        # votes [0, 0, 0, 0] -> +1 everywhere: the positive entries of model 1; zeros never agree
        assert f(xs, base, 1.0, 1.0).tolist() == [1.0, 0.0, 2.0, 0.0]
        # weights 1 and 3: votes [-2, 0, -4, 0] -> -1 where nonzero; normalize divides by model 2's weight
        assert f(xs, base, 1.0, 1.0, [1.0, 3.0]).tolist() == [-1.0, 0.0, -2.0, 0.0]
        assert f(xs, base, 1.0, 1.0, [1.0, 3.0], False).tolist() == [-3.0, 0.0, -6.0, 0.0]


def test_ties_per_task_kept_counts_follow_mergekit():
    # k_t = max(1, int(density_t * n)): n = 7 -> density 0.3 keeps 2 (not 3), 0.01 keeps 1, 1.0 keeps 7
    x = torch.arange(1.0, 8.0)
    base = torch.zeros(7)
    for f in (N.ties_merge, R.ties_merge):
        for d, k in [(0.3, 2), (0.01, 1), (1.0, 7), (0.0, 0)]:
            assert int((f([x], base, [d], 1.0) != 0).sum()) == k, (f, d)


@pytest.mark.parametrize("how", ["transposed", "strided"])
def test_ties_weighted_noncontiguous(how):
    base = noncontig(make((37, 129), torch.bfloat16, seed=9), how)
    xs = [noncontig(make((37, 129), dt, seed=t), how) for t, dt in enumerate(DTYPES)]
    same(N.ties_merge(xs, base, [0.2, 0.5, 0.3], 0.8, [0.5, -1.0, 2.0], False),
         R.ties_merge(xs, base, [0.2, 0.5, 0.3], 0.8, [0.5, -1.0, 2.0], False))


# --- fused linear kernels ----------------------------------------------------------------------------------
OUT_DTYPES = [None, torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("out_dtype", OUT_DTYPES[:3], ids=["none", "bf16", "fp16"])
@pytest.mark.parametrize("values", ["randn", "huge", "nonfinite"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_linear_merge(dtype, shape, values, out_dtype):
    for T in TS:
        xs = [make(shape, dtype, values, seed=t) for t in range(T)]
        w = [0.5 / (t + 1) for t in range(T)]
        y, n = N.linear_merge(xs, w, out_dtype)
        y_ref, n_ref = R.linear_merge(xs, w, out_dtype)
        same(y, y_ref, f"T={T}")
        assert n == n_ref, (T, n, n_ref)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES[:3], ids=["none", "bf16", "fp16"])
@pytest.mark.parametrize("values", ["randn", "huge", "nonfinite"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_task_arithmetic_merge(dtype, shape, values, out_dtype):
    base = make(shape, dtype, "randn", seed=50)
    for T in TS:
        xs = [make(shape, dtype, values, seed=t) for t in range(T)]
        w = [1.0 + 0.25 * t for t in range(T)]
        y, n = N.task_arithmetic_merge(xs, base, w, 0.3, out_dtype)
        y_ref, n_ref = R.task_arithmetic_merge(xs, base, w, 0.3, out_dtype)
        same(y, y_ref, f"T={T}")
        assert n == n_ref, (T, n, n_ref)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES[:3], ids=["none", "bf16", "fp16"])
@pytest.mark.parametrize("values", ["randn", "huge", "nonfinite"])
@pytest.mark.parametrize("shape", SHAPES + [BIG], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_linear_merge_divisor_is_mergekits_normalize(dtype, shape, values, out_dtype):
    # raw weights, then a division by their float32 sum: bit for bit mergekit's linear (its addcmul_ loop in
    # float32, then div_), the twin and the kernel alike
    for w in ([0.6, 0.6], [0.7, 0.3, 0.2], [0.3, 1.1, 0.45, 0.9]):
        xs = [make(shape, dtype, values, seed=t) for t in range(len(w))]
        d = float(torch.tensor(w, dtype=torch.float32).sum())
        y, n = N.linear_merge(xs, w, out_dtype, divisor=d)
        y_ref, n_ref = R.linear_merge(xs, w, out_dtype, divisor=d)
        same(y, y_ref, f"w={w}")
        assert n == n_ref, (w, n, n_ref)
        wt = torch.tensor(w, dtype=torch.float32)
        mk = torch.zeros(xs[0].shape, dtype=torch.float32)
        for x, c in zip(xs, wt):
            mk.addcmul_(x.float(), c.reshape(()))
        mk.div_(wt.sum())
        same(y, mk.to(out_dtype or torch.float32), f"w={w}")


def test_linear_merge_divisor_checked():
    xs = [make((4,), torch.float32, "randn", seed=0)]
    with pytest.raises(ValueError, match="divisor"):
        N.linear_merge(xs, [1.0], None, divisor=0.0)
    with pytest.raises(ValueError, match="divisor"):
        N.linear_merge(xs, [1.0], None, divisor=float("inf"))


@pytest.mark.parametrize("values", ["randn", "nonfinite"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_linear_kernels_big(dtype, values, shape=BIG):
    base = make(shape, dtype, "randn", seed=50)
    xs = [make(shape, dtype, values, seed=t) for t in range(3)]
    for f_n, f_r, args in [(N.linear_merge, R.linear_merge, (xs, [0.2, 0.3, 0.5], torch.bfloat16)),
                           (N.task_arithmetic_merge, R.task_arithmetic_merge, (xs, base, [1.0, 0.5, 2.0], 0.4, None))]:
        (y, n), (y_ref, n_ref) = f_n(*args), f_r(*args)
        same(y, y_ref)
        assert n == n_ref


@pytest.mark.parametrize("out_dtype", OUT_DTYPES[:3], ids=["none", "bf16", "fp16"])
@pytest.mark.parametrize("values", ["randn", "huge", "nonfinite"])
@pytest.mark.parametrize("shape", SHAPES + [BIG], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_linear_merge_scale_is_the_mean(dtype, shape, values, out_dtype):
    # unit weights and scale 1/T: the sum, then the scale, exactly as mean_fp32 rounds (weight_average's mean)
    for T in (1, 3, 8, 17):
        xs = [make(shape, dtype, values, seed=t) for t in range(T)]
        y, n = N.linear_merge(xs, [1.0] * T, out_dtype, scale=1.0 / T)
        y_ref, n_ref = R.linear_merge(xs, [1.0] * T, out_dtype, scale=1.0 / T)
        same(y, y_ref, f"T={T}")
        assert n == n_ref, (T, n, n_ref)
        mean, _ = R.finalize(R.mean_fp32(xs), out_dtype or torch.float32)
        same(y, mean, f"T={T}")
        same(y, R.finalize(N.mean_fp32(xs), out_dtype or torch.float32)[0], f"T={T}")


def test_task_arithmetic_twin_equals_the_method_formula():
    # with unit weights the fused op computes what methods/task_arithmetic.py computes today, bit for bit
    base = make((37, 129), torch.bfloat16, seed=1)
    xs = [make((37, 129), torch.bfloat16, seed=t) for t in range(4)]
    base32 = base.float()
    acc = torch.zeros_like(base32)
    for x in xs:
        acc.add_(x.float() - base32)
    expect = acc.mul_(0.3).add_(base32)
    same(R.task_arithmetic_merge(xs, base, [1.0] * 4, 0.3)[0], expect)
    same(N.task_arithmetic_merge(xs, base, [1.0] * 4, 0.3)[0], expect)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES[1:], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("base_dtype", [None] + DTYPES, ids=["nobase"] + DT_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_linear_register_path(dtype, base_dtype, out_dtype):
    # The kernels' register path (all inputs bfloat16 or all float32, T <= 8; a bfloat16 base converted in
    # registers, a float16 one per block) for every T it is compiled for, every base dtype under each input
    # dtype, and each output; 1013 elements a row: whole vectors and a tail. T = 9 takes the sub-block loop.
    shape = (3, 1013)
    base = None if base_dtype is None else make(shape, base_dtype, "randn", seed=50)
    for T in range(1, 10):
        for values in ("randn", "huge", "nonfinite"):
            xs = [make(shape, dtype, values, seed=t) for t in range(T)]
            w = [0.75 - 0.125 * t for t in range(T)]
            if base is None:
                d = float(torch.tensor(w, dtype=torch.float32).sum())
                got, want = N.linear_merge(xs, w, out_dtype, scale=0.7, divisor=d), \
                    R.linear_merge(xs, w, out_dtype, scale=0.7, divisor=d)
            else:
                got, want = N.task_arithmetic_merge(xs, base, w, 0.3, out_dtype), \
                    R.task_arithmetic_merge(xs, base, w, 0.3, out_dtype)
            same(got[0], want[0], f"T={T} {values}")
            assert got[1] == want[1], (T, values, got[1], want[1])


@pytest.mark.parametrize("how", ["transposed", "strided"])
def test_linear_noncontiguous_and_mixed(how):
    base = noncontig(make((37, 129), torch.float32, seed=9), how)
    xs = [noncontig(make((37, 129), dt, seed=t), how) for t, dt in enumerate(DTYPES)]
    same(N.linear_merge(xs, [0.2, 0.3, 0.5], torch.bfloat16)[0], R.linear_merge(xs, [0.2, 0.3, 0.5], torch.bfloat16)[0])
    same(N.task_arithmetic_merge(xs, base, [1, 2, 3], 0.5)[0], R.task_arithmetic_merge(xs, base, [1, 2, 3], 0.5)[0])


# --- DARE --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_dare(dtype, shape, p):
    for values in VALUES:
        tau = make(shape, dtype, values, seed=11)
        same(N.dare(tau, p, 12345), R.dare(tau, p, 12345), values)


@pytest.mark.parametrize("seed", [0, 1, 2**62 + 12345, 2**64 - 1, -5, 2**70 + 3])
def test_dare_mask_is_a_function_of_seed_and_index(seed):
    tau = torch.ones(70001)
    got = N.dare(tau, 0.37, seed)
    same(got, R.dare(tau, 0.37, seed))
    kept = (got != 0).float().mean().item()
    assert abs(kept - 0.63) < 0.01
    # the mask of a prefix is the prefix of the mask: it depends on the flat index only, not on the split
    same(N.dare(tau[:1000], 0.37, seed), got[:1000])


def test_dare_noncontiguous():
    tau = noncontig(make((37, 129), torch.float16, seed=12), "transposed")
    same(N.dare(tau, 0.3, 99), R.dare(tau, 0.3, 99))


# --- the multi-threaded path (> 32768 elements, two threads), every kernel, every dtype and value kind -------
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_big_all_kernels(dtype, values, shape=BIG):
    xs = [make(shape, dtype, values, seed=t) for t in range(8)]
    m = N.mean_fp32(xs)
    same(m, R.mean_fp32(xs), "mean")
    w = [0.5 / (t + 1) - 0.1 for t in range(8)]
    same(N.mean_fp32(xs, w), R.mean_fp32(xs, w), "weighted mean")
    out = torch.empty(shape)
    same(N.center_into(xs[1], m, out), R.center_into(xs[1], m, torch.empty(shape)), "center")
    y, n = N.finalize(m, dtype, out)
    y_ref, n_ref = R.finalize(m, dtype, out)
    same(y, y_ref, "finalize")
    assert n == n_ref
    base = make(shape, dtype, "randn", seed=100)
    for density in (0.0, 0.2, 1.0):
        same(N.ties_merge(xs[:5], base, density, 0.7), R.ties_merge(xs[:5], base, density, 0.7), f"ties {density}")
    same(N.dare(xs[2], 0.3, 77), R.dare(xs[2], 0.3, 77), "dare")


def test_mean_large_output_uses_streaming_stores_and_stays_exact():
    # >= 64 MiB of float32 output takes the non-temporal store path (with an odd tail)
    torch.set_num_threads(2)
    xs = [make((4096 * 4096 + 37,), torch.bfloat16, seed=t) for t in range(2)]
    same(N.mean_fp32(xs), R.mean_fp32(xs))


# --- CUDA: the same kernels on a GPU (skipped without one) --------------------------------------------------
CUDA_SHAPES = [(0,), (1,), (37, 129), (2049, 1031)]


@cuda
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cuda_mean_center_finalize(dtype, shape, values):
    for T in TS:
        ctx = f"T={T}"
        xs = [make(shape, dtype, values, seed=t, device="cuda") for t in range(T)]
        m = N.mean_fp32(xs)
        same(m, R.mean_fp32(xs), ctx)
        same(m, N.mean_fp32([x.cpu() for x in xs]), ctx)
        w = [0.5 / (t + 1) - 0.1 for t in range(T)]
        same(N.mean_fp32(xs, w), N.mean_fp32([x.cpu() for x in xs], w), ctx + " weighted")
        out = torch.empty(shape, device="cuda")
        N.center_into(xs[0], m, out)
        same(out, R.center_into(xs[0], m, torch.empty(shape, device="cuda")), ctx)
        y, n = N.finalize(m, dtype, out)
        y_ref, n_ref = R.finalize(m.cpu(), dtype, out.cpu())
        same(y, y_ref, ctx)
        assert n == n_ref, ctx


@cuda
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cuda_ties(dtype, shape, density, values):
    base = make(shape, dtype, "randn", seed=100, device="cuda")
    for T in TS:
        xs = [make(shape, dtype, values, seed=t, device="cuda") for t in range(T)]
        got = N.ties_merge(xs, base, density, 0.7)
        same(got, R.ties_merge([x.cpu() for x in xs], base.cpu(), density, 0.7), f"T={T}")


@cuda
@pytest.mark.parametrize("where", NONFINITE_WHERE)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_cuda_ties_merge_to_counts_nonfinite_task_vector_entries(shape, dtype, out_dtype, where):
    """The CUDA kernel's task-vector count (one atomicAdd per block) plus finalize's: the twin's count."""
    if where == "tau overflow" and dtype == torch.float16:
        pytest.skip("float16 inputs cannot overflow a float32 difference")
    xs, base, density = _ties_nonfinite_case(where, dtype, shape)
    for w, norm in ((None, True), ([0.5, -1.0, 2.0], False)):
        got, bad = N.ties_merge_to([x.cuda() for x in xs], base.cuda(), density, 1.3, w, norm, out_dtype)
        want, want_bad = R.ties_merge_to(xs, base, density, 1.3, w, norm, out_dtype)
        same(got, want, where)
        assert bad == want_bad == int((~torch.isfinite(want.float())).sum()) + _nonfinite_tau(xs, base), where
        o = torch.full(shape, 7.0, dtype=out_dtype, device="cuda")
        got2, bad2 = N.ties_merge_to([x.cuda() for x in xs], base.cuda(), density, 1.3, w, norm, out_dtype, out=o)
        assert got2 is o and bad2 == want_bad
        same(got2, want, where)


@cuda
@pytest.mark.parametrize("case", [c[0] for c in TIES_WEIGHTED])
@pytest.mark.parametrize("shape", [(37, 129), MID, (1000, 1001)], ids=str)
def test_cuda_ties_weighted(case, shape):
    xs = _tied_task_vectors(shape, 4, seed=5, zero_frac=0.1)
    xs[1] = (xs[0].float() * 0.5).to(torch.bfloat16)
    base = torch.zeros(shape, dtype=torch.bfloat16)
    ws, ds, norm = _ties_case(case, 4)
    got = N.ties_merge([x.cuda() for x in xs], base.cuda(), ds, 1.1, ws, norm)
    same(got, R.ties_merge(xs, base, ds, 1.1, ws, norm))
    same(got, N.ties_merge(xs, base, ds, 1.1, ws, norm))


@cuda
@pytest.mark.parametrize("density", [1e-3, 0.2, 0.8])
@pytest.mark.parametrize("shape", [(37, 129), MID, (1000, 1001)], ids=str)
def test_cuda_ties_exactly_k_with_many_ties(density, shape):
    # bf16 task vectors with thousands of equal magnitudes: the CUDA tie ranks (tile counts, scan, ballots)
    # must pick the same lowest-index entries as the CPU kernel and the twin
    xs = _tied_task_vectors(shape, 5, seed=11, zero_frac=0.1)
    base = torch.zeros(shape, dtype=torch.bfloat16)
    got = N.ties_merge([x.cuda() for x in xs], base.cuda(), density, 0.9)
    same(got, R.ties_merge(xs, base, density, 0.9))
    same(got, N.ties_merge(xs, base, density, 0.9))
    (x,) = _tied_task_vectors(shape, 1, seed=3)
    out = N.ties_merge([x.cuda()], base.cuda(), density, 1.0)
    assert int((out != 0).sum()) == R.kept_count(x.numel(), density)


@cuda
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["none", "bf16", "fp16", "fp32"])
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cuda_linear_kernels(dtype, shape, values, out_dtype):
    base = make(shape, dtype, "randn", seed=50, device="cuda")
    xs = [make(shape, dtype, values, seed=t, device="cuda") for t in range(3)]
    for f_n, f_r, args in [(N.linear_merge, R.linear_merge, ([0.2, 0.3, 0.5], out_dtype)),
                           (N.linear_merge, R.linear_merge, ([1.0, 1.0, 1.0], out_dtype, 1.0 / 3)),
                           (N.linear_merge, R.linear_merge,
                            ([0.7, 0.3, 0.2], out_dtype, 1.0, float(torch.tensor([0.7, 0.3, 0.2]).sum()))),
                           (N.task_arithmetic_merge, R.task_arithmetic_merge, ([1.0, 0.5, 2.0], 0.4, out_dtype))]:
        a_dev = (xs,) + ((base,) if f_n is N.task_arithmetic_merge else ()) + args
        a_cpu = ([x.cpu() for x in xs],) + ((base.cpu(),) if f_n is N.task_arithmetic_merge else ()) + args
        (y, n), (y_ref, n_ref) = f_n(*a_dev), f_r(*a_cpu)
        same(y, y_ref)
        assert n == n_ref


@cuda
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cuda_dare_same_mask_as_cpu(dtype, shape, p):
    tau = make(shape, dtype, "randn", seed=5, device="cuda")
    got = N.dare(tau, p, 2**61 + 7)
    same(got, N.dare(tau.cpu(), p, 2**61 + 7))
    same(got, R.dare(tau, p, 2**61 + 7))


@cuda
def test_cuda_runs_on_the_callers_stream():
    s = torch.cuda.Stream()
    xs = [make((1024, 1024), torch.bfloat16, seed=t, device="cuda") for t in range(4)]
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        m = N.mean_fp32(xs)
        y, n = N.finalize(m, torch.bfloat16, m)
    s.synchronize()
    same(m, R.mean_fp32([x.cpu() for x in xs]))
    assert n == 0


@cuda
def test_cuda_device_mismatch_is_an_argument_error():
    with pytest.raises(ValueError, match=r"argument 'w': expected a tensor on cuda:0"):
        from centered_merge import _native as nat
        from torch.utils.dlpack import to_dlpack
        nat.get().center_into(to_dlpack(torch.zeros(4)), to_dlpack(torch.zeros(4, device="cuda")),
                              to_dlpack(torch.zeros(4, device="cuda")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weights", [None, [0.5, 0.25, 0.25]])
def test_mean_into_reused_dirty_buffer_equals_fresh(dtype, weights):
    """mean_fp32(..., out=buf) overwrites whatever buf held and equals the fresh-output result bit for bit."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(37, 129, generator=g).to(dtype) for _ in range(3)]
    want = R.mean_fp32(xs, weights)
    for impl in (N.mean_fp32, R.mean_fp32):
        buf = torch.full((37, 129), float("nan"))
        got = impl(xs, weights, out=buf)
        assert got is buf
        assert torch.equal(got, want)


def test_mean_out_mismatch_is_named():
    xs = [torch.ones(4, 4)]
    with pytest.raises(ValueError, match="argument 'out'"):
        R.mean_fp32(xs, out=torch.empty(4, 5))
    with pytest.raises(ValueError, match="argument 'out'"):
        N.mean_fp32(xs, out=torch.empty(4, 4, dtype=torch.float16))
