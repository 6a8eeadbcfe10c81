#include "fill_kernels.h"

namespace cuflash {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride loops beyond this

int blocks_for(int64_t count) {
  return static_cast<int>(count / kThreads + 1 < kMaxBlocks ? count / kThreads + 1 : kMaxBlocks);
}

// Zero bits are +0 in float, half and bfloat16, so one kernel per element width serves all.
template <typename Bits>
__global__ void zero_tensor_kernel(Bits* data, TensorStrides s, int heads, int rows, int head_dim, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < count; i += int64_t{gridDim.x} * kThreads) {
    const int64_t d = i % head_dim, row = i / head_dim % rows, h = i / head_dim / rows % heads;
    const int64_t b = i / head_dim / rows / heads;
    data[b * s.batch + h * s.head + row * s.row + d] = Bits(0);
  }
}

__global__ void fill_floats_kernel(float* data, int64_t count, float value) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < count; i += int64_t{gridDim.x} * kThreads)
    data[i] = value;
}

}  // namespace

cudaError_t zero_tensor(void* data, int element_bytes, const TensorStrides& strides, int batch, int heads, int rows,
                        int head_dim, cudaStream_t stream) {
  const int64_t count = int64_t{batch} * heads * rows * head_dim;
  if (count == 0) return cudaSuccess;
  if (element_bytes == 2)
    zero_tensor_kernel<<<blocks_for(count), kThreads, 0, stream>>>(static_cast<uint16_t*>(data), strides, heads, rows,
                                                                   head_dim, count);
  else
    zero_tensor_kernel<<<blocks_for(count), kThreads, 0, stream>>>(static_cast<uint32_t*>(data), strides, heads, rows,
                                                                   head_dim, count);
  return cudaGetLastError();
}

cudaError_t fill_floats(float* data, int64_t count, float value, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  fill_floats_kernel<<<blocks_for(count), kThreads, 0, stream>>>(data, count, value);
  return cudaGetLastError();
}

}  // namespace cuflash
