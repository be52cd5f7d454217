"""TIES runs as one fused op (ops.ties_merge: the native kernel, or its streaming torch twin for lazy inputs and
without the extension); the task-vector family's generic consensus path (TaskVectorMerge with Ties.sparsify) is
the same formula step by step. All three give the same bits, for per-model weights and densities, gradients,
filter lists and normalize on and off."""
import pytest
import torch

from centered_merge.methods import get_method
from centered_merge.methods.schedule import Filtered, Gradient
from centered_merge.methods.task_arithmetic import TaskVectorMerge

from _engine_util import make_state_dicts

FILTER = Filtered([("self_attn", 0.8), (None, 0.4)])
CASES = {
    "equal": {"density": 0.2},
    "weights": {"density": [0.5, 0.3, 0.7], "weight": [0.7, 0.3, 1.5]},
    "gradient": {"density": 0.5, "weight": [Gradient([0.2, 0.9], num_layers=2), 0.5, 1.0], "lam": 0.9},
    "filter list": {"density": [FILTER, 0.5, 0.2], "weight": [FILTER, 0.6, -0.2]},
    "unnormalized": {"density": 0.5, "weight": [0.7, 0.5, 0.4], "normalize": False},
}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_fused_op_equals_the_generic_consensus_path(case, backend, monkeypatch):
    monkeypatch.setenv("CENTERED_MERGE_BACKEND", backend)
    base, models = make_state_dicts(T=3, dtype=torch.bfloat16, with_int=False)
    m = get_method("ties", **CASES[case])
    for k in base:
        inputs = [sd[k] for sd in models]
        fused = m.merge_tensor(k, inputs, base[k])
        generic = TaskVectorMerge.merge_tensor(m, k, inputs, base[k])
        assert fused.dtype == torch.float32
        assert torch.equal(fused, generic), (case, k)


def test_native_and_torch_backends_agree(monkeypatch):
    base, models = make_state_dicts(T=4, dtype=torch.bfloat16, with_int=False)
    m = get_method("ties", **CASES["weights"] | {"density": [0.5, 0.3, 0.7, 0.1], "weight": [0.7, 0.3, 1.5, -1]})
    got = {}
    for backend in ("torch", "auto"):
        monkeypatch.setenv("CENTERED_MERGE_BACKEND", backend)
        got[backend] = {k: m.merge_tensor(k, [sd[k] for sd in models], base[k]) for k in base}
    assert all(torch.equal(got["torch"][k], got["auto"][k]) for k in base)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_ties_merge_to_into_a_callers_buffer(backend, out_dtype, monkeypatch):
    """out= (the engine's reused buffers): the same bits and non-finite count as a fresh result, every stale value
    overwritten; a buffer that does not fit is refused by the twin's check."""
    monkeypatch.setenv("CENTERED_MERGE_BACKEND", backend)
    from centered_merge import ops
    g = torch.Generator().manual_seed(4)
    shape = (300, 130)  # several blocks and threads
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    xs = [(base.float() + torch.randn(shape, generator=g) * 0.01).to(torch.bfloat16) for _ in range(3)]
    xs[1][0, 0] = float("inf")
    args = (xs, base, [0.2, 0.5, 0.9], 1.3)
    kw = dict(weights=[0.7, 1.0, -0.4], normalize=True, out_dtype=out_dtype)
    want, want_bad = ops.ties_merge_to(*args, **kw)
    o = torch.full(shape, 7.0, dtype=out_dtype)
    got, bad = ops.ties_merge_to(*args, **kw, out=o)
    assert got is o and bad == want_bad
    assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))
    with pytest.raises(ValueError, match="out must be a"):
        ops.ties_merge_to(*args, **kw, out=torch.empty(3, dtype=out_dtype))


@pytest.mark.parametrize("where", ["input nan (dropped)", "input inf (kept)", "input -inf (dropped)", "base nan"])
def test_every_path_counts_a_nonfinite_input(where, monkeypatch):
    """What Ties.counts_nonfinite_inputs promises: on every path of merge_tensor_to (the native kernel, the twin
    for lazy inputs, without the extension, and for a dtype the kernel does not take) an input or base NaN/Inf
    makes the count non-zero, also where TIES drops the entry and the result is finite; all paths agree."""
    from centered_merge import ops
    from centered_merge.engine.reader import LazyDeviceInputs

    base, models = make_state_dicts(T=3, dtype=torch.bfloat16, with_int=False)
    k = next(iter(base))
    inputs = [sd[k].clone() for sd in models]
    b = base[k].clone()
    flat = [x.view(-1) for x in inputs]
    if where == "input nan (dropped)":
        flat[1][3] = float("nan")
    elif where == "input inf (kept)":
        flat[0][5] = float("inf")
    elif where == "input -inf (dropped)":  # k = 1 for model 2: the first of its two -inf is kept, the second not
        flat[2][0] = flat[2][7] = float("-inf")
    else:
        b.view(-1)[2] = float("nan")
    m = get_method("ties", density=[0.5, 0.5, 1.5 / b.numel()])
    paths = {}
    monkeypatch.setenv("CENTERED_MERGE_BACKEND", "auto")
    assert ops.choose("ties_merge_to", inputs, b, 0.5, 1.0) == "native-cpu"
    paths["native"] = m.merge_tensor_to(k, inputs, b, torch.bfloat16)
    paths["lazy"] = m.merge_tensor_to(k, LazyDeviceInputs(inputs, torch.device("cpu")), b, torch.bfloat16)
    paths["float64"] = m.merge_tensor_to(k, [x.double() for x in inputs], b.double(), torch.bfloat16)
    monkeypatch.setenv("CENTERED_MERGE_BACKEND", "torch")
    paths["torch"] = m.merge_tensor_to(k, inputs, b, torch.bfloat16)
    tau = sum(int((~torch.isfinite(x.float() - b.float())).sum()) for x in inputs)
    for name, (out, bad) in paths.items():
        torch.testing.assert_close(out, paths["torch"][0], rtol=0, atol=0, equal_nan=True)  # NaN payloads may differ
        assert bad == int((~torch.isfinite(out.float())).sum()) + tau > 0, (name, bad)
    if where == "input nan (dropped)":
        assert int((~torch.isfinite(paths["native"][0].float())).sum()) == 0 and paths["native"][1] == 1
