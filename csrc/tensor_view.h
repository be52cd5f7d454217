// TensorView: a borrowed, validated look at a tensor that came in as a DLPack capsule.
//
// Borrow semantics: we read the DLManagedTensor inside the capsule and never consume it (the capsule keeps its
// name, so its own destructor still runs the producer's deleter). The Python caller keeps the tensor alive for
// the duration of the call, which is all the kernels need.
//
// Every check throws cm::ArgError (mapped to Python ValueError) with a message that names the function, the
// argument, what was expected and what came.
#pragma once
#include <Python.h>

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "dlpack.h"

namespace cm {

// A wrong value (ValueError in Python) and a wrong type (TypeError).
struct ArgError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct ArgTypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

inline std::string device_str(int32_t type, int32_t id) {
  switch (type) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda:" + std::to_string(id);
    case kDLCUDAHost: return "cuda_host";
    case kDLCUDAManaged: return "cuda_managed:" + std::to_string(id);
    case kDLROCM: return "rocm:" + std::to_string(id);
    case kDLMetal: return "mps";
    default: return "device_type_" + std::to_string(type) + ":" + std::to_string(id);
  }
}

inline std::string dl_dtype_str(DLDataType t) {
  std::string base;
  switch (t.code) {
    case kDLInt: base = "int"; break;
    case kDLUInt: base = "uint"; break;
    case kDLFloat: base = "float"; break;
    case kDLBfloat: base = "bfloat"; break;
    case kDLComplex: base = "complex"; break;
    case kDLBool: base = "bool"; break;
    default: base = "code" + std::to_string(int(t.code)) + "_";
  }
  std::string s = base + std::to_string(int(t.bits));
  if (t.lanes != 1) s += "x" + std::to_string(int(t.lanes));
  return s;
}

struct TensorView {
  std::string where;  // "fn: argument 'name'"
  void* data = nullptr;
  int32_t device_type = 0, device_id = 0;
  DLDataType dl_dtype{};
  int32_t dtype = -1;  // cm::DType, or -1 when not one of float32/float16/bfloat16
  std::vector<int64_t> shape, strides;
  int64_t numel = 1;
  bool contiguous = true;
  bool readonly = false;

  [[noreturn]] void fail(const std::string& expected, const std::string& got) const {
    throw ArgError(where + ": expected " + expected + ", got " + got);
  }
  std::string device() const { return device_str(device_type, device_id); }
  std::string dtype_str() const { return dtype >= 0 ? std::string(dtype_name(dtype)) : dl_dtype_str(dl_dtype); }
  bool is_cpu() const { return device_type == kDLCPU; }
  bool is_cuda() const { return device_type == kDLCUDA; }

  void expect_float(bool allow_half = true) const {
    if (dtype < 0 || (!allow_half && dtype != kF32))
      fail(allow_half ? "a float32, float16 or bfloat16 tensor" : "a float32 tensor", dtype_str() + " tensor");
  }
  void expect_f32() const { expect_float(false); }
  void expect_dtype_i64() const {
    if (!(dl_dtype.code == kDLInt && dl_dtype.bits == 64 && dl_dtype.lanes == 1))
      fail("an int64 tensor", dl_dtype_str(dl_dtype) + " tensor");
  }
  void expect_contiguous() const {
    if (!contiguous)
      fail("a contiguous tensor", "strides " + shape_str(strides) + " for shape " + shape_str(shape) +
                                      " (call .contiguous() first)");
  }
  void expect_writable() const {
    if (readonly) fail("a writable tensor", "a read-only DLPack tensor");
  }
  void expect_shape_of(const TensorView& ref) const {
    if (shape != ref.shape)
      fail("shape " + shape_str(ref.shape) + " (the shape of " + ref.where.substr(ref.where.find('\'')) + ")",
           "shape " + shape_str(shape));
  }
  // An input read alongside `ref` (usually the output): same device and shape, a float dtype, contiguous.
  void expect_input_like(const TensorView& ref) const {
    expect_device_of(ref);
    expect_float();
    expect_contiguous();
    expect_shape_of(ref);
  }
  void expect_numel(int64_t n) const {
    if (numel != n) fail(std::to_string(n) + " elements", std::to_string(numel) + " elements");
  }
  void expect_device_of(const TensorView& ref) const {
    if (device_type != ref.device_type || device_id != ref.device_id)
      fail("a tensor on " + ref.device() + " (the device of " + ref.where.substr(ref.where.find('\'')) + ")",
           "a tensor on " + device());
  }
  void expect_cpu_or_cuda() const {
    if (!is_cpu() && !is_cuda()) fail("a tensor on cpu or cuda", "a tensor on " + device());
  }
  // Bytes this (contiguous) tensor occupies: [data, data + nbytes()).
  size_t nbytes() const { return size_t(numel) * size_t((dl_dtype.bits * dl_dtype.lanes + 7) / 8); }
  // An output must not share memory with an input: the kernels read inputs after writing parts of the output.
  void expect_no_overlap(const TensorView& other) const {
    if (numel == 0 || other.numel == 0 || device_type != other.device_type || device_id != other.device_id) return;
    const char* a = static_cast<const char*>(data);
    const char* b = static_cast<const char*>(other.data);
    if (a < b + other.nbytes() && b < a + nbytes())
      fail("memory of its own (a fresh tensor)", "a tensor that overlaps " + other.where.substr(other.where.find('\'')));
  }
};

// Reads a capsule without consuming it. `fn` and `arg` only label the error messages.
inline TensorView view_capsule(PyObject* obj, const std::string& fn, const std::string& arg) {
  TensorView v;
  v.where = fn + ": argument '" + arg + "'";
  const DLTensor* t = nullptr;
  if (obj && PyCapsule_CheckExact(obj)) {
    const char* name = PyCapsule_GetName(obj);
    if (name && std::strcmp(name, "dltensor") == 0) {
      auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(obj, "dltensor"));
      if (m) t = &m->dl_tensor;
    } else if (name && std::strcmp(name, "dltensor_versioned") == 0) {
      auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(obj, "dltensor_versioned"));
      if (m) {
        if (m->version.major != 1)
          v.fail("a DLPack 1.x capsule", "DLPack version " + std::to_string(m->version.major) + "." +
                                             std::to_string(m->version.minor));
        t = &m->dl_tensor;
        v.readonly = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
      }
    } else if (name && (std::strcmp(name, "used_dltensor") == 0 || std::strcmp(name, "used_dltensor_versioned") == 0)) {
      v.fail("an unconsumed DLPack capsule", "a capsule that was already consumed (make a fresh one per call)");
    } else {
      v.fail("a DLPack capsule (torch.utils.dlpack.to_dlpack(t) or t.__dlpack__())",
             std::string("a capsule named '") + (name ? name : "") + "'");
    }
    if (!t) {
      PyErr_Clear();
      v.fail("a valid DLPack capsule", "a capsule holding a null pointer");
    }
  } else {
    const std::string what = !obj ? "NULL" : (obj == Py_None ? "None" : std::string("an object of type ") + Py_TYPE(obj)->tp_name);
    throw ArgTypeError(v.where + ": expected a DLPack capsule (torch.utils.dlpack.to_dlpack(t) or t.__dlpack__()), got " + what);
  }
  v.device_type = t->device.device_type;
  v.device_id = t->device.device_id;
  v.dl_dtype = t->dtype;
  if (t->dtype.lanes == 1) {
    if (t->dtype.code == kDLFloat && t->dtype.bits == 32) v.dtype = kF32;
    else if (t->dtype.code == kDLFloat && t->dtype.bits == 16) v.dtype = kF16;
    else if (t->dtype.code == kDLBfloat && t->dtype.bits == 16) v.dtype = kBF16;
  }
  if (t->ndim < 0 || t->ndim > 64) v.fail("0 <= ndim <= 64", "ndim " + std::to_string(t->ndim));
  if (t->ndim > 0 && !t->shape) v.fail("a shape array", "a null shape pointer");
  v.shape.assign(t->shape, t->shape + t->ndim);
  for (int64_t s : v.shape) {
    if (s < 0) v.fail("non-negative extents", "shape " + shape_str(v.shape));
    v.numel *= s;
  }
  if (t->strides) {
    v.strides.assign(t->strides, t->strides + t->ndim);
    int64_t expect = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
      // a dimension of extent 1 may carry any stride; an empty tensor is always "contiguous"
      if (v.shape[i] != 1 && v.strides[i] != expect) v.contiguous = false;
      expect *= v.shape[i];
    }
    if (v.numel == 0) v.contiguous = true;
  } else {
    v.strides.resize(t->ndim);
    int64_t expect = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
      v.strides[i] = expect;
      expect *= v.shape[i];
    }
  }
  if (v.numel > 0 && !t->data) v.fail("a tensor with data", "a null data pointer");
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  return v;
}

}  // namespace cm
