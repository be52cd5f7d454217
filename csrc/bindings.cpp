// centered_merge._C: the Python boundary. Each function takes DLPack capsules (borrowed, never consumed),
// validates every argument (device, dtype, shape, contiguity, writability) with messages naming the argument,
// then runs the CPU kernel or, for CUDA tensors, launches the CUDA kernel on the caller's stream. The GIL is
// released while a kernel runs. Argument errors raise ValueError; CUDA failures raise RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
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

// Transparent huge pages for large fresh CPU outputs, asked for on the 2 MiB-aligned interior before the first
// touch. Opt-in (CENTERED_MERGE_HUGEPAGES=1), off by default, by measurement on this project's 2-core VM
// (2026-12-02): an isolated 128 MiB fresh output was faster with the hint in most calls, but some calls took
// 250-600 ms (huge pages the hypervisor had not backed), and in the CLI's task-arithmetic merge of the 4 x 0.5 B
// set (whose output pool makes ~270 MB of fresh outputs) the hint cost ~1 CPU-s of huge-page zeroing
// (clear_page_erms 16-18% of perf samples, against 1% without) and 0.3 s of wall time (medians of 6 alternated
// runs: 3.55 s with it, 3.21 s without; TIES 5.23 s against 4.97 s). Only a hint: ignored where THP is off or
// unsupported, never an error.
bool hugepages_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("CENTERED_MERGE_HUGEPAGES");
    return e && (std::strcmp(e, "1") == 0 || std::strcmp(e, "on") == 0 || std::strcmp(e, "true") == 0);
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

[[noreturn]] void type_fail(const char* fn, const char* name, const std::string& expected, const py::handle& got) {
  throw cm::ArgTypeError(std::string(fn) + ": argument '" + name + "': expected " + expected + ", got " +
                         (got.is_none() ? std::string("None") : std::string("an object of type ") + Py_TYPE(got.ptr())->tp_name));
}

// Scalars arrive as Python objects and are converted here, so a wrong type names its argument (pybind11's own
// conversion error would only print the signature).
double num_arg(const py::handle& h, const char* fn, const char* name) {
  if (PyBool_Check(h.ptr()) || !(PyFloat_Check(h.ptr()) || PyLong_Check(h.ptr()) || PyIndex_Check(h.ptr())))
    type_fail(fn, name, "a number", h);
  const double v = PyFloat_AsDouble(h.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    type_fail(fn, name, "a number that fits a double", h);
  }
  return v;
}

double finite_arg(const py::handle& h, const char* fn, const char* name) {
  const double v = num_arg(h, fn, name);
  if (!std::isfinite(v)) throw cm::ArgError(std::string(fn) + ": argument '" + name + "': expected a finite number, got " + std::to_string(v));
  return v;
}

int64_t int_arg(const py::handle& h, const char* fn, const char* name, int64_t lo, int64_t hi) {
  if (PyBool_Check(h.ptr()) || !PyIndex_Check(h.ptr())) type_fail(fn, name, "an integer", h);
  int overflow = 0;
  py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(h.ptr()));
  const long long v = idx ? PyLong_AsLongLongAndOverflow(idx.ptr(), &overflow) : -1;
  if (!idx || overflow || (v == -1 && PyErr_Occurred()) || v < lo || v > hi) {
    PyErr_Clear();
    throw cm::ArgError(std::string(fn) + ": argument '" + name + "': expected an integer in [" + std::to_string(lo) + ", " +
                       std::to_string(hi) + "], got " + std::string(py::str(h)));
  }
  return int64_t(v);
}

uint64_t u64_arg(const py::handle& h, const char* fn, const char* name) {
  if (PyBool_Check(h.ptr()) || !PyIndex_Check(h.ptr())) type_fail(fn, name, "an integer", h);
  py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(h.ptr()));
  const unsigned long long v = idx ? PyLong_AsUnsignedLongLong(idx.ptr()) : 0;
  if (!idx || (v == (unsigned long long)-1 && PyErr_Occurred())) {
    PyErr_Clear();
    throw cm::ArgError(std::string(fn) + ": argument '" + name + "': expected an integer in [0, 2**64), got " +
                       std::string(py::str(h)));
  }
  return uint64_t(v);
}

bool bool_arg(const py::handle& h, const char* fn, const char* name) {
  if (!PyBool_Check(h.ptr())) type_fail(fn, name, "True or False", h);
  return h.ptr() == Py_True;
}

uintptr_t stream_arg(const py::handle& h, const char* fn) {
  return uintptr_t(u64_arg(h, fn, "stream"));
}

py::sequence seq_arg(const py::handle& h, const char* fn, const char* name) {
  if (!(PyList_Check(h.ptr()) || PyTuple_Check(h.ptr()))) type_fail(fn, name, "a list or tuple", h);
  return py::reinterpret_borrow<py::sequence>(h);
}

void check_device_supported(const TensorView& v) {
  v.expect_cpu_or_cuda();
#ifndef CM_WITH_CUDA
  if (v.is_cuda()) v.fail("a tensor on cpu (this build of centered_merge._C has no CUDA kernels)", "a tensor on " + v.device());
#endif
}

TensorView output_arg(const py::handle& h, const char* fn, const char* name, bool f32_only = true) {
  TensorView v = arg(h, fn, name);
  check_device_supported(v);
  if (f32_only) v.expect_f32();
  else v.expect_float();
  v.expect_contiguous();
  v.expect_writable();
  return v;
}

// Validates inputs[i] against `ref` (shape and device), checks that `out` does not overlap any, fills an InputList.
cm::InputList input_list(const py::handle& inputs_h, const py::handle& weights, const TensorView& ref,
                         const TensorView* out, const char* fn, int64_t index_base, bool weights_required = false) {
  py::sequence inputs = seq_arg(inputs_h, fn, "inputs");
  cm::InputList in{};
  const size_t T = py::len(inputs);
  if (T == 0) throw cm::ArgError(std::string(fn) + ": argument 'inputs': expected at least one tensor, got an empty list");
  if (T > size_t(cm::kMaxInputs))
    throw cm::ArgError(std::string(fn) + ": argument 'inputs': expected at most " + std::to_string(cm::kMaxInputs) +
                       " tensors per call, got " + std::to_string(T));
  in.count = int32_t(T);
  in.weighted = weights.is_none() ? 0 : 1;
  if (weights_required && weights.is_none()) type_fail(fn, "weights", "a list of numbers", weights);
  if (!weights.is_none()) {
    py::sequence w = seq_arg(weights, fn, "weights");
    if (py::len(w) != T)
      throw cm::ArgError(std::string(fn) + ": argument 'weights': expected " + std::to_string(T) + " weights (one per input), got " +
                         std::to_string(py::len(w)));
    for (size_t t = 0; t < T; ++t) in.weight[t] = float(finite_arg(w[t], fn, "weights"));
  } else {
    for (size_t t = 0; t < T; ++t) in.weight[t] = 1.0f;
  }
  for (size_t t = 0; t < T; ++t) {
    TensorView v = arg(inputs[t], fn, "inputs[" + std::to_string(index_base + int64_t(t)) + "]");
    v.expect_input_like(ref);
    if (out) out->expect_no_overlap(v);
    in.ptr[t] = v.data;
    in.dtype[t] = v.dtype;
  }
  return in;
}

void mean_fp32(const py::handle& inputs, const py::handle& weights, const py::handle& out_c, const py::handle& accumulate_h,
               const py::handle& scale_h, const py::handle& apply_scale_h, const py::handle& stream_h,
               const py::handle& index_base_h) {
  const char* fn = "mean_fp32";
  const bool accumulate = bool_arg(accumulate_h, fn, "accumulate"), apply_scale = bool_arg(apply_scale_h, fn, "apply_scale");
  const float scale = float(finite_arg(scale_h, fn, "scale"));
  const uintptr_t stream = stream_arg(stream_h, fn);
  const int64_t index_base = int_arg(index_base_h, fn, "index_base", 0, int64_t(1) << 40);
  TensorView out = output_arg(out_c, fn, "out");
  cm::InputList in = input_list(inputs, weights, out, &out, fn, index_base);
  if (!accumulate) hint_hugepages(out);
  py::gil_scoped_release nogil;
  if (out.is_cpu()) {
    cm::cpu::active().mean_fp32(in, static_cast<float*>(out.data), out.numel, accumulate, scale, apply_scale);
  } else {
#ifdef CM_WITH_CUDA
    cm::cuda::mean_fp32(in, static_cast<float*>(out.data), out.numel, accumulate, scale, apply_scale, out.device_id, stream);
#endif
  }
  (void)stream;
}

void center_into(const py::handle& w_c, const py::handle& mean_c, const py::handle& out_c, const py::handle& stream_h) {
  const char* fn = "center_into";
  const uintptr_t stream = stream_arg(stream_h, fn);
  TensorView out = output_arg(out_c, fn, "out");
  TensorView w = arg(w_c, fn, "w");
  w.expect_input_like(out);
  TensorView mean = arg(mean_c, fn, "mean");
  mean.expect_device_of(out);
  mean.expect_f32();
  mean.expect_contiguous();
  mean.expect_shape_of(out);
  out.expect_no_overlap(w);
  out.expect_no_overlap(mean);
  py::gil_scoped_release nogil;
  if (out.is_cpu()) {
    cm::cpu::active().center(w.data, w.dtype, static_cast<const float*>(mean.data), static_cast<float*>(out.data), out.numel);
  } else {
#ifdef CM_WITH_CUDA
    cm::cuda::center(w.data, w.dtype, static_cast<const float*>(mean.data), static_cast<float*>(out.data), out.numel,
                     out.device_id, stream);
#endif
  }
  (void)stream;
}

// CUDA calls add their non-finite count to `counter` (an int64 tensor of one element on the same device) and
// return None, so nothing synchronises in the binding; CPU calls return the count.
TensorView counter_arg(const py::handle& counter_c, const char* fn, const TensorView& like) {
  if (counter_c.is_none()) type_fail(fn, "counter", "a one-element int64 tensor on " + like.device() + " for a CUDA call", counter_c);
  TensorView c = arg(counter_c, fn, "counter");
  c.expect_device_of(like);
  c.expect_dtype_i64();
  c.expect_numel(1);
  c.expect_writable();
  return c;
}

// out=None (only without add): counts the non-finite values of x, writes nothing.
py::object finalize(const py::handle& x_c, const py::handle& add_c, const py::handle& out_c, const py::handle& stream_h,
                    const py::handle& counter_c) {
  const char* fn = "finalize";
  const uintptr_t stream = stream_arg(stream_h, fn);
  TensorView x = arg(x_c, fn, "x");
  check_device_supported(x);
  x.expect_f32();
  x.expect_contiguous();
  const float* add = nullptr;
  TensorView a;
  if (!add_c.is_none()) {
    a = arg(add_c, fn, "add");
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
    o.expect_no_overlap(x);
    if (add) o.expect_no_overlap(a);
    out = o.data;
    od = o.dtype;
    hint_hugepages(o);
  } else if (add) {
    type_fail(fn, "out", "a tensor to write x + add into (out=None only counts the non-finite values of x)", out_c);
  }
  if (x.is_cpu()) {
    int64_t bad;
    {
      py::gil_scoped_release nogil;
      bad = cm::cpu::active().finalize(static_cast<const float*>(x.data), add, out, od, x.numel);
    }
    return py::int_(bad);
  }
#ifdef CM_WITH_CUDA
  TensorView c = counter_arg(counter_c, fn, x);
  {
    py::gil_scoped_release nogil;
    cm::cuda::finalize(static_cast<const float*>(x.data), add, out, od, x.numel, static_cast<long long*>(c.data),
                       x.device_id, stream);
  }
#endif
  (void)stream;
  (void)counter_c;
  return py::none();
}

// k: one kept count for every task, or a list of one per task; weights: None (1 each) or one per task.
// out: float32, or on the CPU also bfloat16 / float16 (converted like finalize). CPU: returns the non-finite count
// of the written values plus the number of non-finite task-vector entries x_t - base (all tasks, kept or dropped).
// CUDA: float32 out only; needs `workspace` (ties_workspace_bytes(T, n) bytes on the device) and `counter`, to
// which the non-finite task-vector entries are added (the output's are finalize's to count); returns None.
py::object ties_merge(const py::handle& inputs, const py::handle& base_c, const py::handle& out_c, const py::handle& k_h,
                      const py::handle& lam_h, const py::handle& stream_h, const py::handle& workspace_c,
                      const py::handle& weights_h, const py::handle& normalize_h, const py::handle& counter_c) {
  const char* fn = "ties_merge";
  const uintptr_t stream = stream_arg(stream_h, fn);
  const float lam = float(finite_arg(lam_h, fn, "lam"));
  const bool normalize = bool_arg(normalize_h, fn, "normalize");
  TensorView out = output_arg(out_c, fn, "out", false);
  if (!out.is_cpu()) out.expect_f32();
  TensorView base = arg(base_c, fn, "base");
  base.expect_input_like(out);
  out.expect_no_overlap(base);
  cm::InputList in = input_list(inputs, weights_h, out, &out, fn, 0);
  std::vector<int64_t> k(in.count);
  if (py::isinstance<py::sequence>(k_h) && !py::isinstance<py::str>(k_h)) {
    py::sequence ks = seq_arg(k_h, fn, "k");
    if (py::len(ks) != size_t(in.count))
      throw cm::ArgError(std::string(fn) + ": argument 'k': expected " + std::to_string(in.count) +
                         " kept counts (one per input), got " + std::to_string(py::len(ks)));
    for (int t = 0; t < in.count; ++t) k[t] = int_arg(ks[t], fn, "k", 0, out.numel);
  } else {
    const int64_t k1 = int_arg(k_h, fn, "k", 0, out.numel);
    for (int t = 0; t < in.count; ++t) k[t] = k1;
  }
  hint_hugepages(out);
  if (out.is_cpu()) {
    int64_t bad;
    {
      py::gil_scoped_release nogil;
      bad = cm::cpu::active().ties_merge(in, base.data, base.dtype, out.data, out.dtype, out.numel, k.data(), lam,
                                         normalize, nullptr);
    }
    return py::int_(bad);
  }
#ifdef CM_WITH_CUDA
  if (workspace_c.is_none()) type_fail(fn, "workspace", "a device buffer of ties_workspace_bytes(T, n) bytes for a CUDA call", workspace_c);
  TensorView ws = arg(workspace_c, fn, "workspace");
  ws.expect_device_of(out);
  ws.expect_contiguous();
  ws.expect_writable();
  ws.expect_no_overlap(out);
  ws.expect_no_overlap(base);
  const int64_t need = int64_t(cm::cuda::ties_workspace_bytes(in.count, out.numel));
  const int64_t have = int64_t(ws.nbytes());
  if (have < need) ws.fail("at least " + std::to_string(need) + " bytes", std::to_string(have) + " bytes");
  if (reinterpret_cast<uintptr_t>(ws.data) % 16) ws.fail("a 16-byte aligned buffer", "a misaligned one");
  TensorView c = counter_arg(counter_c, fn, out);
  {
    py::gil_scoped_release nogil;
    cm::cuda::ties_merge(in, base.data, base.dtype, static_cast<float*>(out.data), out.numel, k.data(), lam, normalize,
                         ws.data, static_cast<long long*>(c.data), out.device_id, stream);
  }
#endif
  (void)stream;
  (void)workspace_c;
  (void)counter_c;
  return py::none();
}

void dare(const py::handle& tau_c, const py::handle& out_c, const py::handle& p_h, const py::handle& scale_h,
          const py::handle& seed_h, const py::handle& stream_h) {
  const char* fn = "dare";
  const uintptr_t stream = stream_arg(stream_h, fn);
  const double p = num_arg(p_h, fn, "p");
  if (!(p >= 0.0 && p <= 1.0)) throw cm::ArgError(std::string(fn) + ": argument 'p': expected 0 <= p <= 1, got " + std::to_string(p));
  const float sf = float(finite_arg(scale_h, fn, "scale"));
  const uint64_t seed = u64_arg(seed_h, fn, "seed");
  TensorView out = output_arg(out_c, fn, "out");
  TensorView tau = arg(tau_c, fn, "tau");
  tau.expect_input_like(out);
  out.expect_no_overlap(tau);
  const float pf = float(p);
  hint_hugepages(out);
  py::gil_scoped_release nogil;
  if (out.is_cpu()) {
    cm::cpu::active().dare(tau.data, tau.dtype, static_cast<float*>(out.data), out.numel, pf, sf, seed);
  } else {
#ifdef CM_WITH_CUDA
    cm::cuda::dare(tau.data, tau.dtype, static_cast<float*>(out.data), out.numel, pf, sf, seed, out.device_id, stream);
#endif
  }
  (void)stream;
}

// Fused linear merge: out = dtype((lam * sum_t w_t x_t) / divisor) without base, dtype(base + lam * sum_t w_t (x_t - base))
// with it (divisor must then be 1).
py::object linear_merge(const py::handle& inputs, const py::handle& weights, const py::handle& base_c, const py::handle& lam_h,
                        const py::handle& out_c, const py::handle& stream_h, const py::handle& counter_c,
                        const py::handle& divisor_h) {
  const char* fn = "linear_merge";
  const uintptr_t stream = stream_arg(stream_h, fn);
  const float lam = float(finite_arg(lam_h, fn, "lam"));
  const float divisor = float(finite_arg(divisor_h, fn, "divisor"));
  if (divisor == 0.0f || (!base_c.is_none() && divisor != 1.0f))
    throw cm::ArgError(std::string(fn) + ": argument 'divisor': expected a non-zero number (1 with a base), got " +
                       std::to_string(divisor));
  TensorView out = output_arg(out_c, fn, "out", false);
  const void* base = nullptr;
  int32_t bd = cm::kF32;
  if (!base_c.is_none()) {
    TensorView b = arg(base_c, fn, "base");
    b.expect_input_like(out);
    out.expect_no_overlap(b);
    base = b.data;
    bd = b.dtype;
  }
  cm::InputList in = input_list(inputs, weights, out, &out, fn, 0, true);
  hint_hugepages(out);
  if (out.is_cpu()) {
    int64_t bad;
    {
      py::gil_scoped_release nogil;
      bad = cm::cpu::active().linear(in, base, bd, lam, divisor, out.data, out.dtype, out.numel);
    }
    return py::int_(bad);
  }
#ifdef CM_WITH_CUDA
  TensorView c = counter_arg(counter_c, fn, out);
  {
    py::gil_scoped_release nogil;
    cm::cuda::linear(in, base, bd, lam, divisor, out.data, out.dtype, out.numel, static_cast<long long*>(c.data), out.device_id, stream);
  }
#endif
  (void)stream;
  (void)counter_c;
  return py::none();
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
  d["cpu_kernels"] = py::make_tuple("mean_fp32", "center_into", "finalize", "ties_merge", "dare", "linear_merge");
  d["openmp"] = cm::cpu::has_openmp();
  d["omp_max_threads"] = cm::cpu::max_threads();
  d["openmp_runtime"] = std::string(CM_OPENMP_RUNTIME);
  d["cpu_isa"] = std::string(cm::cpu::active().isa);
  d["cpu_isas_compiled"] = std::string(cm::cpu::compiled_isas());
  d["cpu_isas_supported"] = std::string(cm::cpu::supported_isas());
  d["simd"] = simd_flags();
  d["arch_flags"] = std::string(CM_SIMD_FLAGS);
  d["compiler"] = std::string(CM_CXX_COMPILER);
  d["build_type"] = std::string(CM_BUILD_TYPE);
  d["sanitizers"] = std::string(CM_SANITIZERS);
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

size_t ties_workspace_bytes(const py::handle& t_h, const py::handle& n_h) {
  const int64_t T = int_arg(t_h, "ties_workspace_bytes", "num_inputs", 1, cm::kMaxInputs);
  const int64_t n = int_arg(n_h, "ties_workspace_bytes", "numel", 0, std::numeric_limits<int64_t>::max());
#ifdef CM_WITH_CUDA
  return cm::cuda::ties_workspace_bytes(int(T), n);
#else
  (void)T;
  (void)n;
  return 0;
#endif
}

void select_cpu_isa(const std::string& name) {
  std::string why;
  if (!cm::cpu::select(name, &why)) throw cm::ArgError("select_cpu_isa: argument 'name': " + why);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "centered_merge native kernels (CPU/OpenMP and optional CUDA); tensors cross as DLPack capsules";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const cm::ArgError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const cm::ArgTypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });
  // CENTERED_MERGE_CPU_ISA forces one compiled ISA path (tests run every one this CPU supports); a name that
  // was not compiled or that this CPU cannot run makes the import fail with the reason, never a SIGILL later.
  if (const char* want = std::getenv("CENTERED_MERGE_CPU_ISA")) {
    std::string w(want);
    if (!w.empty() && w != "auto") {
      std::string why;
      if (!cm::cpu::select(w, &why)) throw py::import_error("CENTERED_MERGE_CPU_ISA=" + w + ": " + why);
    }
  }
  m.attr("MAX_INPUTS") = cm::kMaxInputs;
  const auto none = py::none();
  m.def("mean_fp32", &mean_fp32, py::arg("inputs"), py::arg("weights"), py::arg("out"), py::arg("accumulate") = false,
        py::arg("scale") = 1.0, py::arg("apply_scale") = false, py::arg("stream") = 0, py::arg("index_base") = 0,
        "out = (accumulate ? out : 0) + sum_t w_t * inputs[t], then *= scale when apply_scale (float32 out)");
  m.def("center_into", &center_into, py::arg("w"), py::arg("mean"), py::arg("out"), py::arg("stream") = 0,
        "out = float32(w) - mean");
  m.def("finalize", &finalize, py::arg("x"), py::arg("add"), py::arg("out"), py::arg("stream") = 0,
        py::arg("counter") = none, "out = dtype(x [+ add]); returns the non-finite count on CPU");
  m.def("ties_merge", &ties_merge, py::arg("inputs"), py::arg("base"), py::arg("out"), py::arg("k"), py::arg("lam"),
        py::arg("stream") = 0, py::arg("workspace") = none, py::arg("weights") = none, py::arg("normalize") = true,
        py::arg("counter") = none,
        "TIES: out = base + lam * the agreeing weighted entries of the trimmed task vectors (exactly k[t] kept per "
        "task) with the sign elected by their weighted sum, divided by the agreeing weights when normalize; returns "
        "on CPU the non-finite count of out plus that of the task vectors (on CUDA the latter goes to counter)");
  m.def("dare", &dare, py::arg("tau"), py::arg("out"), py::arg("p"), py::arg("scale"), py::arg("seed"), py::arg("stream") = 0,
        "DARE: out = 0 where dare_uniform(seed, i) < p, else float32(tau) * scale");
  m.def("linear_merge", &linear_merge, py::arg("inputs"), py::arg("weights"), py::arg("base"), py::arg("lam"), py::arg("out"),
        py::arg("stream") = 0, py::arg("counter") = none, py::arg("divisor") = 1.0,
        "out = dtype((lam * sum_t w_t x_t) / divisor), or with base dtype(base + lam * sum_t w_t (x_t - base)); returns the "
        "non-finite count on CPU");
  m.def("ties_workspace_bytes", &ties_workspace_bytes, py::arg("num_inputs"), py::arg("numel"));
  m.def("select_cpu_isa", &select_cpu_isa, py::arg("name"),
        "use the CPU kernels of one compiled ISA (native, avx512, avx2, baseline); ValueError when not possible");
  m.def("build_info", &build_info);
  m.def("cuda_device_count", &cuda_device_count, "(number of CUDA devices the extension's runtime sees, why not)");
}
