"""Bad arguments and inputs raise MergeError subclasses whose message names the parameter, model and tensor."""
import pytest
import torch

import centered_merge as cm
from centered_merge import MergeConfigError, MergeInputError


def models(T=2, shape=(4, 4)):
    return [{"mlp.w": torch.randn(shape), "b": torch.randn(4)} for _ in range(T)]


@pytest.mark.parametrize("rank", [0.0, -0.1, 1.01, 0, -2])
def test_bad_rank(rank):
    with pytest.raises(MergeConfigError, match="rank"):
        cm.cart(models(), rank=rank)


def test_no_models():
    with pytest.raises(MergeConfigError, match="T = 0"):
        cm.cart([])


def test_shape_mismatch_names_tensor_and_shapes():
    ms = models(2)
    ms[1]["mlp.w"] = torch.randn(4, 5)
    with pytest.raises(MergeInputError, match=r"'mlp.w'.*\(4, 4\) in model 0 but \(4, 5\) in model 1"):
        cm.cart(ms)


def test_key_mismatch_names_missing_keys_per_model():
    ms = models(3)
    del ms[2]["b"]
    ms[0]["extra"] = torch.zeros(1)
    with pytest.raises(MergeInputError) as e:
        cm.merge(ms, "weight_average")
    msg = str(e.value)
    assert "model 1 lacks 1 tensor(s) the others have: extra" in msg
    assert "model 2 lacks 2 tensor(s) the others have: b, extra" in msg


@pytest.mark.parametrize(
    "method, params, match",
    [
        ("cart", {"lam": "x"}, "lam must be a number"),
        ("cart", {"svd": "qr"}, "svd must be one of"),
        ("cart", {"select": "attn"}, "select must be one of"),
        ("cart", {"energy": 1.5}, "energy must be <= 1"),
        ("cart", {"power_iters": -1}, "power_iters"),
        ("cart", {"include": "("}, "not a valid regular expression"),
        ("cart", {"rnk": 0.1}, "does not take parameter"),
        ("ties", {"density": 0.0}, "density must be > 0"),
        ("dare", {"p": 1.0}, "p must be < 1"),
        ("weight_average", {"weights": [1, -1]}, "weights must be >= 0"),
        ("no_such_method", {}, "unknown merge method 'no_such_method'"),
    ],
)
def test_bad_parameters(method, params, match):
    with pytest.raises(MergeConfigError, match=match):
        cm.merge(models(), method, base=models(1)[0], **params)


def test_base_required():
    with pytest.raises(MergeConfigError, match="needs a base model"):
        cm.merge(models(), "task_arithmetic")


def test_wrong_number_of_weights():
    with pytest.raises(MergeConfigError, match="3 weights given for 2 models"):
        cm.merge(models(), "weight_average", weights=[1, 1, 1])


def test_nan_input_is_named_and_can_be_allowed():
    ms = models()
    ms[1]["b"][2] = float("nan")
    with pytest.raises(MergeInputError, match=r"'b' in model 1 holds 1 NaN/Inf"):
        cm.merge(ms, "weight_average")
    with pytest.warns(UserWarning, match=r"'b' in model 1 holds 1 NaN/Inf value\(s\) of 4 \(merged anyway"):
        out = cm.merge(ms, "weight_average", allow_nonfinite=True)
    assert torch.isnan(out["b"][2])


def test_overflow_in_output_dtype_is_reported():
    ms = [{"w": torch.full((3,), 60000.0, dtype=torch.float16)} for _ in range(2)]
    base = {"w": torch.zeros(3, dtype=torch.float16)}
    with pytest.raises(MergeInputError, match="'w' has 3 NaN/Inf"):
        cm.merge(ms, "task_arithmetic", base=base, lam=1.0)


def test_non_float_that_differs():
    ms = [{"ids": torch.arange(3)}, {"ids": torch.arange(3) + 1}]
    with pytest.raises(MergeInputError, match="'ids' is not floating point"):
        cm.merge(ms, "weight_average")


def test_not_a_state_dict():
    with pytest.raises(MergeInputError, match="model 1 is a list"):
        cm.merge([models(1)[0], [1, 2]], "weight_average")
