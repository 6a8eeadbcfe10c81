// Causal and key-length masking. Only blocks that cross the diagonal or the end of the keys
// pay for it; blocks wholly above the diagonal are never visited.
#pragma once
#include <math.h>
#include "../flash_params.h"
#include "mma_sm80.cuh"

namespace cuflash {

// Key blocks [0, result) that queries [m_start, m_start + block_m) can see.
__host__ __device__ inline int key_blocks_for_queries(const MaskParams& mask, int m_start, int block_m,
                                                      int seqlen_q, int seqlen_k, int block_n) {
  int n_end = seqlen_k;
  if (mask.is_causal) {
    const int last_row = min(m_start + block_m, seqlen_q) - 1;
    n_end = min(n_end, last_row + mask.causal_offset + 1);
  }
  return n_end > 0 ? (n_end + block_n - 1) / block_n : 0;
}

// First query block that keys [n_start, ...) are visible to.
__host__ __device__ inline int first_query_block_for_keys(const MaskParams& mask, int n_start,
                                                          int block_m) {
  if (!mask.is_causal) return 0;
  const int first_row = n_start - mask.causal_offset;
  return first_row > 0 ? first_row / block_m : 0;
}

// Whether a 16-row warp tile (query rows row0..row0+15) against keys [n0, n0 + block_n)
// has any masked element.
__device__ __forceinline__ bool block_needs_mask(const MaskParams& mask, int row0, int n0,
                                                 int block_n, int seqlen_k) {
  return n0 + block_n > seqlen_k || (mask.is_causal && n0 + block_n - 1 > row0 + mask.causal_offset);
}

// s: 16 query rows (row0..) x keys (n0..), already scaled: masked elements become -inf.
template <int kN>
__device__ __forceinline__ void apply_mask(WarpAcc<kN>& s, const MaskParams& mask, int row0, int n0,
                                           int seqlen_k, int lane) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = row0 + WarpAcc<kN>::row_of(e, lane);
      const int col = n0 + WarpAcc<kN>::col_of(j, e, lane);
      if (col >= seqlen_k || (mask.is_causal && col > row + mask.causal_offset)) s.v[j][e] = -INFINITY;
    }
}

// The transposed tile of the dK/dV kernel: s is 16 keys (key0..) x queries (m0..). Queries past
// the end carry lse = +inf and need no mask; keys past the end are never written.
template <int kM>
__device__ __forceinline__ bool block_needs_causal_mask_t(const MaskParams& mask, int key0, int m0) {
  return mask.is_causal && key0 + 15 > m0 + mask.causal_offset;
}
template <int kM>
__device__ __forceinline__ void apply_causal_mask_t(WarpAcc<kM>& s, const MaskParams& mask, int key0,
                                                    int m0, int lane) {
#pragma unroll
  for (int j = 0; j < kM / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = key0 + WarpAcc<kM>::row_of(e, lane);
      const int query = m0 + WarpAcc<kM>::col_of(j, e, lane);
      if (key > query + mask.causal_offset) s.v[j][e] = -INFINITY;
    }
}

}  // namespace cuflash
