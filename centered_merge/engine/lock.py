"""The output lock: one merge at a time into one output path.

A file `.NAME.lock` next to the output holds this process's pid, host and start time, and an exclusive flock(2)
on it for the whole merge. A second merge into the same path finds the flock taken and fails at once, naming the
holder. The kernel drops a flock when its process dies however it dies (SIGKILL, OOM), so a lock file left by a
dead process is taken over (the new holder says whose it was). flock is advisory and local to one machine (and,
on NFS, to what the server supports); on a distributed merge rank 0 holds it and every rank follows rank 0.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from ..errors import MergeOutputError


def lock_path(out: Path) -> Path:
    return Path(out).absolute().parent / f".{Path(out).name}.lock"


def _describe(holder: dict) -> str:
    when = holder.get("since")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(when)) if isinstance(when, (int, float)) else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"


class OutputLock:
    """Acquired on construction (raises MergeOutputError if another live merge holds it); `release()` ends it."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.taken_over: Optional[str] = None  # the dead holder whose lock was taken over, in words
        self._fd: Optional[int] = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as e:
            raise MergeOutputError(f"{self.out}: cannot lock the output ({self.path}: {e.strerror or e})") from None

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise MergeOutputError(f"{self.out}: another merge into this output is running ({_describe(holder)}; "
                                       f"lock file {self.path}); wait for it to end or pick another output path")
            try:  # the holder before us may have removed the file after we opened it: lock the file at the path
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = _read(fd)
            if old:
                self.taken_over = _describe(old)
            me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
            self._fd = fd
            return

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still holding the flock: a waiter re-checks the inode (see _acquire)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        v = json.loads(raw) if raw else {}
        return v if isinstance(v, dict) else {}
    except (OSError, ValueError):
        return {}
