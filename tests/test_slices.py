"""mergekit's `slices:` for every method, with its parameter precedence (slice source > slice > global) and
gradients evaluated over each slice's own layers; hand-worked values on 2-layer models built here."""
import json
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from centered_merge.cli import main
from centered_merge.config import from_mapping
from centered_merge.errors import MergeConfigError


def model(d, offset, layers=2):
    d.mkdir()
    sd = {"model.embed_tokens.weight": torch.full((4, 2), offset), "model.norm.weight": torch.full((2,), offset)}
    for i in range(layers):
        sd[f"model.layers.{i}.mlp.w"] = torch.full((2, 2), offset + i)
        sd[f"model.layers.{i}.self_attn.q"] = torch.full((2, 2), offset + i)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": layers, "model_type": "llama"}))
    return str(d)


def merged(tmp_path, cfg, name="o"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["merge", "--config", str(p), "--out", str(tmp_path / name), "-q"]) == 0
    return {k: float(v.flatten()[0]) for k, v in load_file(str(tmp_path / name / "model.safetensors")).items()}


def test_passthrough_precedence_source_slice_global(tmp_path):
    a, b = model(tmp_path / "a", 1.0), model(tmp_path / "b", 10.0)
    got = merged(tmp_path, {"merge_method": "passthrough", "dtype": "float32",
                            "parameters": {"scale": [{"filter": "norm", "value": 7}, {"filter": "self_attn", "value": 5}]},
                            "slices": [
                                {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"scale": 2}}],
                                 "parameters": {"scale": 3}},
                                {"sources": [{"model": b, "layer_range": [0, 2]}],
                                 "parameters": {"scale": [{"filter": "mlp", "value": [0, 1]}]}}]})
    # slice 0: the source's scale 2 beats the slice's 3 and the global filter list
    assert [got[f"model.layers.{i}.mlp.w"] for i in (0, 1)] == [2.0, 4.0]
    assert [got[f"model.layers.{i}.self_attn.q"] for i in (0, 1)] == [2.0, 4.0]
    # slice 1: the gradient [0, 1] runs over the slice's own two layers (t = 0, 1), not the output's four
    assert [got[f"model.layers.{i}.mlp.w"] for i in (2, 3)] == [0.0, 11.0]
    # no slice value for self_attn there: the global filter list (5) applies
    assert [got[f"model.layers.{i}.self_attn.q"] for i in (2, 3)] == [50.0, 55.0]
    assert got["model.embed_tokens.weight"] == 2.0  # embeddings: the first slice's values
    assert got["model.norm.weight"] == 70.0  # final norm: the last slice's, falling through to the global filter


def test_linear_slices_equal_models_form_and_vary_per_slice(tmp_path):
    a, b = model(tmp_path / "a", 0.0), model(tmp_path / "b", 10.0)
    by_models = merged(tmp_path, {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": a, "parameters": {"weight": 0.75}}, {"model": b, "parameters": {"weight": 0.25}}]}, "m")
    by_slices = merged(tmp_path, {"merge_method": "linear", "dtype": "float32", "slices": [{"sources": [
        {"model": a, "layer_range": [0, 2], "parameters": {"weight": 0.75}},
        {"model": b, "layer_range": [0, 2], "parameters": {"weight": 0.25}}]}]}, "s")
    assert by_models == by_slices and by_models["model.layers.1.mlp.w"] == pytest.approx(0.75 * 1 + 0.25 * 11)
    two = merged(tmp_path, {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 0.5}, "slices": [
        {"sources": [{"model": a, "layer_range": [0, 1]}, {"model": b, "layer_range": [0, 1]}]},
        {"sources": [{"model": a, "layer_range": [1, 2], "parameters": {"weight": 1.0}},
                     {"model": b, "layer_range": [1, 2], "parameters": {"weight": 3.0}}]}]}, "two")
    assert two["model.layers.0.mlp.w"] == pytest.approx(5.0)  # the global 0.5/0.5
    assert two["model.layers.1.mlp.w"] == pytest.approx((1 * 1 + 3 * 11) / 4)  # normalized 1:3


def test_task_arithmetic_slices_with_the_base_among_sources(tmp_path):
    base, ft = model(tmp_path / "base", 0.0), model(tmp_path / "ft", 4.0)
    got = merged(tmp_path, {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32", "slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]},
                     {"model": ft, "layer_range": [0, 2], "parameters": {"weight": [0.5, 1.0]}}]}]})
    assert got["model.layers.0.mlp.w"] == pytest.approx(0 + 0.5 * 4)  # base + w * (ft - base), t = 0
    assert got["model.layers.1.mlp.w"] == pytest.approx(1 + 1.0 * 4)  # t = 1
    with pytest.raises(MergeConfigError, match="exactly once among its sources"):
        from_mapping({"merge_method": "task_arithmetic", "base_model": base,
                      "slices": [{"sources": [{"model": ft, "layer_range": [0, 2]}]}]})


def test_slice_rules_and_ignored_parameters(tmp_path):
    a, b = model(tmp_path / "a", 0.0), model(tmp_path / "b", 1.0)
    with pytest.raises(MergeConfigError, match="same number of layers"):
        from_mapping({"merge_method": "linear", "slices": [{"sources": [
            {"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 1]}]}]})
    with pytest.raises(MergeConfigError, match="different numbers of sources"):
        from_mapping({"merge_method": "linear", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 1]}, {"model": b, "layer_range": [0, 1]}]},
            {"sources": [{"model": a, "layer_range": [1, 2]}]}]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        req = from_mapping({"merge_method": "linear", "slices": [{"parameters": {"density": 0.5}, "sources": [
            {"model": a, "layer_range": [0, 2], "parameters": {"density": 0.2}},
            {"model": b, "layer_range": [0, 2]}]}]})
    for m in req["models"]:
        m.close()
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "slices[0].parameters.density" in msg and "slices[0].sources[0].parameters.density" in msg
