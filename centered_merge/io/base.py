"""What every reader gives the engine: names, shapes and dtypes up front, tensors one at a time on demand."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..errors import MergeInputError


@dataclass(frozen=True)
class TensorInfo:
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _not_regular(st: os.stat_result) -> Optional[str]:
    if stat.S_ISREG(st.st_mode):
        return None
    return next((what for test, what in _KINDS if test(st.st_mode)), "not a regular file")


def check_regular_file(path) -> None:
    """Refuse anything but a regular file (a FIFO would block the reader forever, a device reads without end)
    before it is opened, naming the path and what it is."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MergeInputError(f"{path}: file not found") from None
    except OSError as e:
        raise MergeInputError(f"{path}: cannot stat ({e.strerror or e})") from None
    what = _not_regular(st)
    if what:
        raise MergeInputError(f"{path}: is {what}, not a regular file; refusing to read it as a checkpoint")


def open_regular_file(path) -> int:
    """An O_RDONLY descriptor of a regular file, or MergeInputError. Opened non-blocking and checked again with
    fstat, so a path swapped for a FIFO between the two checks cannot block the open."""
    check_regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MergeInputError(f"{path}: cannot open ({e.strerror or e})") from None
    what = _not_regular(os.fstat(fd))
    if what:
        os.close(fd)
        raise MergeInputError(f"{path}: is {what}, not a regular file; refusing to read it as a checkpoint")
    return fd


FLOAT8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                    "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n))


def check_computable(key: str, dtypes, files) -> None:
    """Refuse, by name, a tensor whose dtype the merge cannot compute in. float8 tensors are refused: their
    values are meant to be read with per-block scales stored in other tensors, which a merge that averages the raw
    values would ignore. Integer, bool and complex tensors are not refused here: they are copied through unchanged
    when every model holds the same values, and refused (by validation.check_group) when they differ."""
    for dt, f in zip(dtypes, files):
        if dt in FLOAT8_DTYPES:
            raise MergeInputError(f"tensor {key!r} in {f} has dtype {str(dt).replace('torch.', '')}, which the merge "
                                  "cannot compute in (8-bit floats need their scales applied first); convert the "
                                  "checkpoint to bfloat16 or float16 before merging")


def dtype_size(dtype: torch.dtype) -> int:
    if dtype == torch.bool:
        return 1
    return torch.empty((), dtype=dtype).element_size()


class TensorSource:
    """One model to merge, read lazily.

    `label` names the model in messages (a path, or "model #2 (state dict)"). `get` returns the tensor stored
    under a name, zero-copy where the format allows (a view of an mmap for safetensors); the caller must not
    write into it. `config_dir` is where config.json and tokenizer files live, or None.
    """

    label: str = "?"
    config_dir: Optional[Path] = None

    def keys(self) -> List[str]:
        raise NotImplementedError

    def info(self, key: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def read_into(self, key: str, out: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Copy bytes [offset, offset + out.nbytes) of tensor `key` into `out` (a contiguous CPU tensor of any
        dtype, e.g. a reused or pinned buffer) and return `out`. Readers of files override it to read straight
        into `out`; this default copies from `get`."""
        src = self.get(key).contiguous().reshape(-1).view(torch.uint8)
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("read_into needs a contiguous CPU tensor")
        nbytes = out.numel() * out.element_size()
        if offset < 0 or offset + nbytes > src.numel():
            raise ValueError(f"read_into: bytes {offset}..{offset + nbytes} are outside tensor {key!r} "
                             f"({src.numel()} bytes)")
        out.view(-1).view(torch.uint8).copy_(src[offset:offset + nbytes])
        return out

    def check_unchanged(self) -> None:
        """Raise MergeInputError if an input file changed since it was opened; nothing to check by default."""

    def prefetch(self, key: str) -> None:
        """Hint that `key` will be read soon (start reading it into the page cache); may do nothing."""

    def close(self) -> None:
        pass

    def file_of(self, key: str) -> str:
        """The file holding `key`, for messages."""
        return self.label

    def total_bytes(self) -> int:
        return sum(self.info(k).nbytes for k in self.keys())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
