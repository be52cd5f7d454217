"""build_info(): what this installation of centered_merge was built with and what it will run."""
from __future__ import annotations

import os


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("centered_merge")
    except Exception:
        return "unknown"


def build_info() -> dict:
    import torch

    from . import _native, backend

    C = _native.get(warn=False)
    info = {
        "version": _version(),
        "torch": torch.__version__,
        "native_loaded": C is not None,
        "native_error": _native.error(),
    }
    if C is not None:
        b = C.build_info()
        info.update(
            cpu_kernels=list(b["cpu_kernels"]),
            openmp=bool(b["openmp"]),
            omp_max_threads=int(b["omp_max_threads"]),
            simd=list(b["simd"]),
            arch_flags=b["arch_flags"],
            compiler=b["compiler"],
            hugepage_hint=bool(b.get("hugepage_hint", False)),
            cuda_compiled=bool(b["cuda_compiled"]),
            cuda_archs=b.get("cuda_archs"),
            cuda_version=b.get("cuda_runtime_version"),
        )
    else:
        info.update(cpu_kernels=[], openmp=False, omp_max_threads=None, simd=[], cuda_compiled=False,
                    cuda_archs=None, cuda_version=None)
    info["gpu_available"] = bool(torch.cuda.is_available())
    info["cuda_native_usable"] = _native.cuda_usable()
    if C is not None and info["cuda_compiled"] and not info["cuda_native_usable"]:
        info["cuda_native_why_not"] = _native.cuda_why_not()
    try:
        info["backend"] = backend.describe()
    except ValueError as e:  # a bad CENTERED_MERGE_BACKEND value
        info["backend"] = {"backend": os.environ.get(backend.ENV), "error": str(e)}
    return info
