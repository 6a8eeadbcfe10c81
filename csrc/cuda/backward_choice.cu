// prefers_atomic_dq (flash_launch.h): where a backward that may be non-deterministic takes the
// one-kernel path with dQ added up in fp32. That is where the fused warp-specialized Hopper
// kernel runs (flash_bwd_sm90_tma.cuh: plain 16-bit attention, head-dim buckets 64 and 128, the
// bwdws part of CUFLASH_SM90, inputs TMA can address) and where it measured faster than the
// deterministic pair (benchmarks/NOTES.md, H200): every row length at D=64; at D=128 from 1024
// keys seen by the middle query row (0.90x at 256, 1.00x at 512, 1.02-1.13x from 1024).
// Elsewhere the one-kernel paths are slower than the deterministic kernels.
#include "flash_launch.h"
#include "sm90/flash_bwd_sm90_tma.cuh"
#include "sm90/flash_fwd_sm90_tma.cuh"  // middle_row_keys

namespace cuflash {

bool prefers_atomic_dq(const FlashBwdParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  if (p.dscores != nullptr) return false;
  const int bucket = cuda_head_dim_bucket(p.dtype, p.shape.head_dim);
  if (bucket != 64 && bucket != 128) return false;
  if (!sm90::sm90_paths(p).bwd_ws) return false;
  if (bucket == 128 && sm90::middle_row_keys(p) < 1024) return false;
  return sm90::bwd_tma_addressable(p);  // the launch encodes the maps (no second encoding here)
}

}  // namespace cuflash
