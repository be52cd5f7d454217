"""A Hugging Face model directory: sharded safetensors with model.safetensors.index.json, a single
model.safetensors, or (older repos) pytorch_model.bin, sharded or not. Shards are opened lazily per tensor."""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Dict, List

import torch

from ..errors import MergeInputError
from .base import TensorInfo, TensorSource, check_regular_file, object_without_duplicates
from .safetensors_reader import SafetensorsFile
from .torch_bin import TorchFile

ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _read_index(path: Path) -> Dict[str, str]:
    """The index's weight_map {tensor: shard file name}, checked: a JSON object whose weight_map maps strings to
    plain file names inside the directory (no absolute paths, no '..')."""
    check_regular_file(path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=object_without_duplicates)
    except OSError as e:
        raise MergeInputError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, duplicates
        raise MergeInputError(f"{path}: corrupt shard index ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              ) from None
    if not isinstance(doc, dict):
        raise MergeInputError(f"{path}: corrupt shard index (a JSON {type(doc).__name__}, not an object)")
    if "weight_map" not in doc:
        raise MergeInputError(f"{path}: corrupt shard index (no 'weight_map')")
    weight_map = doc["weight_map"]
    if not isinstance(weight_map, dict):
        raise MergeInputError(f"{path}: 'weight_map' is a JSON {type(weight_map).__name__}, not a mapping of "
                              "tensor names to shard files")
    for k, v in weight_map.items():
        if not isinstance(v, str) or not v:
            raise MergeInputError(f"{path}: 'weight_map' entry for tensor {k!r} is {str(v)[:60]!r}, not a file name")
        pv = PurePosixPath(v)
        if pv.is_absolute() or ".." in pv.parts or "\\" in v:
            raise MergeInputError(f"{path}: 'weight_map' entry for tensor {k!r} points outside the directory ({v!r})")
    if not weight_map:
        raise MergeInputError(f"{path}: 'weight_map' is empty")
    return weight_map


class HFDirectory(TensorSource):
    def __init__(self, path, trust_pickle: bool = False, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(self.path)
        self.config_dir = self.path
        self._where: Dict[str, TensorSource] = {}
        self._shards: List[TensorSource] = []
        d = self.path
        if (d / ST_INDEX).exists():
            self._from_index(d / ST_INDEX, lambda p: SafetensorsFile(p))
        elif (d / "model.safetensors").exists():
            self._add(SafetensorsFile(d / "model.safetensors"))
        elif sorted(d.glob("*.safetensors")):
            for p in sorted(d.glob("*.safetensors")):
                self._add(SafetensorsFile(p))
        elif (d / BIN_INDEX).exists():
            self._from_index(d / BIN_INDEX, lambda p: TorchFile(p, trust_pickle))
        elif (d / "pytorch_model.bin").exists():
            self._add(TorchFile(d / "pytorch_model.bin", trust_pickle))
        else:
            found = sorted(p.name for p in d.iterdir())[:10]
            raise MergeInputError(
                f"{d}: no model weights found (looked for {ST_INDEX}, model.safetensors, *.safetensors, "
                f"{BIN_INDEX}, pytorch_model.bin); the directory holds: {', '.join(found) or 'nothing'}"
            )

    def _add(self, shard: TensorSource) -> None:
        self._shards.append(shard)
        for k in shard.keys():
            if k in self._where:
                raise MergeInputError(f"{self.path}: tensor {k!r} is stored twice, in {self._where[k].label} "
                                      f"and in {shard.label}")
            self._where[k] = shard

    def _from_index(self, index: Path, opener) -> None:
        weight_map = _read_index(index)
        shards = {}
        for name in dict.fromkeys(weight_map.values()):
            p = self.path / name
            if not p.exists():
                users = [k for k, v in weight_map.items() if v == name]
                raise MergeInputError(f"{p}: file not found (listed in {index.name} for {len(users)} tensor(s), "
                                      f"e.g. {users[0]!r})")
            shards[name] = opener(p)
            self._shards.append(shards[name])
        # order: shard by shard, in file order inside each (keeps reads sequential)
        for name, shard in shards.items():
            present = set(shard.keys())
            for k in shard.keys():
                if weight_map.get(k) == name:
                    self._where[k] = shard
            for k, v in weight_map.items():
                if v == name and k not in present:
                    raise MergeInputError(f"{shard.label}: tensor {k!r} is listed in {index.name} "
                                          "but missing from this shard (truncated or wrong file?)")

    def keys(self) -> List[str]:
        return list(self._where)

    def info(self, key: str) -> TensorInfo:
        return self._where[key].info(key)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get(key)

    def read_into(self, key: str, out: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self._where[key].read_into(key, out, offset)

    def check_unchanged(self) -> None:
        for s in self._shards:
            s.check_unchanged()

    def file_of(self, key: str) -> str:
        return self._where[key].file_of(key)

    def prefetch(self, key: str) -> None:
        self._where[key].prefetch(key)

    def release(self, key: str) -> None:
        self._where[key].release(key)

    def close(self) -> None:
        for s in self._shards:
            s.close()
