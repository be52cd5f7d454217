"""Merging with several processes (torch.distributed): the tensors are split across ranks, each rank merges its
share and writes those tensors' bytes into the shared output files; rank 0 writes the headers, the index, the
config files and the card, and publishes the directory. The output is byte for byte what one process writes.

Launch with torchrun (every rank runs the same command):

    torchrun --nproc-per-node 4 -m centered_merge merge ft_*/ --method cart --out merged/

Under torchrun (WORLD_SIZE > 1) the CLI joins the process group itself (gloo on CPU, nccl on CUDA). From Python,
initialise torch.distributed first and call merge_checkpoints on every rank with the same arguments. Every rank
must see the same input files and the same output directory (one machine, or a shared filesystem).

Assignment is deterministic: tensors sorted by planned cost (FLOPs + bytes), each given to the least loaded
rank (longest-processing-time first), so every rank computes the same plan without talking to the others.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class RankContext:
    """This process's place in the group, and the few collectives the engine needs."""

    rank: int
    world: int

    @staticmethod
    def current() -> Optional["RankContext"]:
        """The context of an initialised torch.distributed group of more than one process, else None."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return RankContext(dist.get_rank(), dist.get_world_size())

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: Sequence[int]) -> List[int]:
        """Element-wise sum of an int vector over the ranks."""
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t)
        return [int(v) for v in t.cpu()]


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(device: str = "auto") -> Optional[RankContext]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), once; None otherwise.

    Backend: nccl when the merge runs on CUDA, gloo on the CPU.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if not dist.is_initialized():
        use_cuda = str(device) != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return RankContext.current()


def assign(costs: Sequence[Tuple[str, int]], world: int) -> Dict[str, int]:
    """name -> rank. Costliest first, each to the least loaded rank (lowest rank on ties); deterministic."""
    load = [0] * world
    owner: Dict[str, int] = {}
    ranked = sorted(enumerate(costs), key=lambda ic: (-ic[1][1], ic[0]))
    for _, (name, cost) in ranked:
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += max(1, int(cost))
    return owner
