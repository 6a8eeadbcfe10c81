// The backward's dQ route (flash_launch.h): the fused warp-specialized Hopper kernel
// (flash_bwd_sm90_tma.cuh: plain 16-bit attention, head-dim buckets 64 and 128, the bwdws part of
// CUFLASH_SM90, inputs TMA can address) adds dQ up in fp32 itself, unordered (atomics,
// deterministic=False) or in a fixed order (deterministic); elsewhere the one-kernel paths are
// slower than the pair of kernels. Where it measured faster than the pair (benchmarks/NOTES.md,
// H200): unordered, every row length at D=64, and at D=128 from 1024 keys seen by the middle
// query row (0.90x at 256, 1.00x at 512, 1.02-1.13x from 1024); ordered, the same: at D=64
// 1.15-1.28x without a mask, causal 0.98-1.01x up to 2048 and 1.07-1.08x from 8192; at D=128
// 1.03-1.08x from 1024 without a mask, causal 0.99-1.03x from 2048, 0.87-0.97x at 512.
#include "flash_launch.h"
#include "sm90/flash_bwd_sm90_tma.cuh"
#include "sm90/flash_fwd_sm90_tma.cuh"  // middle_row_keys

namespace cuflash {

bool fused_backward_built_for(DType dtype, int head_dim) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return false;
  const int bucket = cuda_head_dim_bucket(dtype, head_dim);
  return bucket == 64 || bucket == 128;
}

bool fused_backward_runs(const FlashBwdParams& p) {
  if (!fused_backward_built_for(p.dtype, p.shape.head_dim)) return false;
  if (p.dscores != nullptr) return false;
  if (!sm90::sm90_paths(p).bwd_ws) return false;  // (not with seqused_k: sm90_paths)
  // The launch encodes the maps (no second encoding here); dk and dv where the persistent kernel
  // stores them by TMA (both routes' at head dim 64).
  const int bucket = cuda_head_dim_bucket(p.dtype, p.shape.head_dim);
  return sm90::bwd_tma_addressable(p, sm90::bwd_dkdv_persistent(bucket));
}

bool prefers_fused_backward(const FlashBwdParams& p) {
  if (!fused_backward_runs(p)) return false;
  return cuda_head_dim_bucket(p.dtype, p.shape.head_dim) != 128 || sm90::middle_row_keys(p) >= 1024;
}

}  // namespace cuflash
