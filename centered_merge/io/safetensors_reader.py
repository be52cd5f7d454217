"""A single .safetensors file, read tensor by tensor.

safetensors' own `safe_open(framework="pt")` maps the file (a private, read-only mmap) and `get_tensor` returns a
view of that mapping: no copy, no anonymous memory; pages come from the page cache as they are touched. So the
library does the job and this module does not decode tensors itself. It only turns the library's errors into
messages that name the file, and reads the JSON header (a plain read of a few KB) to check up front that every
tensor's bytes lie inside the file and to know each tensor's byte range for read-ahead hints (posix_fadvise).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors import safe_open

from ..errors import MergeInputError
from .base import TensorInfo, TensorSource

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


def read_header(path: Path) -> Tuple[Dict, int]:
    """The JSON header of a safetensors file and its length (a few KB read with plain I/O), with a clear error
    if broken.

    safe_open checks the same things, but its messages do not name the file; this is only used for messages and
    for `info` without mapping the file.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MergeInputError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 2**20:
                raise MergeInputError(f"{path}: not a safetensors file or truncated (header length {n} "
                                      f"does not fit in a file of {size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise MergeInputError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeInputError(f"{path}: corrupt safetensors header ({e})") from None
    except OSError as e:
        raise MergeInputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise MergeInputError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            dt = entry["dtype"]
            shape = entry["shape"]
        except (KeyError, TypeError, ValueError):
            raise MergeInputError(f"{path}: corrupt safetensors header (entry for tensor {name!r})") from None
        if end > data_len or start > end:
            raise MergeInputError(
                f"{path}: truncated or corrupt: tensor {name!r} needs bytes {start}..{end} of the data section "
                f"but the file holds only {data_len}"
            )
        if dt not in _DTYPES:
            raise MergeInputError(f"{path}: tensor {name!r} has dtype {dt}, which this torch cannot hold")
    return header, n


class SafetensorsFile(TensorSource):
    def __init__(self, path, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(self.path)
        self.config_dir = None
        header, header_len = read_header(self.path)
        self._info = {
            k: TensorInfo(tuple(int(s) for s in v["shape"]), _DTYPES[v["dtype"]])
            for k, v in header.items() if k != "__metadata__"
        }
        # file order (by offset): reading in this order walks the file front to back
        self._keys: List[str] = sorted(self._info, key=lambda k: header[k]["data_offsets"][0])
        self.metadata = header.get("__metadata__") or {}
        data_start = 8 + header_len
        self._ranges = {k: (data_start + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
                        for k, v in header.items() if k != "__metadata__"}
        self._fd = None
        try:
            self._f = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError is not importable under one stable name across versions
            raise MergeInputError(f"{self.path}: not a valid safetensors file ({e})") from None

    def keys(self) -> List[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(key)
        except Exception as e:
            raise MergeInputError(f"{self.path}: cannot read tensor {key!r} ({e})") from None

    def file_of(self, key: str) -> str:
        return str(self.path)

    def prefetch(self, key: str) -> None:
        """posix_fadvise(WILLNEED) on the tensor's bytes: the kernel starts reading them in the background, so
        the page faults of the later read hit the page cache."""
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            off, n = self._ranges[key]
            if n:
                os.posix_fadvise(self._fd, off, n, os.POSIX_FADV_WILLNEED)
        except (OSError, KeyError):
            pass  # only a hint

    def close(self) -> None:
        self._f = None
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
