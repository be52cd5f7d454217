// CPU kernels: OpenMP over blocks of kBlock elements, SIMD-friendly inner loops (the compiler vectorises them;
// float16 conversions use F16C when the ISA has it). This file is compiled once per instruction set, with
// -DCM_ISA=<name> and that ISA's -m flags (CMakeLists.txt); each copy exports the table cm::cpu::kernels_<name>()
// and cpu_dispatch.cpp picks one at run time. Everything here has internal linkage (anonymous namespace, or the
// ISA's inline namespace of common.h), and no std:: container or algorithm is instantiated here, so no copy
// compiled with wider instructions can be merged into another ISA's path by the linker. Every kernel reads its inputs once per pass and keeps
// its per-block accumulators in L1, which is what makes it faster than the eager torch sequence of full sweeps.
// Rounding: the build passes -ffp-contract=off, so a*b+c is never fused and the results round like torch's
// eager ops (same operation order as the twins in centered_merge/ops/reference.py).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace cm {
namespace cpu {
namespace {

#ifndef CM_CPU_BLOCK
#define CM_CPU_BLOCK 8192
#endif
// Elements per work item. Large enough that each input stream is read in runs of many pages (hardware
// prefetchers stop at 4 KiB page boundaries and must re-train), small enough that the per-block float32
// accumulators stay in L2.
constexpr int64_t kBlock = CM_CPU_BLOCK;
constexpr int64_t kParallelMin = 1 << 15;  // below this, one thread: the fork/join would cost more than the work

#ifndef CM_STREAM_STORES
#define CM_STREAM_STORES 1
#endif
constexpr bool kStreamStores = CM_STREAM_STORES != 0;
constexpr int64_t kStreamMinBytes = int64_t(64) << 20;

inline int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }
template <typename A>
inline A imin(A a, A b) { return b < a ? b : a; }
template <typename A>
inline A imax(A a, A b) { return a < b ? b : a; }

// A heap array (a stand-in for std::vector that stays internal to this ISA's object, see the top).
template <typename E>
struct Buf {
  E* p = nullptr;
  size_t n = 0;
  Buf() = default;
  explicit Buf(size_t count, E fill = E()) { reset(count, fill); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  void reset(size_t count, E fill = E()) {
    grow(count);
    for (size_t i = 0; i < count; ++i) p[i] = fill;
  }
  // at least `count` elements, contents discarded (no copy on growth)
  void fresh(size_t count) {
    if (count <= n) return;
    std::free(p);
    p = nullptr;
    n = 0;
    grow(count);
  }
  void grow(size_t count) {
    if (count <= n) return;
    void* q = std::realloc(p, (count ? count : 1) * sizeof(E));
    if (!q) throw std::bad_alloc();
    p = static_cast<E*>(q);
    n = count;
  }
  E& operator[](size_t i) { return p[i]; }
  const E& operator[](size_t i) const { return p[i]; }
  E* data() { return p; }
};

// Per-thread scratch of `count` float-sized arrays of kBlock elements (grown once per thread, reused).
inline float* scratch(int count) {
  static thread_local Buf<float> buf;
  buf.grow(size_t(count) * kBlock);
  return buf.data();
}

void f16_to_f32_block(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) d[i] = f16_to_f32(s[i]);
}

void f32_to_f16_block(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) d[i] = f32_to_f16(s[i]);
}

void bf16_to_f32_block(const uint16_t* __restrict s, float* __restrict d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
}

void f32_to_bf16_block(const float* __restrict s, uint16_t* __restrict d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
}

// d[0:n] = y[0:n] converted to a 16-bit dtype (kBF16 or kF16); returns how many converted values are NaN/Inf,
// so that overflow on conversion is counted too (an all-ones exponent in the output).
int64_t store16_count_nonfinite(const float* y, uint16_t* __restrict d, int32_t dtype, int64_t n) {
  if (dtype == kBF16) f32_to_bf16_block(y, d, n);
  else f32_to_f16_block(y, d, n);
  const uint16_t exp_mask = dtype == kBF16 ? 0x7F80u : 0x7C00u;
  int64_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t i = 0; i < n; ++i) c += (d[i] & exp_mask) == exp_mask ? 1 : 0;
  return c;
}

// a * b + c rounded once, like torch's add_(x, alpha=w). Without an FMA instruction in this ISA (the x86-64
// baseline) std::fma is libm's, which is exact everywhere and uses the FMA instruction where the CPU has one.
inline float madd(float a, float b, float c) { return std::fma(a, b, c); }

// d[0:len] = float32(src[off : off+len]); returns a pointer to the float32 values (src itself for float32).
const float* as_f32(const void* src, int32_t dtype, int64_t off, int64_t len, float* d) {
  if (dtype == kF32) return static_cast<const float*>(src) + off;
  const uint16_t* s = static_cast<const uint16_t*>(src) + off;
  if (dtype == kBF16) bf16_to_f32_block(s, d, len);
  else f16_to_f32_block(s, d, len);
  return d;
}

// acc += x (or acc += w * x), x read from src[off : off+len] in its own dtype.
void add_block(float* __restrict acc, const void* src, int32_t dtype, int64_t off, int64_t len, bool weighted, float w,
               float* __restrict tmp) {
  if (dtype == kBF16 && !weighted) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + off;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) acc[i] += bf16_to_f32(s[i]);
    return;
  }
  const float* x = as_f32(src, dtype, off, len, tmp);
  if (weighted) {
    // torch's add_(x, alpha=w) is one fused multiply-add; do the same so the weighted mean is bit-identical
    // (where the target has no FMA instruction, a rounded product and sum: within one ulp per step).
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) acc[i] = madd(w, x[i], acc[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) acc[i] += x[i];
  }
}

inline bool is_nonfinite(float v) { return (f32_bits(v) & 0x7F800000u) == 0x7F800000u; }

#ifndef CM_MEAN_GROUP
#define CM_MEAN_GROUP 2
#endif
// Unweighted sum of same-dtype (bfloat16 or float32) inputs. Per block, the inputs are taken CM_MEAN_GROUP at a
// time with the running sums in registers (each SIMD lane reads its element from the group's streams in turn);
// between groups the sums wait in an L1/L2-resident block buffer. Few concurrent streams keep the hardware
// prefetchers effective, and the output is written once. Same addition order as the twin
// ((0 + x_0) + x_1) + ..., so the same bits.
template <typename Elem>
void mean_streams(const InputList& in, float* out, int64_t n, bool accumulate, float scale, bool apply_scale) {
  const int T = in.count;
  const int64_t nb = num_blocks(n);
  constexpr int G = CM_MEAN_GROUP;
  constexpr int W = 64;  // lanes per step: four 512-bit (or eight 256-bit) accumulators
  // Outputs much larger than the caches are written with streaming stores (64-byte aligned runs only).
  const bool stream_out = kStreamStores && n * 4 >= kStreamMinBytes && reinterpret_cast<uintptr_t>(out) % 64 == 0;
#pragma omp parallel for schedule(dynamic, 1) if (n >= kParallelMin)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t off = b * kBlock, len = imin(kBlock, n - off);
    float* o = out + off;
    float* acc = scratch(1);
    for (int g0 = 0; g0 < T; g0 += G) {
      const int g1 = imin(T, g0 + G);
      const bool first = g0 == 0, last = g1 == T;
      // src and dst may be the same buffer (no __restrict): each lane loads its sum before storing it
      const float* src = first ? o : acc;  // running sums so far (o only read when accumulating)
      float* dst = last ? o : acc;
      const bool load = !first || accumulate;
      const Elem* p[G];
      for (int t = g0; t < g1; ++t) p[t - g0] = static_cast<const Elem*>(in.ptr[t]) + off;
      const int gn = g1 - g0;
      int64_t i0 = 0;
      for (; i0 + W <= len; i0 += W) {
        float a[W];
        for (int l = 0; l < W; ++l) a[l] = load ? src[i0 + l] : 0.0f;
        for (int t = 0; t < gn; ++t) {
          const Elem* __restrict q = p[t] + i0;
          for (int l = 0; l < W; ++l) {
            if constexpr (sizeof(Elem) == 2) a[l] += bf16_to_f32(q[l]);
            else a[l] += q[l];
          }
        }
        if (last && apply_scale) {
          for (int l = 0; l < W; ++l) a[l] *= scale;
        }
#if defined(__AVX512F__)
        if (last && stream_out) {  // non-temporal: no read-for-ownership of the output lines
          for (int l = 0; l < W; l += 16) _mm512_stream_ps(dst + i0 + l, _mm512_loadu_ps(a + l));
          continue;
        }
#endif
        for (int l = 0; l < W; ++l) dst[i0 + l] = a[l];
      }
      for (int64_t i = i0; i < len; ++i) {
        float a = load ? src[i] : 0.0f;
        for (int t = 0; t < gn; ++t) {
          if constexpr (sizeof(Elem) == 2) a += bf16_to_f32(p[t][i]);
          else a += p[t][i];
        }
        dst[i] = last && apply_scale ? a * scale : a;
      }
    }
#if defined(__AVX512F__)
    if (stream_out) _mm_sfence();
#endif
  }
}

void mean_fp32(const InputList& in, float* out, int64_t n, bool accumulate, float scale, bool apply_scale) {
  if (!in.weighted) {
    bool all_bf16 = true, all_f32 = true;
    for (int t = 0; t < in.count; ++t) {
      all_bf16 = all_bf16 && in.dtype[t] == kBF16;
      all_f32 = all_f32 && in.dtype[t] == kF32;
    }
    if (all_bf16) return mean_streams<uint16_t>(in, out, n, accumulate, scale, apply_scale);
    if (all_f32) return mean_streams<float>(in, out, n, accumulate, scale, apply_scale);
  }
  const int64_t nb = num_blocks(n);
#pragma omp parallel for schedule(dynamic, 1) if (n >= kParallelMin)
  for (int64_t b = 0; b < nb; ++b) {
    float* acc = scratch(2);
    float* tmp = acc + kBlock;
    const int64_t off = b * kBlock, len = imin(kBlock, n - off);
    if (accumulate) std::memcpy(acc, out + off, len * sizeof(float));
    else for (int64_t i = 0; i < len; ++i) acc[i] = 0.0f;
    for (int t = 0; t < in.count; ++t) add_block(acc, in.ptr[t], in.dtype[t], off, len, in.weighted != 0, in.weight[t], tmp);
    if (apply_scale) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) acc[i] *= scale;
    }
    std::memcpy(out + off, acc, len * sizeof(float));
  }
}

void center(const void* w, int32_t w_dtype, const float* mean, float* out, int64_t n) {
  const int64_t nb = num_blocks(n);
#pragma omp parallel for schedule(dynamic, 1) if (n >= kParallelMin)
  for (int64_t b = 0; b < nb; ++b) {
    float* tmp = scratch(1);
    const int64_t off = b * kBlock, len = imin(kBlock, n - off);
    float* __restrict o = out + off;
    const float* __restrict m = mean + off;
    if (w_dtype == kBF16) {
      const uint16_t* s = static_cast<const uint16_t*>(w) + off;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) o[i] = bf16_to_f32(s[i]) - m[i];
    } else {
      const float* x = as_f32(w, w_dtype, off, len, tmp);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) o[i] = x[i] - m[i];
    }
  }
}

int64_t finalize(const float* x, const float* add, void* out, int32_t out_dtype, int64_t n) {
  const int64_t nb = num_blocks(n);
  int64_t bad = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : bad) if (n >= kParallelMin)
  for (int64_t b = 0; b < nb; ++b) {
    float* tmp = scratch(1);
    const int64_t off = b * kBlock, len = imin(kBlock, n - off);
    const float* y = x + off;
    if (add) {
      const float* __restrict a = add + off;
      const float* __restrict xx = x + off;
      // float32 output: write the sum straight into out
      float* __restrict dst = out_dtype == kF32 ? static_cast<float*>(out) + off : tmp;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dst[i] = xx[i] + a[i];
      y = dst;
    }
    // Count NaN/Inf in the converted values, so that overflow of a 16-bit output dtype is counted too.
    int64_t c = 0;
    if (out_dtype == kBF16 || out_dtype == kF16) {
      c = store16_count_nonfinite(y, static_cast<uint16_t*>(out) + off, out_dtype, len);
    } else {
#pragma omp simd reduction(+ : c)
      for (int64_t i = 0; i < len; ++i) c += is_nonfinite(y[i]) ? 1 : 0;
      if (out != nullptr && !add) std::memcpy(static_cast<float*>(out) + off, y, len * sizeof(float));
    }
    bad += c;
  }
  return bad;
}

// |x - base| bit patterns of one block into bits[0:len].
void abs_tau_bits(const void* x, int32_t xd, const float* bb, int64_t off, int64_t len, float* tmp, uint32_t* bits) {
  const float* xv = as_f32(x, xd, off, len, tmp);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) bits[i] = f32_bits(xv[i] - bb[i]) & 0x7FFFFFFFu;
}

// Which entries of task t TIES keeps: exactly k, by the bit pattern of |tau| (for non-negative floats, and for
// NaN placed above +inf exactly as torch.kthvalue orders it, the unsigned pattern orders like the value):
// every entry above `bits`, and of the entries equal to it the first `need` in flat order.
struct KeepRule {
  uint32_t bits = 0;  // threshold bit pattern; 0xFFFFFFFF keeps nothing
  bool trim = false;  // whether some entries equal to `bits` are dropped (then ranks among them matter)
  uint64_t need = 0;  // how many entries equal to `bits` are kept
};

// The radix digits of the threshold search: two 16-bit digits for large tensors (one pass fewer over the
// inputs), 11/11/10 bits below (a 65536-bin histogram would cost more to clear and scan than such a tensor).
struct RadixPlan {
  int passes;
  int width[3];
  int shift[3];
};
constexpr int64_t kWideMin = int64_t(1) << 20;
inline RadixPlan radix_plan(int64_t n) {
  if (n >= kWideMin) return RadixPlan{2, {16, 16, 0}, {16, 0, 0}};
  return RadixPlan{3, {11, 11, 10}, {21, 10, 0}};
}

// The blocks are split into `count` contiguous chunks, each histogrammed into its own counters (no merge between
// threads) and walked in flat order by one thread in the merge. The last digit's per-chunk count of the entries
// equal to the threshold then gives each chunk's rank offset among them, so the merge finds which equal entries
// are kept while it streams, with no pass of its own.
struct Chunks {
  int64_t count = 1, nb = 0;
  int64_t first(int64_t j) const { return j * nb / count; }
};
inline Chunks chunks_for(int64_t n, int T, int bins) {
  Chunks c;
  c.nb = num_blocks(n);
  if (n < kParallelMin) return c;
  int64_t want = int64_t(4) * max_threads();  // a few per thread, so a descheduled thread's share can move
  const int64_t budget = (int64_t(64) << 20) / (int64_t(T) * bins * int64_t(sizeof(uint32_t)));  // <= 64 MiB
  want = imin(want, imax<int64_t>(budget, 1));
  // uint32 counters: a chunk holds fewer than 2^31 elements
  want = imax(want, (n >> 31) + 1);
  c.count = imax<int64_t>(1, imin(want, c.nb));
  return c;
}

// --- exact k-th largest by sampling (large tensors) ------------------------------------------------------------
// The radix select reads every input twice (two 16-bit digits) and its first sweep scatters increments over a
// 65536-bin histogram per task. Instead, |tau| bit patterns at kSample pseudo-random positions give, per task, a
// band [lo, hi] that holds the k-th largest with near certainty (the sample's quantile +- kSigma standard
// deviations); ONE sweep then counts the entries above hi and copies the (few) entries inside the band into
// per-chunk buffers; the exact threshold is selected among those. The result (threshold, how many equal entries are
// kept, and each chunk's count of equal entries before it) is the radix select's exactly; where the band misses
// the k-th largest or overflows its buffer (many equal magnitudes), that task falls back to the radix select.
constexpr int64_t kSample = int64_t(1) << 16;
constexpr int64_t kRun = 8;  // consecutive entries per sampled stratum
constexpr double kSigma = 6.0;
// The widest band (fraction of the tensor) worth sweeping. bfloat16 task vectors tie heavily (a few tens of
// thousands of distinct magnitudes in 11.5 M entries), so their bands hold 3-7% of the entries: at 0.05, two of
// the four tasks of a 5632 x 2048 down_proj of bench/peer's 0.5 B set went to the radix select. Measured
// 2026-12-03 in one process, the bound alternated (T = 4, density 0.2, 2 threads, median ms; same bits):
// down_proj 60.2 at 0.05, 38.0 at 0.1, 38.4 at 0.2, 38.5 at 0.3; q_proj 2048 x 2048 25.1 / 15.8 / 15.6 / 15.8;
// embed_tokens 32000 x 2048 242.5 / 232.9 / 180.5 / 190.8. The cost where a wide band overflows a chunk's buffer
// (a sixth of the tensor at one magnitude, as tests/test_kernels.py's "clustered"): 117.9 ms at 0.05 against
// 130.5 at 0.2, the wasted sweep; float32 and fine-grained bf16 task vectors: no change (42.7 / 43.2, 51.1 / 52.0).
constexpr double kMaxShare = 0.2;
constexpr int64_t kBandBudget = int64_t(128) << 20;   // bytes of band buffers per call, all tasks together

inline uint64_t mix64(uint64_t z) {  // splitmix64's finaliser: deterministic pseudo-random sample positions
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline float load_f32(const void* p, int32_t dtype, int64_t i) {
  if (dtype == kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

// The element at ascending position `pos` (< m) of a[0:m], whose entries all lie in [lo, lo + span]: a radix
// select on a[i] - lo, 11-bit digits from span's top bit down; each pass histograms the entries that share the
// digits chosen so far and compacts them to the front, with no data-dependent branch (the Hoare quickselect it
// replaced mispredicted about every other comparison). a is overwritten.
uint32_t select_in_range(uint32_t* a, int64_t m, int64_t pos, uint32_t lo, uint32_t span) {
  uint32_t hist[1 << 11];
  int top = span ? 32 - __builtin_clz(span) : 0;  // bits of a[i] - lo still undecided
  while (top > 0 && m > 1) {
    const int width = top < 11 ? top : 11;
    const int shift = top - width;
    const uint32_t mask = (1u << width) - 1u;
    for (uint32_t b = 0; b <= mask; ++b) hist[b] = 0;
    for (int64_t i = 0; i < m; ++i) ++hist[((a[i] - lo) >> shift) & mask];
    uint32_t b = 0;
    int64_t below = 0;
    while (below + int64_t(hist[b]) <= pos) below += hist[b++];
    pos -= below;
    int64_t w = 0;
    for (int64_t i = 0; i < m; ++i) {
      const uint32_t v = a[i];
      a[w] = v;
      w += (((v - lo) >> shift) & mask) == b ? 1 : 0;
    }
    m = w;
    top = shift;
  }
  return a[pos];  // the survivors are equal (or one is left)
}

#if defined(__AVX512F__) || defined(__AVX2__)
// The vector width of TIES's band sweep and merge pass (band_block, band_bf16, ties_plain), one struct per ISA
// with the same members, so that each of those loops is written once. AVX-512: 16 float32 lanes, lane masks in
// mask registers. AVX2: 8 lanes, lane masks as all-ones-where-true vectors; a masked move becomes an AND (+0.0
// where the lane is off, as a zeroing move gives) or a blend, a masked count a subtraction of the mask. Both
// give the same bits for the same inputs (tests/test_isa_paths.py runs the kernel tests on each).
#if defined(__AVX512F__)
struct Simd {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static F fset(float v) { return _mm512_set1_ps(v); }
  static I iset(uint32_t v) { return _mm512_set1_epi32(int(v)); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static I iload(const uint32_t* p) { return _mm512_loadu_si512(p); }
  // W bfloat16 values at p as float32 (exact: a bf16 is the top half of its float32)
  static F load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_u16(uint16_t* p, I v) {  // every lane < 2^16
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(v));
  }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c rounded once, as madd
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static I bits(F a) { return _mm512_castps_si512(a); }
  static F floats(I a) { return _mm512_castsi512_ps(a); }
  static I iand(I a, I b) { return _mm512_and_si512(a, b); }
  static I ixor(I a, I b) { return _mm512_xor_si512(a, b); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I srl16(I a) { return _mm512_srli_epi32(a, 16); }
  static M le_u32(I a, I b) { return _mm512_cmple_epu32_mask(a, b); }
  static M gt_u32(I a, I b) { return _mm512_cmpgt_epu32_mask(a, b); }
  static M ieq(I a, I b) { return _mm512_cmpeq_epi32_mask(a, b); }
  static M ge0(F a) { return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GE_OQ); }
  static M gt0(F a) { return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ); }
  static M eq0(F a) { return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_EQ_OQ); }
  static F keep(M m, F v) { return _mm512_maskz_mov_ps(m, v); }               // v where m, else +0.0
  static F fselect(M m, F a, F b) { return _mm512_mask_mov_ps(b, m, a); }      // a where m, else b
  static I iselect(M m, I a, I b) { return _mm512_mask_mov_epi32(b, m, a); }   // a where m, else b
  static I count(I acc, M m) { return _mm512_mask_add_epi32(acc, m, acc, _mm512_set1_epi32(1)); }
  static int lanes(M m) { return __builtin_popcount(m); }
  static int64_t sum(I v) { return _mm512_reduce_add_epi32(v); }
  // the lanes of v selected by m, packed to the front (compressed in a register, then stored whole by the
  // caller: vpcompressd to memory is microcoded and slow on Zen 4, where it was most of the band sweep's time)
  static I compress(I v, M m) { return _mm512_maskz_compress_epi32(m, v); }
  static void istore(uint32_t* p, I v) { _mm512_storeu_si512(p, v); }
};
#else
// kCompress.idx[m]: the lanes set in the 8-bit mask m, in order, then zeros: the permutation that packs them to
// the front (AVX2 has no compress instruction; this is the usual lookup table, 2 KiB)
struct CompressTable {
  uint8_t idx[256][8];
  constexpr CompressTable() : idx() {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) idx[m][c++] = uint8_t(l);
    }
  }
};
constexpr CompressTable kCompress{};
struct Simd {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  using M = __m256i;  // all ones in the lanes where true
  static F fset(float v) { return _mm256_set1_ps(v); }
  static I iset(uint32_t v) { return _mm256_set1_epi32(int(v)); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static I iload(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static F load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_u16(uint16_t* p, I v) {  // every lane < 2^16, so the saturating pack is exact
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
  }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c rounded once, as madd
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static I bits(F a) { return _mm256_castps_si256(a); }
  static F floats(I a) { return _mm256_castsi256_ps(a); }
  static I iand(I a, I b) { return _mm256_and_si256(a, b); }
  static I ixor(I a, I b) { return _mm256_xor_si256(a, b); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I srl16(I a) { return _mm256_srli_epi32(a, 16); }
  // AVX2 compares only signed integers: unsigned a <= b as min(a, b) == a; a > b with both top bits flipped
  static M le_u32(I a, I b) { return _mm256_cmpeq_epi32(_mm256_min_epu32(a, b), a); }
  static M gt_u32(I a, I b) {
    const I bias = _mm256_set1_epi32(int(0x80000000u));
    return _mm256_cmpgt_epi32(_mm256_xor_si256(a, bias), _mm256_xor_si256(b, bias));
  }
  static M ieq(I a, I b) { return _mm256_cmpeq_epi32(a, b); }
  static M ge0(F a) { return _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GE_OQ)); }
  static M gt0(F a) { return _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ)); }
  static M eq0(F a) { return _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_EQ_OQ)); }
  static F keep(M m, F v) { return _mm256_and_ps(_mm256_castsi256_ps(m), v); }
  static F fselect(M m, F a, F b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
  static I iselect(M m, I a, I b) { return _mm256_blendv_epi8(b, a, m); }
  static I count(I acc, M m) { return _mm256_sub_epi32(acc, m); }
  static int lanes(M m) { return __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(m))); }
  static int64_t sum(I v) {
    alignas(32) int32_t l[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(l), v);
    int64_t s = 0;
    for (int k = 0; k < 8; ++k) s += l[k];
    return s;
  }
  static I compress(I v, M m) {
    const int bits8 = _mm256_movemask_ps(_mm256_castsi256_ps(m));
    const __m128i i8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompress.idx[bits8]));
    return _mm256_permutevar8x32_epi32(v, _mm256_cvtepu8_epi32(i8));
  }
  static void istore(uint32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
};
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// W float32 values y stored at p as bfloat16, rounded as f32_to_bf16 (to nearest even, every NaN to 0x7FC0), in
// registers; the lanes whose bfloat16 is non-finite (all-ones exponent: overflow on rounding too) counted in badv.
inline void store_bf16_counted(uint16_t* p, Simd::F y, Simd::I& badv) {
  using S = Simd;
  const S::I u = S::bits(y), expo = S::iset(0x7F80u);
  S::I r = S::iadd(u, S::iadd(S::iset(0x7FFFu), S::iand(S::srl16(u), S::iset(1u))));
  r = S::iselect(S::gt_u32(S::iand(u, S::iset(0x7FFFFFFFu)), S::iset(0x7F800000u)), S::iset(0x7FC0u), S::srl16(r));
  S::store_u16(p, r);
  badv = S::count(badv, S::ieq(S::iand(r, expo), expo));
}
#endif

// The band sweep's test of W bit patterns (band_block, band_bf16): counts those above hi, and appends those in
// [lo, hi] to dst[mm..] while mm <= cap (one full store, kBandSlack past cap; mm counts them all).
struct Band {
  Simd::I vl, vw, vh;
  Band(uint32_t lo, uint32_t hi) : vl(Simd::iset(lo)), vw(Simd::iset(hi - lo)), vh(Simd::iset(hi)) {}
  void take(Simd::I v, uint32_t* __restrict dst, int64_t cap, int64_t& mm, int64_t& above) const {
    above += Simd::lanes(Simd::gt_u32(v, vh));
    const Simd::M in = Simd::le_u32(Simd::isub(v, vl), vw);  // v - lo <= hi - lo, unsigned
    if (mm <= cap) Simd::istore(dst + mm, Simd::compress(v, in));
    mm += Simd::lanes(in);
  }
};
#endif

// One block of the sampled select's sweep: returns how many bits[i] > hi, and appends those in [lo, hi] to
// dst[m..] while m < cap (m counts them all, so an overflow shows as m > cap). dst has kBandSlack entries past
// cap, which the vector path may write.
constexpr int64_t kBandSlack = 16;
int64_t band_block(const uint32_t* __restrict bits, int64_t len, uint32_t lo, uint32_t hi, uint32_t* __restrict dst,
                   int64_t cap, int64_t& m) {
  const uint32_t w = hi - lo;  // in the band: bits - lo <= w (unsigned)
  int64_t above = 0, i = 0, mm = m;
#if defined(__AVX512F__) || defined(__AVX2__)
  const Band band(lo, hi);
  for (; i + Simd::W <= len; i += Simd::W) band.take(Simd::iload(bits + i), dst, cap, mm, above);
#endif
  for (; i < len; ++i) {
    above += bits[i] > hi ? 1 : 0;
    if (bits[i] - lo <= w) {
      if (mm < cap) dst[mm] = bits[i];
      ++mm;
    }
  }
  m = mm;
  return above;
}

#if defined(__AVX512F__) || defined(__AVX2__)
// band_block for a bfloat16 input, with |x - base| formed in registers: the first (len / W) * W entries; returns
// how many it did (the caller finishes the tail).
// With BaseBF16, bb_ is the bfloat16 base itself (at the block's offset), converted in registers.
template <bool BaseBF16>
int64_t band_bf16(const uint16_t* __restrict x, const void* bb_, int64_t len, uint32_t lo, uint32_t hi,
                  uint32_t* __restrict dst, int64_t cap, int64_t& m, int64_t& above) {
  const float* __restrict bb = static_cast<const float*>(bb_);
  const uint16_t* __restrict b16 = static_cast<const uint16_t*>(bb_);
  const Band band(lo, hi);
  const Simd::I absmask = Simd::iset(0x7FFFFFFFu);
  int64_t i = 0, mm = m, a = 0;
  for (; i + Simd::W <= len; i += Simd::W) {
    const Simd::F b = BaseBF16 ? Simd::load_bf16(b16 + i) : Simd::load(bb + i);
    const Simd::F tau = Simd::sub(Simd::load_bf16(x + i), b);
    band.take(Simd::iand(Simd::bits(tau), absmask), dst, cap, mm, a);
  }
  m = mm;
  above += a;
  return i;
}
#endif

// Per task of `todo` (k in (0, n)): tries the sampled select; on success sets rule[t] (and before[] for a trimming
// task) and clears todo[t]. Tasks left in todo need the radix select.
void select_sampled(const InputList& in, const void* base, int32_t bd, int64_t n, const int64_t* k, const Chunks& ch,
                    KeepRule* rule, Buf<uint64_t>& before, bool* todo) {
  const int T = in.count;
  Buf<uint32_t> samples{size_t(kSample) * T};
  Buf<uint32_t> lo(T, 0), hi(T, 0);
  Buf<int64_t> cap(T, 0);  // band buffer capacity per chunk and task
  const int64_t per_chunk_elems = (ch.nb + ch.count - 1) / ch.count * kBlock;
  bool some = false;
  for (int t = 0; t < T; ++t) some = some || todo[t];
  if (!some) return;
  // a run of kRun consecutive entries at a pseudo-random offset in each of kSample / kRun equal strata: each run
  // is one cache line of a 16-bit input, so the sample touches kRun times fewer lines than single positions would
  // (it was a third of this select's time on 4 Mi-element tensors); increasing addresses (few TLB misses), base
  // read once per run; strata in parallel (the reads are latency-bound)
  const int64_t strata = kSample / kRun;
  const int64_t stride = n / strata / kRun * kRun;  // >= 2^20 / 2^13, a multiple of kRun: runs stay aligned
  // each run's lines are prefetched kAhead strata before they are read (every run is a cache and TLB miss)
  constexpr int64_t kAhead = 8;
  auto run_start = [stride](int64_t s) { return s * stride + int64_t(mix64(uint64_t(s)) % uint64_t(stride / kRun)) * kRun; };
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < strata; ++s) {
    if (s + kAhead < strata) {
      const int64_t ia = run_start(s + kAhead);
      __builtin_prefetch(static_cast<const char*>(base) + ia * (bd == kF32 ? 4 : 2));
      for (int t = 0; t < T; ++t)
        if (todo[t]) __builtin_prefetch(static_cast<const char*>(in.ptr[t]) + ia * (in.dtype[t] == kF32 ? 4 : 2));
    }
    const int64_t i0 = run_start(s);
    float b[kRun];
    for (int64_t r = 0; r < kRun; ++r) b[r] = load_f32(base, bd, i0 + r);
    for (int t = 0; t < T; ++t) {
      if (!todo[t]) continue;
      uint32_t* dst = samples.data() + size_t(t) * kSample + s * kRun;
      for (int64_t r = 0; r < kRun; ++r) dst[r] = f32_bits(load_f32(in.ptr[t], in.dtype[t], i0 + r) - b[r]) & 0x7FFFFFFFu;
    }
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (int t = 0; t < T; ++t) {
    if (!todo[t]) continue;
    uint32_t* sample = samples.data() + size_t(t) * kSample;
    // expected sample entries above the threshold, and the margin around it
    const double p = double(k[t]) / double(n);
    const double above = p * double(kSample);
    const double margin = kSigma * std::sqrt(double(kSample) * p * (1.0 - p)) + 8.0;
    const int64_t a_hi = int64_t(std::floor(above - margin));  // sample entries kept above hi
    const int64_t a_lo = int64_t(std::ceil(above + margin));   // sample entries at or above lo
    static thread_local Buf<uint32_t> work;  // the select overwrites its input
    work.fresh(size_t(kSample));
    hi[t] = 0xFFFFFFFFu;
    if (a_hi >= 1) {
      std::memcpy(work.data(), sample, size_t(kSample) * sizeof(uint32_t));
      hi[t] = select_in_range(work.data(), kSample, kSample - a_hi - 1, 0u, 0xFFFFFFFFu);
    }
    lo[t] = 0u;
    if (a_lo < kSample) {
      std::memcpy(work.data(), sample, size_t(kSample) * sizeof(uint32_t));
      lo[t] = select_in_range(work.data(), kSample, kSample - a_lo, 0u, 0xFFFFFFFFu);
    }
    if (lo[t] > hi[t]) lo[t] = hi[t];
    int64_t inside = 0;
    for (int64_t s = 0; s < kSample; ++s) inside += (sample[s] - lo[t]) <= (hi[t] - lo[t]) ? 1 : 0;
    // a chunk's band entries: twice the sample's share, plus slack for small chunks
    const double share = double(inside) / double(kSample);
    // a band wider than kMaxShare of the tensor (many equal or clustered magnitudes) would cost more memory and
    // time than the radix sweeps: cap 0 leaves the task to them
    cap[t] = share > kMaxShare ? 0 : imin<int64_t>(per_chunk_elems, int64_t(2.0 * share * double(per_chunk_elems)) + 4 * kBlock);
  }
  // each (chunk, task) band buffer's offset in one allocation, task-major: a task's buffers are contiguous, so
  // they can be packed in place. Tasks are admitted in order while the buffers fit kBandBudget bytes (so memory
  // does not grow with T); the others go to the radix select.
  Buf<int64_t> base_off(size_t(ch.count) * T, 0);
  int64_t total = 0;
  for (int t = 0; t < T; ++t) {
    if (todo[t] && cap[t] > 0 && (total + (cap[t] + kBandSlack) * ch.count) * int64_t(sizeof(uint32_t)) > kBandBudget)
      cap[t] = 0;
    for (int64_t j = 0; j < ch.count; ++j) {
      base_off[size_t(j) * T + t] = total;
      if (todo[t] && cap[t] > 0) total += cap[t] + kBandSlack;
    }
  }
  bool any = false;
  for (int t = 0; t < T; ++t) any = any || (todo[t] && cap[t] > 0);
  if (!any) return;
  // the band buffers: kept per calling thread between calls (most of it is never written, and what is written
  // is faulted in once, not once per tensor)
  static thread_local Buf<uint32_t> band_store;
  band_store.fresh(size_t(total ? total : 1));
  uint32_t* const band = band_store.data();
  Buf<int64_t> above(size_t(ch.count) * T, 0), count(size_t(ch.count) * T, 0);
  bool inline_base = false;
#if defined(__AVX512F__) || defined(__AVX2__)
  inline_base = bd == kBF16;
  for (int t = 0; t < T; ++t) inline_base = inline_base && (!todo[t] || cap[t] <= 0 || in.dtype[t] == kBF16);
#endif
#pragma omp parallel for schedule(dynamic, 1) if (ch.count > 1)
  for (int64_t j = 0; j < ch.count; ++j) {
    float* tmp = scratch(3);
    float* tb = tmp + kBlock;
    uint32_t* bits = reinterpret_cast<uint32_t*>(tb + kBlock);
    for (int64_t b = ch.first(j); b < ch.first(j + 1); ++b) {
      const int64_t off = b * kBlock, len = imin(kBlock, n - off);
      // a bfloat16 base is converted in registers where every swept input is bfloat16 (band_bf16<true>)
      const float* bb = inline_base ? nullptr : as_f32(base, bd, off, len, tb);
      for (int t = 0; t < T; ++t) {
        if (!todo[t] || cap[t] <= 0) continue;
        const size_t slot = size_t(j) * T + t;
        int64_t done = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
        if (in.dtype[t] == kBF16) {  // |tau| bits formed in registers (same arithmetic as abs_tau_bits)
          const uint16_t* xt = static_cast<const uint16_t*>(in.ptr[t]) + off;
          done = inline_base ? band_bf16<true>(xt, static_cast<const uint16_t*>(base) + off, len, lo[t], hi[t],
                                               band + base_off[slot], cap[t], count[slot], above[slot])
                             : band_bf16<false>(xt, bb, len, lo[t], hi[t], band + base_off[slot], cap[t],
                                                count[slot], above[slot]);
        }
#endif
        if (done < len) {
          const float* bt = inline_base ? as_f32(base, bd, off + done, len - done, tb) : bb + done;
          abs_tau_bits(in.ptr[t], in.dtype[t], bt, off + done, len - done, tmp, bits);
          above[slot] += band_block(bits, len - done, lo[t], hi[t], band + base_off[slot], cap[t], count[slot]);
        }
      }
    }
  }
  // per task, in parallel: the exact threshold among its band entries
#pragma omp parallel for schedule(dynamic, 1)
  for (int t = 0; t < T; ++t) {
    if (!todo[t] || cap[t] <= 0) continue;
    int64_t n_above = 0, n_band = 0;
    bool overflow = false;
    for (int64_t j = 0; j < ch.count; ++j) {
      const size_t slot = size_t(j) * T + t;
      n_above += above[slot];
      n_band += count[slot];
      overflow = overflow || count[slot] > cap[t];
    }
    if (overflow || n_above >= k[t] || n_above + n_band < k[t]) continue;  // the band missed: radix select
    // gather the band entries (the per-chunk buffers, packed in place towards the first) and select in them
    uint32_t* all = band + base_off[t];
    int64_t m = 0;
    for (int64_t j = 0; j < ch.count; ++j) {
      const size_t slot = size_t(j) * T + t;
      const uint32_t* src = band + base_off[slot];
      if (src != all + m) std::memmove(all + m, src, size_t(count[slot]) * sizeof(uint32_t));
      m += count[slot];
    }
    const int64_t want = k[t] - n_above;  // the want-th largest of the band is the threshold
    static thread_local Buf<uint32_t> copy;  // overwritten by the select; `all` keeps the flat order
    copy.fresh(size_t(m ? m : 1));
    std::memcpy(copy.data(), all, size_t(m) * sizeof(uint32_t));
    const uint32_t th = select_in_range(copy.data(), m, m - want, lo[t], hi[t] - lo[t]);  // band: in [lo, hi]
    // how many band entries lie above it, and (per chunk, in flat order) how many equal it
    int64_t gt = 0, eq = 0;
    for (int64_t i = 0; i < m; ++i) {
      gt += all[i] > th ? 1 : 0;
      eq += all[i] == th ? 1 : 0;
    }
    KeepRule r;
    r.bits = th;
    r.need = uint64_t(k[t] - n_above - gt);
    r.trim = r.need < uint64_t(eq);
    if (r.trim) {
      uint64_t run = 0;
      int64_t pos = 0;
      for (int64_t j = 0; j < ch.count; ++j) {
        before[size_t(t) * (ch.count + 1) + j] = run;
        const int64_t c = count[size_t(j) * T + t];
        for (int64_t i = 0; i < c; ++i) run += all[pos + i] == th ? 1 : 0;
        pos += c;
      }
      before[size_t(t) * (ch.count + 1) + ch.count] = run;
    }
    rule[t] = r;
    todo[t] = false;
  }
}

// Per task, the rule keeping exactly k[t] entries, and before[t * (chunks + 1) + j] = how many entries equal to the
// threshold lie before chunk j, j <= chunks (only for tasks whose rule trims). Each digit is ONE parallel sweep over the
// chunks reading base once and every task's input once; between sweeps the digit holding the k-th largest value
// is picked per task and becomes the prefix of the next.
// A sweep also counts, per bin, the entries with a non-zero bit below the digit ("impure"). The bin's other entries
// all equal prefix << shift, the smallest value the bin can hold, so they rank below its impure ones: where the
// k-th largest lies past the chosen bin's impure entries, the threshold is prefix << shift, and that task needs no
// further sweep. That is the common case for bfloat16 inputs and base: tau = x - base is exact in float32 with at
// most ~8 significant bits wherever x and base share a binade, so the low 16 bits of |tau| are mostly zero (97.3% of
// a 5632 x 2048 down_proj of the 4 x 0.5 B set; 1367 of the 85422 entries in the bin of its density-0.2
// threshold are impure), and such task vectors tie so much that the sampled select's band can hold more than
// kMaxShare of the tensor or overflow a chunk's buffer, which leaves them here. Measured: docs/kernels.md, "TIES on
// bfloat16 task vectors".
void select_radix(const InputList& in, const void* base, int32_t bd, int64_t n, const int64_t* k,
                  const Chunks& ch, KeepRule* rule, Buf<uint64_t>& before) {
  const int T = in.count;
  bool active[kMaxInputs];  // tasks that keep a strict subset and whose threshold is not found yet
  bool any = false;
  for (int t = 0; t < T; ++t) {
    rule[t] = KeepRule{};
    rule[t].bits = k[t] <= 0 ? 0xFFFFFFFFu : 0u;
    active[t] = k[t] > 0 && k[t] < n;
    any = any || active[t];
  }
  if (!any) return;
  const RadixPlan plan = radix_plan(n);
  const int bins = 1 << plan.width[0];
  const size_t per_chunk = size_t(T) * bins;
  Buf<uint32_t> hist(size_t(ch.count) * per_chunk);
  Buf<uint32_t> impure(size_t(ch.count) * per_chunk);
  Buf<uint32_t> prefix(T, 0);
  Buf<uint64_t> need(T, 0);
  for (int t = 0; t < T; ++t) need[t] = uint64_t(k[t]);
  for (int pass = 0; pass < plan.passes && any; ++pass) {
    const int shift = plan.shift[pass], width = plan.width[pass];
    const uint32_t mask = (1u << width) - 1u;
    const uint32_t below = shift ? (1u << shift) - 1u : 0u;
    const int hi = shift + width;
    const int pbins = 1 << width;
#pragma omp parallel for schedule(dynamic, 1) if (ch.count > 1)
    for (int64_t j = 0; j < ch.count; ++j) {
      uint32_t* local = hist.data() + size_t(j) * per_chunk;
      uint32_t* imp = impure.data() + size_t(j) * per_chunk;
      for (size_t i = 0; i < per_chunk; ++i) local[i] = 0;
      for (size_t i = 0; i < per_chunk; ++i) imp[i] = 0;
      float* tmp = scratch(3);
      float* tb = tmp + kBlock;
      uint32_t* bits = reinterpret_cast<uint32_t*>(tb + kBlock);
      for (int64_t b = ch.first(j); b < ch.first(j + 1); ++b) {
        const int64_t off = b * kBlock, len = imin(kBlock, n - off);
        const float* bb = as_f32(base, bd, off, len, tb);
        for (int t = 0; t < T; ++t) {
          if (!active[t]) continue;
          abs_tau_bits(in.ptr[t], in.dtype[t], bb, off, len, tmp, bits);
          uint32_t* h = local + size_t(t) * bins;
          uint32_t* q = imp + size_t(t) * bins;
          if (pass == 0) {
            for (int64_t i = 0; i < len; ++i) {
              const uint32_t v = bits[i], d = v >> shift;
              ++h[d];
              if (v & below) ++q[d];  // rare for bfloat16 task vectors: a branch beats a second scatter
            }
          } else {
            const uint32_t p = prefix[t];
            for (int64_t i = 0; i < len; ++i) {
              const uint32_t v = bits[i];
              if ((v >> hi) == p) {
                const uint32_t d = (v >> shift) & mask;
                ++h[d];
                if (v & below) ++q[d];
              }
            }
          }
        }
      }
    }
    any = false;
    for (int t = 0; t < T; ++t) {
      if (!active[t]) continue;
      uint64_t above = 0, here = 0;
      int chosen = 0;
      for (int bin = pbins - 1; bin >= 0; --bin) {
        here = 0;
        for (int64_t j = 0; j < ch.count; ++j) here += hist[size_t(j) * per_chunk + size_t(t) * bins + bin];
        if (above + here >= need[t]) {
          chosen = bin;
          break;
        }
        above += here;
      }
      need[t] -= above;
      prefix[t] = (prefix[t] << width) | uint32_t(chosen);
      uint64_t imp_here = 0;  // the chosen bin's impure entries, all above its value prefix << shift
      for (int64_t j = 0; j < ch.count; ++j) imp_here += impure[size_t(j) * per_chunk + size_t(t) * bins + chosen];
      if (need[t] <= imp_here) {  // the k-th largest is among them: the next digit decides (never in the last pass)
        any = true;
        continue;
      }
      active[t] = false;
      rule[t].bits = prefix[t] << shift;
      rule[t].need = need[t] - imp_here;  // the impure entries are all kept; of the equal ones, the first `need`
      rule[t].trim = rule[t].need < here - imp_here;  // here - imp_here: the entries equal to the threshold
      if (rule[t].trim) {
        uint64_t run = 0;
        for (int64_t j = 0; j < ch.count; ++j) {
          before[size_t(t) * (ch.count + 1) + j] = run;
          const size_t at = size_t(j) * per_chunk + size_t(t) * bins + chosen;
          run += hist[at] - impure[at];
        }
        before[size_t(t) * (ch.count + 1) + ch.count] = run;
      }
    }
  }
}

// Per task, the rule keeping exactly k[t] entries (and before[], see select_radix): sampled for large tensors,
// the radix select for small ones and for the tasks whose sampled band missed.
void select_thresholds(const InputList& in, const void* base, int32_t bd, int64_t n, const int64_t* k,
                       const Chunks& ch, KeepRule* rule, Buf<uint64_t>& before) {
  const int T = in.count;
  if (n < kWideMin) return select_radix(in, base, bd, n, k, ch, rule, before);
  bool todo[kMaxInputs];
  int64_t rest[kMaxInputs];  // k for the radix select: 0 for the tasks the sample settled
  for (int t = 0; t < T; ++t) todo[t] = k[t] > 0 && k[t] < n;
  select_sampled(in, base, bd, n, k, ch, rule, before, todo);
  KeepRule done[kMaxInputs];
  for (int t = 0; t < T; ++t) {
    const bool settled = k[t] > 0 && k[t] < n && !todo[t];
    done[t] = rule[t];
    rest[t] = settled ? 0 : k[t];
  }
  select_radix(in, base, bd, n, rest, ch, rule, before);
  for (int t = 0; t < T; ++t)
    if (k[t] > 0 && k[t] < n && !todo[t]) rule[t] = done[t];
}

// Entries of task t in [off, off + len) whose |tau| has the bit pattern th.
int64_t count_equal(const void* x, int32_t xd, const float* __restrict bb, int64_t off, int64_t len, uint32_t th,
                    float* tmp) {
  const float* __restrict xv = as_f32(x, xd, off, len, tmp);
  int64_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t i = 0; i < len; ++i) c += (f32_bits(xv[i] - bb[i]) & 0x7FFFFFFFu) == th ? 1 : 0;
  return c;
}

// A merge-pass tile's float32 results o[0:tl] as out[pos : pos + tl] in dtype od (o is that slice already for a
// float32 out), with the count of non-finite values written.
int64_t store_tile_counted(const float* o, void* out, int32_t od, int64_t pos, int64_t tl) {
  if (od != kF32) return store16_count_nonfinite(o, static_cast<uint16_t*>(out) + pos, od, tl);
  int64_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t i = 0; i < tl; ++i) c += is_nonfinite(o[i]) ? 1 : 0;
  return c;
}

// Elements per tile of the merge pass: every task's weighted kept entries of a tile stay in L1 between the
// election and the mean.
constexpr int64_t kTile = 512;

// ties_plain's keep rule for one task, as constants of an unsigned compare: kept where u - th <= span, i.e.
// thr <= u <= +Inf (u: the |tau| bit pattern); nothing kept where thr > +Inf (then th = 2^31: u < 2^31, so u - 2^31
// wraps above span 0)
struct PlainRule {
  uint32_t th, span;
  explicit PlainRule(uint32_t thr)
      : th(thr > 0x7F800000u ? 0x80000000u : thr), span(thr > 0x7F800000u ? 0u : 0x7F800000u - thr) {}
};

using TiesPlainFn = int64_t (*)(const void* const*, const float*, const uint32_t*, const void*, int64_t, int64_t,
                                float, bool, float*, uint16_t*, int64_t&);
// Elements [i, len) of a ties_plain tile, one at a time (the vector paths' arithmetic, per element): the tail a
// vector does not fill. Returns the non-finite tau_t entries; adds the non-finite bfloat16 outputs to `bad`.
template <int T, bool InF32, bool BaseBF16>
int64_t ties_plain_tail(const void* const* x, const float* w, const uint32_t* thr, const void* bb_, int64_t pos,
                        int64_t i, int64_t len, float lam, bool normalize, float* __restrict o,
                        uint16_t* __restrict out16, int64_t& bad) {
  const float* __restrict bb = static_cast<const float*>(bb_);
  const uint16_t* __restrict b16 = static_cast<const uint16_t*>(bb_);
  int64_t nf = 0;
  for (; i < len; ++i) {
    const float b = BaseBF16 ? bf16_to_f32(b16[i]) : bb[i];
    float d[T];
    float e = 0.0f;
    for (int t = 0; t < T; ++t) {
      const float xv = InF32 ? static_cast<const float*>(x[t])[pos + i]
                             : bf16_to_f32(static_cast<const uint16_t*>(x[t])[pos + i]);
      const float tau = xv - b;
      const uint32_t u = f32_bits(tau) & 0x7FFFFFFFu;
      d[t] = (u >= thr[t] && u <= 0x7F800000u ? tau : 0.0f) * w[t];
      e += d[t];
      nf += u >= 0x7F800000u ? 1 : 0;
    }
    const float el = e >= 0.0f ? 1.0f : -1.0f;
    float mixed = 0.0f, dv = 0.0f;
    for (int t = 0; t < T; ++t) {
      const bool agree = sign_of(d[t]) == el;
      mixed += agree ? d[t] : 0.0f;
      dv += agree ? w[t] : 0.0f;
    }
    const float q = normalize ? mixed / (dv == 0.0f ? 1.0f : dv) : mixed;
    const float sc = q * lam;
    const float y = sc + b;
    if (out16) {
      out16[i] = f32_to_bf16(y);
      bad += (out16[i] & 0x7F80u) == 0x7F80u ? 1 : 0;
    } else {
      o[i] = y;
    }
  }
  return nf;
}

#if defined(__AVX512F__) || defined(__AVX2__)
// The merge pass over one tile whose keep rules need no position in it: task t keeps the entries with
// thr[t] <= |tau| bits <= +Inf (thr is its threshold where its equal entries are all kept here, one above it where
// none are). The same operations in the same order as the tile loop of ties_merge below, per Simd::W elements with
// the T weighted entries in registers (T is a compile-time constant, so the task loops unroll): no d_t tile is
// stored and read back, and no 64-bit position compare per entry. (Written with intrinsics: GCC 12 did not
// vectorise the portable form, an omp simd loop over the elements around the unrolled task loops, and ran it 5x
// slower than the tile loop; on an AVX2-only CPU the tile loop's agreement and mean loops ran scalar, vaddss,
// vucomiss and branches per element by perf annotate: the whole TIES kernel took 263 / 289 ms there on one
// 5632 x 2048 bf16 tensor, T = 4, against 35 / 34 ms with this path and the band sweep's, docs/kernels.md.)
//   inputs  x[t]: all bfloat16, or with InF32 all float32
//   base    bb_: float32 values of base[pos : pos + len], or with BaseBF16 the bfloat16 base at pos, converted in
//           registers
//   output  with out16, bfloat16 values written there (rounded as f32_to_bf16) and their non-finite ones added to
//           `bad`; else the float32 results in o[0:len]
// Returns the non-finite tau_t entries of the tile.
template <int T, bool InF32, bool BaseBF16>
int64_t ties_plain(const void* const* x, const float* w, const uint32_t* thr, const void* bb_, int64_t pos,
                   int64_t len, float lam, bool normalize, float* __restrict o, uint16_t* __restrict out16,
                   int64_t& bad) {
  using S = Simd;
  const float* __restrict bb = static_cast<const float*>(bb_);
  const uint16_t* __restrict b16 = static_cast<const uint16_t*>(bb_);
  const S::I absmask = S::iset(0x7FFFFFFFu), inf = S::iset(0x7F800000u), signbit = S::iset(0x80000000u),
             izero = S::iset(0u);
  const S::F one = S::fset(1.0f), vlam = S::fset(lam), zero = S::fset(0.0f);
  S::F wt[T];
  S::I th[T], span[T];  // each task's PlainRule
  for (int t = 0; t < T; ++t) {
    const PlainRule r(thr[t]);
    wt[t] = S::fset(w[t]);
    th[t] = S::iset(r.th);
    span[t] = S::iset(r.span);
  }
  S::I nfv = izero, badv = izero;  // per-lane counts (< 2^31 per call)
  int64_t nf = 0, i = 0;
  for (; i + S::W <= len; i += S::W) {
    const S::F b = BaseBF16 ? S::load_bf16(b16 + i) : S::load(bb + i);
    S::F d[T];
    S::F e = zero;
    for (int t = 0; t < T; ++t) {
      const S::F xv = InF32 ? S::load(static_cast<const float*>(x[t]) + pos + i)
                            : S::load_bf16(static_cast<const uint16_t*>(x[t]) + pos + i);
      const S::F tau = S::sub(xv, b);
      const S::I u = S::iand(S::bits(tau), absmask);
      d[t] = S::mul(S::keep(S::le_u32(S::isub(u, th[t]), span[t]), tau), wt[t]);  // (kept ? tau : 0) * w; NaN: never kept
      e = S::add(e, d[t]);
      nfv = S::count(nfv, S::le_u32(inf, u));  // NaN or +-Inf
    }
    // the elected sign's sign bit: 0 for +1 (e >= 0, a zero sum too), 1 for -1 (e < 0 or NaN)
    const S::I el = S::iselect(S::ge0(e), izero, signbit);
    S::F mixed = zero, dv = zero;
    for (int t = 0; t < T; ++t) {
      // sign_of(d) == elected sign  <=>  d with the elected sign's bit flipped in is > 0 (false for +-0 and NaN)
      const S::M agree = S::gt0(S::floats(S::ixor(S::bits(d[t]), el)));
      mixed = S::add(mixed, S::keep(agree, d[t]));
      dv = S::add(dv, S::keep(agree, wt[t]));
    }
    S::F q = mixed;
    if (normalize) q = S::div(mixed, S::fselect(S::eq0(dv), one, dv));
    const S::F y = S::add(S::mul(q, vlam), b);
    if (out16) {
      store_bf16_counted(out16 + i, y, badv);
    } else {
      S::store(o + i, y);
    }
  }
  nf += S::sum(nfv);
  bad += S::sum(badv);
  nf += ties_plain_tail<T, InF32, BaseBF16>(x, w, thr, bb_, pos, i, len, lam, normalize, o, out16, bad);
  return nf;
}
constexpr int kPlainMaxT = 8;  // instantiated for T = 1..8; more tasks take the tile loop
template <bool InF32, bool BaseBF16>
TiesPlainFn ties_plain_of(int T) {
  switch (T) {
    case 1: return ties_plain<1, InF32, BaseBF16>;
    case 2: return ties_plain<2, InF32, BaseBF16>;
    case 3: return ties_plain<3, InF32, BaseBF16>;
    case 4: return ties_plain<4, InF32, BaseBF16>;
    case 5: return ties_plain<5, InF32, BaseBF16>;
    case 6: return ties_plain<6, InF32, BaseBF16>;
    case 7: return ties_plain<7, InF32, BaseBF16>;
    case 8: return ties_plain<8, InF32, BaseBF16>;
    default: return nullptr;
  }
}
TiesPlainFn ties_plain_for(int T, bool in_f32, bool base_bf16) {
  if (in_f32) return base_bf16 ? ties_plain_of<true, true>(T) : ties_plain_of<true, false>(T);
  return base_bf16 ? ties_plain_of<false, true>(T) : ties_plain_of<false, false>(T);
}
#else
constexpr int kPlainMaxT = 0;  // without AVX2 every block takes the tile loop
TiesPlainFn ties_plain_for(int, bool, bool) { return nullptr; }
#endif

// TIES in mergekit's order of operations (the twin, ops/reference.py ties_merge, is the spec): per element,
// d_t = w_t * kept_t(tau_t); the elected sign is +1 where sum_t d_t >= 0 (summed in input order), else -1;
// mixed = sum of the agreeing d_t, divisor = sum of their w_t; out = base + lam * mixed [/ divisor].
// One pass over the inputs, tile by tile: d_t is formed once per entry (input read once, in registers for
// bfloat16) and kept in L1 for the mean. Of a trimming task's entries equal to its threshold, the first `need` in
// flat order are kept: `before` says which chunk holds the last kept one, and only in that chunk are they counted.
// Returns the non-finite values written plus the non-finite task-vector entries tau_t = x_t - base of every task,
// kept or dropped (counted where tau_t is formed, in the same loop): so a NaN/Inf in any input, or in base (then
// every tau_t is non-finite there), makes the count non-zero even where TIES drops it from the output.
int64_t ties_merge(const InputList& in, const void* base, int32_t bd, void* out, int32_t od, int64_t n, const int64_t* k,
                   float lam, bool normalize, float* thresholds_out) {
  const int T = in.count;
  Buf<KeepRule> rule(T);
  const Chunks ch = chunks_for(n, T, 1 << radix_plan(n).width[0]);
  Buf<uint64_t> before(size_t(T) * (ch.count + 1), 0);
  select_thresholds(in, base, bd, n, k, ch, rule.data(), before);
  if (thresholds_out)
    for (int t = 0; t < T; ++t)
      thresholds_out[t] = rule[t].bits == 0xFFFFFFFFu ? std::numeric_limits<float>::infinity() : bits_f32(rule[t].bits);
  int64_t bad = 0, bad_tau = 0;  // non-finite output values; non-finite task-vector entries
  // all inputs bfloat16 or all float32, T <= kPlainMaxT: the blocks without a cut take ties_plain
  bool all_bf16 = T <= kPlainMaxT, all_f32 = T <= kPlainMaxT;
  for (int t = 0; t < T; ++t) {
    all_bf16 = all_bf16 && in.dtype[t] == kBF16;
    all_f32 = all_f32 && in.dtype[t] == kF32;
  }
  const TiesPlainFn plain = all_bf16 || all_f32 ? ties_plain_for(T, all_f32, bd == kBF16) : nullptr;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : bad, bad_tau) if (ch.count > 1)
  for (int64_t j = 0; j < ch.count; ++j) {
    // per trimming task: entries equal to its threshold before the current block, and whether this chunk must
    // count them (the one where the kept ones run out); elsewhere all or none of them are kept
    uint64_t seen[kMaxInputs];
    bool counting[kMaxInputs];
    for (int t = 0; t < T; ++t) {
      const uint64_t* bt = before.data() + size_t(t) * (ch.count + 1);
      seen[t] = rule[t].trim ? bt[j] : 0;
      counting[t] = rule[t].trim && bt[j] < rule[t].need && bt[j + 1] > rule[t].need;
    }
    int64_t cut[kMaxInputs];
    // base, elected sign, mixed, divisor: one tile each; d: one tile per task; then two blocks for converting a
    // non-bfloat16 input and base ((4 + T) * kTile + 2 * kBlock floats fit in (4 + T) * kBlock)
    float* tb = scratch(4 + T);
    float* el = tb + kTile;
    float* mixed = el + kTile;
    float* div = mixed + kTile;
    float* dts = div + kTile;
    float* conv = dts + size_t(T) * kTile;
    for (int64_t b = ch.first(j); b < ch.first(j + 1); ++b) {
      const int64_t off = b * kBlock, len = imin(kBlock, n - off);
      // the equal entries kept in this block: those at positions below cut[t]
      for (int t = 0; t < T; ++t) {
        cut[t] = len;
        if (!rule[t].trim) continue;
        const uint64_t need = rule[t].need;
        if (seen[t] >= need) {
          cut[t] = 0;
          continue;
        }
        if (!counting[t]) continue;  // all of this chunk's equal entries are kept
        const float* bbk = as_f32(base, bd, off, len, conv + kBlock);
        const uint32_t th = rule[t].bits;
        const uint64_t c = uint64_t(count_equal(in.ptr[t], in.dtype[t], bbk, off, len, th, conv));
        if (seen[t] + c > need) {  // the block where the count completes
          const float* xv = as_f32(in.ptr[t], in.dtype[t], off, len, conv);
          uint64_t s2 = seen[t];
          int64_t i = 0;
          for (; i < len && s2 < need; ++i) s2 += (f32_bits(xv[i] - bbk[i]) & 0x7FFFFFFFu) == th ? 1 : 0;
          cut[t] = i;
        }
        seen[t] += c;
      }
      // the per-element path where every task keeps all or none of its equal entries in this block
      bool plain_block = plain != nullptr;
      uint32_t thr[kMaxInputs];
      for (int t = 0; t < T && plain_block; ++t) {
        const uint32_t th = rule[t].bits;
        if (cut[t] == len) thr[t] = th;
        else if (cut[t] == 0) thr[t] = th == 0xFFFFFFFFu ? th : th + 1u;  // th = all ones: nothing is kept anyway
        else plain_block = false;
      }
      if (plain_block) {
        for (int64_t i0 = 0; i0 < len; i0 += kTile) {
          const int64_t tl = imin(kTile, len - i0), pos = off + i0;
          const void* bb = bd == kBF16 ? static_cast<const void*>(static_cast<const uint16_t*>(base) + pos)
                                       : static_cast<const void*>(as_f32(base, bd, pos, tl, tb));
          float* __restrict o = od == kF32 ? static_cast<float*>(out) + pos : el;
          uint16_t* o16 = od == kBF16 ? static_cast<uint16_t*>(out) + pos : nullptr;
          int64_t b16 = 0;
          bad_tau += plain(in.ptr, in.weight, thr, bb, pos, tl, lam, normalize, o, o16, b16);
          bad += o16 ? b16 : store_tile_counted(o, out, od, pos, tl);
        }
        continue;
      }
      for (int64_t i0 = 0; i0 < len; i0 += kTile) {
        const int64_t tl = imin(kTile, len - i0), pos = off + i0;
        const float* __restrict bb = as_f32(base, bd, pos, tl, tb);
        for (int64_t i = 0; i < tl; ++i) el[i] = 0.0f;
        // d_t and the sign election's sum of them (in input order); nf: the tile's non-finite tau_t, all tasks
        // (32-bit lanes, like u; a tile has kTile * T entries)
        int32_t nf = 0;
        for (int t = 0; t < T; ++t) {
          float* __restrict d = dts + size_t(t) * kTile;
          const uint32_t th = rule[t].bits;
          const int64_t c = cut[t] - i0;  // equal entries at tile positions below c are kept
          const float w = in.weight[t];
          if (in.dtype[t] == kBF16) {
            const uint16_t* __restrict s = static_cast<const uint16_t*>(in.ptr[t]) + pos;
#pragma omp simd reduction(+ : nf)
            for (int64_t i = 0; i < tl; ++i) {
              const float tau = bf16_to_f32(s[i]) - bb[i];
              const uint32_t u = f32_bits(tau) & 0x7FFFFFFFu;
              const bool kept = (u > th || (u == th && i < c)) && u <= 0x7F800000u;  // NaN is ranked, never kept
              d[i] = (kept ? tau : 0.0f) * w;
              el[i] += d[i];
              nf += u >= 0x7F800000u ? 1 : 0;  // NaN or +-Inf
            }
          } else {
            const float* __restrict xv = as_f32(in.ptr[t], in.dtype[t], pos, tl, conv);
#pragma omp simd reduction(+ : nf)
            for (int64_t i = 0; i < tl; ++i) {
              const float tau = xv[i] - bb[i];
              const uint32_t u = f32_bits(tau) & 0x7FFFFFFFu;
              const bool kept = (u > th || (u == th && i < c)) && u <= 0x7F800000u;
              d[i] = (kept ? tau : 0.0f) * w;
              el[i] += d[i];
              nf += u >= 0x7F800000u ? 1 : 0;
            }
          }
        }
        bad_tau += nf;
#pragma omp simd
        for (int64_t i = 0; i < tl; ++i) {
          el[i] = el[i] >= 0.0f ? 1.0f : -1.0f;  // now the elected sign (a zero sum elects +1; NaN -1)
          mixed[i] = 0.0f;
          div[i] = 0.0f;
        }
        // the agreeing weighted entries and their weights
        for (int t = 0; t < T; ++t) {
          const float* __restrict d = dts + size_t(t) * kTile;
          const float w = in.weight[t];
#pragma omp simd
          for (int64_t i = 0; i < tl; ++i) {
            const bool agree = sign_of(d[i]) == el[i];
            mixed[i] += agree ? d[i] : 0.0f;
            div[i] += agree ? w : 0.0f;
          }
        }
        // the float32 result: straight into a float32 out, else into `el` (no longer needed), then converted
        float* __restrict o = od == kF32 ? static_cast<float*>(out) + pos : el;
        if (normalize) {
#pragma omp simd
          for (int64_t i = 0; i < tl; ++i) {
            const float q = mixed[i] / (div[i] == 0.0f ? 1.0f : div[i]);
            const float s = q * lam;
            o[i] = s + bb[i];
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < tl; ++i) {
            const float s = mixed[i] * lam;
            o[i] = s + bb[i];
          }
        }
        bad += store_tile_counted(o, out, od, pos, tl);
      }
    }
  }
  return bad + bad_tau;
}

void dare(const void* tau, int32_t dtype, float* out, int64_t n, float p, float scale, uint64_t seed) {
  const int64_t nb = num_blocks(n);
#pragma omp parallel for schedule(dynamic, 1) if (n >= kParallelMin)
  for (int64_t b = 0; b < nb; ++b) {
    float* tmp = scratch(1);
    const int64_t off = b * kBlock, len = imin(kBlock, n - off);
    const float* __restrict x = as_f32(tau, dtype, off, len, tmp);
    float* __restrict o = out + off;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float u = dare_uniform(seed, uint64_t(off + i));
      o[i] = u < p ? 0.0f : x[i] * scale;
    }
  }
}

// Fused linear merge: per element, acc = sum_t w_t * (x_t [- base]) in float32 (one rounding per step, like
// torch's add_(tau, alpha=w)), then acc * lam [+ base], converted to the output dtype and counted, in one pass.
// (Without a base, lam is a final scale: lam = 1/T with unit weights rounds exactly like mean_fp32; and then a
// division by `divisor`, mergekit's normalize: raw weights, the sum divided by their sum, rounded as it rounds.)
// Each OpenMP work item (kBlock elements, for the prefetchers' long runs) is swept in sub-blocks of kLinearSub
// elements: the T passes over the float32 accumulator then switch input streams every 512 bytes of bf16 input
// instead of every 16 KiB, with the accumulator, the converted base and a converted input (3 x 1 KiB) in L1.
// Measured 2026-12-03 (2 threads, one process, the sub-block size alternated over 21 rounds; the 4 x 0.5 B set's
// 5632 x 2048 tensors, bf16, T = 4 + base): task arithmetic best / median 10.98 / 13.60 ms with whole 8192-element
// blocks (the previous kernel), 8.70 / 10.10 at 384, 7.22 / 9.39 at 256, 7.24 / 9.36 at 192, 7.63 / 9.11 at 128,
// 8.22 / 9.83 at 96; the 4-way mean 8.47 / 10.32 ms against 5.82 / 7.26 at 256. Same operations in the same order
// per element: same bits.
constexpr int64_t kLinearSub = 256;

// The fused linear merge's register path: per Simd::W elements, the T inputs' weighted sum stays in one register
// (T a compile-time constant, so the task loop unrolls), with the same operations in the same order per element
// as the sub-block loop of linear() below (same bits): no float32 accumulator is stored and re-read once per
// task. Measured 2026-12-05 on the 2-core Zen 5 VM (AVX-512), bf16, T = 4 + base, task arithmetic: see
// docs/kernels.md, "The fused linear merge in registers".
//   inputs  x[t]: all bfloat16, or with InF32 all float32
//   base    Base 0: none; 1: float32 values of base[pos : pos + len] at bb_; 2: the bfloat16 base at pos, converted
//           in registers
//   output  with out16, bfloat16 values written there; else float32 results in o[0:len]
// Returns the non-finite values written (for a float32 o: those of o, which the caller may convert further).
using LinearPlainFn = int64_t (*)(const void* const*, const float*, const void*, int64_t, int64_t, float, float,
                                  float*, uint16_t*);
#if defined(__AVX512F__) || defined(__AVX2__)
template <int T, bool InF32, int Base>
int64_t linear_plain(const void* const* x, const float* w, const void* bb_, int64_t pos, int64_t len, float lam,
                     float divisor, float* __restrict o, uint16_t* __restrict out16) {
  using S = Simd;
  const float* __restrict bb = static_cast<const float*>(bb_);
  const uint16_t* __restrict b16 = static_cast<const uint16_t*>(bb_);
  S::F wt[T];
  for (int t = 0; t < T; ++t) wt[t] = S::fset(w[t]);
  const S::F vlam = S::fset(lam), vdiv = S::fset(divisor), zero = S::fset(0.0f);
  const bool scale = Base != 0 || lam != 1.0f, divide = Base == 0 && divisor != 1.0f;
  const S::I inf = S::iset(0x7F800000u);
  S::I badv = S::iset(0u);
  int64_t i = 0;
  for (; i + S::W <= len; i += S::W) {
    S::F b = zero;
    if (Base == 1) b = S::load(bb + i);
    if (Base == 2) b = S::load_bf16(b16 + i);
    S::F acc = zero;
    for (int t = 0; t < T; ++t) {
      const S::F xv = InF32 ? S::load(static_cast<const float*>(x[t]) + pos + i)
                            : S::load_bf16(static_cast<const uint16_t*>(x[t]) + pos + i);
      acc = S::fma(wt[t], Base != 0 ? S::sub(xv, b) : xv, acc);
    }
    if (scale) acc = S::mul(acc, vlam);
    if (Base != 0) acc = S::add(acc, b);
    if (divide) acc = S::div(acc, vdiv);
    if (out16) {
      store_bf16_counted(out16 + i, acc, badv);
    } else {
      S::store(o + i, acc);
      badv = S::count(badv, S::ieq(S::iand(S::bits(acc), inf), inf));
    }
  }
  int64_t bad = S::sum(badv);
  for (; i < len; ++i) {  // the tail a vector does not fill: the same arithmetic per element
    const float b = Base == 1 ? bb[i] : Base == 2 ? bf16_to_f32(b16[i]) : 0.0f;
    float acc = 0.0f;
    for (int t = 0; t < T; ++t) {
      const float xv = InF32 ? static_cast<const float*>(x[t])[pos + i]
                             : bf16_to_f32(static_cast<const uint16_t*>(x[t])[pos + i]);
      acc = madd(w[t], Base != 0 ? xv - b : xv, acc);
    }
    if (scale) acc = acc * lam;
    if (Base != 0) acc = acc + b;
    if (divide) acc = acc / divisor;
    if (out16) {
      out16[i] = f32_to_bf16(acc);
      bad += (out16[i] & 0x7F80u) == 0x7F80u ? 1 : 0;
    } else {
      o[i] = acc;
      bad += is_nonfinite(acc) ? 1 : 0;
    }
  }
  return bad;
}
template <bool InF32, int Base>
LinearPlainFn linear_plain_of(int T) {
  switch (T) {
    case 1: return linear_plain<1, InF32, Base>;
    case 2: return linear_plain<2, InF32, Base>;
    case 3: return linear_plain<3, InF32, Base>;
    case 4: return linear_plain<4, InF32, Base>;
    case 5: return linear_plain<5, InF32, Base>;
    case 6: return linear_plain<6, InF32, Base>;
    case 7: return linear_plain<7, InF32, Base>;
    case 8: return linear_plain<8, InF32, Base>;
    default: return nullptr;
  }
}
LinearPlainFn linear_plain_for(int T, bool in_f32, int base_kind) {
  if (in_f32) return base_kind == 0 ? linear_plain_of<true, 0>(T) : base_kind == 1 ? linear_plain_of<true, 1>(T)
                                                                                      : linear_plain_of<true, 2>(T);
  return base_kind == 0 ? linear_plain_of<false, 0>(T) : base_kind == 1 ? linear_plain_of<false, 1>(T)
                                                                         : linear_plain_of<false, 2>(T);
}
#else
LinearPlainFn linear_plain_for(int, bool, int) { return nullptr; }  // without AVX2: the sub-block loop
#endif

int64_t linear(const InputList& in, const void* base, int32_t bd, float lam, float divisor, void* out, int32_t od,
               int64_t n) {
  const int64_t nb = num_blocks(n);
  int64_t bad = 0;
  // all inputs bfloat16 or all float32, T <= 8: the register path (a float16 base converted per block first)
  bool all_bf16 = in.count <= 8, all_f32 = in.count <= 8;
  for (int t = 0; t < in.count; ++t) {
    all_bf16 = all_bf16 && in.dtype[t] == kBF16;
    all_f32 = all_f32 && in.dtype[t] == kF32;
  }
  const int base_kind = base == nullptr ? 0 : bd == kBF16 ? 2 : 1;
  const LinearPlainFn plain = all_bf16 || all_f32 ? linear_plain_for(in.count, all_f32, base_kind) : nullptr;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : bad) if (n >= kParallelMin)
  for (int64_t b = 0; b < nb; ++b) {
    float* acc = scratch(3);
    float* tmp = acc + kBlock;
    float* tb = tmp + kBlock;
    const int64_t block_end = imin(n, (b + 1) * kBlock);
    int64_t c = 0;
    if (plain) {
      const int64_t off = b * kBlock, len = block_end - off;
      const void* bb = base_kind == 2 ? static_cast<const void*>(static_cast<const uint16_t*>(base) + off)
                       : base_kind == 1 ? static_cast<const void*>(as_f32(base, bd, off, len, tb))
                                        : nullptr;
      float* o = od == kF32 ? static_cast<float*>(out) + off : acc;
      uint16_t* o16 = od == kBF16 ? static_cast<uint16_t*>(out) + off : nullptr;
      const int64_t counted = plain(in.ptr, in.weight, bb, off, len, lam, divisor, o, o16);
      // a float16 output: converted from the float32 results and counted as such
      bad += od == kF16 ? store16_count_nonfinite(acc, static_cast<uint16_t*>(out) + off, kF16, len) : counted;
      continue;
    }
    for (int64_t off = b * kBlock; off < block_end; off += kLinearSub) {
      const int64_t len = imin(kLinearSub, block_end - off);
      for (int64_t i = 0; i < len; ++i) acc[i] = 0.0f;
      const float* __restrict bb = base ? as_f32(base, bd, off, len, tb) : nullptr;
      for (int t = 0; t < in.count; ++t) {
        const float w = in.weight[t];
        if (in.dtype[t] == kBF16) {  // converted in registers: no float32 staging of the input (same arithmetic)
          const uint16_t* __restrict s = static_cast<const uint16_t*>(in.ptr[t]) + off;
          if (bb) {
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) acc[i] = madd(w, bf16_to_f32(s[i]) - bb[i], acc[i]);
          } else {
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) acc[i] = madd(w, bf16_to_f32(s[i]), acc[i]);
          }
          continue;
        }
        const float* __restrict x = as_f32(in.ptr[t], in.dtype[t], off, len, tmp);
        if (bb) {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) acc[i] = madd(w, x[i] - bb[i], acc[i]);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) acc[i] = madd(w, x[i], acc[i]);
        }
      }
      if (bb) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const float s = acc[i] * lam;
          acc[i] = s + bb[i];
        }
      } else {
        if (lam != 1.0f) {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] * lam;
        }
        if (divisor != 1.0f) {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] / divisor;
        }
      }
      if (od == kF32) {
        float* __restrict o = static_cast<float*>(out) + off;
#pragma omp simd reduction(+ : c)
        for (int64_t i = 0; i < len; ++i) {
          o[i] = acc[i];
          c += is_nonfinite(acc[i]) ? 1 : 0;
        }
      } else {
        c += store16_count_nonfinite(acc, static_cast<uint16_t*>(out) + off, od, len);
      }
    }
    bad += c;
  }
  return bad;
}

}  // namespace

#define CM_ISA_STR2(x) #x
#define CM_ISA_STR(x) CM_ISA_STR2(x)
const Kernels* CM_CAT(kernels_, CM_ISA)() {
  static const Kernels k{CM_ISA_STR(CM_ISA), mean_fp32, center, finalize, ties_merge, dare, linear};
  return &k;
}

}  // namespace cpu
}  // namespace cm
