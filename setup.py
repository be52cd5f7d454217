"""Builds the native extension centered_merge._C by driving CMake. Package metadata lives in pyproject.toml.

Environment switches (read at build time):
  CENTERED_MERGE_CUDA=auto|on|off     CUDA kernels: auto = when nvcc is found (default), on = required, off = skip
  CENTERED_MERGE_NATIVE_ARCH=0|1      0 (default): portable, the CPU kernels are compiled per ISA (baseline,
                                      AVX2, AVX-512) and chosen at run time; 1: one -march=native copy for
                                      the build host only (a wheel built so crashes other CPUs with SIGILL)
  CENTERED_MERGE_DEBUG=1              CMAKE_BUILD_TYPE=Debug (-O0 -g, assertions on); default Release
  CENTERED_MERGE_SANITIZE=address,undefined   build with those sanitizers (see `make sanitize`)
  CENTERED_MERGE_BUILD_DIR=path       where CMake builds (default: build/cmake-<platform>-<python>-<switches>
                                      next to this file); the source tree is never written to otherwise
  CMAKE_ARGS="-DX=Y ..."              extra CMake arguments, appended last (so they win), as scikit-build does
  CMAKE_CUDA_ARCHITECTURES=...        default "80;90"
  CENTERED_MERGE_BUILD_JOBS=N         parallel compile jobs (default: number of CPUs)
CMake comes from PATH, else from the `cmake` pip package when it is installed.

Why a small setup.py driving CMake rather than scikit-build-core: the project's own flow is an editable install
that tests import from the source tree (`make test`: pytest in the repository root). scikit-build-core's
editable installs redirect imports to site-packages (or need its experimental in-place mode), and every build
in an isolated environment would need it downloaded; this driver has no dependency beyond setuptools, works
offline with `pip install --no-build-isolation`, and gives the same switches (CMAKE_ARGS, build type, out-of-tree
build directory). Revisit when the project publishes wheels (scikit-build-core + cibuildwheel is then the usual
choice).
"""
import shlex
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
        on = lambda v: os.environ.get(v, "0").strip().lower() not in ("", "0", "off", "no", "false")  # noqa: E731
        native_arch = on("CENTERED_MERGE_NATIVE_ARCH")
        build_type = "Debug" if on("CENTERED_MERGE_DEBUG") else "Release"
        sanitize = os.environ.get("CENTERED_MERGE_SANITIZE", "").strip()
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        tag = (f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}-cuda_{cuda}-{build_type.lower()}"
               + ("-native" if native_arch else "") + (f"-san_{sanitize.replace(',', '_')}" if sanitize else ""))
        build_dir = Path(os.environ.get("CENTERED_MERGE_BUILD_DIR") or ROOT / "build" / f"cmake-{tag}").resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCENTERED_MERGE_CUDA={cuda}",
            f"-DCENTERED_MERGE_NATIVE_ARCH={'ON' if native_arch else 'OFF'}",
            f"-DCENTERED_MERGE_SANITIZE={sanitize}",
        ]
        pb = _pybind11_cmake_dir()
        if pb:
            args.append(f"-Dpybind11_DIR={pb}")
        archs = os.environ.get("CMAKE_CUDA_ARCHITECTURES")
        if archs:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        cmake = _cmake_executable()
        jobs = os.environ.get("CENTERED_MERGE_BUILD_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--config", build_type, "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("centered_merge._C")], cmdclass={"build_ext": CMakeBuild})
