"""Loads the native extension centered_merge._C, once.

A missing or broken extension is not an error: `get()` returns None, one NativeFallbackWarning says why, and
every op runs its pure-torch twin (centered_merge.ops.reference). Nothing here raises ImportError.
"""
from __future__ import annotations

import threading
import warnings
from typing import Optional


class NativeFallbackWarning(RuntimeWarning):
    """The native extension could not be used; centered_merge runs its torch implementations instead."""


_lock = threading.Lock()
_state = {"tried": False, "module": None, "error": None, "warned": False}


def _load():
    try:
        from . import _C  # noqa: PLC0415
    except Exception as e:  # ImportError, OSError (bad .so), anything a broken build throws
        return None, f"{type(e).__name__}: {e}"
    try:  # a module that imports but cannot answer its own questions is broken too
        info = _C.build_info()
        if not isinstance(info, dict) or "cpu_kernels" not in info:
            return None, "centered_merge._C.build_info() returned an unexpected value"
    except Exception as e:
        return None, f"centered_merge._C is broken: {type(e).__name__}: {e}"
    return _C, None


def get(warn: bool = True):
    """The loaded extension module, or None (after one warning) when it cannot be used."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["module"], _state["error"] = _load()
                _state["tried"] = True
    if _state["module"] is None and warn and not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            f"centered_merge: the native extension is not available ({_state['error']}); running the pure-torch "
            "implementations instead (slower, same results). Rebuild with `pip install -e .` to get it back.",
            NativeFallbackWarning,
            stacklevel=3,
        )
    return _state["module"]


def error() -> Optional[str]:
    """Why the extension could not be loaded (None when it loaded or was not tried yet)."""
    get(warn=False)
    return _state["error"]


_cuda = {"checked": False, "count": 0, "why": None}


def cuda_usable() -> bool:
    """Whether the extension has CUDA kernels and its (static) CUDA runtime sees at least one GPU."""
    C = get(warn=False)
    if C is None:
        return False
    if not _cuda["checked"]:
        if not C.build_info().get("cuda_compiled"):
            _cuda.update(checked=True, count=0, why="built without CUDA kernels")
        else:
            n, why = C.cuda_device_count()
            _cuda.update(checked=True, count=int(n), why=why or (None if n else "no CUDA device"))
    return _cuda["count"] > 0


def cuda_why_not() -> Optional[str]:
    cuda_usable()
    return _cuda["why"]
