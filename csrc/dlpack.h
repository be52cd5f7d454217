// The DLPack ABI (https://github.com/dmlc/dlpack, include/dlpack/dlpack.h), written out here so the extension
// needs neither libtorch nor the dlpack headers. DLPack is a published, stable C ABI: the struct layouts and
// enum values below are the ones every producer (torch, numpy, cupy, jax) fills in. Only what we read is
// declared. Two capsule kinds exist: "dltensor" holds a DLManagedTensor (DLPack < 1.0, what
// torch.utils.dlpack.to_dlpack and tensor.__dlpack__() return by default) and "dltensor_versioned" holds a
// DLManagedTensorVersioned (DLPack >= 1.0, returned when the consumer asks for max_version >= (1, 0)).
#pragma once
#include <cstdint>

extern "C" {

// DLDeviceType (a C enum, i.e. a 32-bit int in the struct).
enum : int32_t {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13,
  kDLOneAPI = 14,
};

typedef struct {
  int32_t device_type;
  int32_t device_id;
} DLDevice;

// DLDataTypeCode
enum : uint8_t {
  kDLInt = 0,
  kDLUInt = 1,
  kDLFloat = 2,
  kDLOpaqueHandle = 3,
  kDLBfloat = 4,
  kDLComplex = 5,
  kDLBool = 6,
};

typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} DLDataType;

typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means compact row-major
  uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensor* self);
} DLManagedTensor;

typedef struct {
  uint32_t major;
  uint32_t minor;
} DLPackVersion;

#define DLPACK_FLAG_BITMASK_READ_ONLY (1ULL << 0)

typedef struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensorVersioned* self);
  uint64_t flags;
  DLTensor dl_tensor;
} DLManagedTensorVersioned;

}  // extern "C"
