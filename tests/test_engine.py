"""The streaming engine gives exactly what the in-memory API gives, for every method and input kind, with the
same bytes whatever the read-ahead depth, torch thread count (on these small tensors) or shard size."""
import json

import pytest
import torch
from safetensors.torch import load_file

import centered_merge as cm
from centered_merge.engine import merge_checkpoints, plan_merge
from centered_merge.io import HFDirectory

from _engine_util import make_state_dicts, save_models, tree_bytes

METHODS = [
    ("cart", dict(rank=0.25, lam=1.5, seed=3)),
    ("weight_average", dict(weights=[1.0, 2.0, 3.0])),
    ("task_arithmetic", dict(lam=0.4)),
    ("ties", dict(density=0.3, lam=1.0)),
]


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_engine_equals_in_memory_api(tmp_path, method, params):
    base, models = make_state_dicts(T=3)
    bpath, paths = save_models(tmp_path, base, models, "file")
    rep = merge_checkpoints(paths, tmp_path / "out", method=method, base=bpath, progress=False, **params)
    ref = cm.merge(models, method=method, base=base if method in ("task_arithmetic", "ties") else None, **params)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        assert torch.equal(got[k], ref[k]), k
    assert rep.tensors == len(ref) and rep.passthrough == 1 and rep.merged == len(ref) - 1
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"**{method}**" in card and paths[0] in card and "centered_merge" in card


def test_every_input_kind_gives_the_same_result(tmp_path):
    base, models = make_state_dicts(T=3)
    kinds = {}
    for kind in ("file", "dir", "bin"):
        (tmp_path / kind).mkdir()
        kinds[kind] = save_models(tmp_path / kind, base, models, kind)[1]
    files, dirs, bins = kinds["file"], kinds["dir"], kinds["bin"]
    mixed = [dirs[0], bins[1], models[2]]
    merge_checkpoints(files, tmp_path / "o1", method="cart", rank=0.5, progress=False)
    merge_checkpoints(mixed, tmp_path / "o2", method="cart", rank=0.5, progress=False)
    a, b = tree_bytes(tmp_path / "o1"), tree_bytes(tmp_path / "o2")
    assert a["model.safetensors"] == b["model.safetensors"]
    assert "config.json" in b and "config.json" not in a  # copied from the first model that has one
    # nn.Modules
    torch.manual_seed(0)
    mods = [torch.nn.Linear(8, 4) for _ in range(2)]
    merge_checkpoints(mods, tmp_path / "o4", method="weight_average", progress=False)
    got = load_file(str(tmp_path / "o4" / "model.safetensors"))
    assert torch.equal(got["weight"], (mods[0].weight.detach() + mods[1].weight.detach()) / 2)
    # a directory input donates its config.json, with the dtype of the output
    merge_checkpoints(dirs, tmp_path / "o3", method="weight_average", out_dtype="float32", progress=False)
    cfg = json.loads((tmp_path / "o3" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32"
    assert load_file(str(tmp_path / "o3" / "model.safetensors"))["lm_head.weight"].dtype == torch.float32


def test_byte_identical_whatever_read_ahead_threads_and_shards(tmp_path):
    base, models = make_state_dicts(T=4, dtype=torch.float16)
    bpath, paths = save_models(tmp_path, base, models, "file")
    outs = []
    before = torch.get_num_threads()
    try:
        for i, (ra, threads) in enumerate([(0, 1), (1, 2), (4, 1), (2, 2)]):
            torch.set_num_threads(threads)
            for method, params in (("cart", dict(rank=0.3, seed=7)), ("ties", dict(density=0.5))):
                out = tmp_path / f"o_{method}_{i}"
                merge_checkpoints(paths, out, method=method, base=bpath, read_ahead=ra, progress=False, **params)
                outs.append((method, tree_bytes(out)))
    finally:
        torch.set_num_threads(before)
    for method in ("cart", "ties"):
        trees = [t for m, t in outs if m == method]
        assert all(t == trees[0] for t in trees[1:]), method
    # sharded output holds the same tensors, bit for bit
    merge_checkpoints(paths, tmp_path / "sh", method="cart", rank=0.3, seed=7, shard_size=3000, progress=False)
    one = load_file(str(tmp_path / "o_cart_0" / "model.safetensors"))
    sharded = HFDirectory(tmp_path / "sh")
    assert len(list((tmp_path / "sh").glob("model-*.safetensors"))) > 1
    for k, v in one.items():
        assert torch.equal(sharded.get(k), v)


def test_seed_changes_randomized_cart(tmp_path):
    base, models = make_state_dicts(T=3, dtype=torch.float32)
    _, paths = save_models(tmp_path, base, models, "file")
    merge_checkpoints(paths, tmp_path / "a", method="cart", rank=0.25, seed=1, progress=False)
    merge_checkpoints(paths, tmp_path / "b", method="cart", rank=0.25, seed=2, progress=False)
    assert tree_bytes(tmp_path / "a") != tree_bytes(tmp_path / "b")


def test_out_dtype_and_dtype(tmp_path):
    base, models = make_state_dicts(T=2, dtype=torch.float32)
    _, paths = save_models(tmp_path, base, models, "file")
    merge_checkpoints(paths, tmp_path / "a", method="weight_average", dtype="bfloat16", progress=False)
    merge_checkpoints(paths, tmp_path / "b", method="weight_average", dtype="bfloat16", out_dtype="fp16",
                      progress=False)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a["lm_head.weight"].dtype == torch.bfloat16 and b["lm_head.weight"].dtype == torch.float16
    assert a["model.position_ids"].dtype == torch.int64  # non-float tensors keep their dtype
    ref = (models[0]["lm_head.weight"] + models[1]["lm_head.weight"]) / 2
    assert torch.equal(a["lm_head.weight"], ref.bfloat16())


def test_progress_bar_and_report(tmp_path, capsys):
    base, models = make_state_dicts(T=2)
    _, paths = save_models(tmp_path, base, models, "file")
    rep = merge_checkpoints(paths, tmp_path / "o", method="weight_average", progress=True)
    err = capsys.readouterr().err
    assert "merging" in err and f"{rep.tensors}/{rep.tensors} tensors" in err
    assert rep.bytes_read == sum(v.numel() * v.element_size() for m in models for v in m.values())
    merge_checkpoints(paths, tmp_path / "q", method="weight_average", progress=False)
    assert capsys.readouterr().err == ""
    assert set(rep.timings) == {"read", "compute", "write", "finish"}
    assert all(v >= 0 for v in rep.timings.values()) and sum(rep.timings.values()) <= rep.seconds


def test_plan(tmp_path):
    base, models = make_state_dicts(T=3)
    _, paths = save_models(tmp_path, base, models, "file")
    plan = plan_merge(paths, "cart", rank=0.25)
    rows = {r["name"]: r for r in plan["tensors"]}
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert q["lowrank"] and q["k"] == 4 and q["flops"] > 0
    assert not rows["model.norm.weight"]["lowrank"]
    assert rows["model.position_ids"]["kind"] == "passthrough"
    assert plan["peak_memory_estimate"]["host_bytes"] >= plan["largest_tensor_bytes"]
    assert plan["bytes_in"] == sum(v.numel() * v.element_size() for m in models for v in m.values())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_lazy_device_inputs_give_the_same_merge(method, params):
    """The sequence the engine hands to methods on CUDA when T inputs do not fit (copy on read) is a drop-in
    for a list: every method gives the same bits (checked on CPU; the CUDA copy is the only difference)."""
    from centered_merge.engine import LazyDeviceInputs
    from centered_merge.methods import get_method

    base, models = make_state_dicts(T=3, dtype=torch.bfloat16, with_int=False)
    m = get_method(method, **params)
    for k in base:
        xs = [sd[k] for sd in models]
        b = base[k] if m.needs_base else None
        lazy = LazyDeviceInputs(xs, torch.device("cpu"))
        assert len(lazy) == 3 and len(lazy[1:]) == 2
        assert torch.equal(m.merge_tensor(k, lazy, b), m.merge_tensor(k, xs, b)), k


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_never_holds_whole_models(tmp_path, read_ahead):
    """Only the inputs of the read-ahead window are alive at once, never T whole models."""
    import gc
    import weakref

    from centered_merge.io import StateDictSource

    live = weakref.WeakSet()
    peak = [0]

    class Tracking(StateDictSource):
        def get(self, key):
            t = super().get(key).clone()  # a fresh tensor per read: its lifetime is the engine's
            live.add(t)
            peak[0] = max(peak[0], len(live))
            return t

    T, n_tensors = 4, 40
    g = torch.Generator().manual_seed(0)
    sds = [{f"layers.{i}.w": torch.randn(8, 8, generator=g) for i in range(n_tensors)} for _ in range(T)]
    gc.disable()  # so that only reference counts free tensors
    try:
        merge_checkpoints([Tracking(sd, f"m{t}") for t, sd in enumerate(sds)], tmp_path / "o",
                          method="cart", rank=2, read_ahead=read_ahead, progress=False)
    finally:
        gc.enable()
    # T inputs for each tensor name in the window: queued (read_ahead) + being read + being merged
    window = 1 if read_ahead == 0 else read_ahead + 2
    assert T <= peak[0] <= window * T < n_tensors * T, peak[0]
