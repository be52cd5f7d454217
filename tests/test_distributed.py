"""Several processes (torch.distributed, gloo on the CPU) merge one model: same bytes as one process; a failing
rank leaves nothing behind; the tensor assignment is deterministic and balanced."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from centered_merge.distributed import RankContext, assign
from centered_merge.engine import merge_checkpoints
from centered_merge.errors import MergeError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_util import leftovers, make_state_dicts, save_models, tree_bytes  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _rank_main(rank, world, init_file, models, base, out, fail_rank, kwargs, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if rank == fail_rank:  # this rank's first write fails as a full disk would
            from centered_merge.io import writer as W

            def broken(self, name, tensor):
                raise W._write_error(self.out, OSError(28, "No space left on device"), f"tensor {name!r}", "x")

            W.PartitionedShardWriter.write = broken
        try:
            rep = merge_checkpoints(models, out, base=base, progress=False, **kwargs)
            results.put((rank, "ok", rep.merged, rep.passthrough))
        except MergeError as e:
            results.put((rank, "error", str(e), None))
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path, world, models, base, out, fail_rank=-1, **kwargs):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = tmp_path / f"init-{world}-{fail_rank}"
    procs = [ctx.Process(target=_rank_main, args=(r, world, str(init_file), models, base, str(out), fail_rank,
                                                   kwargs, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0, f"rank process exited with {p.exitcode} (None: still running after 120 s)"
    finally:
        for p in procs:  # never leave a hung rank behind
            if p.is_alive():
                p.kill()
    return sorted(results.get(timeout=5) for _ in range(world))


@pytest.mark.parametrize("method, kwargs", [
    ("cart", {"rank": 0.25, "shard_size": 3000}),  # several shards, tensors of one shard on several ranks
    ("ties", {"density": 0.5}),
])
def test_two_ranks_write_the_same_bytes_as_one_process(tmp_path, method, kwargs):
    base, models = save_models(tmp_path, *make_state_dicts(T=3), kind="dir")
    one = merge_checkpoints(models, tmp_path / "one", method=method, base=base, progress=False, **kwargs)
    results = _run_ranks(tmp_path, 2, models, base, tmp_path / "two", method=method, **kwargs)
    assert [r[1] for r in results] == ["ok", "ok"]
    assert {(r[2], r[3]) for r in results} == {(one.merged, one.passthrough)}  # counts summed over the ranks
    a, b = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    if "shard_size" in kwargs:
        assert "model.safetensors.index.json" in a
    assert (tmp_path / "two" / "README.md").read_text() == (tmp_path / "one" / "README.md").read_text()


def test_a_failing_rank_leaves_nothing(tmp_path):
    base, models = save_models(tmp_path, *make_state_dicts(T=2), kind="file")
    results = _run_ranks(tmp_path, 2, models, base, tmp_path / "out", fail_rank=1, method="cart", rank=0.5)
    assert [r[1] for r in results] == ["error", "error"]
    assert "disk full" in results[1][2]  # the failing rank's own error
    assert "1 other rank(s) failed" in results[0][2]  # the other rank learns of it
    assert leftovers(tmp_path, "out") == []


def test_assignment_is_deterministic_and_balanced():
    costs = [(f"t{i}", c) for i, c in enumerate([100, 1, 50, 50, 30, 20, 0, 99])]
    owner = assign(costs, 3)
    assert owner == assign(list(costs), 3)
    loads = [sum(max(1, c) for n, c in costs if owner[n] == r) for r in range(3)]
    assert max(loads) - min(loads) <= 100 and set(owner.values()) == {0, 1, 2}
    assert assign(costs, 1) == {n: 0 for n, _ in costs}


def test_single_process_has_no_context():
    assert not dist.is_initialized() and RankContext.current() is None
