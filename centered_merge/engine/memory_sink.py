"""The sink of an in-memory merge (api.merge): the merged tensors in a dict, on the CPU, in the inputs' order."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch


class DictSink:
    """Has the writer's interface (order, write, finish, abort) for a world of one process."""

    resumed = 0

    def __init__(self, order: Sequence[str]):
        self.order = list(order)
        self.tensors: Dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        elif not tensor.is_floating_point():
            tensor = tensor.clone()  # copied through from an input: the result must not alias the caller's tensor
        self.tensors[name] = tensor

    def finish(self, counts: Sequence[int], messages: Sequence[str] = ()) -> Tuple[List[int], List[str]]:
        return list(counts), list(messages)

    def abort(self) -> None:
        self.tensors = {}
