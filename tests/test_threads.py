"""centered_merge.threads: the OpenMP wait policy chosen before torch loads, and the one-thread fallback."""
import os
import subprocess
import sys

import torch

from centered_merge import threads


def _policy_in_child(code, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", threads.OPT_OUT)}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True)
    return out.stdout.split()


PRINT = ("import os, centered_merge as cm; "
         "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), cm.threads.THREADS_YIELD)")


def test_short_spin_set_when_centered_merge_is_imported_before_torch():
    assert _policy_in_child(PRINT) == ["None", threads.SPIN_COUNT, "True"]
    assert _policy_in_child(PRINT, OMP_WAIT_POLICY="PASSIVE") == ["PASSIVE", "None", "True"]  # the user's


def test_policy_left_alone_after_torch_or_when_the_user_chose():
    assert _policy_in_child("import torch; " + PRINT) == ["None", "None", "False"]
    assert _policy_in_child(PRINT, **{threads.OPT_OUT: "keep"}) == ["None", "None", "False"]
    assert _policy_in_child(PRINT, GOMP_SPINCOUNT="5") == ["None", "5", "False"]


def test_compute_threads_uses_one_thread_only_when_spinning_threads_are_contended(monkeypatch):
    n = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    monkeypatch.setattr(threads, "THREADS_YIELD", False)
    monkeypatch.setattr(threads, "KEEP", False)
    monkeypatch.setattr(threads, "contended", lambda: True)
    with threads.compute_threads():
        pass
    assert seen == [1, 2]  # one thread inside, the caller's count restored after
    seen.clear()
    monkeypatch.setattr(threads, "contended", lambda: False)
    with threads.compute_threads():
        pass
    monkeypatch.setattr(threads, "THREADS_YIELD", True)
    monkeypatch.setattr(threads, "contended", lambda: True)
    with threads.compute_threads():
        pass
    monkeypatch.setattr(threads, "THREADS_YIELD", False)
    monkeypatch.setattr(threads, "KEEP", True)  # CENTERED_MERGE_WAIT_POLICY=keep: torch's threads as they are
    with threads.compute_threads():
        pass
    assert seen == []
    assert n >= 1


def test_running_elsewhere_reads_proc_on_linux():
    got = threads._running_elsewhere()
    if sys.platform.startswith("linux"):
        assert isinstance(got, int) and got >= 0
    else:
        assert got is None


def test_run_tasks_runs_each_task_once_on_single_threaded_workers_and_restores_threads(monkeypatch):
    import threading

    n = torch.get_num_threads()
    monkeypatch.setattr(threads, "task_workers", lambda count: min(2, count))
    seen, lock = [], threading.Lock()

    def task(i):
        with lock:
            seen.append((i, torch.get_num_threads(), threading.get_ident()))

    threads.run_tasks(task, 7)
    assert sorted(i for i, _, _ in seen) == list(range(7))
    assert {nt for _, nt, _ in seen} == {1}
    assert threading.get_ident() not in {tid for _, _, tid in seen}
    assert torch.get_num_threads() == n


def test_run_tasks_raises_the_tasks_error_and_restores_threads(monkeypatch):
    n = torch.get_num_threads()
    monkeypatch.setattr(threads, "task_workers", lambda count: 2)

    def task(i):
        if i == 3:
            raise ValueError("task 3")

    try:
        threads.run_tasks(task, 5)
    except ValueError as e:
        assert str(e) == "task 3"
    else:
        raise AssertionError("no error")
    assert torch.get_num_threads() == n


def test_run_tasks_with_one_worker_runs_in_order_in_this_thread(monkeypatch):
    import threading

    monkeypatch.setattr(threads, "task_workers", lambda count: 1)
    seen = []
    threads.run_tasks(lambda i: seen.append((i, threading.get_ident())), 4)
    assert seen == [(i, threading.get_ident()) for i in range(4)]


def test_run_tasks_lets_every_task_finish_before_raising(monkeypatch):
    """An error in one task is raised only once the others are done: none may still write the caller's buffers."""
    import time

    monkeypatch.setattr(threads, "task_workers", lambda count: 2)
    done = []

    def task(i):
        if i == 0:
            raise ValueError("task 0")
        time.sleep(0.05)
        done.append(i)

    try:
        threads.run_tasks(task, 3)
    except ValueError:
        pass
    else:
        raise AssertionError("no error")
    assert sorted(done) == [1, 2]


def test_run_tasks_keeps_its_workers_between_calls(monkeypatch):
    import threading

    monkeypatch.setattr(threads, "task_workers", lambda count: 2)
    first, second = set(), set()  # the Thread objects themselves: held here, fresh threads could not match them
    threads.run_tasks(lambda i: first.add(threading.current_thread()), 6)
    threads.run_tasks(lambda i: second.add(threading.current_thread()), 6)
    assert len(first | second) <= 2  # the same two workers both times
