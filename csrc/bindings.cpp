// centered_merge._C: the Python boundary. Each function takes DLPack capsules (borrowed, never consumed),
// validates every argument (device, dtype, shape, contiguity, writability) with messages naming the argument,
// then runs the CPU kernel or, for CUDA tensors, launches the CUDA kernel on the caller's stream. The GIL is
// released while a kernel runs. Argument errors raise ValueError; CUDA failures raise RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cm_build_config.h"
#include "kernels.h"
#include "tensor_view.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace py = pybind11;
using cm::TensorView;

namespace {

// Large CPU outputs are usually fresh allocations that the kernel touches first; with 4 KiB pages the page
// faults cost more than the kernel itself (about 2 us per page, 45 ms for 64 MiB here). Asking for transparent
// huge pages on the 2 MiB-aligned interior before the first touch cuts that to about a third. Only a hint:
// ignored where THP is off or unsupported, never an error. CENTERED_MERGE_HUGEPAGES=0 turns it off.
bool hugepages_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("CENTERED_MERGE_HUGEPAGES");
    return !(e && (std::strcmp(e, "0") == 0 || std::strcmp(e, "off") == 0 || std::strcmp(e, "false") == 0));
  }();
  return on;
}

void hint_hugepages(const TensorView& v) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!hugepages_enabled()) return;
  const size_t bytes = size_t(v.numel) * size_t(v.dtype == cm::kF32 ? 4 : 2);
  if (!v.is_cpu() || bytes < (size_t(8) << 20)) return;
  const uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(v.data);
  const uintptr_t lo = (p + huge - 1) & ~(huge - 1), hi = (p + bytes) & ~(huge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)v;
#endif
}

TensorView arg(const py::handle& h, const char* fn, const std::string& name) {
  return cm::view_capsule(h.ptr(), fn, name);
}

void check_device_supported(const TensorView& v) {
  v.expect_cpu_or_cuda();
#ifndef CM_WITH_CUDA
  if (v.is_cuda()) v.fail("a tensor on cpu (this build of centered_merge._C has no CUDA kernels)", "a tensor on " + v.device());
#endif
}

TensorView output_arg(const py::handle& h, const char* fn, const char* name) {
  TensorView v = arg(h, fn, name);
  check_device_supported(v);
  v.expect_f32();
  v.expect_contiguous();
  v.expect_writable();
  return v;
}

// Validates inputs[i] against `ref` (shape and device) and fills an InputList.
cm::InputList input_list(const py::sequence& inputs, const py::object& weights, const TensorView& ref, const char* fn,
                         int index_base, std::vector<TensorView>* keep) {
  cm::InputList in{};
  const size_t T = py::len(inputs);
  if (T == 0) throw cm::ArgError(std::string(fn) + ": argument 'inputs': expected at least one tensor, got an empty list");
  if (T > size_t(cm::kMaxInputs))
    throw cm::ArgError(std::string(fn) + ": argument 'inputs': expected at most " + std::to_string(cm::kMaxInputs) +
                       " tensors per call, got " + std::to_string(T));
  in.count = int32_t(T);
  in.weighted = weights.is_none() ? 0 : 1;
  std::vector<double> w;
  if (!weights.is_none()) {
    w = weights.cast<std::vector<double>>();
    if (w.size() != T)
      throw cm::ArgError(std::string(fn) + ": argument 'weights': expected " + std::to_string(T) + " weights (one per input), got " +
                         std::to_string(w.size()));
  }
  for (size_t t = 0; t < T; ++t) {
    TensorView v = arg(inputs[t], fn, "inputs[" + std::to_string(index_base + int(t)) + "]");
    v.expect_input_like(ref);
    in.ptr[t] = v.data;
    in.dtype[t] = v.dtype;
    in.weight[t] = w.empty() ? 1.0f : float(w[t]);
    if (keep) keep->push_back(std::move(v));
  }
  return in;
}

void mean_fp32(const py::sequence& inputs, const py::object& weights, const py::handle& out_c, bool accumulate, float scale,
               bool apply_scale, uintptr_t stream, int index_base) {
  const char* fn = "mean_fp32";
  TensorView out = output_arg(out_c, fn, "out");
  cm::InputList in = input_list(inputs, weights, out, fn, index_base, nullptr);
  if (!accumulate) hint_hugepages(out);
  py::gil_scoped_release nogil;
  if (out.is_cpu()) {
    cm::cpu::mean_fp32(in, static_cast<float*>(out.data), out.numel, accumulate, scale, apply_scale);
  } else {
#ifdef CM_WITH_CUDA
    cm::cuda::mean_fp32(in, static_cast<float*>(out.data), out.numel, accumulate, scale, apply_scale, out.device_id, stream);
#endif
  }
}

void center_into(const py::handle& w_c, const py::handle& mean_c, const py::handle& out_c, uintptr_t stream) {
  const char* fn = "center_into";
  TensorView out = output_arg(out_c, fn, "out");
  TensorView w = arg(w_c, fn, "w");
  w.expect_input_like(out);
  TensorView mean = arg(mean_c, fn, "mean");
  mean.expect_device_of(out);
  mean.expect_f32();
  mean.expect_contiguous();
  mean.expect_shape_of(out);
  py::gil_scoped_release nogil;
  if (out.is_cpu()) {
    cm::cpu::center(w.data, w.dtype, static_cast<const float*>(mean.data), static_cast<float*>(out.data), out.numel);
  } else {
#ifdef CM_WITH_CUDA
    cm::cuda::center(w.data, w.dtype, static_cast<const float*>(mean.data), static_cast<float*>(out.data), out.numel,
                     out.device_id, stream);
#endif
  }
}

// Returns the non-finite count on CPU; on CUDA adds it to `counter` (an int64 tensor of one element on the same
// device) and returns None, so nothing synchronises here.
py::object finalize(const py::handle& x_c, const py::object& add_c, const py::object& out_c, uintptr_t stream,
                    const py::object& counter_c) {
  const char* fn = "finalize";
  TensorView x = arg(x_c, fn, "x");
  check_device_supported(x);
  x.expect_f32();
  x.expect_contiguous();
  const float* add = nullptr;
  if (!add_c.is_none()) {
    TensorView a = arg(add_c, fn, "add");
    a.expect_device_of(x);
    a.expect_f32();
    a.expect_contiguous();
    a.expect_shape_of(x);
    add = static_cast<const float*>(a.data);
  }
  void* out = nullptr;
  int32_t od = cm::kF32;
  if (!out_c.is_none()) {
    TensorView o = arg(out_c, fn, "out");
    o.expect_device_of(x);
    o.expect_float();
    o.expect_contiguous();
    o.expect_writable();
    o.expect_shape_of(x);
    out = o.data;
    od = o.dtype;
    hint_hugepages(o);
  }
  if (x.is_cpu()) {
    int64_t bad;
    {
      py::gil_scoped_release nogil;
      bad = cm::cpu::finalize(static_cast<const float*>(x.data), add, out, od, x.numel);
    }
    return py::int_(bad);
  }
#ifdef CM_WITH_CUDA
  if (counter_c.is_none()) x.fail("a 'counter' tensor for a CUDA call", "counter=None");
  TensorView c = arg(counter_c, fn, "counter");
  c.expect_device_of(x);
  c.expect_dtype_i64();
  c.expect_numel(1);
  c.expect_writable();
  {
    py::gil_scoped_release nogil;
    cm::cuda::finalize(static_cast<const float*>(x.data), add, out, od, x.numel, static_cast<long long*>(c.data),
                       x.device_id, stream);
  }
#endif
  return py::none();
}

// CPU: returns the per-task thresholds (a list of floats). CUDA: needs `workspace` (ties_workspace_bytes(T)
// bytes on the device) and returns None.
py::object ties_merge(const py::sequence& inputs, const py::handle& base_c, const py::handle& out_c, int64_t k, float lam,
                      uintptr_t stream, const py::object& workspace_c) {
  const char* fn = "ties_merge";
  TensorView out = output_arg(out_c, fn, "out");
  TensorView base = arg(base_c, fn, "base");
  base.expect_input_like(out);
  if (k < 0) throw cm::ArgError(std::string(fn) + ": argument 'k': expected k >= 0, got " + std::to_string(k));
  cm::InputList in = input_list(inputs, py::none(), out, fn, 0, nullptr);
  hint_hugepages(out);
  if (out.is_cpu()) {
    std::vector<float> thr(in.count);
    {
      py::gil_scoped_release nogil;
      cm::cpu::ties_merge(in, base.data, base.dtype, static_cast<float*>(out.data), out.numel, k, lam, thr.data());
    }
    return py::cast(std::vector<double>(thr.begin(), thr.end()));
  }
#ifdef CM_WITH_CUDA
  if (workspace_c.is_none()) out.fail("a 'workspace' tensor for a CUDA call", "workspace=None");
  TensorView ws = arg(workspace_c, fn, "workspace");
  ws.expect_device_of(out);
  ws.expect_contiguous();
  ws.expect_writable();
  const int64_t need = int64_t(cm::cuda::ties_workspace_bytes(in.count));
  const int64_t have = ws.numel * ((ws.dl_dtype.bits * ws.dl_dtype.lanes + 7) / 8);
  if (have < need) ws.fail("at least " + std::to_string(need) + " bytes", std::to_string(have) + " bytes");
  if (reinterpret_cast<uintptr_t>(ws.data) % 16) ws.fail("a 16-byte aligned buffer", "a misaligned one");
  {
    py::gil_scoped_release nogil;
    cm::cuda::ties_merge(in, base.data, base.dtype, static_cast<float*>(out.data), out.numel, k, lam, ws.data,
                         out.device_id, stream);
  }
#endif
  return py::none();
}

void dare(const py::handle& tau_c, const py::handle& out_c, double p, double scale, uint64_t seed, uintptr_t stream) {
  const char* fn = "dare";
  TensorView out = output_arg(out_c, fn, "out");
  TensorView tau = arg(tau_c, fn, "tau");
  tau.expect_input_like(out);
  if (!(p >= 0.0 && p <= 1.0)) throw cm::ArgError(std::string(fn) + ": argument 'p': expected 0 <= p <= 1, got " + std::to_string(p));
  const float pf = float(p), sf = float(scale);
  hint_hugepages(out);
  py::gil_scoped_release nogil;
  if (out.is_cpu()) {
    cm::cpu::dare(tau.data, tau.dtype, static_cast<float*>(out.data), out.numel, pf, sf, seed);
  } else {
#ifdef CM_WITH_CUDA
    cm::cuda::dare(tau.data, tau.dtype, static_cast<float*>(out.data), out.numel, pf, sf, seed, out.device_id, stream);
#endif
  }
}

std::vector<std::string> simd_flags() {
  std::vector<std::string> f;
#if defined(__SSE4_2__)
  f.push_back("sse4.2");
#endif
#if defined(__AVX__)
  f.push_back("avx");
#endif
#if defined(__AVX2__)
  f.push_back("avx2");
#endif
#if defined(__FMA__)
  f.push_back("fma");
#endif
#if defined(__F16C__)
  f.push_back("f16c");
#endif
#if defined(__AVX512F__)
  f.push_back("avx512f");
#endif
#if defined(__AVX512BW__)
  f.push_back("avx512bw");
#endif
#if defined(__AVX512BF16__)
  f.push_back("avx512bf16");
#endif
#if defined(__ARM_NEON)
  f.push_back("neon");
#endif
  return f;
}

py::dict build_info() {
  py::dict d;
  d["cpu_kernels"] = py::make_tuple("mean_fp32", "center_into", "finalize", "ties_merge", "dare");
  d["openmp"] = cm::cpu::has_openmp();
  d["omp_max_threads"] = cm::cpu::max_threads();
  d["simd"] = simd_flags();
  d["arch_flags"] = std::string(CM_SIMD_FLAGS);
  d["compiler"] = std::string(CM_CXX_COMPILER);
  d["hugepage_hint"] = hugepages_enabled();
#ifdef CM_WITH_CUDA
  d["cuda_compiled"] = true;
  d["cuda_archs"] = std::string(CM_CUDA_ARCHS);
  d["cuda_compiler_version"] = std::string(CM_CUDA_COMPILER_VERSION);
  const int rv = cm::cuda::runtime_version();
  d["cuda_runtime_version"] = std::to_string(rv / 1000) + "." + std::to_string((rv % 1000) / 10);
#else
  d["cuda_compiled"] = false;
#endif
  return d;
}

py::tuple cuda_device_count() {
#ifdef CM_WITH_CUDA
  std::string why;
  const int n = cm::cuda::device_count(&why);
  return py::make_tuple(n, why);
#else
  return py::make_tuple(0, std::string("built without CUDA kernels"));
#endif
}

size_t ties_workspace_bytes(int num_inputs) {
#ifdef CM_WITH_CUDA
  return cm::cuda::ties_workspace_bytes(num_inputs);
#else
  (void)num_inputs;
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "centered_merge native kernels (CPU/OpenMP and optional CUDA); tensors cross as DLPack capsules";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const cm::ArgError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.attr("MAX_INPUTS") = cm::kMaxInputs;
  m.def("mean_fp32", &mean_fp32, py::arg("inputs"), py::arg("weights"), py::arg("out"), py::arg("accumulate") = false,
        py::arg("scale") = 1.0f, py::arg("apply_scale") = false, py::arg("stream") = 0, py::arg("index_base") = 0,
        "out = (accumulate ? out : 0) + sum_t w_t * inputs[t], then *= scale when apply_scale (float32 out)");
  m.def("center_into", &center_into, py::arg("w"), py::arg("mean"), py::arg("out"), py::arg("stream") = 0,
        "out = float32(w) - mean");
  m.def("finalize", &finalize, py::arg("x"), py::arg("add"), py::arg("out"), py::arg("stream") = 0,
        py::arg("counter") = py::none(), "out = dtype(x [+ add]); returns the non-finite count on CPU");
  m.def("ties_merge", &ties_merge, py::arg("inputs"), py::arg("base"), py::arg("out"), py::arg("k"), py::arg("lam"),
        py::arg("stream") = 0, py::arg("workspace") = py::none(),
        "TIES: out = base + lam * disjoint mean of the trimmed task vectors with the elected sign");
  m.def("dare", &dare, py::arg("tau"), py::arg("out"), py::arg("p"), py::arg("scale"), py::arg("seed"), py::arg("stream") = 0,
        "DARE: out = 0 where dare_uniform(seed, i) < p, else float32(tau) * scale");
  m.def("ties_workspace_bytes", &ties_workspace_bytes, py::arg("num_inputs"));
  m.def("build_info", &build_info);
  m.def("cuda_device_count", &cuda_device_count, "(number of CUDA devices the extension's runtime sees, why not)");
}
