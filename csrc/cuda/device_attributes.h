// Attributes of the current CUDA device, asked of the runtime once per device and attribute:
// the launchers consult them on every call.
#pragma once
#include <cuda_runtime.h>
#include <atomic>

namespace cuflash {

// kAttr of the current device, or `fallback` where the runtime cannot say.
template <cudaDeviceAttr kAttr>
int device_attribute(int fallback) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices] = {};  // value + 1; 0: not asked yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return fallback;
  int entry = known[device].load(std::memory_order_relaxed);
  if (entry == 0) {
    int value = 0;
    if (cudaDeviceGetAttribute(&value, kAttr, device) != cudaSuccess) return fallback;
    entry = value + 1;
    known[device].store(entry, std::memory_order_relaxed);
  }
  return entry - 1;
}

}  // namespace cuflash
