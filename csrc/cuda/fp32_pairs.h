// float32 on the 16-bit tensor cores as fp16 pairs (its default where they run: run_switches.h's
// CUFLASH_FP32): a pre-pass splits each row x of each float32 input into hi + lo 2^-11 = x 2^e,
// both fp16, e the power of two that puts the row's largest finite |x| in [2^14, 2^15) (so that
// neither half overflows; lo, the rest times 2^11, keeps its bits down to 2^-28 of the row's
// largest, and a product 1e-5 of its own size down to ~2^-32 of it: mma_sm80.cuh's split_half2);
// the sm_80-class kernels then run on the halves (T = Fp32Pair: mma_sm80.cuh's three fp16 products
// a k16 step) and scale each product back. fp16 products run at twice TF32's rate and fp16 tiles
// read by ldmatrix, so this is the 3xTF32 kernels' accuracy at about twice their tensor-core
// throughput (benchmarks/fp32_split_model.py models both: the same error over the accuracy rule's
// cases).
// A power of two a row, not a (batch, head): one input outlier, or a masked key holding garbage,
// costs only its own row bits. The scales come back where each operand's rows lie in the product:
// - rows of the output (Q in Q K^T, K in K Q^T, ...) and its columns (K in Q K^T): the
//   accumulated tile times 2^-e of its row and of its column (fp32_pair_tiles.cuh's scale_tile);
// - rows summed over (V in P V, K in dS K, Q in dS^T Q, dO in P^T dO): their 2^-e multiplies the
//   matching column of the register operand (P or dS) before it is split (WarpAcc::to_a), which
//   takes one power of two a warp tile from its largest |value| (PairSplit: so a row of P or dS
//   keeps 1e-5 of its own size down to ~2^-32 of its tile's largest value, not further).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <cstring>
#include "../flash_params.h"

namespace cuflash {

// The exponent e for a largest |x| whose float bits are bits (non-negative floats order as
// their bits; infinity and NaN are not passed). Maxima below 2^-112 (zero and subnormals among
// them) take the largest e for which 2^e and 2^-e stay normal, 126; the largest finite float
// takes -113.
__host__ __device__ inline int pair_exponent(uint32_t bits) {
  const int biased = static_cast<int>((bits >> 23) & 0xffu);  // floor(log2(x)) + 127
  const int e = 141 - biased;                                  // 14 - floor(log2(x))
  return e < 126 ? e : 126;
}
// 2^e for |e| <= 126, exactly.
__host__ __device__ inline float pow2(int e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}
// The exponent for values bounded by `bound` (finite, >= 0).
__host__ __device__ inline int pair_exponent_for(float bound) {
  uint32_t bits;
  memcpy(&bits, &bound, sizeof bits);
  return pair_exponent(bits);
}

// The pre-pass's scratch for p's inputs (q, k, v and, the backward's, dout) split to rows of
// padded_dim units: each input's row scales ([batches][heads][rows] floats), then its rows
// ([batches][rows][heads][padded_dim]); batches 1 and rows the total for packed inputs.
struct PairScratchLayout {
  int inputs = 0, batches = 0;
  int heads[4] = {}, rows[4] = {};
  int64_t scales_offset[4] = {}, rows_offset[4] = {}, bytes = 0;
};
inline PairScratchLayout pair_scratch_layout(const AttentionParams& p, int padded_dim, bool with_dout) {
  const AttentionShape& sh = p.shape;
  const bool packed = p.varlen.cu_seqlens_q != nullptr;
  const int rows_q = packed ? p.varlen.total_q : sh.seqlen_q, rows_k = packed ? p.varlen.total_k : sh.seqlen_k;
  PairScratchLayout l;
  l.inputs = with_dout ? 4 : 3;
  l.batches = packed ? 1 : sh.batch;
  for (int i = 0; i < l.inputs; ++i) {
    l.heads[i] = i == 0 || i == 3 ? sh.heads_q : sh.heads_kv;
    l.rows[i] = i == 0 || i == 3 ? rows_q : rows_k;
  }
  auto rows_of = [&](int i) { return int64_t{l.batches} * l.rows[i] * l.heads[i]; };
  for (int i = 0; i < l.inputs; ++i) {
    l.scales_offset[i] = l.bytes;
    l.bytes += (rows_of(i) * 4 + 15) / 16 * 16;
  }
  for (int i = 0; i < l.inputs; ++i) {
    l.rows_offset[i] = l.bytes;
    l.bytes += rows_of(i) * padded_dim * 4;
  }
  return l;
}

// The pre-pass: splits p's q, k and v (and *dout, the backward's) into p.fp32_pair_scratch (rows
// of padded_dim units: the kernels' head-dim bucket), and points p's inputs (and *dout and its
// strides) at them and p.pair_scales at their row scales.
cudaError_t split_fp32_pairs(AttentionParams& p, int padded_dim, cudaStream_t stream, const void** dout = nullptr,
                             TensorStrides* dout_strides = nullptr);

}  // namespace cuflash
