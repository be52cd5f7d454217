"""The methods mergekit users run (linear, the task-vector family, sce, passthrough), on hand-worked examples,
and the per-tensor parameter schedules (gradients, filter lists, precedence) they read."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import centered_merge as cm
from centered_merge.cli import main
from centered_merge.config import from_mapping
from centered_merge.errors import MergeConfigError
from centered_merge.methods import get_method
from centered_merge.methods import sparsify
from centered_merge.methods.schedule import Chain, Filtered, Gradient, layer_index

from _engine_util import make_state_dicts, save_models


def one(vals, dtype=torch.float32):
    return {"w": torch.tensor(vals, dtype=dtype)}


def close(got, want, tol=1e-6):
    torch.testing.assert_close(got.float(), torch.tensor(want, dtype=torch.float32), rtol=tol, atol=tol)


# -- linear and task arithmetic with per-model weights ---------------------------------------------------------
def test_linear_weights_and_normalize():
    a, b = one([1.0, 2.0]), one([3.0, 6.0])
    close(cm.merge([a, b], "linear", weight=[0.7, 0.3])["w"], [1.6, 3.2])
    close(cm.merge([a, b], "linear", weight=[1, 1], normalize=False)["w"], [4.0, 8.0])
    close(cm.merge([a, b], "linear")["w"], [2.0, 4.0])
    with pytest.raises(MergeConfigError, match="sum to 0"):
        cm.merge([a, b], "linear", weight=[1, -1])


def test_linear_normalize_rounds_as_mergekit_at_halfway_points():
    # bf16 inputs whose exact mean lies halfway between two bf16 numbers: (0.6 x1 + 0.6 x2) / 1.2 in float32, as
    # mergekit computes it, lands off the halfway point for some of them; the output must be that value rounded
    # (the 4 entries of bench/peer/parity.py's linear slices variant that differed before)
    x1 = torch.tensor([1.0, 0.96484375, 0.9765625, 0.91015625], dtype=torch.bfloat16)
    x2 = torch.tensor([0.93359375, 0.8515625, 1.109375, 1.078125], dtype=torch.bfloat16)
    m = get_method("linear", weight=[0.6, 0.6])
    got, _ = m.merge_tensor_to("t", [x1, x2], None, torch.bfloat16)
    w = torch.tensor([0.6, 0.6])
    mk = torch.zeros(4).addcmul_(x1.float(), w[0]).addcmul_(x2.float(), w[1]).div_(w.sum())
    assert torch.equal(got, mk.to(torch.bfloat16))
    assert (got != ((x1.float() + x2.float()) / 2).to(torch.bfloat16)).all()  # the exact mean rounds otherwise


def test_task_arithmetic_weights():
    """tau = [1, 0], [0, 2]; weights 0.5 and 2: base + [0.5, 4]; normalize divides by 2.5."""
    base, a, b = one([1.0, 1.0]), one([2.0, 1.0]), one([1.0, 3.0])
    close(cm.merge([a, b], "task_arithmetic", base=base, lam=1.0, weight=[0.5, 2])["w"], [1.5, 5.0])
    close(cm.merge([a, b], "task_arithmetic", base=base, lam=1.0, weight=[0.5, 2], normalize=True)["w"], [1.2, 2.6])


# -- TIES: exactly k per task, ties at the threshold to the lowest flat indices ----------------------------------
def test_ties_trim_keeps_exactly_k_lowest_index_first():
    tau = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5])
    assert sparsify.magnitude(tau, 0.4).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert sparsify.top_k_mask(torch.tensor([0.0, -2.0, 2.0, 2.0]), 2).tolist() == [False, True, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_exact_k_equal_and_unequal_weights(dtype):
    """tau1 = [1, 1, 1, 1, 0.5], tau2 = [-1, 0, 0, 0, 0], density 0.4 (k = 2 each): trimmed [1, 1, 0, 0, 0] and
    [-1, 0, ...]. Equal weights: votes [0, 1, 0, 0, 0]; a zero vote elects + (mergekit's rule), so entry 0 keeps
    model 1's +1 -> [1, 1, 0, 0, 0] (zero entries never agree). Weights 1 and 3: votes [-2, 1, ...] -> entry 0
    keeps model 2's -1 -> [-1, 1, 0, 0, 0]; without normalize the weighted sums stay: [-3, 1, 0, 0, 0]."""
    base = one([0.0] * 5, dtype)
    m1, m2 = one([1.0, 1.0, 1.0, 1.0, 0.5], dtype), one([-1.0, 0, 0, 0, 0], dtype)
    close(cm.merge([m1, m2], "ties", base=base, density=0.4)["w"], [1, 1, 0, 0, 0])
    close(cm.merge([m1, m2], "ties", base=base, density=0.4, weight=[2, 2])["w"], [1, 1, 0, 0, 0])
    close(cm.merge([m1, m2], "ties", base=base, density=0.4, weight=[1, 3])["w"], [-1, 1, 0, 0, 0])
    close(cm.merge([m1, m2], "ties", base=base, density=0.4, weight=[1, 3], normalize=False)["w"], [-3, 1, 0, 0, 0])


def test_ties_keeps_exactly_k_on_bf16_ties():
    """bf16 task vectors have many equal magnitudes; each task keeps exactly kept_count entries, and the merge
    equals mergekit's formula over the stacked, exactly trimmed, weighted task vectors."""
    from centered_merge.ops.reference import kept_count

    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    ms = [(base.float() + 0.01 * torch.randn(64, 48, generator=g)).to(torch.bfloat16) for _ in range(3)]
    taus = torch.stack([m.float() - base.float() for m in ms])
    k = kept_count(base.numel(), 0.2)
    trimmed = torch.stack([sparsify.magnitude(t, 0.2) for t in taus])
    assert all(int((t != 0).sum()) == k for t in trimmed)
    a = taus[0].abs().reshape(-1)
    assert int((a >= a.topk(k).values[-1]).sum()) > k  # the case: ties at the threshold
    w = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    d = trimmed * w
    elected = torch.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(d) == elected
    divisor = (w * agree).sum(0)
    want = base.float() + (d * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)
    got = cm.merge([{"w": m} for m in ms], "ties", base={"w": base}, density=0.2, weight=[0.5, 1.0, 2.0],
                   out_dtype=torch.float32)["w"]
    torch.testing.assert_close(got, want)


# -- DARE, breadcrumbs, DELLA: masks and rescaling ------------------------------------------------------------
def test_dare_linear_kept_fraction_rescale_and_seed():
    tau = torch.ones(100_000)
    kept = sparsify.random(tau, 0.3, seed=7, rescale=False)
    assert abs(float((kept != 0).float().mean()) - 0.3) < 0.01 and set(kept.unique().tolist()) <= {0.0, 1.0}
    resc = sparsify.random(tau, 0.3, seed=7, rescale=True)
    assert torch.equal(resc != 0, kept != 0)
    assert abs(float(resc.abs().sum()) - 100_000) < 1.0  # L1 norm matched (mergekit's rescale)
    assert torch.equal(sparsify.random(tau, 1.0, seed=7, rescale=True), tau)
    base = {"a.w": torch.zeros(4000), "b.w": torch.zeros(4000)}
    ms = [{k: torch.ones(4000) for k in base}]
    out = cm.merge(ms, "dare_linear", base=base, density=0.5, seed=1)
    assert not torch.equal(out["a.w"], out["b.w"])  # masks differ per tensor name ...
    assert torch.equal(out["a.w"], cm.merge(ms, "dare_linear", base=base, density=0.5, seed=1)["a.w"])  # ... not per run
    assert not torch.equal(out["a.w"], cm.merge(ms, "dare_linear", base=base, density=0.5, seed=2)["a.w"])


def test_dare_ties_density_one_is_ties_without_trim():
    base = one([0.0, 0.0, 0.0])
    ms = [one([1.0, -2.0, 4.0]), one([3.0, 1.0, -1.0])]
    close(cm.merge(ms, "dare_ties", base=base, normalize=True)["w"], [2.0, -2.0, 4.0])
    close(cm.merge(ms, "ties", base=base, density=1.0)["w"], [2.0, -2.0, 4.0])


def test_breadcrumbs_hand_worked():
    """n = 10, density 0.5, gamma 0.1: keep 5; drop the largest |.| (-3) and the 4 smallest (0.05, 0.1, 0.2, -0.3)."""
    tau = torch.tensor([0.1, 0.5, -3, 0.2, 2, -0.3, 0.05, 1, 0.4, 0.6])
    want = [0, 0.5, 0, 0, 2, 0, 0, 1, 0.4, 0.6]
    close(sparsify.breadcrumbs(tau, 0.5, 0.1), want)
    base = {"w": torch.zeros(10)}
    close(cm.merge([{"w": tau}], "breadcrumbs", base=base, density=0.5, gamma=0.1)["w"], want)
    # gamma 0 drops only small entries (mergekit's slice [n_bot:-0] would keep none; docs/mergekit.md)
    assert int((sparsify.breadcrumbs(tau, 0.5, 0.0) != 0).sum()) == 5


def test_della_probabilities_and_keep_rate():
    """row [1, -3, 2], density 0.5, epsilon 0.1: magnitude ranks 0, 2, 1 -> probabilities 0.4, 0.6, 0.5."""
    close(sparsify.della_probabilities(torch.tensor([[1.0, -3.0, 2.0]]), 0.5, 0.1), [[0.4, 0.6, 0.5]])
    close(sparsify.della_probabilities(torch.tensor([1.0, -3.0, 2.0]), 0.5, 0.1), [0.4, 0.6, 0.5])
    tau = torch.randn(200, 500, generator=torch.Generator().manual_seed(0))
    kept = sparsify.della(tau, 0.3, 0.1, seed=5, rescale=False)
    assert abs(float((kept != 0).float().mean()) - 0.3) < 0.01
    big = tau.abs() > tau.abs().median()
    assert float((kept != 0)[big].float().mean()) > float((kept != 0)[~big].float().mean()) + 0.05
    with pytest.raises(MergeConfigError, match=r"density - epsilon and density \+ epsilon"):
        cm.merge([{"w": tau}], "della", base={"w": torch.zeros_like(tau)}, density=0.1, epsilon=0.2)


# -- SCE and passthrough --------------------------------------------------------------------------------------
def test_sce_hand_worked():
    """tau1 = [1, 2, 0, -1], tau2 = [3, -2, 0, -1]: votes [4, 0, 0, -2] elect [+, +, +, -] (a zero sum elects +, as
    in mergekit); weights from the mean squares 1.5 and 3.5 -> 0.3 and 0.7; entry 0: 0.3*1 + 0.7*3 = 2.4; entry 1:
    only model 1's +2 agrees -> 2; entry 2: nothing nonzero -> 0; entry 3: -1."""
    base = one([0.0] * 4)
    close(cm.merge([one([1.0, 2, 0, -1]), one([3.0, -2, 0, -1])], "sce", base=base)["w"], [2.4, 2, 0, -1], 1e-5)
    # select_topk 0.5 of the 2 varying entries keeps entry 1 (variance 2.25 > 1): only model 1 agrees there
    close(cm.merge([one([1.0, 2, 0, -1]), one([3.0, -1, 0, -1])], "sce", base=base, select_topk=0.5)["w"],
          [0, 2, 0, 0], 1e-5)


def test_passthrough_scale_and_model_count():
    close(cm.merge([one([1.0, -2.0])], "passthrough")["w"], [1.0, -2.0])
    close(cm.merge([one([1.0, -2.0])], "passthrough", scale=0.5)["w"], [0.5, -1.0])
    with pytest.raises(MergeConfigError, match="exactly one model"):
        cm.merge([one([1.0]), one([2.0])], "passthrough")


# -- schedules -------------------------------------------------------------------------------------------------
def test_gradient_filter_and_chain():
    g = Gradient([0.0, 1.0], num_layers=3)
    assert [g.at(f"model.layers.{i}.mlp.w") for i in range(3)] == [0.0, 0.5, 1.0]
    assert g.at("model.embed_tokens.weight") == 0.0 and g.at("lm_head.weight") == 0.0  # outside layers: t = 0
    assert Gradient([0.0, 0.5, 1.0], num_layers=5).at("model.layers.1.x") == pytest.approx(0.25)
    assert Gradient([2.0], num_layers=None).at("model.layers.7.x") == 2.0
    with pytest.raises(MergeConfigError, match="layer count"):
        Gradient([0, 1]).at("model.layers.1.x")
    f = Filtered([("self_attn", 0.3), (None, 0.7)])
    assert f.at("model.layers.0.self_attn.q_proj.weight") == 0.3 and f.at("model.layers.0.mlp.up.weight") == 0.7
    c = Chain([Filtered([("mlp", 2.0)]), 0.5])
    assert c.at("layers.0.mlp.w") == 2.0 and c.at("layers.0.self_attn.w") == 0.5
    assert layer_index("transformer.h.11.attn.c_attn.weight") == 11 and layer_index("model.norm.weight") is None


def test_config_precedence_gradient_and_filters(tmp_path):
    """per-model over global; a filter that does not match falls through to the global value; a list is a
    gradient over the base model's num_hidden_layers."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    req = from_mapping({"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"weight": 0.5,
                        "lambda": [0.0, 1.0]},
                        "models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 2.0}]}},
                                   {"model": "b", "parameters": {"weight": [1.0, 3.0]}}]})
    m = get_method(req["method"], **req["params"])
    v = m.values("model.layers.1.mlp.up_proj.weight", 2)
    assert v.weight == [2.0, 2.0] and v.lam == 0.5
    v = m.values("model.layers.2.self_attn.q_proj.weight", 2)
    assert v.weight == [0.5, 3.0] and v.lam == 1.0
    assert m.values("model.embed_tokens.weight", 2).weight == [0.5, 1.0]
    # the merge applies them tensor by tensor
    sd = {"model.layers.1.mlp.w": torch.zeros(2), "model.layers.2.attn.w": torch.zeros(2)}
    ms = [{k: torch.ones(2) for k in sd}, {k: torch.ones(2) for k in sd}]
    out = cm.merge(ms, m, base=sd)
    close(out["model.layers.1.mlp.w"], [0.5 * (2.0 + 2.0)] * 2)  # lam 0.5 at t = 0.5
    close(out["model.layers.2.attn.w"], [1.0 * (0.5 + 3.0)] * 2)


def test_yaml_differing_weights_end_to_end(tmp_path):
    base, models = make_state_dicts(T=2, dtype=torch.float32, with_int=False)
    bp, mps = save_models(tmp_path, base, models, "dir")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": bp, "dtype": "float32", "models": [
        {"model": bp}, {"model": mps[0], "parameters": {"weight": 0.7, "density": 0.5}},
        {"model": mps[1], "parameters": {"weight": 0.3, "density": 0.5}}]}))
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "o"), "-q"]) == 0
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    want = cm.merge(models, "ties", base=base, density=0.5, weight=[0.7, 0.3])
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_passthrough_slices_stack_layers(tmp_path):
    def model(d, offset):
        d.mkdir()
        sd = {"model.embed_tokens.weight": torch.full((4, 2), offset), "model.norm.weight": torch.full((2,), offset)}
        for i in range(2):
            sd[f"model.layers.{i}.mlp.w"] = torch.full((2, 2), offset + i)
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "model_type": "llama"}))
        return str(d)

    a, b = model(tmp_path / "a", 0.0), model(tmp_path / "b", 10.0)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]}, {"sources": [{"model": b, "layer_range": [1, 2]}]}]}))
    out = tmp_path / "o"
    assert main(["merge", "--config", str(cfg), "--out", str(out), "-q"]) == 0
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == ["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.1.mlp.w",
                           "model.layers.2.mlp.w", "model.norm.weight"]
    assert [float(got[f"model.layers.{i}.mlp.w"][0, 0]) for i in range(3)] == [0.0, 1.0, 11.0]
    assert float(got["model.embed_tokens.weight"][0, 0]) == 0.0 and float(got["model.norm.weight"][0]) == 10.0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 5]}]}]}))
    assert main(["merge", "--config", str(bad), "--out", str(tmp_path / "o2"), "-q"]) == 1
    assert not Path(tmp_path / "o2").exists()


def test_tokenizer_source_rules(tmp_path, capsys):
    base, models = make_state_dicts(T=2, with_int=False)
    bp, mps = save_models(tmp_path, base, models, "dir")
    cfg = tmp_path / "t.yaml"
    for ts, rc in (("base", 0), (mps[1], 1)):
        cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": bp, "tokenizer_source": ts,
                                       "models": [{"model": m} for m in mps]}))
        out = tmp_path / f"o{rc}"
        assert main(["merge", "--config", str(cfg), "--out", str(out), "-q"]) == rc
    assert "no tokenizer files there" in capsys.readouterr().err  # the rest: tests/test_model_files.py
