"""Reused output buffers: the fused ops' `out=` (kernel and twin, bit for bit), the pool's reuse and bound, and
merges through the pool writing the same bytes as merges without it."""
import pytest
import torch

import centered_merge.engine.pipeline as pipeline
from centered_merge import backend, ops
from centered_merge.engine import merge_checkpoints
from centered_merge.engine.buffers import OutputPool
from centered_merge.io.direct import BLOCK
from centered_merge.ops import reference as R

from _engine_util import make_state_dicts, save_models, tree_bytes

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(0,), (1, 7), (33, 65), (2, 3, 129)]


def _inputs(shape, dtype, T=3, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    make = (lambda: torch.randn(shape[::-1], generator=g).to(dtype).T) if noncontig and len(shape) == 2 else \
        (lambda: torch.randn(shape, generator=g).to(dtype))
    xs = [make() for _ in range(T)]
    return xs, make()


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(backend, "native_allowed", lambda device: False)
    return request.param


def _same(a, b):
    """Bit for bit (NaN included)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noncontig", [False, True])
def test_out_equals_fresh(path, dtype, out_dtype, shape, noncontig):
    xs, base = _inputs(shape, dtype, noncontig=noncontig)
    if xs[0].numel():
        xs[0][(0,) * len(shape)] = float("inf")  # the count must come through out= too
    w = [0.5, -1.25, 2.0]
    for fresh_call, into_call in (
        (lambda: ops.linear_merge(xs, w, out_dtype, scale=0.3),
         lambda o: ops.linear_merge(xs, w, out_dtype, scale=0.3, out=o)),
        (lambda: ops.linear_merge(xs, w, out_dtype, divisor=1.25),
         lambda o: ops.linear_merge(xs, w, out_dtype, divisor=1.25, out=o)),
        (lambda: ops.task_arithmetic_merge(xs, base, w, 0.7, out_dtype),
         lambda o: ops.task_arithmetic_merge(xs, base, w, 0.7, out_dtype, out=o)),
    ):
        y, n = fresh_call()
        o = torch.full(shape, 7.0, dtype=out_dtype)  # stale contents: all must be overwritten
        y2, n2 = into_call(o)
        assert y2 is o and n2 == n
        _same(y2, y)


def test_out_into_a_reused_view_of_a_larger_buffer(path):
    xs, base = _inputs((5, 9), torch.bfloat16)
    buf = torch.full((1000,), 255, dtype=torch.uint8)
    o = buf[:5 * 9 * 2].view(torch.bfloat16).view(5, 9)
    y, _ = ops.task_arithmetic_merge(xs, base, [1.0, 1.0, 1.0], 0.3, torch.bfloat16)
    ops.task_arithmetic_merge(xs, base, [1.0, 1.0, 1.0], 0.3, torch.bfloat16, out=o)
    _same(o, y)
    assert torch.all(buf[90:] == 255)  # nothing written past the view


def test_noncontiguous_out_goes_to_the_twin_and_is_right():
    xs, base = _inputs((6, 4), torch.float32)
    assert ops.choose("linear_merge", xs, [1.0] * 3, torch.float32, out=torch.empty(4, 6).T) == "torch"
    o = torch.empty(4, 6).T
    y, _ = ops.linear_merge(xs, [1.0, 2.0, 3.0], torch.float32)
    ops.linear_merge(xs, [1.0, 2.0, 3.0], torch.float32, out=o)
    assert torch.equal(o, y)


def test_out_overlapping_an_input_goes_to_the_twin():
    xs, base = _inputs((6, 4), torch.float32)
    assert ops.choose("linear_merge", xs, [1.0] * 3, torch.float32, out=xs[1]) == "torch"
    assert ops.choose("task_arithmetic_merge", xs, base, [1.0] * 3, 0.3, torch.float32, out=base) == "torch"
    assert ops.choose("linear_merge", xs, [1.0] * 3, torch.float32, out=torch.empty(6, 4)) != "torch" or \
        not backend.native_allowed("cpu")


@pytest.mark.parametrize("bad", [torch.empty(6, 5), torch.empty(6, 4, dtype=torch.float16), "x"])
def test_mismatched_out_is_refused(bad):
    xs, base = _inputs((6, 4), torch.float32)
    with pytest.raises(ValueError, match="out must be a"):
        ops.linear_merge(xs, [1.0] * 3, torch.float32, out=bad)
    with pytest.raises(ValueError, match="out must be a"):
        R.task_arithmetic_merge(xs, base, [1.0] * 3, 0.3, torch.float32, out=bad)


# --- the pool ---------------------------------------------------------------------------------------------------
def test_pool_reuses_a_returned_buffer():
    pool = OutputPool(3)
    a = pool.take("a", (10, 10), torch.bfloat16)
    pa = a.data_ptr()
    pool.give_back("a")
    b = pool.take("b", (5, 4), torch.float32)  # smaller: fits in a's buffer
    assert b.data_ptr() == pa and b.shape == (5, 4) and b.dtype == torch.float32 and b.is_contiguous()
    c = pool.take("c", (10, 10), torch.bfloat16)  # a's buffer is in use: a new one
    assert c.data_ptr() != pa and pool.allocated == 2
    pool.give_back("never taken")  # ignored


def test_pool_picks_the_smallest_fitting_buffer():
    pool = OutputPool(4)
    big = pool.take("big", (1000,), torch.uint8).data_ptr()
    small = pool.take("small", (100,), torch.uint8).data_ptr()
    pool.give_back("big")
    pool.give_back("small")
    assert pool.take("x", (50,), torch.uint8).data_ptr() == small
    assert pool.take("y", (50,), torch.uint8).data_ptr() == big


def test_pool_is_bounded():
    pool = OutputPool(2)
    for i in range(20):  # growing sizes, each returned: never more than 2 buffers kept
        pool.take(f"t{i}", (100 * (i + 1),), torch.uint8)
        pool.give_back(f"t{i}")
        assert len(pool._free) + len(pool._used) <= 2
    assert pool.held_bytes() <= 2 * (100 * 20 + BLOCK)  # each buffer has a block of room for the phase
    pool.take("dup", (4,), torch.uint8)
    with pytest.raises(RuntimeError, match="taken twice"):
        pool.take("dup", (4,), torch.uint8)


def test_pool_empty_tensor():
    pool = OutputPool(2)
    t = pool.take("e", (0, 3), torch.bfloat16)
    assert t.shape == (0, 3) and t.dtype == torch.bfloat16


# --- merges through the pool ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [("weight_average", {}), ("task_arithmetic", {"lam": 0.4}),
                                           ("linear", {"weight": [1.0, 2.0, 0.5]}), ("ties", {"density": 0.5})])
@pytest.mark.parametrize("write_queue", [1, 3])
def test_pool_merge_writes_the_same_bytes(tmp_path, monkeypatch, method, params, write_queue):
    made = []

    class Recording(OutputPool):
        def __init__(self, n):
            super().__init__(n)
            self.most = 0  # buffers held at once (in use or free), at its highest
            made.append(self)

        def take(self, token, shape, dtype, phase=0):
            t = super().take(token, shape, dtype, phase)
            self.most = max(self.most, len(self._free) + len(self._used))
            return t

    base, models = make_state_dicts(T=3)
    bpath, paths = save_models(tmp_path, base, models, "file")
    kw = dict(method=method, base=bpath, progress=False, write_queue=write_queue, shard_size=4000, **params)
    monkeypatch.setattr(pipeline, "OutputPool", Recording)
    merge_checkpoints(paths, tmp_path / "pool", **kw)
    assert len(made) == 1 and made[0].allocated >= 1 and 1 <= made[0].most <= write_queue + 2
    assert made[0]._used == {}  # every buffer came back
    monkeypatch.setattr(pipeline, "OutputPool", lambda n: None)
    merge_checkpoints(paths, tmp_path / "fresh", **kw)
    assert tree_bytes(tmp_path / "pool") == tree_bytes(tmp_path / "fresh")


def test_no_pool_for_methods_that_do_not_write_into(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(pipeline, "OutputPool", lambda n: made.append(n))
    base, models = make_state_dicts(T=2)
    bpath, paths = save_models(tmp_path, base, models, "file")
    merge_checkpoints(paths, tmp_path / "dare_ties", method="dare_ties", base=bpath, density=0.5, progress=False)
    assert made == []


def test_pool_scalar_and_fused_op_into_it(path):
    pool = OutputPool(2)
    o = pool.take("s", (), torch.bfloat16)
    xs = [torch.tensor(1.5, dtype=torch.bfloat16), torch.tensor(2.5, dtype=torch.bfloat16)]
    y, n = ops.linear_merge(xs, [1.0, 1.0], torch.bfloat16, scale=0.5, out=o)
    assert y is o and n == 0 and o.shape == () and float(o) == 2.0
