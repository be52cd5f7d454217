"""Run one command as a child process and measure it: wall time, CPU time, and the peak anonymous memory of its
whole process tree (the sum of RssAnon over the child and its descendants, sampled from /proc every ~20 ms).

RssAnon leaves out the page cache of memory-mapped inputs, which both tools use and which the kernel can drop;
what it counts is memory the merge really holds. Imports are included: this is one process against another, as a
user runs them.
"""
from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence


@dataclass
class RunResult:
    cmd: List[str]
    rc: int
    wall_s: float
    cpu_s: float            # user + system time of the child and its descendants
    peak_anon: int          # bytes: the largest sampled sum of RssAnon over the process tree
    samples: int
    stdout: str
    stderr: str


def _rss_anon(pid: int) -> int:
    """RssAnon of one process in bytes (0 if it is gone or is a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _descendants(root: int) -> List[int]:
    """root and every process whose parent chain leads to it (one scan of /proc)."""
    parent: Dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name (2nd field) is parenthesised and may hold spaces: split after its closing bracket
        rest = stat[stat.rfind(b")") + 2:].split()
        parent[int(entry.name)] = int(rest[1])
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sorted(tree)


class TreeSampler(threading.Thread):
    """Samples the tree's RssAnon every `period` s; rescans /proc for new descendants every `rescan` s (a full
    scan costs a few ms of CPU on a shared 2-core machine, so it is not done at every sample)."""

    def __init__(self, pid: int, period: float = 0.02, rescan: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.period, self.rescan = pid, period, rescan
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        pids = [self.pid]
        last_scan = 0.0
        while not self._halt.is_set():
            now = time.monotonic()
            if now - last_scan >= self.rescan:
                pids = _descendants(self.pid)
                last_scan = now
            total = sum(_rss_anon(p) for p in pids)
            self.peak = max(self.peak, total)
            self.samples += 1
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_measured(cmd: Sequence[str], cwd: Optional[Path] = None, env: Optional[dict] = None,
                 timeout: Optional[float] = None) -> RunResult:
    """Run `cmd` to completion (stdout/stderr captured) and measure it; a timeout kills its process group."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        err += f"\n(killed after {timeout:.0f} s)"
    wall = time.perf_counter() - t0
    sampler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return RunResult(list(cmd), proc.returncode, wall, cpu, sampler.peak, sampler.samples, out, err)


def warm(paths: Sequence[Path]) -> int:
    """Read every file under `paths` once so that both tools start from a warm page cache; returns bytes read."""
    n = 0
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for root in paths:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                with open(p, "rb", buffering=0) as f:
                    while True:
                        k = f.readinto(view)
                        if not k:
                            break
                        n += k
    return n
