// Run-time choice of the CPU kernels' instruction set. Compiled with the baseline flags only.
//
// The build compiles cpu_kernels.cpp once per ISA it was configured for (CM_HAVE_ISA_* below): baseline (any
// x86-64 or aarch64 CPU), avx2 (AVX2 + FMA + F16C, i.e. Haswell / Zen 1 and later), avx512 (AVX-512 F, BW, VL,
// DQ plus the avx2 set: Skylake-SP / Ice Lake / Zen 4 and later), or a single `native` copy when the build was
// asked for -march=native. At first use the best copy this CPU can run is taken, unless CENTERED_MERGE_CPU_ISA
// names one (then that one, or an error at import when it was not compiled or the CPU lacks it).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace cm {
namespace cpu {

#ifndef CM_HAVE_ISA_BASELINE
const Kernels* kernels_baseline() { return nullptr; }
#endif
#ifndef CM_HAVE_ISA_AVX2
const Kernels* kernels_avx2() { return nullptr; }
#endif
#ifndef CM_HAVE_ISA_AVX512
const Kernels* kernels_avx512() { return nullptr; }
#endif
#ifndef CM_HAVE_ISA_NATIVE
const Kernels* kernels_native() { return nullptr; }
#endif

namespace {

struct Entry {
  const char* name;
  const Kernels* (*get)();
};
// best first
const Entry kIsas[] = {{"native", kernels_native}, {"avx512", kernels_avx512}, {"avx2", kernels_avx2},
                       {"baseline", kernels_baseline}};

// What the CPU (and the OS, for the AVX register state) supports, via the compiler's cpuid wrapper.
bool cpu_has(const std::string& isa, std::string* missing) {
  auto need = [&](bool ok, const char* feature) {
    if (!ok && missing && missing->empty()) *missing = feature;
    return ok;
  };
  if (isa == "baseline" || isa == "native") return true;  // native: the build host's CPU, by the opt-in's contract
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  bool ok = need(__builtin_cpu_supports("avx2"), "avx2") && need(__builtin_cpu_supports("fma"), "fma") &&
            need(__builtin_cpu_supports("f16c"), "f16c");
  if (isa == "avx2") return ok;
  if (isa == "avx512")
    return ok && need(__builtin_cpu_supports("avx512f"), "avx512f") &&
           need(__builtin_cpu_supports("avx512bw"), "avx512bw") && need(__builtin_cpu_supports("avx512vl"), "avx512vl") &&
           need(__builtin_cpu_supports("avx512dq"), "avx512dq");
#endif
  if (missing && missing->empty()) *missing = isa + " (not an ISA of this architecture)";
  return false;
}

std::atomic<const Kernels*> g_active{nullptr};
std::mutex g_mutex;

const Kernels* best() {
  for (const Entry& e : kIsas) {
    const Kernels* k = e.get();
    if (k && cpu_has(e.name, nullptr)) return k;
  }
  return nullptr;  // unreachable: the baseline or native copy is always compiled
}

}  // namespace

bool select(const std::string& name, std::string* why) {
  for (const Entry& e : kIsas) {
    if (name != e.name) continue;
    const Kernels* k = e.get();
    if (!k) {
      if (why) *why = "the " + name + " kernels were not compiled into this build (compiled: " + compiled_isas() + ")";
      return false;
    }
    std::string missing;
    if (!cpu_has(name, &missing)) {
      if (why) *why = "this CPU cannot run the " + name + " kernels (it lacks " + missing + ")";
      return false;
    }
    std::lock_guard<std::mutex> lock(g_mutex);
    g_active.store(k);
    return true;
  }
  if (why) *why = "unknown CPU ISA '" + name + "'; expected one of native, avx512, avx2, baseline";
  return false;
}

const Kernels& active() {
  const Kernels* k = g_active.load();
  if (k) return *k;
  std::lock_guard<std::mutex> lock(g_mutex);
  k = g_active.load();
  if (!k) {
    k = best();
    g_active.store(k);
  }
  return *k;
}

std::string compiled_isas() {
  std::string s;
  for (const Entry& e : kIsas)
    if (e.get()) s += (s.empty() ? "" : ",") + std::string(e.name);
  return s;
}

std::string supported_isas() {
  std::string s;
  for (const Entry& e : kIsas)
    if (e.get() && cpu_has(e.name, nullptr)) s += (s.empty() ? "" : ",") + std::string(e.name);
  return s;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace cm
