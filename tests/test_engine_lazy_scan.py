"""The lazy non-finite scan: methods whose fused kernel counts every non-finite input (weight_average, linear,
task_arithmetic; ties, whose count adds its non-finite task-vector entries, kept or dropped; cart, whose mean holds
them) are not scanned up front; when the merged tensor's count is not 0 their inputs are scanned then, and the message is the up-front
scan's, word for word, with nothing at the output."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import centered_merge.validation as validation
from centered_merge import ops
from centered_merge.cli import main
from centered_merge.engine import core, merge_checkpoints
from centered_merge.errors import MergeInputError
from centered_merge.methods import available, method_class

from _engine_util import leftovers, make_state_dicts

KEY = "model.layers.0.mlp.up_proj.weight"
LAZY = ("weight_average", "linear", "task_arithmetic", "ties", "cart")
SVD = ("cart",)  # their low-rank tensors are refused under --allow-nonfinite (tested below)
WITH_BASE = ("task_arithmetic", "ties")


def _files(tmp_path, bad_in, value, dtype=torch.float32):
    """base + 3 models as files; `bad_in` (an index, or 'base') holds `value` at two places of KEY."""
    base, models = make_state_dicts(T=3, dtype=dtype)
    sd = base if bad_in == "base" else models[bad_in]
    sd[KEY][1, 2] = value
    sd[KEY][5, 0] = value
    paths = []
    for name, m in [("base", base)] + [(f"ft{i}", m) for i, m in enumerate(models)]:
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file(m, paths[-1])
    return paths[0], paths[1:]


def test_flag_declared_by_the_fused_methods_only():
    lazy = sorted(name for name in available() if method_class(name).counts_nonfinite_inputs)
    assert lazy == sorted(LAZY)


def test_no_upfront_scan_for_fused_methods(tmp_path, monkeypatch):
    """Finite inputs: weight_average and ties never call the scan; dare_ties (no flag) scans every float input."""
    base, models = _files(tmp_path, 0, 0.5)  # all finite
    calls = []
    real = validation.count_nonfinite
    monkeypatch.setattr(core, "count_nonfinite", lambda t: calls.append(1) or real(t))
    merge_checkpoints(models, tmp_path / "wa", method="weight_average", progress=False)
    assert calls == []
    merge_checkpoints(models, tmp_path / "ties", method="ties", base=base, density=0.5, progress=False)
    assert calls == []
    merge_checkpoints(models, tmp_path / "cart", method="cart", progress=False)
    assert calls == []
    merge_checkpoints(models, tmp_path / "dt", method="dare_ties", base=base, density=0.5, progress=False)
    assert len(calls) > 0


@pytest.mark.parametrize("method, bad_in", [(m, 1) for m in LAZY] + [(m, "base") for m in WITH_BASE])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_lazy_scan_names_file_and_tensor(tmp_path, capsys, method, bad_in, value):
    """(For ties an input NaN is never kept: the merged tensor is finite there, and only the task vectors' count
    shows it.)"""
    base, models = _files(tmp_path, bad_in, value)
    where = "base.safetensors" if bad_in == "base" else f"ft{bad_in}.safetensors"
    argv = ["merge", *models, "--method", method, "--out", str(tmp_path / "out")]
    if method in WITH_BASE:
        argv += ["--base", base]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("centered-merge: error:")]
    assert lines == [f"centered-merge: error: tensor {KEY!r} in {tmp_path / where} holds 2 NaN/Inf value(s) of "
                     "512; pass --allow-nonfinite (API: allow_nonfinite=True) to merge anyway"], err
    assert leftovers(tmp_path, "out") == []
    if method in SVD:
        return  # --allow-nonfinite refuses an SVD of KEY: test_cart_refuses_an_svd_of_nonfinite_inputs
    # allowed: merged, one warning per bad input, the same words as the up-front scan's
    with pytest.warns(UserWarning) as rec:
        rep = merge_checkpoints(models, tmp_path / "ok", method=method, allow_nonfinite=True, progress=False,
                                base=base if method in WITH_BASE else None)
    msgs = [str(w.message) for w in rec]
    assert msgs == [f"tensor {KEY!r} in {tmp_path / where} holds 2 NaN/Inf value(s) of 512 "
                    "(merged anyway: allow_nonfinite)"]
    assert rep.nonfinite_inputs == [f"tensor {KEY!r} in {tmp_path / where} holds 2 NaN/Inf value(s) of 512"]
    if method == "ties" and bad_in != "base" and value != value:  # NaN: dropped by the trim, a finite result
        assert bool(torch.isfinite(load_file(str(tmp_path / "ok" / "model.safetensors"))[KEY].float()).all())


def _overflow_files(tmp_path):
    """bfloat16 base + 3 models, all finite, where model 1's task vector at two places of KEY is beyond float32
    (3e38 - (-3e38))."""
    base, models = make_state_dicts(T=3, dtype=torch.bfloat16)
    for p in ((1, 2), (5, 0)):
        base[KEY][p] = -3e38
        for i, m in enumerate(models):
            m[KEY][p] = 3e38 if i == 1 else -3e38
    paths = []
    for name, m in [("base", base)] + [(f"ft{i}", m) for i, m in enumerate(models)]:
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file(m, paths[-1])
    return paths[0], paths[1:]


def test_ties_task_vector_overflow_with_a_finite_result_is_written(tmp_path, recwarn):
    """Finite inputs whose task vector overflows float32: ties's count is not 0 (the task vector's entries), the
    lazy scan finds the inputs finite, the output is counted again: finite (model 1 has weight 0, so its kept inf
    times 0 agrees with no sign), so the merge goes through as before, with no message."""
    base, models = _overflow_files(tmp_path)
    rep = merge_checkpoints(models, tmp_path / "out", method="ties", base=base, density=0.5,
                            weight=[1.0, 0.0, 1.0], progress=False)
    assert rep.nonfinite_inputs == [] and [str(w.message) for w in recwarn] == []
    got = load_file(str(tmp_path / "out" / "model.safetensors"))[KEY]
    assert bool(torch.isfinite(got.float()).all())
    want = method_class("ties")(density=0.5, weight=[1.0, 0.0, 1.0]).merge_tensor(
        KEY, [load_file(m)[KEY] for m in models], load_file(base)[KEY]).to(torch.bfloat16)
    assert torch.equal(got, want)


def test_ties_task_vector_overflow_into_the_result_is_diagnosed(tmp_path, capsys):
    """The same inputs with every weight 1: the overflow reaches the merged tensor, and the message is the float32
    overflow one (the inputs are finite), with nothing at the output."""
    base, models = _overflow_files(tmp_path)
    rc = main(["merge", *models, "--method", "ties", "--base", base, "--density", "0.5",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert (f"merged tensor {KEY!r} has 2 NaN/Inf value(s): its inputs are finite, but the float32 computation "
            "overflowed") in err, err
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_zero_weight_and_lam_still_count(monkeypatch, path, dtype, value):
    """What the flag promises: a non-finite input reaches the count even with weight 0 or lam 0, on the
    kernel and on its torch twin."""
    from centered_merge import backend

    if path == "torch":
        monkeypatch.setattr(backend, "native_allowed", lambda device: False)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 70, generator=g).to(dtype) for _ in range(3)]
    base = torch.randn(3, 70, generator=g).to(dtype)
    xs[1][2, 7] = value
    _, bad = ops.linear_merge(xs, [1.0, 0.0, 1.0], dtype)
    assert bad >= 1
    _, bad = ops.task_arithmetic_merge(xs, base, [1.0, 0.0, 1.0], 0.0, dtype)
    assert bad >= 1
    xs[1][2, 7] = 0.5
    base[0, 0] = value
    _, bad = ops.task_arithmetic_merge(xs, base, [0.0, 0.0, 0.0], 0.0, dtype)
    assert bad >= 1


def test_overflow_still_diagnosed_after_lazy_scan(tmp_path, capsys):
    """Finite inputs whose merge overflows the output dtype: the lazy scan finds nothing, the overflow message
    follows as before."""
    base, models = _files(tmp_path, 0, 1e6)  # finite in float32; the mean (3.3e5) is not in float16
    rc = main(["merge", *models, "--method", "weight_average", "--out-dtype", "float16",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"merged tensor {KEY!r} has 2 NaN/Inf value(s) after conversion to float16" in err
    assert leftovers(tmp_path, "out") == []


def test_in_memory_api_lazy_scan_message():
    base, models = make_state_dicts(T=2, dtype=torch.float32, with_int=False)
    models[1][KEY][0, 0] = float("nan")
    import centered_merge as cm

    with pytest.raises(MergeInputError, match=rf"'{KEY}' in model 1 holds 1 NaN/Inf value\(s\) of 512"):
        cm.merge(models, "weight_average")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cart_refuses_an_svd_of_nonfinite_inputs(tmp_path, capsys, monkeypatch, value):
    """cart without the up-front scan: a NaN/Inf input of a low-rank tensor leaves NaN/Inf in the mean, no SVD is
    taken of it, and --allow-nonfinite still refuses it with the up-front path's words (nothing at the output);
    in a tensor that only gets the mean (a norm vector) it is merged and warned about."""
    base, models = _files(tmp_path, 1, value)
    rc = main(["merge", *models, "--method", "cart", "--allow-nonfinite", "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("centered-merge: error:")]
    assert len(lines) == 1 and f"tensor {KEY!r} in {tmp_path / 'ft1.safetensors'} holds 2 NaN/Inf" in lines[0]
    assert "cart takes an SVD of this tensor" in lines[0]
    assert leftovers(tmp_path, "out") == []
    norm = "model.norm.weight"
    _, models2 = make_state_dicts(T=3, dtype=torch.float32)
    models2[2][norm][3] = value
    paths = []
    for i, m in enumerate(models2):
        paths.append(str(tmp_path / f"n{i}.safetensors"))
        save_file(m, paths[-1])
    with pytest.warns(UserWarning, match=rf"'{norm}' in .*n2.safetensors holds 1 NaN/Inf value"):
        merge_checkpoints(paths, tmp_path / "ok", method="cart", allow_nonfinite=True, progress=False)
    assert not bool(torch.isfinite(load_file(str(tmp_path / "ok" / "model.safetensors"))[norm][3]))


@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_cart_takes_no_svd_of_a_nonfinite_mean(monkeypatch, svd):
    """The method itself: a NaN input of a selected matrix gives the NaN-holding mean, without an SVD."""
    from centered_merge.methods import cart as cart_module
    from centered_merge.methods import get_method

    def no_svd(*a, **k):
        raise AssertionError("an SVD was taken of a matrix holding NaN")

    monkeypatch.setattr(cart_module, "randomized_lowrank_factors", no_svd)
    monkeypatch.setattr(cart_module, "exact_svd", no_svd)

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 16, generator=g) for _ in range(3)]
    xs[1][4, 5] = float("nan")
    out = get_method("cart", svd=svd).merge_tensor(KEY, xs)
    assert torch.isnan(out[4, 5]) and int(torch.isnan(out).sum()) == 1
    torch.testing.assert_close(out, ops.mean_fp32(xs), equal_nan=True)  # the mean, in content order
