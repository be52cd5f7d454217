"""A merge method's parameters, each declared once: name, kind, default, allowed values, help, YAML names, CLI flag.

Everything else is derived from these declarations (methods/catalog.py): the CLI flags, the YAML key lookup,
the README's method table, the dry-run description. Every value, whichever front end it came from, passes
through Param.check, so a bad value (a string, NaN, +-inf, out of range, a list where a number belongs) is
refused before any tensor is read, with the method's and the parameter's name in the message.

Values of `schedulable` parameters may also be schedules (methods/schedule.py: a gradient over the layers, or a
list of {filter, value}); their values are checked one by one. `per_model` parameters (mergekit's "tensor
parameters": weight, density, ...) take one value for all models or one per model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from ..errors import MergeConfigError

# kinds of value, and what each accepts
KINDS = {
    "float": "a finite number",
    "int": "an integer",
    "bool": "true or false",
    "choice": "one of the listed names",
    "rank": "a ratio in (0, 1] or an integer k >= 1",
    "indices": "a list of ints or a string like 0-7,16 (0-based)",
    "patterns": "a regular expression or a list of them",
    "floats": "a list of finite numbers",
}


@dataclass(frozen=True)
class Param:
    name: str  # the Python keyword and the canonical YAML key
    kind: str  # a key of KINDS
    default: Any
    help: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: Tuple[str, ...] = ()
    aliases: Tuple[str, ...] = ()  # other YAML keys meaning the same (mergekit's names: lambda for lam)
    flag: Optional[str] = None  # CLI flag; default "--" + name with "_" -> "-"
    optional: bool = False  # None is a valid value (meaning "not set"); implied by a None default
    required: bool = False  # the method cannot run without it (its default is None)
    per_model: bool = False  # one value for all models, or one per model
    schedulable: bool = False  # may vary per tensor (a gradient over layers, a filter list)
    mergekit: Optional[str] = None  # the name mergekit gives it, where it has one and it differs
    yaml_default: Any = None  # the default when a mergekit-style YAML config omits it (mergekit's), if it differs
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"parameter {self.name}: unknown kind {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"parameter {self.name}: a choice needs choices")

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def yaml_keys(self) -> Tuple[str, ...]:
        return (self.name,) + tuple(a for a in self.aliases if a != self.name)

    @property
    def nullable(self) -> bool:
        return (self.optional or self.default is None) and not self.required

    def range_text(self) -> str:
        """The allowed values, in words, for help texts and the README."""
        if self.kind == "choice":
            return " | ".join(self.choices)
        if self.kind in ("float", "int", "floats") and (self.lo is not None or self.hi is not None):
            lo = "-inf" if self.lo is None else f"{self.lo:g}"
            hi = "inf" if self.hi is None else f"{self.hi:g}"
            return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"
        return KINDS[self.kind]

    # -- checking -----------------------------------------------------------------------------------------
    def check(self, method: str, value, as_name: Optional[str] = None):
        """The value, normalised (ints of float parameters become floats, ...); MergeConfigError if invalid.
        Messages name the parameter as the caller spelled it (`as_name`, e.g. an alias)."""
        where = f"{method}: {as_name or self.name}"
        if value is None:
            if self.nullable:
                return None
            raise MergeConfigError(f"{where} must be {KINDS[self.kind]}; got nothing (null)")
        if self.per_model and isinstance(value, (list, tuple)) and self.kind != "floats":
            if not value:
                raise MergeConfigError(f"{where}: an empty list; give one value, or one per model")
            out = []
            for i, v in enumerate(value):
                try:
                    out.append(self._check_one(where, v))
                except MergeConfigError as e:
                    raise MergeConfigError(f"{e} (model {i})") from None
            return out
        return self._check_one(where, value)

    def _check_one(self, where: str, value):
        if hasattr(value, "map_values"):  # a schedule: check every value it can take
            if not self.schedulable:
                raise MergeConfigError(f"{where} takes one value, not a per-layer gradient or filter list")
            return value.map_values(lambda v, w: self._check_scalar(f"{where} ({w})", v))
        return self._check_scalar(where, value)

    def _check_scalar(self, where: str, value):
        k = self.kind
        if k == "float":
            return self._number(where, value, float)
        if k == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise MergeConfigError(f"{where} must be an integer; got {value!r}")
            return self._number(where, value, int)
        if k == "bool":
            if not isinstance(value, bool):
                raise MergeConfigError(f"{where} must be true or false; got {value!r}")
            return value
        if k == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise MergeConfigError(f"{where} must be one of {', '.join(self.choices)}; got {value!r}")
            return value
        if k == "rank":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MergeConfigError(f"{where} must be {KINDS[k]}; got {value!r}")
            return self._number(where, value, type(value))
        if k == "indices":
            if isinstance(value, (str, int, list, tuple)) and not isinstance(value, bool):
                return list(value) if isinstance(value, tuple) else value  # parsed by the method (a range syntax)
            raise MergeConfigError(f"{where} must be {KINDS[k]}; got {value!r}")
        if k == "patterns":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
                raise MergeConfigError(f"{where} must be {KINDS[k]}; got {value!r}")
            return value if isinstance(value, str) else list(items)
        if k == "floats":
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
                raise MergeConfigError(f"{where} must be {KINDS[k]}; got {value!r}")
            return [self._number(f"{where}[{i}]", v, float) for i, v in enumerate(value)]
        raise AssertionError(k)  # pragma: no cover  (KINDS is checked in __post_init__)

    def _number(self, where: str, value, cast):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeConfigError(f"{where} must be a number; got {value!r}")
        v = float(value)
        if math.isnan(v):
            raise MergeConfigError(f"{where} must be a number; got NaN")
        if math.isinf(v):
            raise MergeConfigError(f"{where} must be finite; got {value}")
        lo, hi = self.lo, self.hi
        if lo is not None and (v < lo or (self.lo_open and v == lo)):
            raise MergeConfigError(f"{where} must be {'>' if self.lo_open else '>='} {lo:g}; got {value}")
        if hi is not None and (v > hi or (self.hi_open and v == hi)):
            raise MergeConfigError(f"{where} must be {'<' if self.hi_open else '<='} {hi:g}; got {value}")
        return cast(value)


def lam_param(default: float, help_text: str = "scale of the merged task vectors", **kw) -> Param:
    """The scale that mergekit calls `lambda` (a Python keyword, hence `lam`; CART's authors call it `prior`)."""
    return Param("lam", "float", default, help_text, aliases=("lambda",) + kw.pop("aliases", ()), flag="--lambda",
                 mergekit="lambda", **kw)


def weight_param(default=1.0, **kw) -> Param:
    return Param("weight", "float", default, "each model's weight", per_model=True, schedulable=True,
                 aliases=("weights",), flag="--weights", **kw)


def density_param(default, yaml_default=None, lo_open=True, **kw) -> Param:
    return Param("density", "float", default, "fraction of each task vector's entries kept", lo=0.0, hi=1.0,
                 lo_open=lo_open, per_model=True, schedulable=True, yaml_default=yaml_default, **kw)


def normalize_param(default: bool) -> Param:
    return Param("normalize", "bool", default, "divide by the sum of the weights that contribute at each entry")


def rescale_param(default: bool) -> Param:
    return Param("rescale", "bool", default, "scale each thinned task vector back to its L1 norm")


def use_base_param(help_text: str) -> Param:
    return Param("use_base", "bool", False, help_text + " (mergekit does this when a config names base_model)")


def seed_param(help_text: str = "seed of the random steps; with the tensor name it fixes each tensor's draws") -> Param:
    return Param("seed", "int", 0, help_text, lo=0)


def random_mask_params(normalize: bool, *extra: Param) -> tuple:
    """The parameters of the random-mask task-vector merges (DARE, DELLA): density, the method's own `extra`,
    per-model weight, lambda, normalize (default `normalize`), rescale and seed."""
    return (density_param(1.0, lo_open=False), *extra, weight_param(), lam_param(1.0, schedulable=True),
            normalize_param(normalize), rescale_param(True), seed_param())
