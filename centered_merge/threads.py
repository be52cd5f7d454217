"""Thread policy for the compute-bound parts (CART's GEMMs and QRs) on machines shared with other work.

torch's CPU ops run in a GNU OpenMP (libgomp) thread pool whose idle threads spin-wait at every barrier (libgomp
spins 300,000 iterations before it sleeps). When another process holds one of the cores, a spinning thread burns
the time slice its partner needs: issue 12 measured cm.cart on one ViT-B/32 block x 8 tasks at 20 s against 1.0 s
under one busy process.

The choice, measured 2026-12-01 on this project's 2-core VM (cm.cart, one ViT-B/32 block x 8 tasks, best of 2 in
a fresh process per setting, load average 0.2-1.2 from other work, then with one `while True: pass` process):

    setting                      quiet s        one busy s
    torch default (spin 300k)    0.99 / 1.13    3.24
    OMP_WAIT_POLICY=PASSIVE      1.31 / 1.34    1.55
    GOMP_SPINCOUNT=1000          0.94 / 0.96    1.71
    GOMP_SPINCOUNT=10000         0.88 / 0.91    3.42
    GOMP_SPINCOUNT=30000         0.86 / 1.07    6.06
    GOMP_SPINCOUNT=100000        0.90 / 0.91    9.85

PASSIVE is not a per-barrier cost of small ops: it halves even a single large GEMM (a bf16 768x3072 @ 3072x115
ran at 194 GFLOP/s under PASSIVE against 399 with spinning, same session; a 768x115 QR 1.21 vs 0.72 ms), i.e.
about one thread's speed. Issue 12's GOMP_SPINCOUNT=300000 figure (1.45x slower when idle) came from the
one-thread fallback below, which that setting turns on (see contended()). A short spin (1000 iterations, a few microseconds) keeps
the quiet speed of torch's default and, under one busy process, stays within 1.8x of it; longer spins grow the
busy time roughly linearly. Under heavy oversubscription the order changes: `bench_cart_speed.py --contend`
at load average 6-10 from other jobs (13:55 UTC, one round) gave torch's default 25.6 s / 45.6 s with one more
busy process, PASSIVE 4.05 / 2.86 s, GOMP_SPINCOUNT=1000 3.22 / 5.06 s. The short spin is chosen for the case
issue 12 sets (an otherwise idle machine, one competing process), where it meets both aims. So:
1. Importing centered_merge before torch (the CLI, and any script that does so) sets GOMP_SPINCOUNT=1000 unless the
   user chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT already set) or opted out with
   CENTERED_MERGE_WAIT_POLICY=keep. libgomp reads it once, when torch loads it.
2. When torch was imported first (its threads spin 300,000 iterations), `compute_threads()` checks, per call,
   whether other processes are running on the cores this process may use, and if so runs the block with one
   thread.
CENTERED_MERGE_WAIT_POLICY=keep turns both off (torch's threads exactly as torch sets them).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

OPT_OUT = "CENTERED_MERGE_WAIT_POLICY"
SPIN_COUNT = "1000"  # libgomp spin iterations before an idle thread sleeps: the measured choice above


def _choose_wait_policy() -> bool:
    """Set a short spin count for the OpenMP runtime torch will load; returns whether idle threads give their
    core up quickly (our short spin, or the user's PASSIVE)."""
    env = os.environ
    if env.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        return True
    if "torch" in sys.modules or env.get(OPT_OUT, "").strip().lower() == "keep":
        return False  # libgomp has read its policy already, or the user keeps torch's default
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return False  # the user's choice
    env["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


THREADS_YIELD = _choose_wait_policy()  # evaluated once, at import, before centered_merge imports torch
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
    if KEEP or THREADS_YIELD or n == 1 or not contended():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def task_workers(count: int) -> int:
    """How many single-threaded workers run_tasks uses for `count` independent tasks: torch's thread count (as
    compute_threads leaves it), at most one per task."""
    return max(1, min(torch.get_num_threads(), count))


def run_tasks(fn, count: int) -> None:
    """fn(0), ..., fn(count - 1) on task_workers(count) Python threads, each running torch with one thread; the
    workers take the next task as they finish one, and the first exception is raised here.

    Why tasks in parallel rather than each op on all threads: CART's T truncated SVDs of one tensor are
    independent, and only its large GEMMs use several threads well; its QRs, w x w eigenproblems and small ops run
    at a fraction of that (a 768x115 Householder QR, 2 threads: ~56 GFLOP/s) and every op ends in a barrier.
    One task per core has no barriers at all, and under a competing process the free core simply takes more
    tasks (measured figures: docs/measurements.md, CART speed). torch releases the GIL inside its ops."""
    workers = task_workers(count)
    if workers == 1:
        for i in range(count):
            fn(i)
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # this thread's and MKL's setting; each worker set its own OpenMP one when it started
    try:
        pool = _pool(workers)
        futures = [pool.submit(fn, i) for i in range(count)]
        wait(futures)  # every task has finished (none still writing the caller's buffers) before any error is raised
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(n)


_pools: dict = {}
_pools_lock = threading.Lock()


def _pool(workers: int):
    """The process's pool of `workers` single-threaded workers, made on first use and kept: a fresh
    ThreadPoolExecutor per call started its threads for every tensor, 7 ms a call, ~4% of cm.cart on one ViT-B/32
    block x 8 tasks (2 threads, 2026-12-02). Keyed by process id too, as a forked child inherits the dict but not
    the threads."""
    key = (os.getpid(), workers)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="cm-task",
                                                    initializer=torch.set_num_threads, initargs=(1,))
        return pool
