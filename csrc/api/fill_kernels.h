// The outputs of calls that need no attention kernel (no keys, or no queries): zeros and -inf.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "../flash_params.h"

namespace cuflash {

// Zeroes a [batch, heads, rows, head_dim] tensor of element_bytes (2 or 4) wide elements.
cudaError_t zero_tensor(void* data, int element_bytes, const TensorStrides& strides, int batch, int heads, int rows,
                        int head_dim, cudaStream_t stream);

// Sets `count` contiguous floats to `value`.
cudaError_t fill_floats(float* data, int64_t count, float value, cudaStream_t stream);

}  // namespace cuflash
