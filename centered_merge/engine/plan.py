"""The dry run: what a merge would do, from metadata alone (no tensor data read)."""
from __future__ import annotations

import math
from typing import Any, Dict

import torch

from .inputs import is_mmapped
from .request import MergeRequest


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def plan(req: MergeRequest) -> Dict[str, Any]:
    """Per tensor whether it is low rank and at which k, FLOPs, and an estimate of peak memory."""
    m, inputs, dev = req.method, req.inputs, req.device
    out_info = dict(req.items)
    rows = []
    for key in inputs.keys:
        kind = req.kinds[key]
        info = inputs.sources[0].info(key)
        oinfo = out_info[key]
        in_bytes = sum(s.info(key).nbytes for s in inputs.group)
        if kind == "float":
            p = m.plan_tensor(key, info.shape, info.dtype, req.num_models)
        else:
            p = {"lowrank": False, "k": None, "flops": 0, "workspace_bytes": 0}
        rows.append({"name": key, "shape": tuple(info.shape), "dtype": _name(info.dtype),
                     "out_dtype": _name(oinfo.dtype), "kind": kind,
                     "lowrank": bool(p.get("lowrank")), "k": p.get("k"), "flops": int(p.get("flops") or 0),
                     "workspace_bytes": int(p.get("workspace_bytes") or 0), "in_bytes": in_bytes,
                     "out_bytes": oinfo.nbytes})
    max_out = max((r["out_bytes"] for r in rows), default=0)
    # the method's float32 workspace (its result included) + finalize's NaN/Inf mask (1 byte per element);
    # the torch twins of the element-wise ops also make a float32 copy of each 16-bit input as they add it
    from ..backend import describe as backend_describe

    twin = backend_describe().get("cuda" if dev.type == "cuda" else "cpu") != "native"
    max_ws = max((r["workspace_bytes"] + math.prod(r["shape"]) * (5 if twin else 1) for r in rows), default=0)
    # host: method workspace (+ its float32 result) for the current tensor, the finalized tensor, and the
    # tensors waiting for / being written; mmap'd inputs live in the page cache, not in this figure.
    host = max_ws + (req.write_queue + 2) * max_out
    est = {"host_bytes": host, "device_bytes": 0}
    if dev.type == "cuda":
        # staged inputs of the read-ahead window, as the reader stages them: all T inputs of a tensor up to the
        # request's budget, else one input at a time when read (a method holds at most two)
        budget = req.stage_budget()
        group = len(inputs.group)
        eager = max((r["in_bytes"] for r in rows if r["in_bytes"] <= budget), default=0)
        lazy = max((r["in_bytes"] // group for r in rows if r["in_bytes"] > budget), default=0)
        staged = (req.read_ahead + 1) * eager + 2 * lazy
        est["device_bytes"] = max_ws + staged + max_out
        est["host_bytes"] = host + staged  # pinned staging buffers
    return {
        "method": m.describe(), "models": [s.label for s in inputs.sources],
        "elementwise": "torch" if twin else "native",
        "base": inputs.base.label if inputs.base is not None else None,
        "device": str(dev), "tensors": rows, "num_tensors": len(rows),
        "num_lowrank": sum(r["lowrank"] for r in rows),
        "total_flops": sum(r["flops"] for r in rows),
        "bytes_in": sum(r["in_bytes"] for r in rows), "bytes_out": sum(r["out_bytes"] for r in rows),
        "largest_tensor_bytes": max_out, "peak_memory_estimate": est,
        "held_in_memory": [s.label for s in inputs.sources if not is_mmapped(s)],
    }
