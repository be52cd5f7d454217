"""Where every output tensor goes: the shard layout of an HF-style directory, computed once per merge.

The engine hands the same ShardLayout to the reader (the order tensors are produced in) and to the writer (the
file and byte offset of each tensor), so the two cannot disagree. The layout depends only on the tensors' names,
shapes and dtypes and the shard size: every rank of a distributed merge, and a resumed merge, computes the same.

Why the safetensors header is built here by hand: `safetensors.torch.save_file` needs every tensor of a shard in
memory at once (a 5 GB shard = 5 GB of RAM). The format is simple (8-byte little-endian header length, a JSON
header with dtype / shape / data_offsets per tensor, then the raw bytes, contiguous, no holes) and every tensor's
shape and dtype is known before the merge starts, so the header is written first and each tensor's bytes later,
at their offset. Files written so are read back with safetensors' own reader in the tests.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from ..errors import MergeConfigError
from .base import TensorInfo, dtype_size

ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _attr, _name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _attr):
        ST_DTYPE[getattr(torch, _attr)] = _name

INDEX_NAME = "model.safetensors.index.json"


def plan_shards(items: Sequence[Tuple[str, TensorInfo]], shard_size: int) -> List[List[Tuple[str, TensorInfo]]]:
    """Split tensors (in the given order) into shards of at most shard_size bytes (a bigger tensor gets its own).

    Inside a shard, tensors are laid out by element size, largest first (stable), so that every tensor starts at
    an offset aligned to its element size without padding (safetensors allows no holes).
    """
    shards: List[List[Tuple[str, TensorInfo]]] = []
    cur: List[Tuple[str, TensorInfo]] = []
    size = 0
    for name, info in items:
        if cur and size + info.nbytes > shard_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, info))
        size += info.nbytes
    if cur or not shards:
        shards.append(cur)
    return [sorted(s, key=lambda kv: -dtype_size(kv[1].dtype)) for s in shards]


def shard_names(n: int) -> List[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def header_bytes(shard: Sequence[Tuple[str, TensorInfo]], metadata: Dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header (space-padded to a multiple of 8) of one shard."""
    header = {"__metadata__": metadata}
    off = 0
    for name, info in shard:
        if info.dtype not in ST_DTYPE:
            raise MergeConfigError(f"tensor {name!r}: dtype {info.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": ST_DTYPE[info.dtype], "shape": list(info.shape),
                        "data_offsets": [off, off + info.nbytes]}
        off += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


@dataclass(frozen=True)
class Slot:
    """One tensor's place in the output: file index, absolute byte offset in that file, length in bytes."""

    shard: int
    offset: int
    length: int


class ShardLayout:
    """Shards, file names, headers and each tensor's Slot, from (name, TensorInfo) items and a shard size."""

    def __init__(self, items: Sequence[Tuple[str, TensorInfo]], shard_size: int):
        self.info: Dict[str, TensorInfo] = dict(items)
        self.shards = plan_shards(list(items), int(shard_size))
        self.names = shard_names(len(self.shards))
        self.headers = [header_bytes(s, {"format": "pt"}) for s in self.shards]
        self.slots: Dict[str, Slot] = {}
        self.file_sizes: List[int] = []
        for i, (shard, head) in enumerate(zip(self.shards, self.headers)):
            off = len(head)
            for name, info in shard:
                self.slots[name] = Slot(i, off, info.nbytes)
                off += info.nbytes
        self.file_sizes = [len(h) + sum(i.nbytes for _, i in s) for s, h in zip(self.shards, self.headers)]
        self.order: List[str] = [name for shard in self.shards for name, _ in shard]

    def index(self) -> Dict:
        """The HF index (model.safetensors.index.json) of a multi-shard output."""
        return {"metadata": {"total_size": sum(i.nbytes for s in self.shards for _, i in s)},
                "weight_map": {name: fname for shard, fname in zip(self.shards, self.names) for name, _ in shard}}

    def digest(self) -> str:
        """Names, shapes, dtypes and shard boundaries: equal digests mean byte-compatible layouts."""
        h = hashlib.sha256()
        for head in self.headers:
            h.update(head)
        return h.hexdigest()
