// Helpers shared by the C++ API tests: device detection, device buffers, the element types.
#pragma once
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <ostream>
#include <vector>

#include "cuflash/flash_attention.h"

// gtest prints the API's enums by name.
namespace cuflash {
inline void PrintTo(FlashAttentionError e, std::ostream* os) { *os << get_error_string(e); }
inline void PrintTo(DataType t, std::ostream* os) {
  *os << (t == DataType::FLOAT32 ? "FLOAT32" : t == DataType::FLOAT16 ? "FLOAT16" : "BFLOAT16");
}
}  // namespace cuflash

namespace cuflash_test {

using cuflash::DataType;
using cuflash::FlashAttentionError;

// Whether a CUDA device can run the kernels. Leaves no CUDA error behind when none is there.
inline bool cuda_device_available() {
  int count = 0;
  const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  cudaGetLastError();
  return ok;
}

#define CUFLASH_REQUIRE_CUDA() \
  if (!::cuflash_test::cuda_device_available()) GTEST_SKIP() << "no CUDA device"

// Device memory that frees itself; empty (null) for 0 bytes.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0 && cudaMalloc(&ptr_, bytes) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }
  // All bytes 0xFF: NaN in float32, float16 and bfloat16, so an element a kernel forgot to write fails.
  void poison() const {
    if (ptr_) {
      EXPECT_EQ(cudaMemset(ptr_, 0xFF, bytes_), cudaSuccess);
    }
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

template <typename T>
DeviceBuffer upload(const std::vector<T>& host) {
  DeviceBuffer d(host.size() * sizeof(T));
  if (!host.empty()) {
    EXPECT_EQ(cudaMemcpy(d.get(), host.data(), d.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  return d;
}

template <typename T>
std::vector<T> download(const DeviceBuffer& d) {
  std::vector<T> host(d.bytes() / sizeof(T));
  if (!host.empty()) {
    EXPECT_EQ(cudaMemcpy(host.data(), d.get(), d.bytes(), cudaMemcpyDeviceToHost), cudaSuccess);
  }
  return host;
}

// The element types of the API, with their conversions to and from double.
template <typename T>
struct Element;
template <>
struct Element<float> {
  static constexpr DataType kType = DataType::FLOAT32;
  static float from(double x) { return static_cast<float>(x); }
  static double to(float x) { return x; }
};
template <>
struct Element<half> {
  static constexpr DataType kType = DataType::FLOAT16;
  static half from(double x) { return __float2half(static_cast<float>(x)); }
  static double to(half x) { return __half2float(x); }
};
template <>
struct Element<__nv_bfloat16> {
  static constexpr DataType kType = DataType::BFLOAT16;
  static __nv_bfloat16 from(double x) { return __float2bfloat16(static_cast<float>(x)); }
  static double to(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// x rounded to T, as a double: the rounding a PyTorch op in dtype T applies to its result.
template <typename T>
double round_to(double x) {
  return Element<T>::to(Element<T>::from(x));
}

inline const char* dtype_name(DataType t) {
  return t == DataType::FLOAT32 ? "fp32" : t == DataType::FLOAT16 ? "fp16" : "bf16";
}

}  // namespace cuflash_test
