"""CUDA copy on read (issue 14, the engine's part): when the T inputs of a tensor do not fit on the device, the
engine hands methods a LazyDeviceInputs, and at most two inputs are ever resident on the device at once, for
every method, whatever T. Checked on the CPU with a probe whose "device copy" is a fresh tensor that is
counted while it is alive."""
import gc
import weakref

import pytest
import torch

from centered_merge.engine import LazyDeviceInputs
from centered_merge.methods import available, get_method

from _engine_util import make_state_dicts


class Probe(LazyDeviceInputs):
    """A LazyDeviceInputs whose copies are fresh tensors, tracked: `peak` is the most alive at one time."""

    def __init__(self, host, live=None, peak=None):
        super().__init__(host, torch.device("cpu"))
        self.live = live if live is not None else weakref.WeakSet()
        self.peak = peak if peak is not None else [0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Probe([self.host[j] for j in range(*i.indices(len(self)))], self.live, self.peak)
        return super().__getitem__(i)

    def copy_to_device(self, t):
        c = t.clone()
        self.live.add(c)
        self.peak[0] = max(self.peak[0], len(self.live))
        return c


PARAMS = {"cart": {"rank": 0.5, "svd": "exact"}, "ties": {"density": 0.5}, "dare": {"p": 0.3}, "slerp": {"t": 0.3}}
MODEL_COUNT = {"slerp": 1, "nuslerp": 2, "passthrough": 1}  # methods that take a fixed number of models (slerp: + the base)


# No method is exempt: the native element-wise ops that read every input at once hand a lazy sequence to their
# torch twins (the `reads_all` rule of centered_merge/ops/table.py), karcher reads its inputs one at a time per
# pass, and cart keys a lazy sequence by content one input at a time.


def _cases():
    for backend in ("torch", "auto"):
        for method in available():
            yield pytest.param(backend, method, id=f"{backend}-{method}")


@pytest.mark.parametrize("backend, method", list(_cases()))
@pytest.mark.parametrize("T", [3, 8])
def test_at_most_two_inputs_resident(backend, method, T, monkeypatch):
    monkeypatch.setenv("CENTERED_MERGE_BACKEND", backend)
    T = MODEL_COUNT.get(method, T)
    base, models = make_state_dicts(T=T, dtype=torch.bfloat16, with_int=False)
    m = get_method(method, **PARAMS.get(method, {}))
    gc.disable()  # only reference counts free tensors
    try:
        for k in base:
            probe = Probe([sd[k] for sd in models])
            b = base[k] if m.needs_base else None
            got = m.merge_tensor(k, probe, b)
            assert torch.equal(got, m.merge_tensor(k, [sd[k] for sd in models], b)), k
            assert probe.peak[0] <= 2, (method, k, probe.peak[0])
    finally:
        gc.enable()


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("method", ["weight_average", "linear", "task_arithmetic", "karcher"])
def test_lazy_inputs_same_bytes_in_the_output_dtype(backend, method, monkeypatch):
    # what the engine writes (merge_tensor_to: the fused kernels convert on the way) is the same from a lazy
    # sequence (torch twins, one input at a time) as from a list (native kernels, all inputs at once)
    monkeypatch.setenv("CENTERED_MERGE_BACKEND", backend)
    base, models = make_state_dicts(T=5, dtype=torch.bfloat16, with_int=False)
    m = get_method(method)
    for k in base:
        b = base[k] if m.needs_base else None
        probe = Probe([sd[k] for sd in models])
        got, bad = m.merge_tensor_to(k, probe, b, torch.bfloat16)
        want, want_bad = m.merge_tensor_to(k, [sd[k] for sd in models], b, torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want) and bad == want_bad, k
        assert probe.peak[0] <= 2, (method, k, probe.peak[0])
