"""Every failure of a merge: one clear message naming file / tensor, exit code != 0, nothing at the output path
that looks finished (no partial directory left either)."""
import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import centered_merge.io.direct as direct_mod
import centered_merge.io.writer as writer_mod
from centered_merge.cli import main
from centered_merge.engine import merge_checkpoints
from centered_merge.errors import MergeConfigError, MergeInputError, MergeOutputError

from _engine_util import leftovers, make_state_dicts, save_models

ROOT = Path(__file__).resolve().parents[1]



def write_safetensors(tmp_path, models):
    """Each state dict as tmp_path/m{i}.safetensors; the paths, in order."""
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(m, paths[-1])
    return paths

def run_cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def assert_clean_failure(rc, err, tmp_path, *patterns, out="out"):
    assert rc == 1
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("centered-merge: error:")]
    assert len(lines) == 1, err
    for p in patterns:
        assert p in err, (p, err)
    assert leftovers(tmp_path, out) == []


@pytest.fixture
def files(tmp_path):
    base, models = make_state_dicts(T=2, dtype=torch.float32)
    return base, models, save_models(tmp_path, base, models, "file")


def test_missing_file(tmp_path, files, capsys):
    _, _, (_, paths) = files
    rc, err = run_cli(["merge", paths[0], str(tmp_path / "gone.safetensors"), "--method", "weight_average",
                       "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(rc, err, tmp_path, "gone.safetensors: file or directory not found")


def test_truncated_safetensors(tmp_path, files, capsys):
    _, _, (_, paths) = files
    p = Path(paths[1])
    p.write_bytes(p.read_bytes()[:-300])
    rc, err = run_cli(["merge", *paths, "--method", "weight_average", "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(rc, err, tmp_path, "ft1.safetensors: truncated or corrupt: tensor")


def test_corrupt_safetensors(tmp_path, files, capsys):
    _, _, (_, paths) = files
    Path(paths[0]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    rc, err = run_cli(["merge", *paths, "--method", "weight_average", "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(rc, err, tmp_path, "ft0.safetensors: corrupt safetensors header")


def test_key_sets_differ(tmp_path, capsys):
    _, models = make_state_dicts(T=3)
    del models[1]["lm_head.weight"]
    del models[2]["model.norm.weight"]
    paths = write_safetensors(tmp_path, models)
    rc, err = run_cli(["merge", *paths, "--method", "cart", "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(rc, err, tmp_path, "m1.safetensors lacks 1 tensor(s) the others have: lm_head.weight",
                         "m2.safetensors lacks 1 tensor(s) the others have: model.norm.weight")
    assert "m0.safetensors lacks" not in err


def test_shape_mismatch(tmp_path, capsys):
    _, models = make_state_dicts(T=2)
    models[1]["model.layers.0.mlp.up_proj.weight"] = torch.zeros(32, 17, dtype=torch.bfloat16)
    paths = write_safetensors(tmp_path, models)
    rc, err = run_cli(["merge", *paths, "--method", "cart", "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(rc, err, tmp_path, "'model.layers.0.mlp.up_proj.weight'", "(32, 16)", "(32, 17)",
                         "m0.safetensors", "m1.safetensors")


def test_non_float_tensor(tmp_path, capsys):
    _, models = make_state_dicts(T=2)
    models[1]["model.norm.weight"] = torch.ones(16, dtype=torch.int32)
    paths = write_safetensors(tmp_path, models)
    rc, err = run_cli(["merge", *paths, "--method", "weight_average", "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(rc, err, tmp_path, "'model.norm.weight'", "not in", "m1.safetensors", "torch.int32")


def test_differing_integer_tensors_fail_mid_stream(tmp_path, capsys):
    _, models = make_state_dicts(T=2)
    models[1]["model.position_ids"] = torch.arange(8, dtype=torch.int64) * 2
    paths = write_safetensors(tmp_path, models)
    rc, err = run_cli(["merge", *paths, "--method", "weight_average", "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(rc, err, tmp_path, "'model.position_ids' is not floating point", "differs")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_named_and_flag_proceeds(tmp_path, capsys, bad):
    _, models = make_state_dicts(T=2, dtype=torch.float32)
    models[1]["model.layers.0.self_attn.o_proj.weight"][3, 4] = bad
    paths = write_safetensors(tmp_path, models)
    rc, err = run_cli(["merge", *paths, "--method", "cart", "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(rc, err, tmp_path, "'model.layers.0.self_attn.o_proj.weight' in",
                         "m1.safetensors holds 1 NaN/Inf value(s)", "--allow-nonfinite")
    rc, err = run_cli(["merge", *paths, "--method", "weight_average", "--out", str(tmp_path / "out"),
                       "--allow-nonfinite", "-q"], capsys)
    assert rc == 0 and (tmp_path / "out" / "model.safetensors").exists()
    assert "centered-merge: warning: tensor 'model.layers.0.self_attn.o_proj.weight' in" in err
    with pytest.warns(UserWarning, match="o_proj.weight"):  # the API warns
        merge_checkpoints(paths, tmp_path / "api", method="weight_average", allow_nonfinite=True, progress=False)


def test_overflow_in_output_dtype(tmp_path, capsys):
    _, models = make_state_dicts(T=2, dtype=torch.float32)
    models[0]["model.norm.weight"][0] = 1e6  # finite in float32, not in float16
    paths = write_safetensors(tmp_path, models)
    rc, err = run_cli(["merge", *paths, "--method", "weight_average", "--out-dtype", "float16",
                       "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(rc, err, tmp_path, "merged tensor 'model.norm.weight' has 1 NaN/Inf", "float16")


def test_output_exists(tmp_path, files, capsys):
    _, _, (_, paths) = files
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("someone else's")
    rc, err = run_cli(["merge", *paths, "--method", "weight_average", "--out", str(out)], capsys)
    assert rc == 1 and "output directory is not empty; pass --overwrite" in err
    assert (out / "model.safetensors").read_text() == "someone else's"
    assert leftovers(tmp_path, "out") == ["out"]
    (tmp_path / "file").write_text("x")
    rc, err = run_cli(["merge", *paths, "--method", "weight_average", "--out", str(tmp_path / "file")], capsys)
    assert rc == 1 and "path exists and is not a directory" in err
    assert main(["merge", *paths, "--method", "weight_average", "--out", str(out), "--overwrite", "-q"]) == 0
    assert (out / "model.safetensors").stat().st_size > 100
    assert leftovers(tmp_path, "out") == ["out"]


class _FullDisk:
    """The writer's pwrite of tensor bytes (buffered or direct, io/direct.py), failing with ENOSPC once `room`
    bytes have been written."""

    room = 3000
    real = staticmethod(direct_mod.pwrite_all)

    @staticmethod
    def pwrite_all(fd, data, offset):
        n = len(memoryview(data).cast("B"))
        if _FullDisk.room < n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.room -= n
        return _FullDisk.real(fd, data, offset)


def test_disk_full_mid_way(tmp_path, files, capsys, monkeypatch):
    _, _, (_, paths) = files
    monkeypatch.setattr(direct_mod, "pwrite_all", _FullDisk.pwrite_all)
    _FullDisk.room = 3000
    rc, err = run_cli(["merge", *paths, "--method", "weight_average", "--shard-size", "2KB",
                       "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(rc, err, tmp_path, "disk full while writing tensor", "No space left on device",
                         "nothing was written to the output path")
    # the same through the API: the error type says it is about the output
    _FullDisk.room = 3000
    with pytest.raises(MergeOutputError):
        merge_checkpoints(paths, tmp_path / "out", method="weight_average", shard_size=2000, progress=False)
    assert leftovers(tmp_path, "out") == []


def test_failed_sync_on_the_syncer_thread(tmp_path, files, capsys, monkeypatch):
    """fdatasync (run by the writer's syncer thread) failing: one line naming the shard, nothing left."""
    _, _, (_, paths) = files

    def fdatasync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(writer_mod.os, "fdatasync", fdatasync)
    monkeypatch.setattr(writer_mod, "SYNC_BYTES", 0)  # a sync after every tensor
    rc, err = run_cli(["merge", *paths, "--method", "weight_average", "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(rc, err, tmp_path, "write error while writing tensors up to", "model.safetensors",
                         "nothing was written to the output path")


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))


def test_real_write_error_in_subprocess(tmp_path, files):
    """A real failing write() (file size limit) in a real process: exit code 1, nothing left."""
    _, _, (_, paths) = files
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-m", "centered_merge", "merge", *paths, "--method", "weight_average",
                        "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True, env=env,
                       preexec_fn=_limit_file_size, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "file size limit reached while writing tensor" in r.stderr and "Traceback" not in r.stderr
    assert leftovers(tmp_path, "out") == []


def test_failure_keeps_previous_output_with_overwrite(tmp_path, files, capsys):
    _, _, (_, paths) = files
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous merge")
    rc, err = run_cli(["merge", paths[0], str(tmp_path / "missing"), "--method", "weight_average",
                       "--out", str(out), "--overwrite"], capsys)
    assert rc == 1 and (out / "old.txt").read_text() == "previous merge"
    assert leftovers(tmp_path, "out") == ["out"]


def test_api_errors_are_merge_errors(tmp_path, files):
    _, models, (_, paths) = files
    with pytest.raises(MergeConfigError, match="needs a base model"):
        merge_checkpoints(paths, tmp_path / "out", method="ties", progress=False)
    with pytest.raises(MergeInputError):
        merge_checkpoints([paths[0], {"x": torch.zeros(2)}], tmp_path / "out", method="weight_average",
                          progress=False)
    assert leftovers(tmp_path, "out") == []


def test_sigterm_mid_merge_cleans_up(tmp_path):
    """A merge stopped by SIGTERM (a job scheduler's kill) exits 130 and leaves no partial directory."""
    import time

    g = torch.Generator().manual_seed(0)
    paths = []
    for t in range(3):
        sd = {f"layers.{i}.mlp.w": torch.randn(384, 384, generator=g) for i in range(60)}
        paths.append(str(tmp_path / f"m{t}.safetensors"))
        save_file(sd, paths[-1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "centered_merge", "merge", *paths, "--method", "cart", "--svd", "exact",
                          "--rank", "0.5", "--out", str(tmp_path / "out"), "-q"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not any(n.startswith(".out.partial") for n in os.listdir(tmp_path)):
            assert p.poll() is None and time.time() < deadline, "merge ended before it could be stopped"
            time.sleep(0.01)
        time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert leftovers(tmp_path, "out") == []
