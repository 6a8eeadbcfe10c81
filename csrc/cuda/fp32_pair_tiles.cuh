// The pair kernels' row scales (fp32_pairs.h): each input row's 2^-e, staged in shared memory
// beside the rows' tile (as the backward stages lse and delta), read where a warp's tile needs
// them. A product's output rows and columns take theirs once the tile is accumulated
// (scale_tile); the rows a product sums over take theirs as column factors of the register
// operand before it is split (warp_gemm_rb's column factors).
#pragma once
#include "../attention_math.h"
#include "mma_sm80.cuh"

namespace cuflash {

// 2^-e of row `row` of (sequence s, batch b, head h) of an input (is_q: a query-side one), 0 past
// its `rows` (tile padding: those rows are zero and their scores masked).
__device__ __forceinline__ float row_unscale(const PairRowScales& r, const Sequence& s, bool is_q, int b, int h,
                                             int row, int rows) {
  return row < rows ? r.unscale[row_offset(r.strides, s, is_q, b, h, row)] : 0.f;
}

// Rows row0 .. row0 + kRows - 1's scales into `out` (shared memory), by kThreads threads.
template <int kRows, int kThreads>
__device__ __forceinline__ void stage_row_unscales(float* out, const PairRowScales& r, const Sequence& s, bool is_q,
                                                   int b, int h, int row0, int rows, int tid) {
  for (int i = tid; i < kRows; i += kThreads) out[i] = row_unscale(r, s, is_q, b, h, row0 + i, rows);
}

// The staged scales of a warp tile's columns (rows col0.. of an input, from `first`): this
// lane's two columns of each 8-column tile j, a WarpAcc's.
struct ColumnUnscales {
  const float* first;  // 8-byte aligned
  int lane;
  __device__ __forceinline__ float2 operator()(int j) const {
    return *reinterpret_cast<const float2*>(first + 8 * j + 2 * (lane & 3));
  }
};

// An accumulated warp tile times the scales of its 16 rows (staged from rows_first) and of its
// columns: the true product. One factor at a time, the smaller first: the intermediate overflows
// only where the product does (a row of 1e32 against one of 1, say, whose scales' product is
// finite but whose larger scale times the tile is not), and a zero padding element stays 0 where
// the two scales' product would not be finite.
template <int kN>
__device__ __forceinline__ void scale_tile(WarpAcc<kN>& t, const float* rows_first, const ColumnUnscales& cols) {
  const float row[2] = {rows_first[cols.lane >> 2], rows_first[(cols.lane >> 2) + 8]};
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
    const float2 c = cols(j);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float r = row[e >> 1], col = (e & 1) ? c.y : c.x;
      t.v[j][e] = t.v[j][e] * fminf(r, col) * fmaxf(r, col);
    }
  }
}

}  // namespace cuflash
