"""Readers: every input kind gives the same tensors, lazily, with clear errors for broken files."""
import json

import pytest
import torch
from safetensors.torch import save_file

from centered_merge.errors import MergeInputError
from centered_merge.io import HFDirectory, SafetensorsFile, StateDictSource, TorchFile, open_model
from centered_merge.io.writer import ShardedWriter
from centered_merge.io.base import TensorInfo

from _engine_util import make_state_dicts


@pytest.fixture
def sd():
    return make_state_dicts(T=1)[1][0]


def _same(src, sd):
    assert sorted(src.keys()) == sorted(sd)
    for k, v in sd.items():
        assert src.info(k) == TensorInfo(tuple(v.shape), v.dtype)
        assert torch.equal(src.get(k), v)


@pytest.mark.parametrize("mode", ["auto", "pread"])
def test_safetensors_file_modes(tmp_path, sd, mode):
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p))
    src = SafetensorsFile(p, mode=mode)
    if mode == "auto" and not lease_possible(p):
        pytest.skip("no file leases here: auto falls back to pread")
    assert src.mode == ("map" if mode == "auto" else "pread")
    _same(src, sd)
    a, b = src.get("model.embed_tokens.weight"), src.get("model.embed_tokens.weight")
    # map: two views of the same mapped bytes; pread: two private copies
    assert (a.data_ptr() == b.data_ptr()) == (mode == "auto")
    a.zero_()  # writing into what get returned never reaches the file (MAP_PRIVATE, or a copy)
    assert torch.equal(SafetensorsFile(p, mode="pread").get("model.embed_tokens.weight"),
                       sd["model.embed_tokens.weight"])
    assert src.total_bytes() == sum(v.numel() * v.element_size() for v in sd.values())
    assert src.keys() == sorted(sd, key=lambda k: src.byte_range(k)[0])  # file order
    src.close()


def lease_possible(p) -> bool:
    return SafetensorsFile(p).mode == "map"


def test_read_into_reused_buffer_and_byte_ranges(tmp_path, sd):
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p))
    for src in (SafetensorsFile(p), StateDictSource(sd, "sd")):
        buf = torch.empty(1 << 20, dtype=torch.uint8)
        for k, v in sd.items():
            raw = v.contiguous().reshape(-1).view(torch.uint8)
            n = raw.numel()
            assert torch.equal(src.read_into(k, buf[:n]), raw)
            if n >= 8:  # a byte range in the middle, into a buffer of another dtype
                out = torch.empty(2, dtype=torch.int16)
                src.read_into(k, out, offset=4)
                assert torch.equal(out.view(torch.uint8), raw[4:8])
            with pytest.raises(ValueError, match="outside tensor"):
                src.read_into(k, buf[:n + 1])
        src.close()


def test_hf_dir_with_sharded_index(tmp_path, sd):
    items = [(k, TensorInfo(tuple(v.shape), v.dtype)) for k, v in sd.items()]
    w = ShardedWriter(tmp_path / "m", items, shard_size=1500)
    for k in w.order:
        w.write(k, sd[k])
    w.commit()
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "m").glob("model-*-of-*.safetensors"))) > 1
    src = open_model(tmp_path / "m")
    assert isinstance(src, HFDirectory)
    _same(src, sd)
    assert src.file_of("lm_head.weight").endswith(".safetensors")


def test_hf_dir_index_names_missing_shard(tmp_path, sd):
    d = tmp_path / "m"
    d.mkdir()
    save_file(sd, str(d / "model-00001-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in sd}
    wm["extra.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(MergeInputError, match=r"model-00002-of-00002.safetensors: file not found.*extra.weight"):
        open_model(d)


def test_hf_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MergeInputError, match="no model weights found.*config.json"):
        open_model(tmp_path)


def test_torch_bin_weights_only_and_nested(tmp_path, sd):
    p = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": sd, "epoch": 3}, str(p))
    src = open_model(p)
    assert isinstance(src, TorchFile)
    _same(src, sd)
    (tmp_path / "d").mkdir()
    torch.save(sd, str(tmp_path / "d" / "pytorch_model.bin"))
    _same(open_model(tmp_path / "d"), sd)


class Opaque:  # pickled by reference: weights_only loading must refuse it
    def __init__(self):
        self.x = 1


def test_torch_pickle_needs_explicit_trust(tmp_path, sd):
    p = tmp_path / "m.pt"
    torch.save({**sd, "extra": Opaque()}, str(p))
    with pytest.raises(MergeInputError, match=r"m.pt: .*full pickle.*--trust-pickle"):
        open_model(p)
    _same(open_model(p, trust_pickle=True), sd)  # non-tensor entries are dropped


def test_memory_state_dict_and_module(sd):
    _same(open_model(sd), sd)
    lin = torch.nn.Linear(3, 2)
    src = open_model(lin, index=1)
    assert isinstance(src, StateDictSource) and "model #2" in src.label
    assert sorted(src.keys()) == ["bias", "weight"]
    assert not src.get("weight").requires_grad
    with pytest.raises(MergeInputError, match="not a tensor"):
        open_model({"a": 1})


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "header"])
def test_broken_safetensors_named(tmp_path, sd, damage):
    p = tmp_path / "bad.safetensors"
    save_file(sd, str(p))
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[:-200])
    elif damage == "garbage":
        p.write_bytes(b"this is not a checkpoint at all" * 3)
    elif damage == "empty":
        p.write_bytes(b"")
    else:
        p.write_bytes(data[:8] + b"X" + data[9:])  # break the JSON
    with pytest.raises(MergeInputError, match=r"bad.safetensors: .*(truncated|corrupt|not a safetensors)"):
        open_model(p)


def test_truncated_names_the_tensor(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(64, 64)}, str(p))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(MergeInputError, match=r"t.safetensors: truncated or corrupt: tensor 'b.weight'"):
        open_model(p)


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(MergeInputError, match=r"nope.safetensors: file or directory not found"):
        open_model(tmp_path / "nope.safetensors")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(MergeInputError, match="unknown checkpoint format"):
        open_model(tmp_path / "x.txt")


def test_byte_ranges_for_prefetch(tmp_path, sd):
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p))
    src = SafetensorsFile(p)
    raw = p.read_bytes()
    for k, v in sd.items():
        off, n = src.byte_range(k)
        assert raw[off:off + n] == v.contiguous().view(torch.uint8).numpy().tobytes()
        src.prefetch(k)  # a hint: must never fail
    src.close()
    open_model(tmp_path).prefetch("lm_head.weight")


def _mapped_rss_kib(addr: int) -> int:
    """Rss (KiB) of the mapping of this process that contains `addr`, from /proc/self/smaps."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= addr < hi
            elif inside and head[0] == "Rss:":
                return int(head[1])
    raise LookupError(hex(addr))


def test_release_drops_the_pages_and_keeps_live_views(tmp_path):
    # tensors of odd byte lengths, so that their ranges start and end inside pages
    g = torch.Generator().manual_seed(1)
    sd = {"a": torch.randn(3001, generator=g), "b": torch.randn(250_003, generator=g),
          "c": torch.randn(1001, generator=g), "d": torch.empty(0), "e": torch.randn(7, generator=g)}
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p))
    src = SafetensorsFile(p)
    if src.mode != "map":
        src.release("b")  # pread: nothing mapped, nothing to do
        pytest.skip("no file leases here: pread mode")
    views = {k: src.get(k) for k in sd}
    for k, v in views.items():
        assert torch.equal(v, sd[k])  # faults every page in
    addr = views["b"].data_ptr()
    try:
        before = _mapped_rss_kib(addr)
    except (OSError, LookupError):
        before = None
    for k in sd:
        src.release(k)  # every kind of range, the empty one included; pages shared with a neighbour stay
    if before is not None:
        dropped = before - _mapped_rss_kib(addr)
        assert dropped >= (250_003 * 4 - 2 * 4096) // 1024 - 4, (before, dropped)
    for k, v in views.items():  # live views read the same bytes again (the map is private and never written)
        assert torch.equal(v, sd[k]), k
    assert torch.equal(src.get("b"), sd["b"])
    src.close()
    open_model(tmp_path).release("b")  # through an HF directory: a hint that never fails
