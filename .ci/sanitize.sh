#!/usr/bin/env bash
# The sanitizer job (`make sanitize`): builds centered_merge._C with AddressSanitizer + UndefinedBehaviorSanitizer
# (CPU kernels only, every ISA path compiled), out of the source tree, into a copy of the package under
# build/sanitize/, and runs the kernel and binding tests against it with libasan preloaded into python (python
# itself is not instrumented). Any sanitizer report aborts the run (-fno-sanitize-recover=all, halt_on_error).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac  # absolute, but not resolved (a venv's python is a symlink)
OUT=build/sanitize
rm -rf "$OUT/pkg"
mkdir -p "$OUT/pkg"
OUT=$(realpath "$OUT")
cp -r centered_merge "$OUT/pkg/"
rm -f "$OUT"/pkg/centered_merge/_C*.so
cmake -S . -B "$OUT/cmake" -DCENTERED_MERGE_CUDA=off -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCENTERED_MERGE_SANITIZE=address,undefined -DPython_EXECUTABLE="$PY" \
      -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$OUT/pkg/centered_merge" >"$OUT/configure.log"
cmake --build "$OUT/cmake" --parallel "$(nproc)" >"$OUT/build.log"
# libstdc++ is preloaded too: python does not link it, and ASan's __cxa_throw interceptor must find the real one
PRELOAD="$(${CXX:-c++} -print-file-name=libasan.so) $(${CXX:-c++} -print-file-name=libstdc++.so)"
TESTS=$(realpath tests)
cd "$OUT/pkg"
# detect_leaks=0: the interpreter and torch keep allocations until exit by design; everything else is fatal
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$PY" -m pytest -q -p no:cacheprovider -x "$TESTS/test_kernels.py" "$TESTS/test_bindings.py" \
  -k "not cuda" -W error::centered_merge._native.NativeFallbackWarning
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 "$PY" -c "import centered_merge._C as c; i = c.build_info(); assert i['sanitizers'] == 'address,undefined', i; print('sanitizer build checked:', i['sanitizers'], i['cpu_isa'])"
