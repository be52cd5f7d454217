"""The reader thread: the inputs of each tensor, in the layout's order, paged in, checked and (CUDA) staged.

It produces ReadItems, `read_ahead` of them ahead of the merge (a bounded queue; 0 = read in the main thread).
On CPU the inputs are mmap views (page cache, not anonymous memory); the non-finite scan of the core pages them
in (the inputs of methods whose kernel counts non-finite inputs itself are not scanned here:
core.scans_inputs_upfront). On CUDA they are staged through pinned host buffers and copied on a side stream, or,
when the inputs of the read-ahead window would take more than a quarter of the device memory, handed over as
LazyDeviceInputs.
"""
from __future__ import annotations

import queue
import threading
from collections import abc
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .core import check_inputs, scans_inputs_upfront
from .request import MergeRequest

_STOP = object()


@dataclass
class ReadItem:
    key: str
    kind: str
    inputs: Sequence[torch.Tensor]
    base: Optional[torch.Tensor]
    nbytes: int
    event: Optional[object]  # a CUDA event the compute stream must wait on, or None
    nonfinite: List[str]  # messages of inputs holding NaN/Inf (allow_nonfinite)
    labels: List[str]  # where each input, then the base, comes from (for the merge's own non-finite scan)


class LazyDeviceInputs(abc.Sequence):
    """The T inputs of one tensor, copied to the compute device only when a method reads one of them.

    Used on CUDA when staging all T inputs at once would take too much device memory: the device then holds
    only the inputs a method is using (methods read one, or two, at a time), whatever T, at the price of one
    host-to-device copy per read. Copies are issued on the current stream, so they are ordered with the compute
    that uses them; the host side goes through a pinned buffer so the copy is a real DMA.
    """

    def __init__(self, host: Sequence[torch.Tensor], device: torch.device):
        self.host, self.device = list(host), device

    def __len__(self):
        return len(self.host)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LazyDeviceInputs([self.host[j] for j in range(*i.indices(len(self)))], self.device)
        return self.copy_to_device(self.host[i])

    def copy_to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t.to(self.device)
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t)
        return pinned.to(self.device, non_blocking=True)


class Reader:
    """Iterates ReadItems for `order`; stop() ends the thread early."""

    def __init__(self, req: MergeRequest, order: Sequence[str]):
        self.req, self.order, self.device = req, list(order), req.device
        self.depth = req.read_ahead
        self.scan = scans_inputs_upfront(req.method)
        self._stop = threading.Event()
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device=self.device)
            self.stage_budget = req.stage_budget()  # beyond it: LazyDeviceInputs, device memory flat in T
        if self.depth > 0:
            self.q: "queue.Queue" = queue.Queue(maxsize=self.depth)
            self.thread = threading.Thread(target=self._run, name="centered_merge-reader", daemon=True)
            self.thread.start()

    def _load(self, i) -> ReadItem:
        key = self.order[i]
        kind = self.req.kinds[key]
        inputs = self.req.inputs
        group = inputs.group
        if i + 1 < len(self.order):  # the disk reads the next tensor while this one is scanned and merged
            for s in group:
                s.prefetch(self.order[i + 1])
        tensors = [s.get(key) for s in group]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        labels = inputs.labels(key)
        nonfinite = check_inputs(key, kind, tensors, labels, self.req.allow_nonfinite, self.scan)
        event = None
        staged = self.cuda and kind == "float" and any(t.device != self.device for t in tensors)
        if staged and nbytes > self.stage_budget:
            host = tensors[:-1] if inputs.use_base else tensors
            base_t = tensors[-1].to(self.device) if inputs.use_base else None  # current stream: ordered
            return ReadItem(key, kind, LazyDeviceInputs(host, self.device), base_t, nbytes, None, nonfinite,
                            labels)
        if staged:
            # pinned host staging + async H2D copy on a side stream; the compute stream waits on `event`
            out = []
            with torch.cuda.stream(self.copy_stream):
                for t in tensors:
                    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    pinned.copy_(t)
                    out.append(pinned.to(self.device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            tensors = out
        if inputs.use_base:
            return ReadItem(key, kind, tensors[:-1], tensors[-1], nbytes, event, nonfinite, labels)
        return ReadItem(key, kind, tensors, None, nbytes, event, nonfinite, labels)

    def _release_behind(self, i) -> None:
        """Called as item i is about to be loaded: the queue holds at most `depth` items, so the merge has taken
        item i - depth - 1 and so has finished item i - depth - 2, whose inputs' pages go now
        (TensorSource.release), overlapped with the merge instead of one unmap of every input at the end. A
        passthrough tensor may still wait in the writer's queue as a view: releasing is safe for live views (they
        fault the pages in again)."""
        j = i - self.depth - 2
        if j >= 0:
            key = self.order[j]
            for s in self.req.inputs.group:
                s.release(key)

    def _run(self):
        try:
            for i in range(len(self.order)):
                if self._stop.is_set():
                    return
                self._release_behind(i)
                self._put(self._load(i))  # the queue then holds the item; nothing here keeps it alive
            self._put(_STOP)
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            self._put(e)

    def _put(self, item) -> None:
        """Queue `item`, waiting for room, unless stop() is called meanwhile."""
        while not self._stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                pass

    def __iter__(self):
        if self.depth <= 0:
            for i in range(len(self.order)):
                yield self._load(i)
            return
        while True:
            item = self.q.get()
            if item is _STOP:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            item = None  # the consumer is done with it: do not hold it while waiting for the next

    def stop(self):
        self._stop.set()
        if self.depth > 0:
            try:
                while True:
                    self.q.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=30)
