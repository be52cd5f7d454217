"""Merging with several processes (torch.distributed): the tensors are split across ranks, each rank merges its
share and writes those tensors' bytes into the shared output files; rank 0 writes the headers, the index, the
config files and the card, and publishes the directory. The output is byte for byte what one process writes.

Launch with torchrun (every rank runs the same command):

    torchrun --nproc-per-node 4 -m centered_merge merge ft_*/ --method cart --out merged/

Under torchrun (WORLD_SIZE > 1) the CLI joins the process group itself (gloo on CPU, nccl on CUDA). From Python,
initialise torch.distributed first and call merge_checkpoints(..., distributed=True) on every rank with the same
arguments (checked: ranks given different ones all raise). Every rank must see the same input files and the
same output directory (one machine, or a shared filesystem). Without distributed=True a merge inside a process
group is an ordinary one-process merge, e.g. on rank 0 only.

Assignment is deterministic: tensors sorted by planned cost (FLOPs + bytes), each given to the least loaded
rank (longest-processing-time first), so every rank computes the same plan without talking to the others.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch


@dataclass
class RankContext:
    """This process's place in the group, and the few collectives the engine needs."""

    rank: int
    world: int

    @staticmethod
    def single() -> "RankContext":
        """A single process: a world of one rank, whose collectives return its own values."""
        return RankContext(0, 1)

    @staticmethod
    def current() -> Optional["RankContext"]:
        """The context of an initialised torch.distributed group of more than one process, else None."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return RankContext(dist.get_rank(), dist.get_world_size())

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_from_env(device: str = "auto") -> Tuple[Optional[RankContext], bool]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment).

    Returns (context or None, whether this call created the group, so the caller should destroy it).
    Backend: nccl when the merge runs on CUDA, gloo on the CPU.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None, False
    created = False
    if not dist.is_initialized():
        use_cuda = str(device) != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    return RankContext.current(), created


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
