"""Hostile input the engine refuses cleanly (issue 9, item 6): special output paths, FIFOs and device files as
inputs, bad shard sizes, NaN/Inf with CART under --allow-nonfinite, float32 overflow of finite inputs. Each: one
line naming the file / tensor, exit code 1, no traceback, nothing at the output path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from centered_merge.cli import main

from _engine_util import leftovers, make_state_dicts, save_models

ROOT = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


def one_error(rc, err, *patterns):
    assert rc == 1, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("centered-merge: error:")]
    assert len(lines) == 1, err
    for p in patterns:
        assert p in lines[0], (p, err)


@pytest.fixture
def dirs(tmp_path):
    return save_models(tmp_path, *make_state_dicts(T=2, dtype=torch.float32), kind="dir")


def test_output_dot_and_the_current_directory(tmp_path, dirs, capsys, monkeypatch):
    _, models = dirs
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path)):
        rc, err = run(["merge", *models, "--method", "weight_average", "--out", out, "--overwrite", "-q"], capsys)
        one_error(rc, err)
        assert "current directory" in err or "directory name of its own" in err, err
    assert (work / "keep.txt").read_text() == "x" and sorted(os.listdir(work)) == ["keep.txt"]


def test_output_mount_point_and_root(tmp_path, dirs, capsys):
    _, models = dirs
    mount = next((m for m in ("/proc", "/sys", "/dev") if os.path.ismount(m)), None)
    if mount is not None:
        rc, err = run(["merge", *models, "--method", "weight_average", "--out", mount, "--overwrite", "-q"], capsys)
        one_error(rc, err, f"{mount}: is a mount point")
    rc, err = run(["merge", *models, "--method", "weight_average", "--out", "/", "--overwrite", "-q"], capsys)
    one_error(rc, err, "directory name of its own")


def test_output_regular_file_even_with_overwrite(tmp_path, dirs, capsys):
    _, models = dirs
    f = tmp_path / "out"
    f.write_text("precious")
    rc, err = run(["merge", *models, "--method", "weight_average", "--out", str(f), "--overwrite", "-q"], capsys)
    one_error(rc, err, "exists and is not a directory", "--overwrite replaces directories only")
    assert f.read_text() == "precious"


def test_output_is_an_input_directory_or_inside_one(tmp_path, dirs, capsys):
    base, models = dirs
    before = sorted(os.listdir(models[0]))
    rc, err = run(["merge", *models, "--method", "weight_average", "--out", models[0], "--overwrite", "-q"], capsys)
    one_error(rc, err, "holds the merge's input", "never replaces its own inputs")
    assert sorted(os.listdir(models[0])) == before
    rc, err = run(["merge", *models, "--method", "ties", "--base", base, "--out", str(tmp_path), "--overwrite",
                   "-q"], capsys)
    one_error(rc, err, "holds the merge's input")
    inside = Path(models[1]) / "merged"
    rc, err = run(["merge", *models, "--method", "weight_average", "--out", str(inside), "-q"], capsys)
    one_error(rc, err, "is inside the input directory")
    assert not inside.exists() and leftovers(models[1], "merged") == []


def test_fifo_and_device_file_as_input(tmp_path, dirs):
    """Run as a subprocess with a timeout: opening a FIFO would block forever."""
    _, models = dirs
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    inside = Path(models[1]) / "model-extra.safetensors"
    os.mkfifo(inside)  # a FIFO among an HF directory's weight files
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for bad, what in ((str(fifo), "is a FIFO"), ("/dev/zero", "is a device file"), (models[1], "is a FIFO")):
        r = subprocess.run([sys.executable, "-m", "centered_merge", "merge", models[0], bad, "--method",
                            "weight_average", "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True,
                           env=env, timeout=60)
        one_error(r.returncode, r.stderr, what)
        assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("size", ["0", "-5", "inf", "-inf", "nan", "1e400", "lots", "", "0.4", "5XB"])
def test_bad_shard_sizes(tmp_path, dirs, capsys, size):
    _, models = dirs
    rc, err = run(["merge", *models, "--method", "weight_average", f"--shard-size={size}",
                   "--out", str(tmp_path / "out"), "-q"], capsys)
    one_error(rc, err, "shard size")
    assert leftovers(tmp_path, "out") == []
    rc, err = run(["merge", *models, "--method", "weight_average", f"--shard-size={size}", "--dry-run"], capsys)
    one_error(rc, err, "shard size")


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_with_cart_under_allow_nonfinite(tmp_path, capsys, svd, bad):
    _, models = make_state_dicts(T=2, dtype=torch.float32)
    models[1]["model.layers.0.self_attn.o_proj.weight"][3, 4] = bad
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(m, paths[-1])
    rc, err = run(["merge", *paths, "--method", "cart", "--svd", svd, "--allow-nonfinite",
                   "--out", str(tmp_path / "out"), "-q"], capsys)
    one_error(rc, err, "'model.layers.0.self_attn.o_proj.weight' in", "m1.safetensors", "takes an SVD")
    assert leftovers(tmp_path, "out") == []


def test_finite_inputs_whose_float32_sum_overflows(tmp_path, capsys):
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.full((4,), 3e38)} for _ in range(2)]  # finite; 2 * 3e38 is not
    paths = []
    for name, sd in [("base", base), ("m0", models[0]), ("m1", models[1])]:
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file(sd, paths[-1])
    rc, err = run(["merge", *paths[1:], "--base", paths[0], "--method", "task_arithmetic", "--lambda", "1",
                   "--out", str(tmp_path / "out"), "-q"], capsys)
    one_error(rc, err, "merged tensor 'w'", "inputs are finite", "float32 computation overflowed")
    assert "output dtype" not in err
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("method", ["task_arithmetic", "weight_average", "linear"])
def test_fused_methods_tell_overflow_from_conversion(tmp_path, capsys, method):
    # the fused kernels write the output dtype directly; the core still says which step made the NaN/Inf
    base = {"w": torch.zeros(4)}
    for case, value, out_dtype, words in [("sum", 3e38, "bfloat16", "float32 computation overflowed"),
                                          ("conv", 7e4, "float16", "after conversion to float16")]:
        if method == "linear" and case == "sum":
            continue  # linear's normalised weights scale each model before the sum: no float32 overflow here
        m = [{"w": torch.full((4,), value)} for _ in range(2)]
        if method == "weight_average" and case == "sum":
            m[1]["w"] = torch.full((4,), 3.4e38)  # the plain mean sums first: 3e38 + 3.4e38 overflows
        paths = []
        for name, sd in [("base", base), ("m0", m[0]), ("m1", m[1])]:
            paths.append(str(tmp_path / f"{case}{name}.safetensors"))
            save_file(sd, paths[-1])
        extra = ["--base", paths[0], "--lambda", "1"] if method == "task_arithmetic" else []
        rc, err = run(["merge", *paths[1:], *extra, "--method", method, "--out-dtype", out_dtype,
                       "--out", str(tmp_path / f"out{case}"), "-q"], capsys)
        one_error(rc, err, "merged tensor 'w'", words)
        assert leftovers(tmp_path, f"out{case}") == []
