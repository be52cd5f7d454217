"""Thread policy for the compute-bound parts (CART's GEMMs and QRs) on machines shared with other work.

torch's CPU ops run in a GNU OpenMP (libgomp) thread pool whose idle threads spin-wait at every barrier by
default. When another process holds one of the cores, a spinning thread burns the time slice its partner needs:
measured on this project's 2-core VM, cm.cart on one ViT-B/32 block x 8 tasks took 34.3 s with torch's default
(2 threads, spinning) against 4.6 s with OMP_WAIT_POLICY=PASSIVE and 5.0 s with one thread, the machine
loaded by other jobs (load average 5-11); issue 12 measured 20 s against 1.0 s under one busy process.

libgomp reads OMP_WAIT_POLICY once, when it is loaded, i.e. when torch is first imported. So:
1. Importing centered_merge before torch (the CLI, and any script that does so) sets OMP_WAIT_POLICY=PASSIVE
   unless the user chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT already set) or opted out with
   CENTERED_MERGE_WAIT_POLICY=keep. Idle threads then sleep at once; the quiet-machine cost is measured by
   `bench/bench_cart_speed.py --contend`.
2. When torch was imported first and its threads spin, `compute_threads()` checks, per call, whether other
   processes are running on the cores this process may use, and if so runs the block with one thread.
CENTERED_MERGE_WAIT_POLICY=keep turns both off (torch's threads exactly as torch sets them).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

OPT_OUT = "CENTERED_MERGE_WAIT_POLICY"


def _choose_wait_policy() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE for the OpenMP runtime torch will load; returns whether idle threads sleep."""
    env = os.environ
    if env.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        return True
    if "torch" in sys.modules or env.get(OPT_OUT, "").strip().lower() == "keep":
        return False  # libgomp has read its policy already, or the user keeps torch's default
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return False  # the user's choice
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


THREADS_SLEEP = _choose_wait_policy()  # evaluated once, at import, before centered_merge imports torch
KEEP = os.environ.get(OPT_OUT, "").strip().lower() == "keep"

import torch  # noqa: E402  (after the policy is in the environment)


def _running_elsewhere() -> int | None:
    """Threads of other processes running right now (Linux: /proc), or None where that cannot be read."""
    try:
        with open("/proc/stat") as f:
            running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
        ours = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                ours += f.read().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return max(0, running - ours)


_cache = {"at": -1.0, "contended": False}
RECHECK_S = 0.5  # how long a contention reading is reused


def contended() -> bool:
    """Whether the threads torch would use outnumber the cores other processes leave free (lowest of three
    readings 1 ms apart, so one short-lived process does not count), cached for RECHECK_S."""
    now = time.monotonic()
    if now - _cache["at"] < RECHECK_S:
        return _cache["contended"]
    readings = []
    for i in range(3):
        if i:
            time.sleep(0.001)
        r = _running_elsewhere()
        if r is None:
            break
        readings.append(r)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = bool(readings) and torch.get_num_threads() + min(readings) > cores
    _cache.update(at=now, contended=busy)
    return busy


@contextlib.contextmanager
def compute_threads():
    """Run a compute-bound block with torch's threads, or with one thread where they spin-wait and other
    processes hold cores (the case where spinning multiplies the time by 10-30x)."""
    n = torch.get_num_threads()
    if KEEP or THREADS_SLEEP or n == 1 or not contended():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
