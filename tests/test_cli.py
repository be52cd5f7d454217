"""The centered-merge command: merge (flags or a mergekit-style YAML), --dry-run, info, lab; config mapping."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from centered_merge.cli import main
from centered_merge.config import from_mapping, load_config
from centered_merge.errors import MergeConfigError

from _engine_util import make_state_dicts, save_models, tree_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpts(tmp_path):
    base, models = make_state_dicts(T=3)
    return save_models(tmp_path, base, models, "dir")


@pytest.mark.parametrize("method,flags", [
    ("cart", ["--rank", "0.25", "--lambda", "1.5", "--seed", "1"]),
    ("weight_average", ["--weights", "1", "1", "2"]),
    ("task_arithmetic", ["--lambda", "0.5"]),
    ("ties", ["--density", "0.4"]),
])
def test_merge_each_method(tmp_path, ckpts, method, flags, capsys):
    base, models = ckpts
    out = tmp_path / "out"
    rc = main(["merge", *models, "--method", method, "--base", base, "--out", str(out), "--quiet", *flags])
    assert rc == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert capsys.readouterr().err == ""  # --quiet: no bar, no summary


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, ckpts, capsys):
    base, models = ckpts
    rc = main(["merge", *models, "--method", "cart", "--rank", "4", "--out", str(tmp_path / "o"), "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "o").exists()
    assert "model.layers.0.self_attn.q_proj.weight" in text and "low rank k=4" in text
    assert "GFLOP" in text and "estimated peak memory" in text and "copied" in text


def test_info(ckpts, capsys):
    assert main(["info", ckpts[0]]) == 0
    text = capsys.readouterr().out
    assert "model.embed_tokens.weight" in text and "40x16" in text and "bfloat16" in text
    assert "9 tensors" in text


def test_yaml_config_mergekit_shape(tmp_path, ckpts):
    base, models = ckpts
    cfg = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": base}] + [{"model": m, "parameters": {"weight": 1.0, "density": 0.4}} for m in models],
        "parameters": {"lambda": 0.8, "normalize": True},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "a"), "-q"]) == 0
    assert main(["merge", *models, "--method", "ties", "--base", base, "--density", "0.4", "--lambda", "0.8",
                 "--out", str(tmp_path / "b"), "-q"]) == 0
    a = tree_bytes(tmp_path / "a")
    assert a.pop("mergekit_config.yml") == (tmp_path / "merge.yaml").read_bytes()  # the config as given
    assert a == tree_bytes(tmp_path / "b")


def test_yaml_cart_params_and_relative_paths(tmp_path, ckpts):
    base, models = ckpts
    cfg = {"merge_method": "cart", "models": [{"model": Path(m).name} for m in models],
           "parameters": {"lambda": 1.7, "rank": 0.3, "svd": "exact"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    req = load_config(tmp_path / "c.yaml")  # model paths relative to the config file
    assert req["method"] == "cart" and req["params"] == {"lam": 1.7, "rank": 0.3, "svd": "exact"}
    assert req["models"] == [str(Path(m)) for m in models]
    assert main(["merge", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "-q"]) == 0


def test_config_mapping_rules():
    m = lambda **kw: {"models": [{"model": "a"}, {"model": "b"}], **kw}  # noqa: E731
    assert from_mapping(m(merge_method="linear"))["method"] == "linear"
    assert from_mapping(m(merge_method="model_soup"))["method"] == "weight_average"
    r = from_mapping({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                           {"model": "b", "parameters": {"weight": 3}}]})
    assert r["params"] == {"weight": [1.0, 3.0]}
    # per-model weights that differ reach task arithmetic as they are; mergekit's lambda default is 1.0
    r = from_mapping({**m(merge_method="task_arithmetic", base_model="base", parameters={"lambda": 0.5}),
                      "models": [{"model": "a", "parameters": {"weight": 0.7}},
                                 {"model": "b", "parameters": {"weight": 0.3}}]})
    assert r["params"] == {"lam": 0.5, "weight": [0.7, 0.3]} and r["base"] == "base"
    assert from_mapping(m(merge_method="task_arithmetic", base_model="x"))["params"] == {"lam": 1.0}
    r = from_mapping(m(merge_method="ties", base_model="x"))
    assert r["params"] == {"density": 1.0}  # mergekit's default density
    r = from_mapping(m(merge_method="ties", base_model="x", parameters={"density": 0.2, "lambda": 2}))
    assert r["params"] == {"density": 0.2, "lam": 2}
    r = from_mapping(m(merge_method="cart", parameters={"lambda": 2.0, "rank": 16, "seed": 5}, dtype="bfloat16"))
    assert r["params"] == {"lam": 2.0, "rank": 16, "seed": 5} and r["dtype"] == "bfloat16"
    bad = [
        (m(merge_method="frankenmerge"), "frankenmerge.*not supported"),
        (m(merge_method="ties", base_model="x", parameters={"density": [0.1, "x"]}), "density .gradient entry 1."),
        (m(merge_method="cart", parameters={"rank": [0.1, 0.2]}), "rank must be"),
        ({"merge_method": "linear", "slices": []}, "'slices' must be a non-empty list"),
        (m(merge_method="linear", tokenizer_source="union"), "union"),
        (m(merge_method="linear", tokenizer={"source": "base", "tokens": {}}), "tokenizer.tokens"),
        (m(merge_method="linear", tokenizer_source="base", tokenizer={"source": "base"}), "not both"),
        (m(), "merge_method"),
        ({"merge_method": "linear", "models": []}, "models"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "slices": [{}]}, "exactly one of"),
    ]
    for cfg, pattern in bad:
        with pytest.raises(MergeConfigError, match=pattern):
            from_mapping(cfg)


def test_ignored_parameters_warn_once_naming_them(tmp_path, ckpts, capsys):
    """mergekit ignores parameters a method does not take (task arithmetic's density); so do we, with one warning."""
    with pytest.warns(UserWarning, match=r"task_arithmetic ignores parameters\.frobnicate, "
                                         r"models\[0\]\.parameters\.density") as rec:
        r = from_mapping({"merge_method": "task_arithmetic", "base_model": "x", "parameters": {"frobnicate": 1},
                          "models": [{"model": "a", "parameters": {"density": 0.5, "weight": 1}}, {"model": "b"}]})
    assert len(rec) == 1 and r["params"] == {"lam": 1.0, "weight": 1}
    base, models = ckpts
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": base, "models": [
        {"model": mp, "parameters": {"weight": 0.5, "density": 0.3}} for mp in models]}))
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "o"), "-q"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "models[0].parameters.density" in err


def test_usage_errors(tmp_path, ckpts, capsys):
    base, models = ckpts
    assert main(["merge", "--out", str(tmp_path / "o")]) == 1
    assert "no models given" in capsys.readouterr().err
    assert main(["merge", *models, "--method", "cart", "--config", "x.yaml", "--out", "o"]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["merge", *models, "--method", "weight_average", "--rank", "3", "--out", str(tmp_path / "o")]) == 1
    assert "does not take parameter(s) rank" in capsys.readouterr().err
    assert main(["merge", *models, "--method", "nope", "--out", str(tmp_path / "o")]) == 1
    assert "unknown merge method 'nope'" in capsys.readouterr().err
    assert main(["merge", *models]) == 1
    assert "--out DIR is required" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["merge", *models, "--device", "cuda", "--out", str(tmp_path / "o")]) == 1
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["merge", *models, "--device", "tpu", "--out", str(tmp_path / "o")]) == 1
    assert "device 'tpu'" in capsys.readouterr().err
    assert main(["merge", *models, "--shard-size", "big", "--out", str(tmp_path / "o")]) == 1
    assert "shard size 'big'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["merge", *models, "--rank", "lots"])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()


def test_lab_dispatch(monkeypatch, capsys):
    import types

    fake = types.ModuleType("centered_merge.lab")
    fake.main = lambda argv: 0 if argv == ["--profile", "demo"] else 3
    monkeypatch.setitem(sys.modules, "centered_merge.lab", fake)
    assert main(["lab", "--profile", "demo"]) == 0
    assert main(["lab", "other"]) == 3
    monkeypatch.setitem(sys.modules, "centered_merge.lab", None)  # as if absent
    assert main(["lab"]) == 1
    assert "centered_merge.lab" in capsys.readouterr().err


def test_python_dash_m(tmp_path, ckpts):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base, models = ckpts
    r = subprocess.run([sys.executable, "-m", "centered_merge", "merge", *models[:2], "--method", "weight_average",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr and "100%" in r.stderr
    assert load_file(str(tmp_path / "o" / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16
    # the command leaves through os._exit after merge/info: what it printed must still all arrive, through a pipe
    r = subprocess.run([sys.executable, "-m", "centered_merge", "info", str(tmp_path / "o")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tensor") and "tensors," in r.stdout.splitlines()[-1]
    r = subprocess.run([sys.executable, "-m", "centered_merge", "merge", *models[:2], "--method", "weight_average",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("centered-merge: error:"), r.stderr  # exists: refused, code kept


def test_cart_indices_from_flags_and_yaml(tmp_path, ckpts, capsys):
    """--indices 0-1 and a YAML list reach CART's indices mode (k = 2 on every low-rank matrix)."""
    base, models = ckpts
    rc = main(["merge", *models, "--method", "cart", "--indices", "0-1", "--out", str(tmp_path / "o"), "--dry-run"])
    assert rc == 0 and "low rank k=2" in capsys.readouterr().out
    req = from_mapping({"merge_method": "cart", "models": models, "parameters": {"indices": [0, 1], "lambda": 1.0}})
    assert req["params"]["indices"] == [0, 1]
    out = tmp_path / "y"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "cart", "models": models, "parameters": {"indices": [0, 1]}}))
    assert main(["merge", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    flags = tmp_path / "f"
    assert main(["merge", *models, "--method", "cart", "--indices", "0,1", "--out", str(flags), "--quiet"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(flags / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
