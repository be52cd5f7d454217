"""The per-tensor interface every merge method implements, and the parameter checking they share."""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import torch

from .. import ops
from ..errors import MergeConfigError
from .params import Param
from .schedule import describe_value, value_at


class MergeMethod:
    """One merge method with its parameters resolved.

    Subclasses set `name`, `needs_base`, `parameters` (a tuple of Param: every accepted parameter, declared once)
    and implement `merge_tensor`; `defaults` is derived from `parameters`. Every value passes through its
    Param.check when the method is built, whatever front end (Python, CLI, YAML) it came from; `validate` adds the
    checks that involve several parameters. Inputs arrive tensor by tensor so the same object drives in-memory
    merges and the streaming engine.
    """

    name: ClassVar[str] = ""
    needs_base: ClassVar[bool] = False
    summary: ClassVar[str] = ""  # one line for the README's method table
    parameters: ClassVar[Tuple[Param, ...]] = ()
    defaults: ClassVar[Dict[str, Any]] = {}
    # True where merge_tensor_to's non-finite count is non-zero whenever an input holds NaN/Inf: for the fused
    # linear merges every input element enters an IEEE sum with a finite factor and nothing is skipped, so NaN and
    # +-Inf always reach the result (0 * Inf is NaN); TIES's count adds its non-finite task-vector entries, kept
    # or dropped. The engine then skips its up-front scan of the inputs and scans them only when the count is not
    # 0, to name the input, and recounts the output when they are finite (engine/core.py).
    counts_nonfinite_inputs: ClassVar[bool] = False
    # True where merge_tensor_to takes `out=`: a caller's contiguous tensor of the output's shape and dtype that
    # the result is written into (the engine passes reused buffers, so no fresh pages per tensor).
    writes_into: ClassVar[bool] = False
    # True where each output element depends only on the same element of the inputs (and the parameters of the
    # tensor's name): the engine may then merge a large tensor in pieces of its flat elements, handing each piece
    # to the writer while it computes the next (engine/core.py, merge_tensor_in_pieces). Not TIES (a top-k
    # threshold per tensor), DARE (one random mask per tensor) or CART (an SVD).
    elementwise: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "parameters" not in cls.__dict__ and "defaults" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: declare `parameters` (a tuple of Param), not `defaults`")
        names = [p.name for p in cls.parameters]
        if len(set(names)) != len(names):
            raise TypeError(f"{cls.__name__}: a parameter is declared twice in {names}")
        cls.defaults = {p.name: p.default for p in cls.parameters}

    @classmethod
    def param(cls, key: str) -> Param:
        for p in cls.parameters:
            if p.name == key:
                return p
        raise KeyError(key)

    def __init__(self, **params):
        aliases = {a: p.name for p in self.parameters for a in p.yaml_keys}
        named, spelled = {}, {}
        for key, value in params.items():
            canon = aliases.get(key, key)
            if canon in named:
                raise MergeConfigError(f"method {self.name!r}: {key} and another name of {canon} both given")
            named[canon], spelled[canon] = value, key
        params = named
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise MergeConfigError(
                f"method {self.name!r} does not take parameter(s) {', '.join(unknown)}; it takes: {allowed}"
            )
        missing = [p.name for p in self.parameters if p.required and params.get(p.name) is None]
        if missing:
            p = self.param(missing[0])
            raise MergeConfigError(f"{self.name}: parameter {p.name} is required ({p.help})")
        checked = {k: self.param(k).check(self.name, v, spelled[k]) for k, v in params.items()}
        self.params = {**self.defaults, **checked}
        self.validate()

    def __getattr__(self, key):
        params = self.__dict__.get("params", {})
        if key in params:
            return params[key]
        raise AttributeError(key)

    def values(self, name: str, num_models: int) -> "TensorValues":
        """The parameter values for tensor `name`: schedules (gradients, filter lists, precedence chains) resolved
        for it, per-model parameters as a list of `num_models` values, unset values replaced by the defaults."""
        out = {}
        for p in self.parameters:
            v = self.params[p.name]
            if p.per_model:
                vs = v if isinstance(v, list) else [v] * num_models
                if len(vs) != num_models:
                    raise MergeConfigError(f"{self.name}: {len(vs)} {plural(p.name)} given for {num_models} models")
                got = [value_at(x, name) for x in vs]
                if any(g is None for g in got) and p.default is None and not p.nullable:
                    raise MergeConfigError(f"{self.name}: no {p.name} for tensor {name!r}")
                out[p.name] = [p.default if g is None else g for g in got]
            else:
                g = value_at(v, name)
                out[p.name] = p.default if g is None else g
        return TensorValues(out)

    def validate(self) -> None:
        """Raise MergeConfigError for an invalid parameter value."""

    def merge_tensor(
        self, name: str, inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Merge the T tensors called `name` (same shape, any float dtype). Returns float32."""
        raise NotImplementedError

    def merge_tensor_to(
        self, name: str, inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], dtype: torch.dtype
    ) -> Tuple[torch.Tensor, int]:
        """The merged tensor converted to `dtype`, and how many NaN/Inf values it holds: what the engine writes.
        By default merge_tensor's float32 result through ops.finalize; methods with a fused kernel that writes
        `dtype` directly (and counts on the way) override this instead, and derive merge_tensor from it."""
        return ops.finalize(self.merge_tensor(name, inputs, base), dtype)

    def plan_tensor(self, name: str, shape, dtype: torch.dtype, num_models: int) -> dict:
        """What merge_tensor will do, without doing it: for --dry-run and memory estimates."""
        numel = numel_of(shape)
        return {"lowrank": False, "k": None, "flops": numel * (num_models + 1), "workspace_bytes": 4 * numel}

    def describe(self) -> dict:
        return {"method": self.name, **{k: describe_value(v) for k, v in self.params.items()}}


def plural(word: str) -> str:
    return word[:-1] + "ies" if word.endswith("y") else word + ("es" if word.endswith("s") else "s")


class TensorValues(dict):
    """Resolved parameter values of one tensor; read as attributes (v.lam) or keys (v["lam"])."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def check_number(method: str, key: str, value, lo=None, hi=None, lo_open=False, hi_open=False):
    """Raise MergeConfigError unless `value` is a real number within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeConfigError(f"{method}: {key} must be a number; got {value!r}")
    v = float(value)
    if v != v:
        raise MergeConfigError(f"{method}: {key} must be a number; got NaN")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise MergeConfigError(f"{method}: {key} must be {'>' if lo_open else '>='} {lo}; got {value}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise MergeConfigError(f"{method}: {key} must be {'<' if hi_open else '<='} {hi}; got {value}")


def numel_of(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
