// CPU attention: the same tiled online-softmax algorithm as the CUDA kernels, in T = float or
// double (float16/bfloat16 inputs are computed in float by the caller). Each call handles the
// (batch, head) pairs [bh_begin, bh_end), so the caller can split them over threads.
#pragma once
#include <cstdint>
#include "../flash_params.h"

namespace cuflash {

template <typename T>
void flash_fwd_cpu(const FlashFwdParams& p, int64_t bh_begin, int64_t bh_end);

// Writes dq, dk and dv of the (batch, head) pairs in range; p.delta is not used.
template <typename T>
void flash_bwd_cpu(const FlashBwdParams& p, int64_t bh_begin, int64_t bh_end);

}  // namespace cuflash
