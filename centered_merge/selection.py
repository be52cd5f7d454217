"""Which tensors CART treats as low-rank matrices; all others are averaged.

Presets:
- "default": 2-D float tensors except embeddings, LM heads, norms, biases and position tables. Embedding and
  head matrices are vocabulary-sized lookup tables, not linear maps whose task knowledge lives in a few
  directions; the CART authors' NLP reimplementation averages them too (REFERENCE.md §1).
- "official": the rule of the CART authors' code: "attn" or "mlp" in the name, and neither "ln" nor "bias".
- "all2d": every 2-D float tensor.
`include` / `exclude` regexes (re.search, case-sensitive) override the preset: exclude wins over include, and an
included tensor of more than two dimensions (a conv kernel) is treated as the matrix (shape[0], rest).
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Union

from .errors import MergeConfigError

_DEFAULT_EXCLUDE = re.compile(
    r"(embed|wte|wpe|lm_head|norm|position|(^|[._])ln[_\d]*([._]|$)|bias)", re.IGNORECASE
)

PRESETS = ("default", "official", "all2d")

Patterns = Union[None, str, Sequence[str]]


def _compile(patterns: Patterns, what: str):
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise MergeConfigError(f"{what} pattern {p!r} is not a valid regular expression: {e}") from None
    return out


class Selector:
    """Decides per tensor name and shape whether CART's low-rank step applies."""

    def __init__(self, preset: str = "default", include: Patterns = None, exclude: Patterns = None):
        if preset not in PRESETS:
            raise MergeConfigError(f"select must be one of {', '.join(PRESETS)}; got {preset!r}")
        self.preset = preset
        self.include = _compile(include, "include")
        self.exclude = _compile(exclude, "exclude")

    def _preset_selects(self, name: str, ndim: int) -> bool:
        if ndim != 2:
            return False
        if self.preset == "all2d":
            return True
        if self.preset == "official":
            return ("attn" in name or "mlp" in name) and not ("ln" in name or "bias" in name)
        return _DEFAULT_EXCLUDE.search(name) is None

    def __call__(self, name: str, shape: Iterable[int]) -> bool:
        shape = tuple(shape)
        if len(shape) < 2 or min(shape) == 0:
            return False
        if any(p.search(name) for p in self.exclude):
            return False
        if any(p.search(name) for p in self.include):
            return True
        return self._preset_selects(name, len(shape))

    def describe(self) -> dict:
        return {
            "select": self.preset,
            "include": [p.pattern for p in self.include] or None,
            "exclude": [p.pattern for p in self.exclude] or None,
        }


def matrix_shape(shape: Sequence[int]) -> tuple:
    """The (rows, cols) a selected tensor is viewed as: (shape[0], prod(rest))."""
    rows = int(shape[0])
    cols = 1
    for s in shape[1:]:
        cols *= int(s)
    return rows, cols


def make_selector(select: Optional[str] = "default", include: Patterns = None, exclude: Patterns = None) -> Selector:
    return Selector(select or "default", include, exclude)
