"""The streaming engine on a CUDA device: `merge_checkpoints(..., device="cuda")` writes what the CPU merge
writes. Run only where a GPU exists (`make gpu-check` selects them by "cuda"); elsewhere they skip. Both of the
reader's ways onto the device are covered: the inputs of a tensor staged through pinned buffers on a side stream,
and, where they would not fit the staging budget, LazyDeviceInputs (one host-to-device copy per read).

Tolerances: the elementwise merges run the same float32 operations in the same order on both devices (the CUDA
kernels are built with --fmad=false), so their outputs must match bit for bit. CART's randomized SVD sketches in
bfloat16 on a GPU and in another dtype on most CPUs, so its merge is compared with the exact CART merge instead.
"""
import pytest
import torch
from safetensors.torch import load_file

import centered_merge as cm
from centered_merge.engine import request as request_module
from centered_merge.engine.pipeline import merge_checkpoints

from _engine_util import make_state_dicts, save_models
from conftest import decaying_matrix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ELEMENTWISE = [
    ("weight_average", dict(weights=[1.0, 2.0, 3.0])),
    ("task_arithmetic", dict(lam=0.4)),
    ("ties", dict(density=0.3, lam=1.0)),
]


def _merge(tmp_path, name, paths, bpath, method, params, device):
    out = tmp_path / name
    merge_checkpoints(paths, out, method=method, base=bpath, progress=False, device=device, **params)
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("lazy", [False, True], ids=["staged", "lazy"])
@pytest.mark.parametrize("method,params", ELEMENTWISE, ids=[m for m, _ in ELEMENTWISE])
def test_cuda_engine_writes_the_cpu_merge(tmp_path, monkeypatch, method, params, lazy):
    base, models = make_state_dicts(T=3)
    bpath, paths = save_models(tmp_path, base, models, "file")
    want = _merge(tmp_path, "cpu", paths, bpath, method, params, "cpu")
    if lazy:  # every float tensor over the budget: read onto the device one input at a time
        monkeypatch.setattr(request_module.MergeRequest, "stage_budget", lambda self: 0)
    got = _merge(tmp_path, "cuda", paths, bpath, method, params, "cuda")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("lazy", [False, True], ids=["staged", "lazy"])
def test_cuda_engine_cart_is_as_close_to_exact_cart_as_the_cpu_merge(tmp_path, monkeypatch, lazy):
    # task vectors with decaying spectra (a well-defined top-k subspace), on shapes wide enough for the
    # randomized SVD, and a bias that is averaged
    g = torch.Generator().manual_seed(5)
    base = {"a.weight": torch.randn(200, 150, generator=g), "b.weight": torch.randn(150, 200, generator=g),
            "b.bias": torch.randn(150, generator=g)}
    models = [{k: v + 1e-3 * (decaying_matrix(*v.shape, seed=10 * t + i) if v.dim() == 2 else torch.randn(
        v.shape, generator=g)) for i, (k, v) in enumerate(base.items())} for t in range(4)]
    bpath, paths = save_models(tmp_path, base, models, "file")
    params = dict(rank=0.1, lam=1.5)
    cpu = _merge(tmp_path, "cpu", paths, None, "cart", params, "cpu")
    exact = cm.cart(models, svd="exact", **params)
    avg = cm.merge(models, "weight_average")
    if lazy:
        monkeypatch.setattr(request_module.MergeRequest, "stage_budget", lambda self: 0)
    got = _merge(tmp_path, "cuda", paths, None, "cart", params, "cuda")
    assert set(got) == set(cpu)
    for k in exact:
        update = (exact[k].double() - avg[k].double()).norm().item()
        off_cpu = (cpu[k].double() - exact[k].double()).norm().item()
        off_cuda = (got[k].double() - exact[k].double()).norm().item()
        # the CPU merge's own distance (~5% of the update on these 1/i spectra; a bfloat16 sketch on the CPU gave
        # 5.18% and 7.64% against the float32 sketch's 5.09% and 7.61%), with room for the other sketch dtype's
        # rounding (1e-3 of the update) and for float32 rounding of the mean (the bias: no update at all)
        bound = 1.5 * off_cpu + 1e-3 * update + 1e-7 * exact[k].double().norm().item()
        assert off_cuda <= bound, (k, off_cuda, off_cpu, update)
