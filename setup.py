"""Builds the native extension centered_merge._C by driving CMake. Package metadata lives in pyproject.toml.

Environment switches (read at build time):
  CENTERED_MERGE_CUDA=auto|on|off     CUDA kernels: auto = when nvcc is found (default), on = required, off = skip
  CENTERED_MERGE_NATIVE_ARCH=1|0      -march=native for the CPU kernels (default 1: pip builds on the machine
                                      that runs the code; set 0 to build a wheel for other machines)
  CMAKE_CUDA_ARCHITECTURES=...        default "80;90"
  CENTERED_MERGE_BUILD_JOBS=N         parallel compile jobs (default: number of CPUs)
CMake comes from PATH, else from the `cmake` pip package when it is installed.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cmake_executable() -> str:
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:
        import cmake  # the PyPI package ships a cmake binary

        cand = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if cand.exists():
            return str(cand)
    except Exception:
        pass
    raise RuntimeError("centered_merge needs CMake >= 3.18 to build its native extension: install it "
                       "(apt install cmake, or pip install cmake) and retry")


def _pybind11_cmake_dir():
    try:
        import pybind11

        return pybind11.get_cmake_dir()
    except Exception:
        return None  # CMakeLists.txt asks `python -m pybind11 --cmakedir` itself


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        cuda = os.environ.get("CENTERED_MERGE_CUDA", "auto").strip().lower()
        if cuda not in ("auto", "on", "off"):
            raise RuntimeError(f"CENTERED_MERGE_CUDA must be auto, on or off, got {cuda!r}")
        native_arch = os.environ.get("CENTERED_MERGE_NATIVE_ARCH", "1").strip().lower() not in ("0", "off", "no", "false")
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}-cuda_{cuda}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCENTERED_MERGE_CUDA={cuda}",
            f"-DCENTERED_MERGE_NATIVE_ARCH={'ON' if native_arch else 'OFF'}",
        ]
        pb = _pybind11_cmake_dir()
        if pb:
            args.append(f"-Dpybind11_DIR={pb}")
        archs = os.environ.get("CMAKE_CUDA_ARCHITECTURES")
        if archs:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
        cmake = _cmake_executable()
        jobs = os.environ.get("CENTERED_MERGE_BUILD_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--config", "Release", "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("centered_merge._C")], cmdclass={"build_ext": CMakeBuild})
