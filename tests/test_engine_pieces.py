"""Elementwise merges hand large tensors to the writer in pieces (engine/pipeline.py, piece_bounds and
core.merge_tensor_in_pieces): the same bytes as whole tensors, whole-tensor non-finite messages, checksums that
resume, pieces whose inner bounds sit on aligned file offsets, and output buffers the size of a piece."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import centered_merge.engine.pipeline as pipeline
from centered_merge.cli import main
from centered_merge.engine import merge_checkpoints
from centered_merge.engine.buffers import OutputPool
from centered_merge.io.direct import BLOCK
from centered_merge.io import TensorInfo
from centered_merge.io.writer import ShardedWriter

from _engine_util import leftovers, tree_bytes

ROOT = Path(__file__).resolve().parents[1]
PIECE = 2 * BLOCK  # small pieces, so that tensors of a few tens of KB are cut
SHAPES = {"embed.weight": (301, 64), "a.weight": (129, 100), "b.bias": (37,), "c.weight": (64, 64),
          "d.weight": (3001,), "norm.weight": (5,)}
BIG = "embed.weight"
METHODS = [("weight_average", {}), ("task_arithmetic", {"lam": 0.4}), ("linear", {"weight": [1.0, 2.0, 0.5]})]


def _models(tmp_path, dtype=torch.bfloat16, T=3, bad=None):
    """base + T models as .safetensors files; bad=(model index, value) puts value at two places of BIG."""
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = [{k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
              for _ in range(T)]
    base = {k: v.to(dtype) for k, v in base.items()}
    if bad is not None:
        models[bad[0]][BIG][7, 3] = bad[1]
        models[bad[0]][BIG][250, 60] = bad[1]
    paths = []
    for name, sd in [("base", base)] + [(f"ft{i}", m) for i, m in enumerate(models)]:
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file(sd, paths[-1])
    return paths[0], paths[1:]


@pytest.fixture
def pieces(monkeypatch):
    """Small pieces; records every piece handed to the writer as (name, first byte, bytes, last)."""
    monkeypatch.setattr(pipeline, "PIECE_BYTES", PIECE)
    seen = []
    real = ShardedWriter.write_piece

    def write_piece(self, name, piece, start, last):
        seen.append((name, start, piece.numel() * piece.element_size(), last))
        return real(self, name, piece, start, last)
    monkeypatch.setattr(ShardedWriter, "write_piece", write_piece)
    return seen


@pytest.mark.parametrize("numel,esize,offset", [(1 << 20, 2, 8), (1 << 20, 4, 4096), (12345, 1, 4095),
                                                (3 * PIECE // 2, 2, 8 * 77), (PIECE - 1, 4, 0), (0, 2, 8)])
def test_piece_bounds(numel, esize, offset):
    b = pipeline.piece_bounds(numel, esize, offset, PIECE)
    if numel * esize < 2 * PIECE:
        assert b is None
        return
    assert b[0] == 0 and b[-1] == numel and all(x < y for x, y in zip(b, b[1:]))
    assert all((offset + x * esize) % BLOCK == 0 for x in b[1:-1])  # inner bounds: aligned file offsets
    sizes = [(y - x) * esize for x, y in zip(b, b[1:])]
    assert all(PIECE - BLOCK < s <= PIECE for s in sizes[:-1]) and PIECE // 2 - BLOCK <= sizes[-1] < 3 * PIECE // 2


@pytest.mark.parametrize("method,params", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("write_queue,shard_size", [(1, 5 * 10**9), (3, 40000)])
def test_pieces_write_the_same_bytes(tmp_path, monkeypatch, pieces, method, params, dtype, write_queue, shard_size):
    base, models = _models(tmp_path, dtype)
    kw = dict(method=method, progress=False, write_queue=write_queue, shard_size=shard_size, **params)
    if method == "task_arithmetic":
        kw["base"] = base
    held = []
    real_take = OutputPool.take

    def take(self, token, shape, dtype, phase=0):
        t = real_take(self, token, shape, dtype, phase)
        held.append(max(b.numel() for b in list(self._free) + list(self._used.values())))
        return t
    monkeypatch.setattr(OutputPool, "take", take)
    merge_checkpoints(models, tmp_path / "pieces", **kw)
    cut = {n for n, _, _, last in pieces if not last}
    assert BIG in cut and "a.weight" in cut and "norm.weight" not in cut
    # every piece's buffer is at most 1.5 pieces and a block: no whole-tensor buffer for the cut tensors
    big_bytes = 301 * 64 * dtype.itemsize
    assert max(held) <= max(3 * PIECE // 2, 64 * 64 * dtype.itemsize) + BLOCK < big_bytes
    pieces.clear()
    monkeypatch.setattr(pipeline, "PIECE_BYTES", 1 << 40)  # nothing cut
    merge_checkpoints(models, tmp_path / "whole", **kw)
    assert all(last for *_, last in pieces)
    assert tree_bytes(tmp_path / "pieces") == tree_bytes(tmp_path / "whole")


@pytest.mark.parametrize("method,params", METHODS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_pieces_name_a_nonfinite_input_as_whole_tensors_do(tmp_path, capsys, monkeypatch, pieces, method, params,
                                                          value):
    base, models = _models(tmp_path, torch.float32, bad=(1, value))
    argv = ["merge", *models, "--method", method, "--out", str(tmp_path / "out")]
    if method == "task_arithmetic":
        argv += ["--base", base]
    if method == "linear":
        argv += ["--weights", "1", "2", "0.5"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("centered-merge: error:")] == [
        f"centered-merge: error: tensor {BIG!r} in {tmp_path / 'ft1.safetensors'} holds 2 NaN/Inf value(s) of "
        f"{301 * 64}; pass --allow-nonfinite (API: allow_nonfinite=True) to merge anyway"], err
    assert "Traceback" not in err and leftovers(tmp_path, "out") == []
    kw = dict(method=method, progress=False, allow_nonfinite=True, **params)
    if method == "task_arithmetic":
        kw["base"] = base
    runs = []
    for piece_bytes in (PIECE, 1 << 40):
        monkeypatch.setattr(pipeline, "PIECE_BYTES", piece_bytes)
        with pytest.warns(UserWarning) as rec:
            rep = merge_checkpoints(models, tmp_path / f"ok{piece_bytes}", **kw)
        runs.append(([str(w.message) for w in rec], rep.nonfinite_inputs, tree_bytes(tmp_path / f"ok{piece_bytes}")))
    assert runs[0] == runs[1] and len(runs[0][0]) == 1
    assert any(n == BIG and not last for n, _, _, last in pieces)


def test_an_overflow_in_a_piece_is_named_for_the_tensor(tmp_path, capsys, pieces):
    """Finite inputs whose float32 sum overflows in one piece: the whole tensor's message, nothing at the output."""
    base, models = _models(tmp_path, torch.float32)
    from safetensors.torch import load_file
    for p in models[:2]:
        sd = load_file(p)
        sd[BIG][250, 60] = 3e38
        save_file(sd, p)
    assert main(["merge", *models, "--method", "linear", "--no-normalize", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"centered-merge: error: merged tensor {BIG!r} has 1 NaN/Inf value(s): its inputs are finite, but the " \
           "float32 computation overflowed" in err, err
    assert "Traceback" not in err and leftovers(tmp_path, "out") == []


KILLER = r"""
import os, signal, sys
import centered_merge.engine.pipeline as P
import centered_merge.io.writer as W
P.PIECE_BYTES = int(sys.argv[1])
W.SYNC_BYTES = 0  # journal every tensor as it is written
real, seen = W.Journal.record, [0]
def record(self, entries):
    real(self, entries)
    seen[0] += len(entries)
    if seen[0] >= int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
W.Journal.record = record
from centered_merge.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_a_killed_pieced_merge_resumes(tmp_path, capsys, monkeypatch, pieces):
    """The journal's checksum of a tensor written in pieces (xxh3, streamed) is the one resume checks on disk."""
    base, models = _models(tmp_path, torch.bfloat16)
    args = [*models, "--method", "task_arithmetic", "--base", base, "--lam", "0.5"]
    assert main(["merge", *args, "--out", str(tmp_path / "reference"), "-q"]) == 0
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    n_tensors = len(SHAPES)
    r = subprocess.run([sys.executable, "-c", KILLER, str(PIECE), "4", "merge", *args, "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    capsys.readouterr()
    assert main(["merge", *args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"resuming an interrupted merge: 4 of {n_tensors} tensors already written" in err, err
    assert tree_bytes(out) == tree_bytes(tmp_path / "reference")


def test_pieces_of_non_contiguous_torch_inputs(tmp_path, monkeypatch, pieces):
    """Torch files keep a transposed view's strides: its pieces are cut from the flat (row-major) elements all the
    same, and the bytes are the whole tensors'."""
    g = torch.Generator().manual_seed(4)
    base = {"w.weight": torch.randn(64, 300, generator=g).T, "v.weight": torch.randn(129, 100, generator=g)}
    paths = []
    for name, scale in (("base", 0.0), ("ft0", 1.0), ("ft1", 2.0)):
        sd = {k: (v + scale * 0.05 * torch.ones_like(v)).to(torch.bfloat16) for k, v in base.items()}
        sd["w.weight"] = sd["w.weight"].T.contiguous().T  # stored transposed
        assert not sd["w.weight"].is_contiguous()
        paths.append(str(tmp_path / f"{name}.bin"))
        torch.save(sd, paths[-1])
    kw = dict(method="task_arithmetic", base=paths[0], progress=False, lam=0.7)
    merge_checkpoints(paths[1:], tmp_path / "pieces", **kw)
    assert any(n == "w.weight" and not last for n, _, _, last in pieces)
    monkeypatch.setattr(pipeline, "PIECE_BYTES", 1 << 40)
    merge_checkpoints(paths[1:], tmp_path / "whole", **kw)
    assert tree_bytes(tmp_path / "pieces") == tree_bytes(tmp_path / "whole")


def test_writer_refuses_pieces_out_of_order(tmp_path):
    w = ShardedWriter(tmp_path / "out", [("x", TensorInfo((4096,), torch.float32))])
    try:
        t = torch.zeros(4096)
        w.write_piece("x", t[:1024], 0, False)
        with pytest.raises(RuntimeError, match="does not continue"):
            w.write_piece("x", t[2048:], 8192, True)  # skips bytes 4096..8191
        with pytest.raises(RuntimeError, match="does not continue"):
            w.write_piece("x", t[1024:2048], 4096, True)  # last, but not the end of the tensor
        w.write_piece("x", t[1024:], 4096, True)
        w.finish([0])
        w.commit()
    except BaseException:
        w.abort()
        raise
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["x"], t)
