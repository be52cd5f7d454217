"""slerp, nuslerp, multislerp, karcher and model_stock on hand-worked examples, with mergekit's meaning for every
parameter (read from mergekit/merge_methods/*.py), through cm.merge and cm.merge_checkpoints."""
import math

import pytest
import torch
from safetensors.torch import load_file

import centered_merge as cm
from centered_merge.errors import MergeConfigError, MergeInputError
from centered_merge.methods.slerp import nuslerp, slerp

from _engine_util import make_state_dicts, save_models

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
R2 = math.sqrt(2.0)


def one(x, dtype=torch.float32):
    return {"w": torch.tensor(x, dtype=dtype)}


def close(got, want, tol=1e-6):
    torch.testing.assert_close(got.float(), torch.as_tensor(want, dtype=torch.float32), rtol=tol, atol=tol)


def angle(x, y):
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    return math.acos(max(-1.0, min(1.0, float(x @ y / (x.norm() * y.norm())))))


def on_disk_equals_in_memory(tmp_path, method, models, base=None, **params):
    """cm.merge_checkpoints on small safetensors files gives the bytes cm.merge gives."""
    bpath, paths = save_models(tmp_path, base if base is not None else models[0], models, "file")
    ref = cm.merge(models, method, base=base, **params)
    cm.merge_checkpoints(paths, tmp_path / "out", method=method, base=bpath if base is not None else None,
                         progress=False, **params)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    return ref


# --- slerp ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_slerp_orthogonal_midpoint_keeps_each_norm(dtype):
    """a = (2, 0), b = (0, 3): theta = pi/2, sin((1 - t) theta)/sin theta = sin(t theta)/sin theta = 1/sqrt(2)
    at t = 0.5, applied to the raw vectors: (a + b)/sqrt(2) = (sqrt(2), 3/sqrt(2))."""
    got = cm.merge([one([0.0, 3.0], dtype)], "slerp", base=one([2.0, 0.0], dtype), t=0.5)["w"]
    assert got.dtype == dtype
    close(got, [R2, 3 / R2], tol=1e-2 if dtype != torch.float32 else 1e-6)


def test_slerp_quarter_turn_of_unit_vectors():
    """Unit vectors 90 degrees apart, t = 1/3: the result is the unit vector 30 degrees from the base."""
    got = cm.merge([one([0.0, 1.0])], "slerp", base=one([1.0, 0.0]), t=1 / 3)["w"]
    close(got, [math.cos(math.pi / 6), math.sin(math.pi / 6)])


def test_slerp_endpoints_and_symmetry():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    close(slerp(a, b, 0.0), a)
    close(slerp(a, b, 1.0), b, tol=1e-5)
    # swapping the endpoints mirrors t
    close(slerp(a, b, 0.3), slerp(b, a, 0.7), tol=1e-5)
    # the base is the t = 0 end
    close(cm.merge([{"w": b}], "slerp", base={"w": a}, t=0.0)["w"], a)


def test_slerp_on_unit_sphere_moves_at_constant_speed():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, generator=g), torch.randn(300, generator=g)
    a, b = a / a.norm(), b / b.norm()
    theta = angle(a, b)
    for t in (0.1, 0.5, 0.9):
        out = slerp(a, b, t)
        assert abs(out.norm().item() - 1.0) < 1e-5
        assert abs(angle(a, out) - t * theta) < 1e-4 and abs(angle(out, b) - (1 - t) * theta) < 1e-4


def test_slerp_colinear_falls_back_to_lerp():
    # parallel (cos = 1), antiparallel (cos = -1) and within mergekit's 0.9995 threshold: (1 - t) a + t b
    close(slerp(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]), 0.25), [1.25, 2.5])
    close(slerp(torch.tensor([1.0, 2.0]), torch.tensor([-3.0, -6.0]), 0.5), [-1.0, -2.0])
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.02])  # cos = 0.9998
    close(slerp(a, b, 0.5), [1.0, 0.01])
    # just outside the threshold the spherical formula is used: the result is longer than the chord midpoint
    b = torch.tensor([1.0, 0.04])  # cos = 0.9992
    assert slerp(a, b, 0.5).norm() > torch.lerp(a, b, 0.5).norm() + 1e-7


def test_slerp_with_a_zero_tensor_follows_mergekit():
    """A zero tensor is not divided by its norm, so cos theta = 0 and theta = pi/2: slerp(a, 0, t) =
    sin((1 - t) pi/2) a (not the lerp (1 - t) a)."""
    a = torch.tensor([3.0, -1.0])
    close(slerp(a, torch.zeros(2), 1 / 3), a * math.sin(math.pi / 3))
    close(slerp(torch.zeros(2), torch.zeros(2), 0.5), [0.0, 0.0])


def test_slerp_parameters_and_model_count_are_checked():
    with pytest.raises(MergeConfigError, match="t is required"):
        cm.merge([one([1.0])], "slerp", base=one([0.0]))
    with pytest.raises(MergeConfigError, match="t must be a number"):
        cm.merge([one([1.0])], "slerp", base=one([0.0]), t="half")
    with pytest.raises(MergeConfigError, match="needs a base"):
        cm.merge([one([1.0]), one([2.0])], "slerp", t=0.5)
    with pytest.raises(MergeConfigError, match="exactly two models"):
        cm.merge([one([1.0]), one([2.0])], "slerp", base=one([0.0]), t=0.5)


def test_slerp_on_disk(tmp_path):
    base, models = make_state_dicts(T=1)
    ref = on_disk_equals_in_memory(tmp_path, "slerp", models, base=base, t=0.4)
    k = "model.layers.0.mlp.up_proj.weight"
    close(ref[k], slerp(base[k], models[0][k], 0.4).to(torch.bfloat16))


# --- nuslerp -------------------------------------------------------------------------------------------------
def test_nuslerp_weights_give_t():
    """t = w1 / (w0 + w1): weights (1, 3) -> t = 0.75 on a = (2, 0), b = (0, 3):
    sin(pi/8) a + sin(3 pi/8) b."""
    got = cm.merge([one([2.0, 0.0]), one([0.0, 3.0])], "nuslerp", weights=[1, 3])["w"]
    close(got, [2 * math.sin(math.pi / 8), 3 * math.sin(3 * math.pi / 8)])
    # no weights: equal, t = 0.5; weights summing to ~0: mergekit's fallback t = 0.5
    mid = [R2, 3 / R2]
    close(cm.merge([one([2.0, 0.0]), one([0.0, 3.0])], "nuslerp")["w"], mid)
    close(cm.merge([one([2.0, 0.0]), one([0.0, 3.0])], "nuslerp", weights=[1.0, -1.0])["w"], mid)


def test_nuslerp_equals_slerp_of_whole_tensors():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    got = cm.merge([{"w": a}, {"w": b}], "nuslerp", weights=[0.7, 0.3])["w"]
    close(got, slerp(a, b, 0.3), tol=1e-5)
    # swapping the two models together with their weights changes nothing
    close(cm.merge([{"w": b}, {"w": a}], "nuslerp", weights=[0.3, 0.7])["w"], got, tol=1e-5)


def test_nuslerp_rows_and_columns():
    """[[1, 0], [0, 1]] and [[0, 1], [1, 1]] at t = 0.5, not flattened:
    rows (default): row 0 pairs (1,0)/(0,1) -> (1,1)/sqrt(2); row 1 pairs (0,1)/(1,1) at 45 degrees ->
    sin(pi/8)/sin(pi/4) * ((0,1) + (1,1)).
    nuslerp_row_wise (mergekit swaps dim 0 with the last, so the vectors are the columns): column 0 pairs (1,0)/(0,1),
    column 1 pairs (0,1)/(1,1)."""
    a, b = [[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]]
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    rows = cm.merge([one(a), one(b)], "nuslerp", nuslerp_flatten=False)["w"]
    close(rows, [[1 / R2, 1 / R2], [c, 2 * c]])
    cols = cm.merge([one(a), one(b)], "nuslerp", nuslerp_flatten=False, nuslerp_row_wise=True)["w"]
    close(cols, [[1 / R2, c], [1 / R2, 2 * c]])
    # row_wise has no effect while flattened (mergekit's default nuslerp_flatten: true)
    flat = cm.merge([one(a), one(b)], "nuslerp", nuslerp_row_wise=True)["w"]
    close(flat, slerp(torch.tensor(a), torch.tensor(b), 0.5))


def test_nuslerp_colinear_rows_are_lerped_one_by_one():
    a = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 4.0], [0.0, 1.0]])
    got = nuslerp(a, b, 0.25, flatten=False)
    close(got, [[1.25, 2.5], [math.cos(math.pi / 8), math.sin(math.pi / 8)]])


def test_nuslerp_with_base_slerps_task_vectors():
    """use_base (mergekit: a base_model in the config): base + nuslerp(a - base, b - base)."""
    base = one([1.0, 1.0])
    got = cm.merge([one([3.0, 1.0]), one([1.0, 4.0])], "nuslerp", base=base, use_base=True)["w"]
    close(got, [1 + R2, 1 + 3 / R2])
    # without use_base the base is not used
    plain = cm.merge([one([3.0, 1.0]), one([1.0, 4.0])], "nuslerp", base=base)["w"]
    close(plain, slerp(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 4.0]), 0.5))
    with pytest.raises(MergeConfigError, match="needs a base"):
        cm.merge([one([3.0, 1.0]), one([1.0, 4.0])], "nuslerp", use_base=True)


def test_nuslerp_checks():
    with pytest.raises(MergeConfigError, match="exactly two models"):
        cm.merge([one([1.0])] * 3, "nuslerp")
    with pytest.raises(MergeConfigError, match="2 weights given for 3|3 weights given for 2"):
        cm.merge([one([1.0])] * 2, "nuslerp", weights=[1, 2, 3])
    with pytest.raises(MergeConfigError, match="nuslerp_flatten must be true or false"):
        cm.merge([one([1.0])] * 2, "nuslerp", nuslerp_flatten="no")
    with pytest.raises(MergeConfigError, match="weights must be a number"):
        cm.merge([one([1.0])] * 2, "nuslerp", weights=[1, float("nan")])


def test_nuslerp_empty_and_scalar_tensors():
    close(nuslerp(torch.zeros(0, 3), torch.zeros(0, 3), 0.5, flatten=False), torch.zeros(0, 3))
    close(nuslerp(torch.tensor(2.0), torch.tensor(4.0), 0.5, flatten=False), 3.0)


def test_nuslerp_on_disk(tmp_path):
    base, models = make_state_dicts(T=2)
    on_disk_equals_in_memory(tmp_path, "nuslerp", models, base=base, use_base=True, weights=[2.0, 1.0],
                             nuslerp_flatten=False)


# --- multislerp ----------------------------------------------------------------------------------------------
def multislerp_step_by_step(xs, w, base=None, normalize=True, eps=1e-8):
    """mergekit's multislerp written out step by step (tangent projection and exponential map included)."""
    xs = torch.stack([x.double() - (base.double() if base is not None else 0) for x in xs]).reshape(len(xs), -1)
    w = torch.tensor(w, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = xs.norm(dim=1, keepdim=True)
    u = xs / (norms + eps)
    m = (u * w[:, None]).sum(0)
    m = m / m.norm()
    g = ((u - (u @ m)[:, None] * m) * w[:, None]).sum(0)
    gn = g.norm() + eps
    out = (m * torch.cos(gn) + g * torch.sin(gn) / gn) * (norms[:, 0] * w).sum()
    return out + (base.double().reshape(-1) if base is not None else 0)


def test_multislerp_two_orthogonal_directions():
    """(2, 0) and (0, 4), equal weights: direction (1, 1)/sqrt(2), length the mean norm 3."""
    got = cm.merge([one([2.0, 0.0]), one([0.0, 4.0])], "multislerp")["w"]
    close(got, [3 / R2, 3 / R2])
    # unit vectors: the same point as slerp at t = 0.5
    close(cm.merge([one([1.0, 0.0]), one([0.0, 1.0])], "multislerp")["w"], [1 / R2, 1 / R2])


def test_multislerp_weights_normalize_and_three_points():
    # weights 3:1 on e1, e2: direction of 0.75 e1 + 0.25 e2, i.e. (3, 1)/sqrt(10), length 1
    got = cm.merge([one([1.0, 0.0]), one([0.0, 1.0])], "multislerp", weights=[3, 1])["w"]
    close(got, [3 / math.sqrt(10), 1 / math.sqrt(10)])
    # normalize_weights: false keeps the weights as given: the length is sum_i w_i |x_i| = 2
    got = cm.merge([one([1.0, 0.0]), one([0.0, 1.0])], "multislerp", normalize_weights=False)["w"]
    close(got, [R2, R2])
    e = torch.eye(3)
    got = cm.merge([{"w": 2 * e[i]} for i in range(3)], "multislerp")["w"]
    close(got, [2 / math.sqrt(3)] * 3)


def test_multislerp_matches_step_by_step_and_is_permutation_invariant():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 8, generator=g) for _ in range(4)]
    base = torch.randn(5, 8, generator=g)
    w = [0.5, 1.0, 2.0, 0.25]
    for b in (None, base):
        for normalize in (True, False):
            got = cm.merge([{"w": x} for x in xs], "multislerp", base=None if b is None else {"w": b},
                           use_base=b is not None, weights=w, normalize_weights=normalize)["w"]
            close(got.reshape(-1), multislerp_step_by_step(xs, w, b, normalize).float(), tol=1e-5)
    order = [2, 0, 3, 1]
    a = cm.merge([{"w": x} for x in xs], "multislerp", weights=w)["w"]
    b = cm.merge([{"w": xs[i]} for i in order], "multislerp", weights=[w[i] for i in order])["w"]
    close(a, b, tol=1e-6)


def test_multislerp_with_base_works_on_task_vectors():
    base = one([1.0, -1.0])
    got = cm.merge([one([3.0, -1.0]), one([1.0, 1.0])], "multislerp", base=base, use_base=True)["w"]
    close(got, [1 + R2, -1 + R2])


def test_multislerp_antipodal_inputs():
    # two models: mergekit's fallback, the weighted sum (here a - a = 0)
    close(cm.merge([one([1.0, 2.0]), one([-1.0, -2.0])], "multislerp")["w"], [0.0, 0.0])
    # unequal weights do not cancel: the heavier direction, at the weighted mean norm (|a| here)
    close(cm.merge([one([1.0, 2.0]), one([-1.0, -2.0])], "multislerp", weights=[3, 1])["w"], [1.0, 2.0])
    with pytest.raises(MergeInputError, match="'w'.*weighted sum of the models' directions is zero"):
        cm.merge([one([1.0, 0.0]), one([-1.0, 0.0]), one([0.0, 1.0])], "multislerp", weights=[1, 1, 0])


def test_multislerp_single_model_and_checks():
    close(cm.merge([one([1.0, 2.0])], "multislerp")["w"], [1.0, 2.0])
    with pytest.raises(MergeConfigError, match="sum to 0"):
        cm.merge([one([1.0]), one([2.0])], "multislerp", weights=[1, -1])
    with pytest.raises(MergeConfigError, match="1 weights given for 2"):
        cm.merge([one([1.0]), one([2.0])], "multislerp", weights=[1])
    with pytest.raises(MergeConfigError, match="eps must be >= 0"):
        cm.merge([one([1.0]), one([2.0])], "multislerp", eps=-1)


def test_multislerp_on_disk(tmp_path):
    base, models = make_state_dicts(T=3)
    on_disk_equals_in_memory(tmp_path, "multislerp", models, weights=[1.0, 2.0, 0.5])
    (tmp_path / "b").mkdir()
    on_disk_equals_in_memory(tmp_path / "b", "multislerp", models, base=base, use_base=True)


# --- karcher -------------------------------------------------------------------------------------------------
def on_circle(deg, r=1.0):
    return {"w": torch.tensor([r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))])}


def test_karcher_mean_on_a_circle_is_the_mean_angle():
    """Points at -30, 0 and 60 degrees with radii 1, 2, 3: the Karcher mean direction is the mean angle, 10 degrees
    (the normalised Euclidean mean would be atan2(0.366, 2.366) = 8.79 degrees); length the mean radius 2."""
    pts = [on_circle(-30, 1.0), on_circle(0, 2.0), on_circle(60, 3.0)]
    close(cm.merge(pts, "karcher")["w"], on_circle(10, 2.0)["w"], tol=1e-5)
    # max_iter = 0 stops at the starting point, the normalised mean of the directions
    start = math.degrees(math.atan2((3 ** 0.5 - 1) / 2, (3 ** 0.5 + 3) / 2))  # sum of sines, sum of cosines
    assert abs(start - 8.794) < 1e-3
    close(cm.merge(pts, "karcher", max_iter=0)["w"], on_circle(start, 2.0)["w"], tol=1e-5)
    # the order of the models does not matter
    close(cm.merge(pts[::-1], "karcher")["w"], on_circle(10, 2.0)["w"], tol=1e-5)


def test_karcher_two_points_is_the_geodesic_midpoint():
    close(cm.merge([one([2.0, 0.0]), one([0.0, 4.0])], "karcher")["w"], [3 / R2, 3 / R2])


def test_karcher_on_the_sphere_zeroes_the_mean_log_map():
    """In higher dimension the fixed point satisfies sum_i log_u(u_i) = 0 (the Karcher mean's defining property)."""
    g = torch.Generator().manual_seed(4)
    centre = torch.randn(50, generator=g)
    xs = [centre + 0.8 * torch.randn(50, generator=g) for _ in range(5)]
    u = cm.merge([{"w": x} for x in xs], "karcher", max_iter=100, tol=1e-9)["w"].double()
    u = u / u.norm()
    grad = torch.zeros(50, dtype=torch.float64)
    for x in xs:
        xu = x.double() / x.double().norm()
        c = float(xu @ u)
        th = math.acos(c)
        grad += th / math.sin(th) * (xu - c * u)
    assert grad.norm() < 1e-4
    # and it is not the normalised Euclidean mean of the directions
    m = sum(x.double() / x.double().norm() for x in xs)
    assert angle(u, m) > 1e-4


def test_karcher_base_and_zero_tensors():
    # use_base: the base is one more equally weighted point
    pts = [on_circle(-30, 1.0), on_circle(0, 2.0)]
    got = cm.merge(pts, "karcher", base=on_circle(60, 3.0), use_base=True)["w"]
    close(got, on_circle(10, 2.0)["w"], tol=1e-5)
    # a zero tensor has no direction but its norm (0) still counts in the length
    got = cm.merge([one([2.0, 0.0]), one([0.0, 4.0]), one([0.0, 0.0])], "karcher")["w"]
    close(got, [2 / R2, 2 / R2])
    close(cm.merge([one([0.0, 0.0])] * 2, "karcher")["w"], [0.0, 0.0])


def test_karcher_checks():
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(MergeConfigError, match="max_iter must be (an integer|>= 0)"):
            cm.merge([one([1.0])] * 2, "karcher", max_iter=bad)
    with pytest.raises(MergeConfigError, match="tol must be >= 0"):
        cm.merge([one([1.0])] * 2, "karcher", tol=-1e-3)


def test_karcher_on_disk(tmp_path):
    base, models = make_state_dicts(T=3)
    on_disk_equals_in_memory(tmp_path, "karcher", models)


# --- model_stock ---------------------------------------------------------------------------------------------
def test_model_stock_two_models_by_the_papers_formula():
    """Task vectors (1, 0) and (1, 1) from the base (1, 1): cos theta = 1/sqrt(2), t = 2c / (1 + c) = 2(sqrt 2 - 1);
    the merge is base + t * mean task vector (1, 0.5)."""
    t = 2 * (R2 - 1)
    got = cm.merge([one([2.0, 1.0]), one([2.0, 2.0])], "model_stock", base=one([1.0, 1.0]))["w"]
    close(got, [1 + t, 1 + 0.5 * t])
    # equivalently t * mean(models) + (1 - t) * base
    close(got, [t * 2.0 + (1 - t), t * 1.5 + (1 - t)])


def test_model_stock_limits_and_three_models():
    base = one([0.0, 0.0])
    # orthogonal task vectors: t = 0, the base; identical ones: t = 1, their mean
    close(cm.merge([one([1.0, 0.0]), one([0.0, 1.0])], "model_stock", base=base)["w"], [0.0, 0.0])
    close(cm.merge([one([1.0, 2.0]), one([1.0, 2.0])], "model_stock", base=base)["w"], [1.0, 2.0])
    # three: pairwise cosines 0, 1/sqrt 2, 1/sqrt 2 -> c = sqrt(2)/3, t = 3c / (1 + 2c); mean task vector (2/3, 2/3)
    c = R2 / 3
    t = 3 * c / (1 + 2 * c)
    got = cm.merge([one([1.0, 0.0]), one([0.0, 1.0]), one([1.0, 1.0])], "model_stock", base=base)["w"]
    close(got, [t * 2 / 3, t * 2 / 3])
    # permuting the models changes nothing
    got2 = cm.merge([one([1.0, 1.0]), one([1.0, 0.0]), one([0.0, 1.0])], "model_stock", base=base)["w"]
    close(got2, got)


def test_model_stock_filter_wise_takes_one_ratio_per_row():
    """Rows of the task vectors: row 0 (1, 0) vs (0, 1) -> t = 0; row 1 (1, 0) vs (1, 0) -> t = 1.
    Per tensor: flattened cos = 1/2, t = 2/3 for everything."""
    base = one([[0.0, 0.0], [0.0, 0.0]])
    models = [one([[1.0, 0.0], [1.0, 0.0]]), one([[0.0, 1.0], [1.0, 0.0]])]
    close(cm.merge(models, "model_stock", base=base, filter_wise=True)["w"], [[0.0, 0.0], [1.0, 0.0]])
    close(cm.merge(models, "model_stock", base=base)["w"], [[1 / 3, 1 / 3], [2 / 3, 0.0]])
    # a 1-D tensor is one row either way
    vec = [one([1.0, 0.0, 1.0, 0.0]), one([0.0, 1.0, 1.0, 0.0])]
    a = cm.merge(vec, "model_stock", base=one([0.0] * 4), filter_wise=True)["w"]
    close(a, cm.merge(vec, "model_stock", base=one([0.0] * 4))["w"])
    close(a, [1 / 3, 1 / 3, 2 / 3, 0.0])


def test_model_stock_degenerate_inputs():
    base = one([1.0, 1.0])
    # task vectors that are zero: cosine 0 (norm product floored), t = 0, the base
    close(cm.merge([one([1.0, 1.0]), one([1.0, 1.0])], "model_stock", base=base)["w"], [1.0, 1.0])
    # opposite task vectors, N = 2: 1 + cos = 0, t is infinite -> a clear error naming the tensor
    with pytest.raises(MergeInputError, match="'w'.*NaN/Inf"):
        cm.merge([one([2.0, 1.0]), one([0.0, 1.0])], "model_stock", base=base)
    with pytest.raises(MergeConfigError, match="at least two other models"):
        cm.merge([one([2.0, 1.0])], "model_stock", base=base)
    with pytest.raises(MergeConfigError, match="needs a base"):
        cm.merge([one([2.0, 1.0]), one([0.0, 1.0])], "model_stock")
    with pytest.raises(MergeConfigError, match="filter_wise must be true or false"):
        cm.merge([one([2.0, 1.0]), one([0.0, 1.0])], "model_stock", base=base, filter_wise=1)


def test_model_stock_on_disk(tmp_path):
    base, models = make_state_dicts(T=3)
    on_disk_equals_in_memory(tmp_path, "model_stock", models, base=base, filter_wise=True)


# --- all five ------------------------------------------------------------------------------------------------
PLANS = [("slerp", 1, dict(t=0.5)), ("nuslerp", 2, dict(use_base=True)), ("multislerp", 3, {}),
         ("karcher", 3, dict(use_base=True)), ("model_stock", 3, {})]


@pytest.mark.parametrize("method,T,params", PLANS, ids=[p[0] for p in PLANS])
def test_registered_and_planned(tmp_path, method, T, params):
    from centered_merge.engine import plan_merge

    assert method in cm.methods.available()
    base, models = make_state_dicts(T=T)
    bpath, paths = save_models(tmp_path, base, models, "file")
    plan = plan_merge(paths, method=method, base=bpath, **params)
    rows = [r for r in plan["tensors"] if r["kind"] != "passthrough"]
    assert rows and all(not r["lowrank"] and r["flops"] > 0 for r in rows)
    assert plan["method"]["method"] == method


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_dtype_follows_the_inputs(dtype):
    base, models = make_state_dicts(T=3, dtype=dtype, with_int=False)
    for method, T, params in PLANS:
        out = cm.merge(models[:T], method, base=base, **params)
        assert all(v.dtype == dtype and torch.isfinite(v.float()).all() for v in out.values()), method


def test_plain_functions_take_non_contiguous_tensors():
    from centered_merge.methods.karcher import karcher_mean
    from centered_merge.methods.model_stock import model_stock
    from centered_merge.methods.multislerp import multislerp

    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(6, 5, generator=g) for _ in range(4)]
    ts = [x.t() for x in xs]  # non-contiguous views
    cs = [x.contiguous() for x in ts]
    assert not ts[0].is_contiguous()
    for f in (lambda v: slerp(v[0], v[1], 0.3), lambda v: nuslerp(v[0], v[1], 0.3, flatten=False),
              lambda v: nuslerp(v[0], v[1], 0.3, flatten=False, row_wise=True),
              lambda v: multislerp(v[:3], [1, 2, 3], v[3]), lambda v: karcher_mean(v, [0.25] * 4),
              lambda v: model_stock(v[0], v[1:], filter_wise=True)):
        close(f(ts), f(cs))


def test_wrong_model_count_on_disk_leaves_nothing(tmp_path):
    base, models = make_state_dicts(T=2)
    bpath, paths = save_models(tmp_path, base, models, "file")
    with pytest.raises(MergeConfigError, match="got the base and 2 other model"):
        cm.merge_checkpoints(paths, tmp_path / "out", method="slerp", base=bpath, t=0.5, progress=False)
    with pytest.raises(MergeConfigError, match="got the base and 1 other model"):
        cm.merge_checkpoints(paths[:1], tmp_path / "out", method="model_stock", base=bpath, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "ft0.safetensors", "ft1.safetensors"]
