// Raw-pointer entry points of the kernels. The bindings (bindings.cpp) validate every argument and then call
// these; they know nothing about Python. All element counts are flat (the tensors are contiguous).
#pragma once
#include <cstdint>
#include <string>

#include "common.h"

namespace cm {
namespace cpu {

// The CPU kernels of one instruction set. cpu_kernels.cpp is compiled once per ISA (baseline x86-64 or aarch64,
// AVX2+FMA+F16C, AVX-512 F/BW/VL/DQ; or a single -march=native copy when that opt-in is on) and each copy
// exports one of these tables; cpu_dispatch.cpp picks the best one the CPU supports at load time.
struct Kernels {
  const char* isa;
  // out = (accumulate ? out : 0) + sum_t w_t x_t, then out *= scale when apply_scale. One pass over the inputs.
  void (*mean_fp32)(const InputList& in, float* out, int64_t n, bool accumulate, float scale, bool apply_scale);
  // out = float32(w) - mean
  void (*center)(const void* w, int32_t w_dtype, const float* mean, float* out, int64_t n);
  // out = dtype(x [+ add]); returns the number of non-finite values of the converted result.
  int64_t (*finalize)(const float* x, const float* add, void* out, int32_t out_dtype, int64_t n);
  // TIES (mergekit's order of operations, see ops/reference.py ties_merge): exactly k[t] entries kept per task
  // (largest |x_t - base|, lowest flat index first among equal magnitudes), weights in.weight[t], sign election
  // by the weighted sum, out = base + lam * sum of the agreeing weighted entries [/ their weights when
  // normalize], written in out_dtype (float32, bfloat16 or float16; the 16-bit ones round like finalize).
  // thresholds_out[t] = the k[t]-th largest |x_t - base|. Returns the non-finite count of the written values PLUS
  // the number of non-finite task-vector entries x_t - base over all tasks, kept or dropped (so any NaN/Inf input
  // or base entry makes it non-zero, although TIES may drop it from the output; an overflowing x_t - base of
  // finite inputs counts too).
  int64_t (*ties_merge)(const InputList& in, const void* base, int32_t base_dtype, void* out, int32_t out_dtype, int64_t n,
                        const int64_t* k, float lam, bool normalize, float* thresholds_out);
  // DARE: out = (u_i < p) ? 0 : float32(tau_i) * scale, u_i = dare_uniform(seed, i)
  void (*dare)(const void* tau, int32_t dtype, float* out, int64_t n, float p, float scale, uint64_t seed);
  // Fused linear merge, one pass: without base, out = dtype((lam * sum_t w_t x_t) / divisor) (the division
  // skipped when divisor is 1); with base, out = dtype(base + lam * sum_t w_t (x_t - base)) (divisor unused).
  // Returns the non-finite count of the converted result.
  int64_t (*linear)(const InputList& in, const void* base, int32_t base_dtype, float lam, float divisor, void* out,
                    int32_t out_dtype, int64_t n);
};

// Each returns nullptr when that ISA was not compiled into this build.
const Kernels* kernels_baseline();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();
const Kernels* kernels_native();

// The table in use. Chosen on first use: CENTERED_MERGE_CPU_ISA when set, else the best the CPU supports.
const Kernels& active();
// Switch to the named ISA ("baseline", "avx2", "avx512", "native"); returns false with *why when it was not
// compiled or this CPU lacks it.
bool select(const std::string& name, std::string* why);
// Names of the ISAs compiled into this build and of those this CPU can run.
std::string compiled_isas();
std::string supported_isas();

int max_threads();
bool has_openmp();

}  // namespace cpu

#ifdef CM_WITH_CUDA
namespace cuda {

// Device count seen by the (static) CUDA runtime; on failure returns 0 and puts the reason into *why.
int device_count(std::string* why);
int runtime_version();
int driver_version();

// All launches go onto `stream` (a cudaStream_t as an integer, 0 = legacy default stream) on `device`.
void mean_fp32(const InputList& in, float* out, int64_t n, bool accumulate, float scale, bool apply_scale, int device,
               uintptr_t stream);
void center(const void* w, int32_t w_dtype, const float* mean, float* out, int64_t n, int device, uintptr_t stream);
// Adds the non-finite count to *counter (device memory, int64) without synchronising.
void finalize(const float* x, const float* add, void* out, int32_t out_dtype, int64_t n, long long* counter, int device,
              uintptr_t stream);
size_t ties_workspace_bytes(int num_inputs, int64_t n);
// k: host array of in.count kept counts. Writes float32 (the output's count is finalize's); adds the number of
// non-finite task-vector entries x_t - base (all tasks, kept or dropped) to *counter (device int64).
void ties_merge(const InputList& in, const void* base, int32_t base_dtype, float* out, int64_t n, const int64_t* k,
                float lam, bool normalize, void* workspace, long long* counter, int device, uintptr_t stream);
void dare(const void* tau, int32_t dtype, float* out, int64_t n, float p, float scale, uint64_t seed, int device,
          uintptr_t stream);
// Fused linear merge (see cpu::Kernels::linear); adds the non-finite count to *counter.
void linear(const InputList& in, const void* base, int32_t base_dtype, float lam, float divisor, void* out,
            int32_t out_dtype, int64_t n, long long* counter, int device, uintptr_t stream);

}  // namespace cuda
#endif

}  // namespace cm
