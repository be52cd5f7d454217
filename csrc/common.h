// Shared by the CPU kernels (cpu_kernels.cpp), the CUDA kernels (cuda_kernels.cu) and the bindings:
// dtype codes, exact scalar conversions between float32 and bfloat16 / float16 (usable on host and device),
// the splitmix64 counter RNG of DARE, and the plain structs that carry kernel arguments.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CM_HD __host__ __device__ __forceinline__
#else
#define CM_HD inline
#endif

// The CPU kernels are compiled once per instruction set (cpu_kernels.cpp with -DCM_ISA=avx2, ...). The inline
// helpers below then exist in several copies compiled with different -m flags; each copy lives in its own
// inline namespace (cm::isa_<name>), so the linker never merges an AVX-512 copy into the baseline path.
#ifndef CM_ISA
#define CM_ISA generic
#endif
#define CM_CAT2(a, b) a##b
#define CM_CAT(a, b) CM_CAT2(a, b)
#define CM_ISA_NS CM_CAT(isa_, CM_ISA)

namespace cm {

enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline namespace CM_ISA_NS {
inline const char* dtype_name(int32_t d) {
  switch (d) {
    case kF32: return "float32";
    case kF16: return "float16";
    case kBF16: return "bfloat16";
    default: return "?";
  }
}
inline int dtype_size(int32_t d) { return d == kF32 ? 4 : 2; }
}  // inline namespace CM_ISA_NS

// Most inputs one kernel call takes; the Python wrappers split longer lists (mean) or fall back (TIES on CUDA).
constexpr int kMaxInputs = 64;

struct InputList {
  const void* ptr[kMaxInputs];
  int32_t dtype[kMaxInputs];
  float weight[kMaxInputs];
  int32_t count;
  int32_t weighted;  // 0: plain sum; 1: sum of weight[t] * x_t
};

inline namespace CM_ISA_NS {

CM_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
CM_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

CM_HD float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

// Round to nearest even; every NaN becomes the canonical quiet NaN 0x7FC0 (what torch does).
CM_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

CM_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu;
  uint32_t m = h & 0x3FFu;
  if (e == 0x1F) return bits_f32(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    float v = float(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return bits_f32(sign | f32_bits(v));
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// Round to nearest even, overflow to +-inf, NaN to a quiet NaN keeping the sign.
CM_HD uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return uint16_t(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (ax >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (ax >= 0x38800000u) {                                 // a normal half (>= 2^-14)
    uint32_t r = ax - 0x38000000u;                          // rebias the exponent: 127 - 15 = 112
    uint32_t res = r >> 13, rem = r & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (res & 1u))) ++res;
    return uint16_t(sign | res);
  }
  if (ax <= 0x33000000u) return uint16_t(sign);  // <= 2^-25 rounds to (signed) zero
  uint32_t e = ax >> 23;                          // 103..112: a half subnormal, in units of 2^-24
  uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
  uint32_t shift = 126u - e;  // 14..23
  uint32_t res = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (res & 1u))) ++res;
  return uint16_t(sign | res);
}

CM_HD float load_as_f32(const void* p, int32_t dtype, int64_t i) {
  if (dtype == kBF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  if (dtype == kF16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// sign as torch.sign computes it: -1, 0 or +1, and 0 for NaN.
CM_HD float sign_of(float v) { return float(v > 0.0f) - float(v < 0.0f); }

// DARE's counter-based RNG: splitmix64 of (seed + golden * (index + 1)), top 24 bits as U[0, 1).
// A pure function of (seed, flat index): CPU threads, CUDA blocks and the torch twin all give the same bits.
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
CM_HD float dare_uniform(uint64_t seed, uint64_t index) {
  uint64_t z = index * kGolden + (seed + kGolden);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z = z ^ (z >> 31);
  return float(uint32_t(z >> 40)) * (1.0f / 16777216.0f);
}

// TIES threshold selection: a radix select on the bit pattern of |tau| (for non-negative floats, and for
// NaN placed above +inf exactly as torch.kthvalue orders it, the unsigned bit pattern orders like the value).
// Three digit passes of 11, 11 and 10 bits.
constexpr int kRadixPasses = 3;
constexpr int kRadixBins = 2048;
CM_HD int radix_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
CM_HD uint32_t radix_mask(int pass) { return pass == 2 ? 0x3FFu : 0x7FFu; }

}  // inline namespace CM_ISA_NS

}  // namespace cm
