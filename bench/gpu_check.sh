#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (`make gpu-check`): builds the extension with its CUDA kernels,
# runs every CUDA test with the kernels opted in (CENTERED_MERGE_BACKEND=native), then the GPU benchmarks:
#   io_floor      bench/bench_io_floor.py --device cuda on the 4 x 0.5 B bf16 set (1 GB per model): weight_average,
#                 task_arithmetic, ties and cart end to end against the host read floor, the host-to-device and
#                 device-to-host copy floors and the write floor (issue 10 item 5, issue 12 item 4)
#   cart_vit      bench/bench_cart_speed.py --device cuda, ViT-B/32 blocks x 8 tasks: achieved TFLOP/s against the
#   cart_llama    GPU's measured GEMM peaks, and the Llama-shaped layer x 4 tasks (issue 12 item 4)
#   bench_kernels the native CUDA kernels against their torch twins on the GPU
#   bench_cart    a CART merge of 48 ViT-B matrices x 8 tasks, GPU against this host's CPU
# and prints one summary. Budget: about 8 minutes on one H200 (each step has its own timeout). Without a GPU (or
# with a CPU-only torch) it stops at once with the reason and exit code 2. If the build fails, the benchmarks
# still run, on the torch twins, and the check fails.
#
#   PY=path/to/python bench/gpu_check.sh      # a python whose torch is a CUDA build (default .venv/bin/python)
#   GPU_CHECK_OUT=dir                         # where the logs go (default build/gpu_check)
#   GPU_CHECK_TAR=file.tgz                    # also pack the logs into this file after every step
#
# Only after this has passed on a real GPU may backend.CUDA_VALIDATED be set to True (with the figures in the
# README); until then `auto` runs the torch twins on CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-build/gpu_check}
TAR=${GPU_CHECK_TAR:-}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # the benchmarks import the checkout
START=$(date +%s)
declare -a SUMMARY

step() {  # [TAIL=lines] step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2 lines=${TAIL:-3}
  shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local verdict=PASS
  [ $rc -eq 0 ] || verdict="FAIL (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))"
  SUMMARY+=("$(printf '%-14s %-28s %4ss  %s' "$name" "$verdict" "$dt" "$OUT/$name.log")")
  echo "== $name: $verdict in ${dt}s"
  tail -n "$lines" "$OUT/$name.log" | sed 's/^/   /'
  [ -z "$TAR" ] || tar czf "$TAR" -C "$OUT" .
  return $rc
}

# 0. a GPU, and a torch that can use it
if ! "$PY" - <<'PY'
import sys, torch
if torch.version.cuda is None:
    sys.exit(f"gpu-check: the torch of {sys.executable} ({torch.__version__}) is a CPU-only build; install a CUDA build of torch there, or run with PY=<python with one>")
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: no usable CUDA GPU (torch {torch.__version__}, CUDA {torch.version.cuda}, devices: {torch.cuda.device_count()})")
print(f"gpu-check: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
PY
then
  echo "gpu-check: nothing was run (no GPU): this check has not passed" >&2
  exit 2
fi

export CENTERED_MERGE_BACKEND=native   # the CUDA kernels, not the twins, for every step below
FAILED=0
# 1. build with the CUDA kernels required, for the architecture of this GPU
ARCH=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
step build 300 env CENTERED_MERGE_CUDA=on CMAKE_CUDA_ARCHITECTURES="$ARCH" \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . || FAILED=1
if step build_info 60 "$PY" -c "
import centered_merge, json, sys
i = centered_merge.build_info(); print(json.dumps(i, indent=1))
sys.exit(0 if i['cuda_native_usable'] and i['backend']['cuda'] == 'native' else 'native CUDA kernels not usable')"; then
  NATIVE=1
else
  FAILED=1 NATIVE=0
  unset CENTERED_MERGE_BACKEND  # the benchmarks below then run on the torch twins; the check has failed anyway
fi
# 2. every CUDA test: the kernels against their twins and the CPU kernels (streams, devices), the kernels API on
#    cupy arrays where cupy is installed, the engine's CUDA paths (tests/test_engine_cuda.py)
if [ $NATIVE -eq 1 ]; then
  XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
  TAIL=8 step cuda_tests 240 "$PY" -m pytest -q -p no:cacheprovider $XDIST tests -k "cuda or CUDA or cupy" -rfE || FAILED=1
fi
# 3. the floors and the merges end to end on the 4 x 0.5 B bf16 set (checkpoints built in /tmp, deleted after)
TAIL=22 step io_floor 240 "$PY" bench/bench_io_floor.py --size-gb 1 --T 4 --rounds 1 --device cuda \
  --methods weight_average task_arithmetic ties cart || FAILED=1
# 4. CART's randomized SVD on the GPU: achieved TFLOP/s against the GEMM peaks measured in the same run
TAIL=20 step cart_vit 120 "$PY" bench/bench_cart_speed.py --device cuda --blocks 2 --repeats 3 || FAILED=1
TAIL=20 step cart_llama 120 "$PY" bench/bench_cart_speed.py --device cuda --set llama --tasks 4 --blocks 1 \
  --repeats 2 || FAILED=1
# 5. the kernel benchmark on the device (native CUDA kernel vs the torch twin on the GPU)
TAIL=12 step bench_kernels 120 "$PY" bench/bench_kernels.py --device cuda --repeats 5 --json "$OUT/bench_kernels.json" || FAILED=1
# 6. a CART merge on the device: 8 fine-tunes of a 12-block ViT-B-sized stack, GPU vs this host's CPU
step bench_cart 150 "$PY" - <<'PY' || FAILED=1
import time, torch, centered_merge as cm
g = torch.Generator().manual_seed(0)
shapes = {f"blocks.{b}.{n}": s for b in range(12) for n, s in
          (("attn.qkv", (2304, 768)), ("attn.proj", (768, 768)), ("mlp.fc1", (3072, 768)), ("mlp.fc2", (768, 3072)))}
base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
models = [{k: (v + torch.randn(v.shape, generator=g) * 0.002).bfloat16() for k, v in base.items()} for _ in range(8)]
def run(device):
    t = time.perf_counter()
    out = cm.merge(models, "cart", device=device, rank=0.12, lam=2.0)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out
run("cuda")  # warm-up (context, cuBLAS/cuSOLVER handles)
tg, og = run("cuda")
tc, oc = run("cpu")
rel = max(float((og[k].float() - oc[k].float()).norm() / oc[k].float().norm().clamp_min(1e-30)) for k in oc)
print(f"CART r=0.12 T=8, 48 ViT-B matrices (bf16): cuda {tg:.2f} s, cpu {tc:.2f} s ({tc / tg:.1f}x), "
      f"largest relative difference cuda vs cpu {rel:.1e}")
assert rel < 5e-2, rel
PY

echo
echo "== gpu-check summary ($(( $(date +%s) - START ))s total, $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'))"
printf '%s\n' "${SUMMARY[@]}"
if [ $FAILED -ne 0 ]; then
  echo "gpu-check: FAILED (logs above); keep backend.CUDA_VALIDATED = False"
  exit 1
fi
echo "gpu-check: PASSED; the CUDA kernels may now be marked validated (backend.CUDA_VALIDATED) with these figures"
