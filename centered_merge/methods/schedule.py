"""Parameter values that vary per tensor, with mergekit's meaning (read from its config.py and plan.py):

- Gradient([v0, v1, ...], num_layers): linear interpolation over t = layer / (num_layers - 1) for the tensors of
  layer `layer` (t = 1 when the model has one layer); tensors outside the layers (embeddings, final norm, head)
  take t = 0, as in mergekit;
- Filtered([(substring, value), ..., (None, default)]): the first entry whose substring occurs in the tensor name
  (None or "*" matches every name); a value may itself be a Gradient; no match means "not set here";
- Chain([high, ..., low]): the first level that sets a value (mergekit's precedence: slice source > slice >
  per-model > global).

`value_at(v, name)` gives the plain value of any of these (or of a plain value) for one tensor; None = not set.
"""
from __future__ import annotations

import re
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ..errors import MergeConfigError

# the layer index inside HF-style names: model.layers.3.mlp..., transformer.h.3..., blocks.3..., encoder.layer.3...
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> Optional[int]:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class Schedule:
    """A value that depends on the tensor. Subclasses implement at(name) and map_values(fn)."""

    def at(self, name: str):
        raise NotImplementedError

    def map_values(self, fn: Callable[[Any, str], Any]) -> "Schedule":
        """The same schedule with fn(value, where) applied to every value it holds (checks, conversions)."""
        raise NotImplementedError

    def describe(self):
        raise NotImplementedError

    def __eq__(self, other):
        return type(self) is type(other) and self.describe() == other.describe()

    def __repr__(self):
        return f"{type(self).__name__}({self.describe()!r})"


class Gradient(Schedule):
    def __init__(self, values: Sequence, num_layers: Optional[int] = None):
        values = list(values)
        if len(values) < 1:
            raise MergeConfigError("a gradient needs at least one value")
        self.values, self.num_layers = values, num_layers

    def t(self, name: str) -> float:
        layer = layer_index(name)
        if layer is None:
            return 0.0
        if self.num_layers is None:
            raise MergeConfigError(f"a per-layer gradient {self.values} needs the model's layer count (tensor {name!r}); "
                                   "give Gradient(values, num_layers=N)")
        if layer >= self.num_layers:
            raise MergeConfigError(f"tensor {name!r} is in layer {layer}, but the model has {self.num_layers} layers")
        return 1.0 if self.num_layers == 1 else layer / (self.num_layers - 1)

    def at(self, name: str):
        v = self.values
        if len(v) == 1:
            return v[0]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return v[int(self.t(name) * (len(v) - 1))]  # non-numbers: the nearest step below, as mergekit does
        scaled = self.t(name) * (len(v) - 1)
        i0 = int(scaled)
        i1 = min(len(v) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * v[i0] + frac * v[i1]

    def map_values(self, fn):
        return Gradient([fn(x, f"gradient entry {i}") for i, x in enumerate(self.values)], self.num_layers)

    def describe(self):
        return list(self.values)


class Filtered(Schedule):
    def __init__(self, entries: Sequence[Tuple[Optional[str], Any]]):
        self.entries = [(f, v) for f, v in entries]

    def at(self, name: str):
        for f, v in self.entries:
            if f is None or f == "*" or f in name:
                return value_at(v, name)
        return None

    def map_values(self, fn):
        out = []
        for f, v in self.entries:
            where = f"filter {f!r}" if f is not None else "default entry"
            out.append((f, v.map_values(lambda x, w: fn(x, f"{where}, {w}")) if isinstance(v, Schedule)
                        else fn(v, where)))
        return Filtered(out)

    def describe(self):
        return [{"value": v.describe() if isinstance(v, Schedule) else v, **({"filter": f} if f is not None else {})}
                for f, v in self.entries]


class Chain(Schedule):
    def __init__(self, levels: Sequence):
        self.levels = [v for v in levels if v is not None]

    def at(self, name: str):
        for v in self.levels:
            got = value_at(v, name)
            if got is not None:
                return got
        return None

    def map_values(self, fn):
        return Chain([v.map_values(fn) if isinstance(v, Schedule) else fn(v, "value") for v in self.levels])

    def describe(self):
        return [v.describe() if isinstance(v, Schedule) else v for v in self.levels]


def value_at(v, name: str):
    return v.at(name) if isinstance(v, Schedule) else v


def describe_value(v):
    if isinstance(v, Schedule):
        return v.describe()
    if isinstance(v, list):
        return [describe_value(x) for x in v]
    return v


def from_yaml(value, num_layers: Optional[int], where: str):
    """A YAML parameter value as a plain value or a Schedule: a list of numbers (or of plain values) is a
    gradient, a mapping with `value` or a list of such mappings is a filter list."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        entries: List[Tuple[Optional[str], Any]] = []
        for i, e in enumerate(value):
            extra = sorted(set(e) - {"filter", "value"})
            if "value" not in e or extra:
                raise MergeConfigError(f"{where}[{i}]: expected {{filter: SUBSTRING, value: V}}"
                                       + (f"; unknown key(s) {', '.join(extra)}" if extra else ""))
            f = e.get("filter")
            if f is not None and not isinstance(f, str):
                raise MergeConfigError(f"{where}[{i}].filter must be a string; got {f!r}")
            entries.append((f, from_yaml(e["value"], num_layers, f"{where}[{i}].value")))
        return Filtered(entries)
    if isinstance(value, list):
        if not value:
            raise MergeConfigError(f"{where}: an empty list")
        if any(isinstance(e, (list, dict)) for e in value):
            raise MergeConfigError(f"{where}: a gradient holds plain values; got {value!r}")
        return Gradient(value, num_layers)
    return value
