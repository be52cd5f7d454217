"""Writer: streamed shards that safetensors reads back, an index, copied files, atomic publish."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from centered_merge.errors import MergeConfigError, MergeOutputError
from centered_merge.io import HFDirectory, ShardedWriter, parse_size
from centered_merge.io.base import TensorInfo
from centered_merge.io.writer import copy_model_files, plan_shards

from _engine_util import leftovers, make_state_dicts


def _items(sd):
    return [(k, TensorInfo(tuple(v.shape), v.dtype)) for k, v in sd.items()]


def _write(out, sd, **kw):
    w = ShardedWriter(out, _items(sd), **kw)
    for k in w.order:
        w.write(k, sd[k])
    return w


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5kb") == 1500
    assert parse_size(1234) == 1234
    assert parse_size("1e6") == 10**6
    for bad in ("lots", "0", "-5MB"):
        with pytest.raises(MergeConfigError):
            parse_size(bad)


def test_single_shard_and_mixed_dtypes_aligned(tmp_path):
    sd = {"h": torch.randn(3, 5).half(), "i": torch.arange(7), "f": torch.randn(5), "b": torch.tensor([True, False]),
          "s": torch.tensor(2.5, dtype=torch.bfloat16), "e": torch.zeros(0, 3)}
    _write(tmp_path / "o", sd).commit()
    files = sorted(os.listdir(tmp_path / "o"))
    assert files == ["model.safetensors"]
    back = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k])
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_sharding_and_index(tmp_path):
    sd = make_state_dicts(T=1)[1][0]
    _write(tmp_path / "o", sd, shard_size=2000).commit(card="# card\n")
    idx = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    for s in shards:  # every shard respects the limit unless a single tensor is larger
        assert os.path.getsize(tmp_path / "o" / s) < 2000 + 1024 or len(load_file(str(tmp_path / "o" / s))) == 1
    src = HFDirectory(tmp_path / "o")
    for k, v in sd.items():
        assert torch.equal(src.get(k), v)
    assert (tmp_path / "o" / "README.md").read_text() == "# card\n"


def test_plan_shards_big_tensor_alone():
    i = lambda n: TensorInfo((n,), torch.float32)  # noqa: E731
    shards = plan_shards([("a", i(10)), ("b", i(1000)), ("c", i(10))], 100)
    assert [[n for n, _ in s] for s in shards] == [["a"], ["b"], ["c"]]


def test_refuses_non_empty_output_and_overwrites_on_request(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    sd = {"w": torch.ones(2)}
    with pytest.raises(MergeOutputError, match=r"o: output directory is not empty; pass --overwrite"):
        ShardedWriter(out, _items(sd))
    assert (out / "keep.txt").exists()
    _write(out, sd, overwrite=True).commit()
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert leftovers(tmp_path, "o") == ["o"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty, sd).commit()  # an empty directory is fine
    assert (empty / "model.safetensors").exists()


def test_abort_leaves_nothing(tmp_path):
    sd = make_state_dicts(T=1)[1][0]
    w = ShardedWriter(tmp_path / "o", _items(sd))
    w.write(w.order[0], sd[w.order[0]])
    w.abort()
    assert leftovers(tmp_path, "o") == []


def test_copy_model_files_sets_dtype(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir(), dst.mkdir()
    (src / "config.json").write_text(json.dumps({"torch_dtype": "float32", "hidden_size": 4}))
    for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
              "tokenizer_extra.txt"):
        (src / n).write_text("{}")
    (src / "model.safetensors").write_text("not copied")
    copied = copy_model_files(src, dst, torch.bfloat16)
    assert "model.safetensors" not in copied and "tokenizer_extra.txt" in copied
    assert json.loads((dst / "config.json").read_text()) == {"torch_dtype": "bfloat16", "hidden_size": 4}
    assert (dst / "generation_config.json").exists() and (dst / "tokenizer.json").exists()


def test_missing_parents_are_created(tmp_path):
    _write(tmp_path / "a" / "b" / "o", {"w": torch.ones(2)}).commit()
    assert (tmp_path / "a" / "b" / "o" / "model.safetensors").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(MergeOutputError, match="not a directory"):
        ShardedWriter(tmp_path / "f" / "o", _items({"w": torch.ones(2)}))


def test_production_order_starts_with_a_large_final_tensor(tmp_path):
    """The layout's order, except that a final tensor larger than the average comes first (its write would
    otherwise be the one that nothing overlaps); the file layout is unchanged."""
    from centered_merge.io.writer import production_order

    info = {n: TensorInfo(s, torch.bfloat16) for n, s in
            [("embed", (64, 8)), ("q", (8, 8)), ("norm", (8,)), ("lm_head", (64, 8))]}
    assert production_order(list(info), info) == ["lm_head", "embed", "q", "norm"]
    assert production_order(["embed", "q", "lm_head", "norm"], info) == ["embed", "q", "lm_head", "norm"]
    assert production_order(["q", "norm"], info) == ["q", "norm"]  # norm is below the average
    assert production_order(["q"], info) == ["q"] and production_order([], info) == []
    sd = {n: torch.randn(i.shape).to(torch.bfloat16) for n, i in info.items()}
    w = _write(tmp_path / "out", sd)
    assert w.order[0] == "lm_head"
    w.finish([0])
    w.commit()
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(back[n], sd[n]) for n in sd)
    slots = w.layout.slots  # written first, but its bytes are still the file's last
    assert slots["lm_head"].offset > max(slots[n].offset for n in ("embed", "q", "norm"))
