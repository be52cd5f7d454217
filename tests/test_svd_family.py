"""TSV-M, Iso-C and Iso-CTS against plain full-SVD references written here from the papers' formulas."""
import math

import pytest
import torch

import centered_merge as cm
from centered_merge.errors import MergeConfigError
from centered_merge.methods import get_method
from centered_merge.methods.iso import iso_cts_sizes
from centered_merge.methods.svd_family import top_svd

from conftest import decaying_matrix

# --------------------------------------------------------------------------- references (float64, full SVDs)


def ref_polar(a):
    w, _, zh = torch.linalg.svd(a, full_matrices=False)
    return w @ zh


def ref_tsv(taus, alpha):
    """Gargiulo et al.: each task's top floor(r/T) triplets, concatenated, U and V orthogonalised (polar)."""
    T = len(taus)
    k = min(taus[0].shape) // T
    parts = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    u = torch.cat([p[0][:, :k] for p in parts], 1)
    s = torch.cat([p[1][:k] for p in parts])
    v = torch.cat([p[2][:k].T for p in parts], 1)
    return alpha * ref_polar(u) @ torch.diag(s) @ ref_polar(v).T


def ref_iso_c(taus, alpha):
    """Marczak et al.: SVD of the summed task matrix, every singular value replaced by their mean."""
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return alpha * s.mean() * u @ vh


def ref_iso_cts(taus, alpha, frac):
    """Marczak et al.: the sum's top k_c directions plus each task's top s of (I - U_c U_c^T) tau_t, orthogonalised,
    with an isotropic spectrum (the mean of the kept singular values). k_c and s as in FusionBench."""
    T, r = len(taus), min(taus[0].shape)
    k_c = int(r * frac)
    s_t = round((r - k_c) / T)
    k_c = r - T * s_t
    uc, sc, vhc = torch.linalg.svd(sum(taus), full_matrices=False)
    us, ss, vs = [uc[:, :k_c]], [sc[:k_c]], [vhc[:k_c].T]
    proj = torch.eye(taus[0].shape[0], dtype=taus[0].dtype) - us[0] @ us[0].T
    for t in taus:
        u, s, vh = torch.linalg.svd(proj @ t, full_matrices=False)
        us.append(u[:, :s_t])
        ss.append(s[:s_t])
        vs.append(vh[:s_t].T)
    sigma = torch.cat(ss).mean()
    return alpha * sigma * ref_polar(torch.cat(us, 1)) @ ref_polar(torch.cat(vs, 1)).T


REFS = {"tsv": lambda taus, p: ref_tsv(taus, p["alpha"]),
        "iso_c": lambda taus, p: ref_iso_c(taus, p["alpha"]),
        "iso_cts": lambda taus, p: ref_iso_cts(taus, p["alpha"], p["common_fraction"])}
EXACT = {"tsv": {"svd": "exact"}, "iso_c": {}, "iso_cts": {"svd": "exact"}}
KW = {"tsv": {"alpha": 0.7}, "iso_c": {"alpha": 1.3}, "iso_cts": {"alpha": 1.2, "common_fraction": 0.6}}


def models(shapes, T, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(T)]
    return base, fts


def rel(a, b):
    return (torch.linalg.norm((a.double() - b.double()).flatten()) / torch.linalg.norm(b.double().flatten())).item()


SHAPES = [(24, 40), (40, 24), (32, 32), (64, 20)]


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [2, 3, 4])
def test_exact_mode_equals_full_svd_reference(method, shape, T):
    base, fts = models({"layer.weight": shape}, T, seed=sum(shape) + T)
    params = {**EXACT[method], **KW[method]}
    out = cm.merge(fts, method=method, base=base, **params)["layer.weight"]
    taus = [ft["layer.weight"].double() - base["layer.weight"].double() for ft in fts]
    ref = base["layer.weight"].double() + REFS[method](taus, {**get_method(method).defaults, **params})
    # rtol 1e-5 as the issue asks; atol 1e-5 is the float32 floor for entries near zero (as in test_cart.py)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_non_matrices_get_base_plus_alpha_mean_task_vector(method):
    base, fts = models({"layer.weight": (16, 12), "layer.bias": (16,), "scale": ()}, 3)
    base["layer.bias"] = base["layer.bias"].to(torch.bfloat16)
    fts = [{**ft, "layer.bias": ft["layer.bias"].to(torch.bfloat16)} for ft in fts]
    out = cm.merge(fts, method=method, base=base, alpha=0.5)
    for key in ("layer.bias", "scale"):
        mean_tau = sum(ft[key].float() - base[key].float() for ft in fts) / 3
        want = (base[key].float() + 0.5 * mean_tau).to(base[key].dtype)
        assert out[key].dtype == base[key].dtype
        torch.testing.assert_close(out[key], want, rtol=1e-2 if key == "layer.bias" else 1e-6, atol=1e-6)


def test_integer_buffers_pass_through():
    base, fts = models({"layer.weight": (16, 12)}, 3)
    for sd in fts + [base]:
        sd["position_ids"] = torch.arange(10)
    for method in ("tsv", "iso_c", "iso_cts"):
        assert torch.equal(cm.merge(fts, method=method, base=base)["position_ids"], torch.arange(10))


def test_tsv_matrix_thinner_than_T_is_averaged():
    """k = floor(min(m, n) / T) = 0: TSV-M keeps nothing of such a matrix, so it is treated as a non-matrix."""
    base, fts = models({"thin.weight": (3, 20)}, 4)
    out = cm.merge(fts, method="tsv", base=base, alpha=1.0)["thin.weight"]
    want = base["thin.weight"] + sum(ft["thin.weight"] - base["thin.weight"] for ft in fts) / 4
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_tsv_single_model_is_returned(svd):
    base, fts = models({"layer.weight": (30, 20)}, 1)
    out = cm.merge(fts, method="tsv", base=base, svd=svd, alpha=1.0)["layer.weight"]
    torch.testing.assert_close(out, fts[0]["layer.weight"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_model_order_does_not_matter(method):
    base, fts = models({"layer.weight": (48, 32)}, 4)
    a = cm.merge(fts, method=method, base=base)["layer.weight"]  # defaults: tsv randomized, the others exact
    b = cm.merge(fts[::-1], method=method, base=base)["layer.weight"]
    assert rel(a - base["layer.weight"], b - base["layer.weight"]) <= 1e-5


def test_iso_c_full_spectrum_is_isotropic():
    base, fts = models({"layer.weight": (40, 24)}, 3)
    delta = cm.merge(fts, method="iso_c", base=base, alpha=1.0)["layer.weight"] - base["layer.weight"]
    s = torch.linalg.svdvals(delta.double())
    assert (s.max() - s.min()) / s.mean() < 1e-4


@pytest.mark.parametrize("r, T, frac, want", [(384, 8, 0.8, (304, 10)), (20, 3, 0.5, (11, 3)), (4, 8, 0.8, (4, 0)),
                                              (12, 8, 0.01, (4, 1)), (10, 2, 1.0, (10, 0))])
def test_iso_cts_subspace_sizes(r, T, frac, want):
    k_c, s = iso_cts_sizes(r, r + 5, T, frac)
    assert (k_c, s) == want
    assert k_c + T * s == r and k_c >= 0


# --------------------------------------------------------------------------- randomized mode


@pytest.mark.parametrize("shape", [(240, 96), (96, 240), (160, 160)])
@pytest.mark.parametrize("k", [4, 12, 30])
def test_randomized_top_svd_within_2_percent_of_optimal(shape, k):
    """The truncations TSV-M and Iso-CTS make: within CART's bound (rank-k error <= 1.02 x Eckart-Young)."""
    a = decaying_matrix(*shape, decay="power", seed=k)
    opt = torch.linalg.svdvals(a.double())[k:].pow(2).sum().sqrt().item()
    u, s, vh = top_svd(a, k, svd="randomized", name="w")
    got = torch.linalg.matrix_norm(a.double() - ((u * s) @ vh).double()).item()
    assert got <= 1.02 * opt + 1e-6


def decaying_models(T, m=160, n=120, seed=0):
    base = {"layer.weight": torch.randn(m, n, generator=torch.Generator().manual_seed(seed))}
    fts = [{"layer.weight": base["layer.weight"] + 0.05 * decaying_matrix(m, n, decay="exp", seed=seed + t + 1)}
           for t in range(T)]
    return base, fts


@pytest.mark.parametrize("method, power_iters, bound", [("tsv", 2, 2e-2), ("iso_cts", 4, 1e-2)])
def test_randomized_close_to_exact_on_decaying_task_vectors(method, power_iters, bound):
    """Iso-CTS's isotropic spectrum weighs weak directions fully: it needs more power iterations for the same
    closeness (and so defaults to the exact SVD)."""
    base, fts = decaying_models(4)
    ex = cm.merge(fts, method=method, base=base, svd="exact")["layer.weight"] - base["layer.weight"]
    rn = cm.merge(fts, method=method, base=base, svd="randomized", power_iters=power_iters)["layer.weight"]
    assert rel(rn - base["layer.weight"], ex) < bound


def test_randomized_is_default_and_seeded_by_name():
    assert get_method("tsv").svd == "randomized" and get_method("iso_cts").svd == "exact"
    base, fts = decaying_models(3)
    a = cm.merge(fts, method="tsv", base=base, seed=1)["layer.weight"]
    b = cm.merge(fts, method="tsv", base=base, seed=1)["layer.weight"]
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- parameters, plans, engine


@pytest.mark.parametrize("method, params, match", [
    ("tsv", {"alpha": "x"}, "alpha"), ("tsv", {"svd": "fast"}, "svd"), ("iso_cts", {"common_fraction": 0.0}, "common"),
    ("iso_cts", {"common_fraction": 1.5}, "common"), ("iso_c", {"svd": "exact"}, "does not take"),
    ("tsv", {"power_iters": -1}, "power_iters"), ("iso_c", {"select": "some"}, "select")])
def test_bad_parameters_raise(method, params, match):
    with pytest.raises(MergeConfigError, match=match):
        get_method(method, **params)


def test_methods_need_a_base():
    _, fts = models({"layer.weight": (8, 8)}, 2)
    with pytest.raises(MergeConfigError, match="base"):
        cm.merge(fts, method="tsv")


def test_plan_reports_matrices_and_ranks():
    assert get_method("tsv").plan_tensor("a.weight", (384, 1536), torch.float32, 8)["k"] == 48
    assert get_method("iso_cts").plan_tensor("a.weight", (384, 384), torch.float32, 8)["k"] == 304
    assert not get_method("iso_c").plan_tensor("a.bias", (384,), torch.float32, 8)["lowrank"]
    plan = get_method("tsv").plan_tensor("a.weight", (384, 1536), torch.float32, 8)
    assert plan["workspace_bytes"] <= 4 * 384 * 1536 * 8  # a few copies of the matrix, whatever T is
    assert plan["workspace_bytes"] == get_method("tsv").plan_tensor("a.weight", (384, 1536), torch.float32,
                                                                    2)["workspace_bytes"]


def test_default_preset_follows_the_papers_every_2d_tensor():
    base, fts = models({"embeddings.word_embeddings.weight": (30, 16)}, 2)
    out = cm.merge(fts, method="iso_c", base=base, alpha=1.0)["embeddings.word_embeddings.weight"]
    s = torch.linalg.svdvals((out - base["embeddings.word_embeddings.weight"]).double())
    assert (s.max() - s.min()) / s.mean() < 1e-4  # treated as a matrix (isotropic), not averaged
    out2 = cm.merge(fts, method="iso_c", base=base, alpha=1.0, select="default")["embeddings.word_embeddings.weight"]
    want = base["embeddings.word_embeddings.weight"] + sum(
        ft["embeddings.word_embeddings.weight"] - base["embeddings.word_embeddings.weight"] for ft in fts) / 2
    torch.testing.assert_close(out2, want)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_streaming_engine_equals_in_memory(tmp_path, method):
    from _engine_util import make_state_dicts, save_models
    from safetensors.torch import load_file

    base, fts = make_state_dicts(T=3, dtype=torch.float32)
    base_path, ft_paths = save_models(tmp_path, base, fts)
    out_dir = tmp_path / "out"
    cm.merge_checkpoints(ft_paths, str(out_dir), method=method, base=base_path, progress=False)
    got = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        got.update(load_file(str(f)))
    want = cm.merge(fts, method=method, base=base)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the Gram routes (svd_family)


def _no_svd(*a, **k):
    raise AssertionError("the Gram route should not call an SVD here")


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of 256 rows from 2 KiB on: the block loops of gram64/times64 run more than once."""
    from centered_merge.methods import svd_family
    monkeypatch.setattr(svd_family, "_BLOCK_BYTES", 2048)


GRAM_SHAPES = [(600, 24), (24, 600), (40, 40), (1, 9), (9, 1)]


@pytest.mark.parametrize("shape", GRAM_SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_gram_polar_and_top_svd_equal_float64_svd(shape, transposed, small_blocks, monkeypatch):
    from centered_merge.methods.svd_family import polar, polar_and_singular_values, top_svd_exact
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(shape[::-1] if transposed else shape, generator=g)
    a = a.mT if transposed else a  # a non-contiguous view of the same shape
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    monkeypatch.setattr(torch.linalg, "svd", _no_svd)
    torch.testing.assert_close(polar(a).double(), u @ vh, rtol=1e-5, atol=1e-6)
    p, sv = polar_and_singular_values(a)
    torch.testing.assert_close(p.double(), u @ vh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sv.double(), s, rtol=1e-5, atol=1e-6)
    k = max(1, min(shape) // 2)
    tu, ts, tvh = top_svd_exact(a, k)
    assert tu.shape == (shape[0], k) and ts.shape == (k,) and tvh.shape == (k, shape[1])
    assert tu.dtype == ts.dtype == tvh.dtype == torch.float32
    torch.testing.assert_close(((tu * ts) @ tvh).double(), (u[:, :k] * s[:k]) @ vh[:k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ts.double(), s[:k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("what", ["zero", "rank_deficient", "tiny_tail"])
def test_gram_routes_fall_back_to_the_svd_when_nearly_singular(what, monkeypatch):
    """Where the Gram would lose float32 accuracy (eigenvalue ratio < GRAM_MIN_RATIO), the SVD is used."""
    from centered_merge.methods.svd_family import polar, polar_and_singular_values, top_svd_exact
    g = torch.Generator().manual_seed(3)
    if what == "zero":
        a = torch.zeros(50, 20)
    elif what == "rank_deficient":
        a = torch.randn(50, 3, generator=g) @ torch.randn(3, 20, generator=g)
    else:
        a = decaying_matrix(50, 20, decay="exp", seed=3)  # sigma_20 / sigma_1 = e^-95
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *x, **kw: calls.append(1) or real_svd(*x, **kw))
    k = min(a.shape)
    tu, ts, tvh = top_svd_exact(a, k)
    torch.testing.assert_close(((tu * ts) @ tvh).double(), a.double(), rtol=1e-5, atol=1e-6 * max(1.0, s[0].item()))
    p, sv = polar_and_singular_values(a)
    assert torch.isfinite(p).all() and torch.isfinite(polar(a)).all()
    torch.testing.assert_close(sv.double(), s, rtol=1e-5, atol=1e-6 * max(1.0, s[0].item()))  # float32 floor
    assert len(calls) == 3


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_methods_take_the_gram_route_on_well_conditioned_matrices(method, monkeypatch):
    """The reference comparison above then checks the Gram routes (no SVD is called at all)."""
    base, fts = models({"layer.weight": (40, 24)}, 3, seed=5)
    params = {**EXACT[method], **KW[method]}
    monkeypatch.setattr(torch.linalg, "svd", _no_svd)
    out = cm.merge(fts, method=method, base=base, **params)["layer.weight"]
    monkeypatch.undo()
    taus = [ft["layer.weight"].double() - base["layer.weight"].double() for ft in fts]
    ref = base["layer.weight"].double() + REFS[method](taus, {**get_method(method).defaults, **params})
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_a_zero_task_vector_still_merges():
    """A task that did not change a matrix (e.g. frozen embeddings) makes the concatenated factors rank-deficient:
    the SVD fallback keeps the results finite and equal to the references."""
    base, fts = models({"layer.weight": (30, 20)}, 3, seed=7)
    fts[1] = {"layer.weight": base["layer.weight"].clone()}
    taus = [ft["layer.weight"].double() - base["layer.weight"].double() for ft in fts]
    for method in ("tsv", "iso_c", "iso_cts"):
        params = {**EXACT[method], **KW[method]}
        out = cm.merge(fts, method=method, base=base, **params)["layer.weight"]
        assert torch.isfinite(out).all()
        if method == "iso_c":
            ref = base["layer.weight"].double() + REFS[method](taus, {**get_method(method).defaults, **params})
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frac", [1.0, 0.01])
def test_iso_cts_all_common_or_almost_all_task_specific(frac):
    """k_c = r (no task-specific part: the task vectors are read once, for the sum) and k_c small."""
    base, fts = models({"layer.weight": (20, 12)}, 3, seed=11)
    out = cm.merge(fts, method="iso_cts", base=base, alpha=1.0, common_fraction=frac)["layer.weight"]
    taus = [ft["layer.weight"].double() - base["layer.weight"].double() for ft in fts]
    ref = base["layer.weight"].double() + ref_iso_cts(taus, 1.0, frac)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
