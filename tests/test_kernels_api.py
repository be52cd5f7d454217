"""centered_merge.kernels: DLPack arrays of any library in, the same library's arrays out, with the values of
the ops (compared bit for bit against the torch twins). numpy and torch on the CPU here; cupy where a GPU and
cupy are present (skipped cleanly elsewhere)."""
import numpy as np
import pytest
import torch

from centered_merge import kernels
from centered_merge.ops import reference as R


def _np(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _eq(a, b):
    np.testing.assert_array_equal(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_in_numpy_out(dtype):
    xs = [_np((5, 7), dtype, s) for s in range(3)]
    txs = [torch.from_numpy(x) for x in xs]
    m = kernels.mean(xs)
    assert isinstance(m, np.ndarray) and m.dtype == np.float32 and m.shape == (5, 7)
    _eq(m, R.mean_fp32(txs).numpy())
    c = kernels.center(xs[0], m)
    assert isinstance(c, np.ndarray)
    _eq(c, (txs[0].float() - torch.from_numpy(m)).numpy())
    y, bad = kernels.finalize(m, np.float16, add=c)
    assert isinstance(y, np.ndarray) and y.dtype == np.float16 and bad == 0
    _eq(y, R.finalize(torch.from_numpy(m), torch.float16, torch.from_numpy(c))[0].numpy())
    base = _np((5, 7), dtype, 9)
    t = kernels.ties(xs, base, 0.3, 0.8)
    _eq(t, R.ties_merge(txs, torch.from_numpy(base), 0.3, 0.8).numpy())
    d = kernels.dare(xs[1], 0.5, 42)
    _eq(d, R.dare(txs[1], 0.5, 42).numpy())
    lin, bad = kernels.linear(xs, [0.2, 0.3, 0.5], "float16")
    assert isinstance(lin, np.ndarray) and lin.dtype == np.float16
    _eq(lin, R.linear_merge(txs, [0.2, 0.3, 0.5], torch.float16)[0].numpy())
    ta, bad = kernels.task_arithmetic(xs, base, [1.0, 1.0, 2.0], 0.3)
    assert ta.dtype == np.float32
    _eq(ta, R.task_arithmetic_merge(txs, torch.from_numpy(base), [1.0, 1.0, 2.0], 0.3)[0].numpy())


def test_out_arrays_are_written_in_place():
    xs = [_np((3, 5), seed=s) for s in range(2)]
    out = np.full((3, 5), 7.0, np.float32)
    r = kernels.mean(xs, out=out)
    assert isinstance(r, np.ndarray) and np.shares_memory(r, out)
    _eq(out, R.mean_fp32([torch.from_numpy(x) for x in xs]).numpy())
    c = np.empty((3, 5), np.float32)
    kernels.center(xs[0], out, out=c)
    _eq(c, xs[0] - out)


def test_numpy_results_share_memory_with_the_kernel_output():
    m = kernels.mean([_np(8), _np(8, seed=1)])
    assert not m.flags.owndata  # a view of the kernel's output buffer (exchanged through DLPack), not a copy


def test_torch_in_torch_out_bf16():
    xs = [torch.randn(4, 9).bfloat16() for _ in range(2)]
    y, bad = kernels.linear(xs, [0.5, 0.5], torch.bfloat16)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16
    assert torch.equal(y, R.linear_merge(xs, [0.5, 0.5], torch.bfloat16)[0])
    assert torch.equal(kernels.mean(xs), R.mean_fp32(xs))


def test_ties_with_nonfinite_inputs_equals_the_twin():
    """kernels.ties (float32 result, no count) with NaN (never kept) and +-Inf in the inputs and the base: the
    twin's values, NaN where the twin has NaN."""
    xs = [_np((6, 11), np.float32, s) for s in range(3)]
    base = _np((6, 11), np.float32, 9)
    xs[0][0, 0], xs[1][2, 3], xs[2][5, 10], base[4, 4] = np.nan, np.inf, -np.inf, np.nan
    t = kernels.ties(xs, base, 0.3, 0.8)
    _eq(t, R.ties_merge([torch.from_numpy(x) for x in xs], torch.from_numpy(base), 0.3, 0.8).numpy())
    assert np.isfinite(t[0, 0]) and np.isnan(t[4, 4])


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"kernels.mean: argument 'inputs\[1\]': expected an array with __dlpack__"):
        kernels.mean([_np(3), [1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match=r"kernels.mean: argument 'inputs': expected a non-empty list"):
        kernels.mean([])
    with pytest.raises(ValueError, match=r"kernels.finalize: argument 'dtype': expected float32, float16 or bfloat16"):
        kernels.finalize(_np(3), "int8")
    with pytest.raises(ValueError, match="numpy has no bfloat16"):
        kernels.finalize(_np(3), "bfloat16")


def test_cupy_in_cupy_out():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("cupy sees no GPU")
    except Exception as e:  # no driver
        pytest.skip(f"cupy sees no GPU: {e}")
    xs = [cp.asarray(_np((64, 33), np.float32, s)) for s in range(3)]
    m = kernels.mean(xs)
    assert isinstance(m, cp.ndarray)
    txs = [torch.from_numpy(cp.asnumpy(x)) for x in xs]
    _eq(cp.asnumpy(m), R.mean_fp32(txs).numpy())
    y, _ = kernels.linear(xs, [0.1, 0.2, 0.7], "float16")
    assert isinstance(y, cp.ndarray) and y.dtype == cp.float16
    _eq(cp.asnumpy(y), R.linear_merge(txs, [0.1, 0.2, 0.7], torch.float16)[0].numpy())
