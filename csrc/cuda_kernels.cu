// CUDA twins of the CPU kernels (cpu_kernels.cpp). How they are launched:
//
//   stream   every kernel runs on the caller's stream (torch.cuda.current_stream().cuda_stream, passed in as an
//            integer), after switching to the tensors' device (restored afterwards). Nothing here synchronises;
//            the only host sync is the caller's .item() on finalize's counter.
//   block    256 threads (kThreads).
//   grid     1-D, min(ceil(n / 256), 8 x SM count) blocks, each thread walking the tensor with a grid-stride
//            loop over flat element indices (so every n, including n >= 2^31, is covered).
//   errors   every launch is followed by cudaGetLastError(); failures (launch or CUDA API) throw
//            std::runtime_error carrying cudaGetErrorName/String, which pybind11 turns into RuntimeError.
//   memory traffic per element (e = input element size, 2 for bf16/fp16, 4 for fp32; T inputs):
//     mean_fp32   T*e read + 4 written (+4 read when accumulating onto a previous group)
//     center      e + 4 read, 4 written
//     finalize    4 (+4 with add) read, out element written; one atomicAdd per warp with non-finite values
//     dare        e read, 4 written; the mask is computed (splitmix64 of seed and index), never stored
//     ties_merge  threshold: 3 radix-histogram passes per task, each reading e + base element (block-level
//                 shared-memory histograms of 2048 bins, merged with one atomicAdd per non-empty bin), plus a
//                 1-thread kernel that picks the digit; merge: one pass reading base and the T inputs twice
//                 (second read mostly from L2) and writing 4. Workspace: 16 KiB histogram + thresholds,
//                 allocated by the caller (ties_workspace_bytes).
//   rounding  built with --fmad=false, so a*b+c is never contracted: results round like the CPU kernels.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels.h"

namespace cm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("centered_merge CUDA error in ") + what + ": " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
  }
}

void check_launch(const char* what) { check(cudaGetLastError(), what); }

struct DeviceGuard {
  int prev = -1, dev;
  explicit DeviceGuard(int d) : dev(d) {
    check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != dev) check(cudaSetDevice(dev), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (prev >= 0 && prev != dev) cudaSetDevice(prev);
  }
};

int grid_for(int64_t n, int device) {
  static int sm_count[64] = {0};
  int sms = device >= 0 && device < 64 ? sm_count[device] : 0;
  if (sms == 0) {
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    if (device >= 0 && device < 64) sm_count[device] = sms;
  }
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(sms) * 8;
  return int(blocks < cap ? blocks : cap);
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

__device__ __forceinline__ int64_t first_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

__global__ void mean_kernel(InputList in, float* __restrict__ out, int64_t n, bool accumulate, float scale,
                            bool apply_scale) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    float acc = accumulate ? out[i] : 0.0f;
    for (int t = 0; t < in.count; ++t) {
      const float x = load_as_f32(in.ptr[t], in.dtype[t], i);
      acc = in.weighted ? __fmaf_rn(in.weight[t], x, acc) : acc + x;  // one fused op, like torch's add_(x, alpha=w)
    }
    if (apply_scale) acc *= scale;
    out[i] = acc;
  }
}

__global__ void center_kernel(const void* __restrict__ w, int32_t wd, const float* __restrict__ mean,
                              float* __restrict__ out, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) out[i] = load_as_f32(w, wd, i) - mean[i];
}

__global__ void finalize_kernel(const float* __restrict__ x, const float* __restrict__ add, void* __restrict__ out,
                                int32_t od, int64_t n, unsigned long long* counter) {
  unsigned long long bad = 0;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float y = add ? x[i] + add[i] : x[i];
    // count NaN/Inf in the converted value: overflow of a 16-bit output dtype counts too
    if (od == kBF16) {
      const uint16_t h = f32_to_bf16(y);
      bad += (h & 0x7F80u) == 0x7F80u;
      static_cast<uint16_t*>(out)[i] = h;
    } else if (od == kF16) {
      const uint16_t h = f32_to_f16(y);
      bad += (h & 0x7C00u) == 0x7C00u;
      static_cast<uint16_t*>(out)[i] = h;
    } else {
      bad += (f32_bits(y) & 0x7F800000u) == 0x7F800000u;
      if (out) static_cast<float*>(out)[i] = y;
    }
  }
  // every thread of the block reaches this point: reduce within the warp, one atomic per warp
  for (int off = 16; off > 0; off >>= 1) bad += __shfl_down_sync(0xFFFFFFFFu, bad, off);
  if ((threadIdx.x & 31) == 0 && bad) atomicAdd(counter, bad);
}

__global__ void dare_kernel(const void* __restrict__ tau, int32_t dt, float* __restrict__ out, int64_t n, float p,
                            float scale, unsigned long long seed) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float u = dare_uniform(seed, uint64_t(i));
    out[i] = u < p ? 0.0f : load_as_f32(tau, dt, i) * scale;
  }
}

// --- TIES ------------------------------------------------------------------------------------------------
struct SelectState {
  unsigned int prefix;
  unsigned int pad;
  unsigned long long krem;
};

constexpr size_t kHistBytes = sizeof(unsigned long long) * kRadixBins;
constexpr size_t kStateOffset = kHistBytes;
constexpr size_t kThrOffset = kStateOffset + sizeof(SelectState);

__global__ void ties_hist_kernel(const void* __restrict__ x, int32_t xd, const void* __restrict__ base, int32_t bd,
                                 int64_t n, int pass, const SelectState* __restrict__ state,
                                 unsigned long long* __restrict__ hist) {
  __shared__ unsigned int sh[kRadixBins];
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  const int shift = radix_shift(pass);
  const uint32_t mask = radix_mask(pass);
  const int hi = shift + (pass == 2 ? 10 : 11);
  const unsigned int prefix = pass == 0 ? 0u : state->prefix;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float tau = load_as_f32(x, xd, i) - load_as_f32(base, bd, i);
    const uint32_t bits = f32_bits(tau) & 0x7FFFFFFFu;
    if (pass == 0 || (bits >> hi) == prefix) atomicAdd(&sh[(bits >> shift) & mask], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x)
    if (sh[b]) atomicAdd(&hist[b], (unsigned long long)sh[b]);
}

// One thread: pick the digit holding the k-th largest value, narrow the prefix; the last pass writes thr.
__global__ void ties_select_kernel(const unsigned long long* __restrict__ hist, int pass, unsigned long long k,
                                   SelectState* state, float* thr) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  unsigned long long krem = pass == 0 ? k : state->krem;
  unsigned int prefix = pass == 0 ? 0u : state->prefix;
  unsigned long long above = 0;
  int chosen = 0;
  for (int b = kRadixBins - 1; b >= 0; --b) {
    if (above + hist[b] >= krem) {
      chosen = b;
      break;
    }
    above += hist[b];
  }
  krem -= above;
  prefix = (prefix << (pass == 2 ? 10 : 11)) | unsigned(chosen);
  state->krem = krem;
  state->prefix = prefix;
  if (pass == kRadixPasses - 1) *thr = bits_f32(prefix);
}

__global__ void set_float_kernel(float* p, float v) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *p = v;
}

__global__ void ties_merge_kernel(InputList in, const void* __restrict__ base, int32_t bd, const float* __restrict__ thr,
                                  float* __restrict__ out, int64_t n, float lam) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float bb = load_as_f32(base, bd, i);
    float ss = 0.0f;
    for (int t = 0; t < in.count; ++t) {
      const float tau = load_as_f32(in.ptr[t], in.dtype[t], i) - bb;
      ss += fabsf(tau) >= thr[t] ? tau : 0.0f;
    }
    const float el = sign_of(ss);
    float num = 0.0f, cnt = 0.0f;
    for (int t = 0; t < in.count; ++t) {
      const float tau = load_as_f32(in.ptr[t], in.dtype[t], i) - bb;
      const bool keep = fabsf(tau) >= thr[t] && sign_of(tau) == el && tau != 0.0f;
      num += keep ? tau : 0.0f;
      cnt += keep ? 1.0f : 0.0f;
    }
    const float q = num / fmaxf(cnt, 1.0f);
    out[i] = q * lam + bb;  // --fmad=false: a rounded product, then a rounded sum
  }
}

}  // namespace

int device_count(std::string* why) {
  int c = 0;
  cudaError_t e = cudaGetDeviceCount(&c);
  if (e != cudaSuccess) {
    if (why) *why = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    cudaGetLastError();  // clear it
    return 0;
  }
  return c;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

void mean_fp32(const InputList& in, float* out, int64_t n, bool accumulate, float scale, bool apply_scale, int device,
               uintptr_t stream) {
  if (n == 0) return;
  DeviceGuard g(device);
  mean_kernel<<<grid_for(n, device), kThreads, 0, as_stream(stream)>>>(in, out, n, accumulate, scale, apply_scale);
  check_launch("mean_fp32 kernel launch");
}

void center(const void* w, int32_t wd, const float* mean, float* out, int64_t n, int device, uintptr_t stream) {
  if (n == 0) return;
  DeviceGuard g(device);
  center_kernel<<<grid_for(n, device), kThreads, 0, as_stream(stream)>>>(w, wd, mean, out, n);
  check_launch("center kernel launch");
}

void finalize(const float* x, const float* add, void* out, int32_t od, int64_t n, long long* counter, int device,
              uintptr_t stream) {
  if (n == 0) return;
  DeviceGuard g(device);
  finalize_kernel<<<grid_for(n, device), kThreads, 0, as_stream(stream)>>>(
      x, add, out, od, n, reinterpret_cast<unsigned long long*>(counter));
  check_launch("finalize kernel launch");
}

void dare(const void* tau, int32_t dt, float* out, int64_t n, float p, float scale, uint64_t seed, int device,
          uintptr_t stream) {
  if (n == 0) return;
  DeviceGuard g(device);
  dare_kernel<<<grid_for(n, device), kThreads, 0, as_stream(stream)>>>(tau, dt, out, n, p, scale, seed);
  check_launch("dare kernel launch");
}

size_t ties_workspace_bytes(int num_inputs) { return kThrOffset + sizeof(float) * size_t(num_inputs > 0 ? num_inputs : 1); }

void ties_merge(const InputList& in, const void* base, int32_t bd, float* out, int64_t n, int64_t k, float lam,
                void* workspace, int device, uintptr_t stream) {
  if (n == 0) return;
  DeviceGuard g(device);
  cudaStream_t s = as_stream(stream);
  char* ws = static_cast<char*>(workspace);
  auto* hist = reinterpret_cast<unsigned long long*>(ws);
  auto* state = reinterpret_cast<SelectState*>(ws + kStateOffset);
  auto* thr = reinterpret_cast<float*>(ws + kThrOffset);
  const int grid = grid_for(n, device);
  for (int t = 0; t < in.count; ++t) {
    if (k <= 0 || k >= n) {
      set_float_kernel<<<1, 1, 0, s>>>(thr + t, k <= 0 ? bits_f32(0x7F800000u) : 0.0f);
      check_launch("ties threshold kernel launch");
      continue;
    }
    for (int pass = 0; pass < kRadixPasses; ++pass) {
      check(cudaMemsetAsync(hist, 0, kHistBytes, s), "cudaMemsetAsync (ties histogram)");
      ties_hist_kernel<<<grid, kThreads, 0, s>>>(in.ptr[t], in.dtype[t], base, bd, n, pass, state, hist);
      check_launch("ties histogram kernel launch");
      ties_select_kernel<<<1, 1, 0, s>>>(hist, pass, (unsigned long long)k, state, thr + t);
      check_launch("ties select kernel launch");
    }
  }
  ties_merge_kernel<<<grid, kThreads, 0, s>>>(in, base, bd, thr, out, n, lam);
  check_launch("ties merge kernel launch");
}

}  // namespace cuda
}  // namespace cm
