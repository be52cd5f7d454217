"""The one resolved merge request: method instance, inputs, dtypes, device, shard layout and options.

Built once by `build_request`, then used as it is by the dry-run plan (plan.py) and by the merge (pipeline.py),
so the two cannot resolve anything differently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import MergeConfigError
from ..io import TensorInfo
from ..io.layout import ShardLayout
from ..io.writer import parse_size
from ..methods import MergeMethod, get_method
from .card import library_version
from .inputs import Inputs

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(value, what: str = "dtype") -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().replace("torch.", "")
    if key not in _DTYPE_NAMES:
        raise MergeConfigError(f"{what} {value!r} is not a float dtype; use one of bfloat16, float16, float32, float64")
    return _DTYPE_NAMES[key]


def resolve_device(device) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MergeConfigError(f"device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeConfigError(f"device {device!r} requested but CUDA is not available in this torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise MergeConfigError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def resolve_method(method, params: dict) -> MergeMethod:
    """A method instance from a registered name and its parameters, or an instance given as is."""
    if isinstance(method, MergeMethod):
        if params:
            raise MergeConfigError("pass parameters either to the method object or to merge(), not both")
        return method
    return get_method(method, **params)


@dataclass
class MergeRequest:
    method: MergeMethod
    inputs: Inputs
    out_dtype: Optional[torch.dtype]
    device: torch.device
    read_ahead: int = 2
    write_queue: int = 1
    shard_size: int = 5 * 10**9
    allow_nonfinite: bool = False
    kinds: Dict[str, str] = field(default_factory=dict)
    items: List[Tuple[str, TensorInfo]] = field(default_factory=list)  # every output tensor, in input order
    _layout: Optional[ShardLayout] = None

    @property
    def num_models(self) -> int:
        return len(self.inputs.sources)

    @property
    def layout(self) -> ShardLayout:
        """The output's shard layout (computed on first use: an in-memory merge has none)."""
        if self._layout is None:
            self._layout = ShardLayout(self.items, self.shard_size)
        return self._layout

    def stage_budget(self) -> int:
        """CUDA: the most input bytes of one tensor staged eagerly (all T inputs copied ahead on a side stream):
        the staged inputs of the read-ahead window then fit in a quarter of the device memory. A tensor with
        more input bytes is copied to the device one input at a time, when read (reader.LazyDeviceInputs)."""
        if self.device.type != "cuda":
            return 0
        total = torch.cuda.get_device_properties(self.device).total_memory
        return total // (4 * (self.read_ahead + 1))

    def cost(self, key: str) -> int:
        """Planned work for one tensor, to share tensors out between ranks: FLOPs plus bytes moved."""
        info = self.inputs.sources[0].info(key)
        flops = (self.method.plan_tensor(key, info.shape, info.dtype, self.num_models)["flops"]
                 if self.kinds[key] == "float" else 0)
        return int(flops) + info.nbytes * (self.num_models + 1)

    def fingerprint(self) -> Optional[Dict[str, Any]]:
        """What a resumed merge must share with the run that started it; None when inputs are in memory."""
        files = self.inputs.fingerprint()
        if files is None:
            return None
        return {"version": library_version(), "method": self.method.describe(),
                "options": {"out_dtype": str(self.out_dtype), "allow_nonfinite": self.allow_nonfinite,
                            "uses_base": self.inputs.use_base},
                "inputs": files}

    def close(self) -> None:
        self.inputs.close()


def build_request(models, method="cart", base=None, *, out_dtype=None, dtype=None, device="auto", read_ahead=2,
                  write_queue=1, shard_size=5 * 10**9, allow_nonfinite=False, trust_pickle=False,
                  labels: Optional[List[str]] = None, **params) -> MergeRequest:
    """Resolve everything a merge needs before reading any tensor data; opens the inputs (close() the result)."""
    m = resolve_method(method, params)
    out_dt = parse_dtype(out_dtype, "out_dtype") or parse_dtype(dtype, "dtype")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    size = parse_size(shard_size)
    try:
        read_ahead = int(read_ahead)
    except (TypeError, ValueError):
        raise MergeConfigError(f"read_ahead must be an integer >= 0; got {read_ahead!r}") from None
    if read_ahead < 0:
        raise MergeConfigError(f"read_ahead must be >= 0; got {read_ahead}")
    inputs = Inputs(models, base, m, trust_pickle, labels=labels)
    try:
        kinds = {k: inputs.kind(k) for k in inputs.keys}
        items = [(k, inputs.out_info(k, kinds[k], out_dt)) for k in inputs.keys]
    except BaseException:
        inputs.close()
        raise
    return MergeRequest(method=m, inputs=inputs, out_dtype=out_dt, device=dev, read_ahead=read_ahead,
                        write_queue=int(write_queue), shard_size=size, allow_nonfinite=bool(allow_nonfinite),
                        kinds=kinds, items=items)
