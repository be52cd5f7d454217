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
