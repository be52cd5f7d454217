"""Several processes (torch.distributed, gloo on the CPU) merge one model: same bytes as one process; failures on
any rank (a write error, a rank that dies, an error after the writes, ranks given different arguments) make every
rank raise and leave nothing behind; a merge without distributed=True inside a group is an ordinary one.

One group of two ranks runs every scenario in turn (spawning processes costs seconds), the one that kills a rank
last."""
import datetime
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from centered_merge.distributed import RankContext, assign
from centered_merge.engine import merge_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_util import leftovers, make_state_dicts, save_models, tree_bytes  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

MULTI_SHARD = {"method": "cart", "rank": 0.25, "shard_size": 3000}  # tensors of one shard land on both ranks
SCENARIOS = ["cart", "ties", "rank0_only", "diff_args", "locked", "fail_write", "post_finish_fail", "peer_dies"]


def _scenario(name, rank, models, base, out):
    """Run one scenario on this rank; returns (status, detail)."""
    import centered_merge.engine.card as E
    from centered_merge.io import writer as W

    kw = dict(base=base, progress=False)
    if name == "cart":
        rep = merge_checkpoints(models, out, distributed=True, **kw, **MULTI_SHARD)
        return "ok", (rep.merged, rep.passthrough)
    if name == "ties":
        rep = merge_checkpoints(models, out, distributed=True, method="ties", density=0.5, **kw)
        return "ok", (rep.merged, rep.passthrough)
    if name == "rank0_only":  # no distributed=True: rank 0 merges alone, rank 1 is not involved
        if rank == 0:
            merge_checkpoints(models, out, method="cart", rank=0.5, **kw)
        return "ok", None
    if name == "locked":  # the test process holds the output's lock: every rank refuses, naming it
        merge_checkpoints(models, out, distributed=True, method="cart", rank=0.5, **kw)
        return "ok", None
    if name == "diff_args":
        merge_checkpoints(models, out, distributed=True, method="cart", rank=0.5, lam=1.0 + rank, **kw)
        return "ok", None
    saved = (W.ShardedWriter.write, E.model_card)
    try:
        if name == "fail_write" and rank == 1:
            def broken(self, tname, tensor):
                raise W._write_error(self.out, OSError(28, "No space left on device"), f"tensor {tname!r}", "x")
            W.ShardedWriter.write = broken
        if name == "post_finish_fail" and rank == 0:  # after every rank's writes: rank 0 alone fails
            def broken_card(*a, **k):
                raise RuntimeError("card failed")
            E.model_card = broken_card
        if name == "peer_dies" and rank == 1:
            def die(self, tname, tensor):
                os._exit(3)
            W.ShardedWriter.write = die
        merge_checkpoints(models, out, distributed=True, method="cart", rank=0.5, **kw)
        return "ok", None
    finally:
        W.ShardedWriter.write, E.model_card = saved


def _rank_main(rank, world, init_file, models, base, tmp, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name in SCENARIOS:
            try:
                status = _scenario(name, rank, models, base, Path(tmp) / name)
            except Exception as e:  # noqa: BLE001  (reported to the test)
                status = (type(e).__name__, str(e))
            results.put((name, rank, status))
            if name != "peer_dies":
                dist.barrier()
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (the peer may be gone)
            pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    base, models = save_models(tmp, *make_state_dicts(T=3), kind="dir")
    from centered_merge.engine.lock import OutputLock

    held = OutputLock(tmp / "locked")  # another merge into that output, as far as the ranks can tell
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, str(tmp / "init"), models, base, str(tmp), results),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=240)
    finally:
        for p in procs:  # never leave a hung rank behind
            if p.is_alive():
                p.kill()
        held.release()
    out = {}
    while not results.empty():
        name, rank, status = results.get(timeout=5)
        out[name, rank] = status
    return tmp, base, models, out, [p.exitcode for p in procs]


@pytest.mark.parametrize("name, kwargs", [("cart", MULTI_SHARD), ("ties", {"method": "ties", "density": 0.5})])
def test_two_ranks_write_the_same_bytes_as_one_process(runs, name, kwargs):
    tmp, base, models, out, _ = runs
    one = merge_checkpoints(models, tmp / f"one-{name}", base=base, progress=False, **kwargs)
    assert out[name, 0] == out[name, 1] == ("ok", (one.merged, one.passthrough))  # counts summed over ranks
    a, b = tree_bytes(tmp / f"one-{name}"), tree_bytes(tmp / name)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert (tmp / name / "README.md").read_text() == (tmp / f"one-{name}" / "README.md").read_text()
    if "shard_size" in kwargs:
        assert "model.safetensors.index.json" in a


def test_without_distributed_a_rank_merges_alone(runs):
    tmp, _, _, out, _ = runs
    assert out["rank0_only", 0] == out["rank0_only", 1] == ("ok", None)
    assert (tmp / "rank0_only" / "model.safetensors").exists()


@pytest.mark.parametrize("name, rank0, rank1", [
    ("diff_args", "different arguments", "different arguments"),
    ("fail_write", "rank(s) [1] failed", "disk full"),
    ("post_finish_fail", "card failed", "could not finish the output"),
])
def test_a_failure_on_any_rank_fails_every_rank_and_leaves_nothing(runs, name, rank0, rank1):
    tmp, _, _, out, _ = runs
    assert out[name, 0][0] != "ok" and rank0 in out[name, 0][1]
    assert out[name, 1][0] != "ok" and rank1 in out[name, 1][1]
    assert leftovers(tmp, name) == []


def test_every_rank_refuses_a_locked_output(runs):
    tmp, _, _, out, _ = runs
    for rank in (0, 1):
        status, message = out["locked", rank]
        assert status == "MergeOutputError" and f"another merge into this output is running (pid {os.getpid()}" \
            in message, message
    assert not (tmp / "locked").exists()


def test_a_rank_that_dies_is_noticed_and_leaves_nothing(runs):
    tmp, _, _, out, exitcodes = runs
    assert exitcodes[1] == 3 and exitcodes[0] == 0
    status, message = out["peer_dies", 0]
    assert status == "MergeOutputError" and "lost contact with the other ranks" in message
    assert ("peer_dies", 1) not in out and leftovers(tmp, "peer_dies") == []


def test_assignment_is_deterministic_and_balanced():
    costs = [(f"t{i}", c) for i, c in enumerate([100, 1, 50, 50, 30, 20, 0, 99])]
    owner = assign(costs, 3)
    assert owner == assign(list(costs), 3)
    loads = [sum(max(1, c) for n, c in costs if owner[n] == r) for r in range(3)]
    assert max(loads) - min(loads) <= 100 and set(owner.values()) == {0, 1, 2}
    assert assign(costs, 1) == {n: 0 for n, _ in costs}


def test_single_process_has_no_context():
    assert not dist.is_initialized() and RankContext.current() is None


def test_distributed_needs_a_group(tmp_path):
    base, models = save_models(tmp_path, *make_state_dicts(T=2), kind="file")
    with pytest.raises(Exception, match="process group"):
        merge_checkpoints(models, tmp_path / "o", distributed=True, progress=False)
    assert leftovers(tmp_path, "o") == []
