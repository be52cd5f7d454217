"""What every reader gives the engine: names, shapes and dtypes up front, tensors one at a time on demand."""
from __future__ import annotations

import os
import signal
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


# Linux fcntl commands (not all in Python's fcntl module)
F_SETSIG, F_SETLEASE, F_GETLEASE = 10, 1024, 1025


class FileGuard:
    """An open input file and what it looked like when opened, to tell when it changes under the merge.

    `take_lease` asks the kernel for a read lease (Linux F_SETLEASE; granted on our own files or as root, on local
    file systems, when nobody has the file open for writing). While it is held, another process that opens the
    file for writing or truncates it waits (up to /proc/sys/fs/lease-break-time, 45 s by default) and the lease
    is marked as breaking, which `check` sees: so the file cannot shrink under a memory map that is still read,
    the case that kills a process with SIGBUS. The break signal is set to SIGURG, ignored by default: breaks are
    seen by polling, no signal handler is installed. Without a lease, `check` compares fstat (inode, size, mtime;
    not ctime, which unlinking the old file on a save-by-rename changes while its bytes stay valid).
    """

    def __init__(self, path):
        self.path = path
        self.fd: Optional[int] = open_regular_file(path)
        st = os.fstat(self.fd)
        self.size = st.st_size
        self.stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.leased = False

    def take_lease(self) -> bool:
        try:
            import fcntl

            fcntl.fcntl(self.fd, F_SETSIG, signal.SIGURG)
            fcntl.fcntl(self.fd, F_SETLEASE, fcntl.F_RDLCK)
            self.leased = fcntl.fcntl(self.fd, F_GETLEASE) == fcntl.F_RDLCK
        except (ImportError, OSError, AttributeError):
            self.leased = False
        if self.leased:
            self.check()  # nothing changed between the fstat at open and the lease
        return self.leased

    def _lease_held(self) -> bool:
        import fcntl

        try:
            return fcntl.fcntl(self.fd, F_GETLEASE) == fcntl.F_RDLCK  # F_UNLCK once a writer is waiting
        except OSError:
            return False

    def check(self, key: Optional[str] = None) -> None:
        if self.fd is None:
            return
        at = f" (while reading tensor {key!r})" if key is not None else ""
        if self.leased and not self._lease_held():
            raise MergeInputError(f"{self.path}: another process is opening it for writing or truncating it{at}; "
                                  "stopped before it changes (that process waits until this merge lets go)")
        try:
            st = os.fstat(self.fd)
        except OSError as e:
            raise MergeInputError(f"{self.path}: cannot stat ({e.strerror or e})") from None
        now = (st.st_ino, st.st_size, st.st_mtime_ns)
        if now != self.stamp:
            what = f"size {self.size} -> {now[1]} bytes" if now[1] != self.size else "modified in place"
            raise MergeInputError(f"{self.path}: changed while the merge was reading it{at}: {what}")

    def close(self) -> None:
        """Drop the lease (else it lives on with any memory map of the file and makes writers wait) and close."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        if self.leased:
            try:
                import fcntl

                fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
            except (ImportError, OSError):
                pass
        try:
            os.close(fd)
        except OSError:
            pass


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
    under a name, zero-copy where the format allows (a view of a leased MAP_PRIVATE map for safetensors, see
    FileGuard); the caller must not write into it. `config_dir` is where config.json and tokenizer files live,
    or None.
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

    def release(self, key: str) -> None:
        """Hint that the merge is done with `key`: a memory-mapped reader may drop its page-table entries now
        instead of at close (views still alive stay valid); may do nothing."""

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


class DuplicateKeyError(ValueError):
    """A JSON object (safetensors header, shard index) names one key twice; json.loads would keep the last."""

    def __init__(self, key: str):
        super().__init__(f"key {key!r} appears twice")
        self.key = key


def object_without_duplicates(pairs):
    """json.loads' object_pairs_hook: the object as a dict, or DuplicateKeyError for a repeated key."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise DuplicateKeyError(k)
        d[k] = v
    return d
