// CUDA twins of the CPU kernels (cpu_kernels.cpp). How they are launched:
//
//   stream   every kernel runs on the caller's stream (torch.cuda.current_stream().cuda_stream, passed in as an
//            integer), after switching to the tensors' device (restored afterwards). Nothing here synchronises;
//            the only host sync is the caller's .item() on the counter of finalize, linear or ties_merge.
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
//                 1-thread kernel that picks the digit; exact k: one more pass per task counting, per tile of
//                 256, the entries equal to the threshold, and a 1-block scan of those counts (both return at
//                 once when no equal entry is dropped); merge: one pass over tiles of 256 reading base and the
//                 T inputs twice (second read mostly from L2) and writing 4, counting the non-finite task-vector
//                 entries on the way (one atomicAdd per block into the caller's counter). Workspace
//                 (ties_workspace_bytes): 16 KiB histogram + per-task rules + 8 bytes per task per 256 elements.
//     linear      T*e (+ base e) read, out element written; non-finite count as finalize
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
// Exactly k entries kept per task: those whose |tau| bit pattern is above the k-th largest, and of those equal
// to it the first `need` in flat order (NaN is ranked as torch.kthvalue ranks it, above +inf, but never kept).
struct SelectState {
  unsigned int prefix;
  unsigned int pad;
  unsigned long long krem;
};
struct TiesRule {
  unsigned int bits;  // threshold bit pattern; 0xFFFFFFFF keeps nothing
  unsigned int trim;  // 1 when some entries equal to `bits` are dropped (ranks needed)
  unsigned long long need;  // how many entries equal to `bits` are kept
};

constexpr size_t kHistBytes = sizeof(unsigned long long) * kRadixBins;
constexpr size_t kStateOffset = kHistBytes;
constexpr size_t kRuleOffset = kStateOffset + sizeof(SelectState);

__host__ __device__ inline int64_t num_tiles(int64_t n) { return (n + kThreads - 1) / kThreads; }
inline size_t before_offset(int T) { return kRuleOffset + sizeof(TiesRule) * size_t(T); }

__device__ __forceinline__ uint32_t abs_bits(float tau) { return f32_bits(tau) & 0x7FFFFFFFu; }

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
    const uint32_t bits = abs_bits(load_as_f32(x, xd, i) - load_as_f32(base, bd, i));
    if (pass == 0 || (bits >> hi) == prefix) atomicAdd(&sh[(bits >> shift) & mask], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x)
    if (sh[b]) atomicAdd(&hist[b], (unsigned long long)sh[b]);
}

// One thread: pick the digit holding the k-th largest value, narrow the prefix; the last pass writes the rule.
__global__ void ties_select_kernel(const unsigned long long* __restrict__ hist, int pass, unsigned long long k,
                                   SelectState* state, TiesRule* rule) {
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
  if (pass == kRadixPasses - 1) {
    rule->bits = prefix;
    rule->need = krem;
    rule->trim = krem < hist[chosen] ? 1u : 0u;
  }
}

__global__ void set_rule_kernel(TiesRule* rule, unsigned int bits) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    rule->bits = bits;
    rule->trim = 0;
    rule->need = 0;
  }
}

// Per tile of kThreads consecutive elements: how many equal the threshold (only when the rule trims).
__global__ void ties_tie_count_kernel(const void* __restrict__ x, int32_t xd, const void* __restrict__ base, int32_t bd,
                                      int64_t n, const TiesRule* __restrict__ rule, unsigned long long* __restrict__ cnt) {
  const TiesRule r = *rule;
  if (!r.trim) return;  // the same for every thread of the grid
  const int64_t tiles = num_tiles(n);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t i = tile * kThreads + threadIdx.x;
    const bool eq = i < n && abs_bits(load_as_f32(x, xd, i) - load_as_f32(base, bd, i)) == r.bits;
    const int c = __syncthreads_count(eq);
    if (threadIdx.x == 0) cnt[tile] = (unsigned long long)c;
  }
}

// One block of kScanThreads: exclusive prefix sum of the tile counts, in place.
constexpr int kScanThreads = 1024;
__global__ void ties_tie_scan_kernel(const TiesRule* __restrict__ rule, unsigned long long* __restrict__ cnt, int64_t tiles) {
  __shared__ unsigned long long part[kScanThreads];
  if (!rule->trim) return;
  const int64_t per = (tiles + kScanThreads - 1) / kScanThreads;
  const int64_t lo = int64_t(threadIdx.x) * per, hi = lo + per < tiles ? lo + per : tiles;
  unsigned long long s = 0;
  for (int64_t j = lo; j < hi; ++j) s += cnt[j];
  part[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long run = 0;
    for (int j = 0; j < kScanThreads; ++j) {
      const unsigned long long v = part[j];
      part[j] = run;
      run += v;
    }
  }
  __syncthreads();
  unsigned long long run = part[threadIdx.x];
  for (int64_t j = lo; j < hi; ++j) {
    const unsigned long long v = cnt[j];
    cnt[j] = run;
    run += v;
  }
}

// One tile of kThreads elements per block iteration (every thread of a block runs the same iterations, so the
// block-wide rank of the equal entries can be formed with warp ballots). Launched with kThreads threads. Adds the
// number of non-finite tau_t = x_t - base (all tasks, kept or dropped) to *counter: one atomicAdd per block.
__global__ void ties_merge_kernel(InputList in, const void* __restrict__ base, int32_t bd, const TiesRule* __restrict__ rule,
                                  const unsigned long long* __restrict__ before, float* __restrict__ out, int64_t n,
                                  float lam, bool normalize, unsigned long long* __restrict__ counter) {
  __shared__ unsigned int warp_cnt[kThreads / 32];
  __shared__ unsigned long long warp_bad[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tiles = num_tiles(n);
  unsigned long long bad = 0;  // this thread's non-finite task-vector entries
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t i = tile * kThreads + threadIdx.x;
    const bool valid = i < n;
    const float bb = valid ? load_as_f32(base, bd, i) : 0.0f;
    unsigned long long kept = 0;  // bit t: task t keeps this entry (before the sign test)
    for (int t = 0; t < in.count; ++t) {
      const TiesRule r = rule[t];
      const uint32_t u = valid ? abs_bits(load_as_f32(in.ptr[t], in.dtype[t], i) - bb) : 0u;
      bad += u >= 0x7F800000u ? 1ull : 0ull;  // NaN or +-Inf (0 for the padding lanes)
      bool keep = valid && u > r.bits;
      const bool eq = valid && u == r.bits;
      if (r.trim) {  // uniform across the block
        const unsigned int m = __ballot_sync(0xFFFFFFFFu, eq);
        if (lane == 0) warp_cnt[warp] = __popc(m);
        __syncthreads();
        unsigned long long rank = before[size_t(t) * tiles + tile] + __popc(m & ((1u << lane) - 1u));
        for (int w = 0; w < warp; ++w) rank += warp_cnt[w];
        __syncthreads();  // warp_cnt is reused for the next task
        keep = keep || (eq && rank < r.need);
      } else {
        keep = keep || eq;
      }
      if (keep && u <= 0x7F800000u) kept |= 1ull << t;
    }
    if (!valid) continue;
    // mergekit's order of operations (see the CPU kernel): weighted vote, a zero sum elects +1
    float vote = 0.0f;
    for (int t = 0; t < in.count; ++t) {
      const float tau = load_as_f32(in.ptr[t], in.dtype[t], i) - bb;
      vote += (((kept >> t) & 1ull) ? tau : 0.0f) * in.weight[t];
    }
    const float el = vote >= 0.0f ? 1.0f : -1.0f;
    float mixed = 0.0f, div = 0.0f;
    for (int t = 0; t < in.count; ++t) {
      const float tau = load_as_f32(in.ptr[t], in.dtype[t], i) - bb;
      const float w = in.weight[t];
      const float d = (((kept >> t) & 1ull) ? tau : 0.0f) * w;
      const bool agree = sign_of(d) == el;
      mixed += agree ? d : 0.0f;
      div += agree ? w : 0.0f;
    }
    const float q = normalize ? mixed / (div == 0.0f ? 1.0f : div) : mixed;
    out[i] = q * lam + bb;  // --fmad=false: a rounded product, then a rounded sum
  }
  // every thread of the block reaches this point: reduce within each warp, then across the block's warps
  for (int off = 16; off > 0; off >>= 1) bad += __shfl_down_sync(0xFFFFFFFFu, bad, off);
  if (lane == 0) warp_bad[warp] = bad;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long sum = 0;
    for (int w = 0; w < kThreads / 32; ++w) sum += warp_bad[w];
    if (sum) atomicAdd(counter, sum);
  }
}

// --- fused linear merge -------------------------------------------------------------------------------------
__global__ void linear_kernel(InputList in, const void* __restrict__ base, int32_t bd, float lam, float divisor,
                              void* __restrict__ out, int32_t od, int64_t n, unsigned long long* counter) {
  unsigned long long bad = 0;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float bb = base ? load_as_f32(base, bd, i) : 0.0f;
    float acc = 0.0f;
    for (int t = 0; t < in.count; ++t) {
      const float x = load_as_f32(in.ptr[t], in.dtype[t], i);
      acc = __fmaf_rn(in.weight[t], base ? x - bb : x, acc);  // like torch's add_(tau, alpha=w): one rounding
    }
    if (base) acc = acc * lam + bb;  // --fmad=false: a rounded product, then a rounded sum
    else {
      if (lam != 1.0f) acc = acc * lam;  // without a base lam is a final scale (1/T: the mean)
      if (divisor != 1.0f) acc = __fdiv_rn(acc, divisor);  // mergekit's normalize: an IEEE division
    }
    if (od == kBF16) {
      const uint16_t h = f32_to_bf16(acc);
      bad += (h & 0x7F80u) == 0x7F80u;
      static_cast<uint16_t*>(out)[i] = h;
    } else if (od == kF16) {
      const uint16_t h = f32_to_f16(acc);
      bad += (h & 0x7C00u) == 0x7C00u;
      static_cast<uint16_t*>(out)[i] = h;
    } else {
      bad += (f32_bits(acc) & 0x7F800000u) == 0x7F800000u;
      static_cast<float*>(out)[i] = acc;
    }
  }
  for (int off = 16; off > 0; off >>= 1) bad += __shfl_down_sync(0xFFFFFFFFu, bad, off);
  if ((threadIdx.x & 31) == 0 && bad) atomicAdd(counter, bad);
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

size_t ties_workspace_bytes(int num_inputs, int64_t n) {
  const int T = num_inputs > 0 ? num_inputs : 1;
  return before_offset(T) + sizeof(unsigned long long) * size_t(T) * size_t(num_tiles(n > 0 ? n : 1));
}

void ties_merge(const InputList& in, const void* base, int32_t bd, float* out, int64_t n, const int64_t* kk, float lam,
                bool normalize, void* workspace, long long* counter, int device, uintptr_t stream) {
  if (n == 0) return;
  DeviceGuard g(device);
  cudaStream_t s = as_stream(stream);
  char* ws = static_cast<char*>(workspace);
  auto* hist = reinterpret_cast<unsigned long long*>(ws);
  auto* state = reinterpret_cast<SelectState*>(ws + kStateOffset);
  auto* rule = reinterpret_cast<TiesRule*>(ws + kRuleOffset);
  auto* before = reinterpret_cast<unsigned long long*>(ws + before_offset(in.count));
  const int64_t tiles = num_tiles(n);
  const int grid = grid_for(n, device);
  for (int t = 0; t < in.count; ++t) {
    const int64_t k = kk[t];
    if (k <= 0 || k >= n) {
      set_rule_kernel<<<1, 1, 0, s>>>(rule + t, k <= 0 ? 0xFFFFFFFFu : 0u);
      check_launch("ties threshold kernel launch");
      continue;
    }
    for (int pass = 0; pass < kRadixPasses; ++pass) {
      check(cudaMemsetAsync(hist, 0, kHistBytes, s), "cudaMemsetAsync (ties histogram)");
      ties_hist_kernel<<<grid, kThreads, 0, s>>>(in.ptr[t], in.dtype[t], base, bd, n, pass, state, hist);
      check_launch("ties histogram kernel launch");
      ties_select_kernel<<<1, 1, 0, s>>>(hist, pass, (unsigned long long)k, state, rule + t);
      check_launch("ties select kernel launch");
    }
    // ranks of the entries equal to the threshold (both kernels return at once when nothing is trimmed)
    ties_tie_count_kernel<<<grid, kThreads, 0, s>>>(in.ptr[t], in.dtype[t], base, bd, n, rule + t, before + size_t(t) * tiles);
    check_launch("ties tie-count kernel launch");
    ties_tie_scan_kernel<<<1, kScanThreads, 0, s>>>(rule + t, before + size_t(t) * tiles, tiles);
    check_launch("ties tie-scan kernel launch");
  }
  ties_merge_kernel<<<grid, kThreads, 0, s>>>(in, base, bd, rule, before, out, n, lam, normalize,
                                              reinterpret_cast<unsigned long long*>(counter));
  check_launch("ties merge kernel launch");
}

void linear(const InputList& in, const void* base, int32_t bd, float lam, float divisor, void* out, int32_t od,
            int64_t n, long long* counter, int device, uintptr_t stream) {
  if (n == 0) return;
  DeviceGuard g(device);
  linear_kernel<<<grid_for(n, device), kThreads, 0, as_stream(stream)>>>(in, base, bd, lam, divisor, out, od, n,
                                                                          reinterpret_cast<unsigned long long*>(counter));
  check_launch("linear merge kernel launch");
}

}  // namespace cuda
}  // namespace cm
