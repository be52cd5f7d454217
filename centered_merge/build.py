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
    from .ops import OPS

    C = _native.get(warn=False)
    info = {
        "version": _version(),
        "ops": list(OPS),
        "torch": torch.__version__,
        "native_loaded": C is not None,
        "native_error": _native.error(),
    }
    if C is not None:
        b = C.build_info()
        info.update(
            cpu_kernels=list(b["cpu_kernels"]),
            cpu_isa=b["cpu_isa"],
            cpu_isas_compiled=b["cpu_isas_compiled"].split(","),
            cpu_isas_supported=b["cpu_isas_supported"].split(","),
            openmp=bool(b["openmp"]),
            openmp_runtime=b["openmp_runtime"],
            omp_max_threads=int(b["omp_max_threads"]),
            arch_flags=b["arch_flags"],
            compiler=b["compiler"],
            build_type=b["build_type"],
            sanitizers=b["sanitizers"],
            hugepage_hint=bool(b.get("hugepage_hint", False)),
            cuda_compiled=bool(b["cuda_compiled"]),
            cuda_archs=b.get("cuda_archs"),
            cuda_version=b.get("cuda_runtime_version"),
        )
    else:
        info.update(cpu_kernels=[], cpu_isa=None, openmp=False, omp_max_threads=None, cuda_compiled=False,
                    cuda_archs=None, cuda_version=None)
    # the CUDA kernels are gated until they have passed their tests on a real GPU (backend.CUDA_VALIDATED)
    info["cuda_kernels"] = backend.CUDA_STATUS if info["cuda_compiled"] else "not compiled"
    info["gpu_available"] = bool(torch.cuda.is_available())
    info["cuda_native_usable"] = _native.cuda_usable()
    if C is not None and info["cuda_compiled"] and not info["cuda_native_usable"]:
        info["cuda_native_why_not"] = _native.cuda_why_not()
    try:
        info["backend"] = backend.describe()
    except ValueError as e:  # a bad CENTERED_MERGE_BACKEND value
        info["backend"] = {"backend": os.environ.get(backend.ENV), "error": str(e)}
    return info
