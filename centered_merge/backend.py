"""Whether the native kernels may run on a device: the environment switch and the CUDA gate.

CENTERED_MERGE_BACKEND=auto (default) | native | torch:
- torch:  always the pure-torch twins (centered_merge.ops.reference);
- auto:   the native kernels on the CPU; on CUDA only once the CUDA kernels have been validated on a real GPU
          (CUDA_VALIDATED below), the torch twins until then (said once, by a CudaNotValidatedWarning);
- native: the native kernels on the CPU and, when the extension has CUDA kernels and sees a GPU, on CUDA too.
Whether a given call is covered by its kernel (dtype, shape, aliasing, ...) is the ops table's business
(centered_merge/ops/table.py); this module only answers "may native kernels run on this device at all".
A missing or broken extension never raises: it gives one NativeFallbackWarning and the torch twins run.
The variable is read at every call, so tests and benchmarks can switch it on the fly.

This module imports nothing from centered_merge.ops (ops depends on it, never the other way round).
"""
from __future__ import annotations

import os
import threading
import warnings

from . import _native

ENV = "CENTERED_MERGE_BACKEND"
MODES = ("auto", "native", "torch")

# The CUDA kernels compile in every build with nvcc, but no GPU has run them yet. Flip this to True only after
# `make gpu-check` (bench/gpu_check.sh) has passed on a real GPU, with its figures in the README.
CUDA_VALIDATED = False
CUDA_STATUS = "validated on a GPU" if CUDA_VALIDATED else "compiled, not yet validated"


class CudaNotValidatedWarning(UserWarning):
    """`auto` on a CUDA tensor runs the torch twins: the CUDA kernels have not yet passed their tests on a GPU."""


_said = {"cuda_gate": False}
_lock = threading.Lock()


def mode() -> str:
    m = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {os.environ.get(ENV)!r}")
    return m


def _say_cuda_gate_once():
    with _lock:
        if _said["cuda_gate"]:
            return
        _said["cuda_gate"] = True
    warnings.warn(f"centered_merge: the CUDA kernels are {CUDA_STATUS}; running the torch implementations on the "
                  f"GPU instead (same results). Set {ENV}=native to use the CUDA kernels anyway.",
                  CudaNotValidatedWarning, stacklevel=4)


def native_allowed(device_type: str) -> bool:
    """Whether the native kernels may run for tensors on `device_type` ('cpu', 'cuda', ...) under the current
    mode, build and gate. The one place that decides native-vs-torch per device."""
    m = mode()
    if m == "torch" or _native.get() is None:
        return False
    if device_type == "cpu":
        return True
    if device_type != "cuda" or not _native.cuda_usable():
        return False
    if m == "native" or CUDA_VALIDATED:
        return True
    _say_cuda_gate_once()
    return False


def describe() -> dict:
    """What runs where, and why (for build_info(), logs and the model card)."""
    m = mode()
    C = _native.get(warn=False)
    d = {"backend": m, "native": C is not None, "native_error": _native.error()}
    if m == "torch" or C is None:
        d.update(cpu="torch", cuda="torch")
        return d
    d["cpu"] = "native"
    if not _native.cuda_usable():
        d["cuda"] = "torch"
        d["cuda_native_why_not"] = _native.cuda_why_not()
    elif m == "native" or CUDA_VALIDATED:
        d["cuda"] = "native"
    else:
        d["cuda"] = "torch"
        d["cuda_native_why_not"] = f"CUDA kernels {CUDA_STATUS} (set {ENV}=native to opt in)"
    return d
