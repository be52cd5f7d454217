"""Name -> merge method class."""
from __future__ import annotations

from typing import Dict, List, Type

from ..errors import MergeConfigError

_METHODS: Dict[str, type] = {}


def register(cls: Type) -> Type:
    """Class decorator: make a MergeMethod subclass available under its `name`."""
    _METHODS[cls.name] = cls
    return cls


def available() -> List[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type:
    try:
        return _METHODS[name]
    except KeyError:
        raise MergeConfigError(f"unknown merge method {name!r}; available: {', '.join(available())}") from None


def get_method(name: str, **params):
    """An instance of the method called `name` with `params` checked."""
    return method_class(name)(**params)
