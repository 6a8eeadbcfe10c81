// float32 on the 16-bit tensor cores as fp16 pairs (CUFLASH_FP32=pairs): a pre-pass splits each
// float32 input x of (batch, head) into hi + lo = x 2^e, both fp16, e the power of two that puts
// the largest |x| of that (batch, head) in [2^14, 2^15) (so that neither half overflows and lo
// keeps its 11 bits down to 2^-18 of the largest); the sm_80-class kernels then run on the
// halves (T = Fp32Pair: mma_sm80.cuh's three fp16 products a k16 step) and scale each product
// back by 2^-(ea + eb). fp16 products run at twice TF32's rate and fp16 tiles read by ldmatrix, so
// this is the 3xTF32 kernels' accuracy at about twice their tensor-core throughput
// (benchmarks/fp32_split_model.py models both: the same error over the accuracy rule's cases).
// The operands the kernels compute are split in registers at a power of two too: P's from its
// bound (1, or the dropout factor), dS's from its warp tile's largest |value|.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <cstring>
#include "../flash_params.h"

namespace cuflash {

// The exponent e for a largest |x| whose float bits are amax_bits (the pre-pass's atomicMax of
// |x|'s bits: non-negative floats order as their bits). Maxima below 2^-112 (zero and subnormals
// among them) take the largest e for which 2^e and 2^-e stay normal, 126; the largest finite
// float takes -113.
__host__ __device__ inline int pair_exponent(uint32_t amax_bits) {
  const int biased = static_cast<int>((amax_bits >> 23) & 0xffu);  // floor(log2(amax)) + 127
  const int e = 141 - biased;                                      // 14 - floor(log2(amax))
  return e < 126 ? e : 126;
}
// 2^e for |e| <= 126, exactly.
__host__ __device__ inline float pow2(int e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}
// The scale a value bounded by `bound` (P times its dropout factor) is split at.
__host__ __device__ inline float pair_scale_for_bound(float bound) {
  uint32_t bits;
  memcpy(&bits, &bound, sizeof bits);
  return pow2(pair_exponent(bits));
}

// The scratch the pre-pass needs for p's inputs (the backward's: with dout) split to rows of
// padded_dim units: the amax counters, then each input's rows. Packed inputs have one amax a head.
struct PairScratchLayout {
  int64_t amax_offset[4] = {}, rows_offset[4] = {}, bytes = 0;
};
inline PairScratchLayout pair_scratch_layout(const AttentionParams& p, int padded_dim, bool with_dout) {
  const AttentionShape& sh = p.shape;
  const bool packed = p.varlen.cu_seqlens_q != nullptr;
  const int64_t batches = packed ? 1 : sh.batch;
  const int64_t rows_q = packed ? p.varlen.total_q : int64_t{sh.batch} * sh.seqlen_q;
  const int64_t rows_k = packed ? p.varlen.total_k : int64_t{sh.batch} * sh.seqlen_k;
  const int64_t heads[4] = {sh.heads_q, sh.heads_kv, sh.heads_kv, sh.heads_q};
  const int64_t rows[4] = {rows_q, rows_k, rows_k, rows_q};
  PairScratchLayout l;
  const int inputs = with_dout ? 4 : 3;
  for (int i = 0; i < inputs; ++i) {
    l.amax_offset[i] = l.bytes;
    l.bytes += (batches * heads[i] * 4 + 15) / 16 * 16;
  }
  for (int i = 0; i < inputs; ++i) {
    l.rows_offset[i] = l.bytes;
    l.bytes += rows[i] * heads[i] * padded_dim * 4;
  }
  return l;
}

// The exponent of an input (of `heads` heads; amax: PairAmax's) at (batch b, head h).
__host__ __device__ inline int pair_exponent_of(const AttentionParams& p, const uint32_t* amax, int heads, int b,
                                                int h) {
  return pair_exponent(amax[(p.varlen.cu_seqlens_q != nullptr ? 0 : b) * heads + h]);
}

// The inverse scales 2^-e of p's pair inputs at (batch b, query head h, its KV head h_kv): the
// factors the kernels multiply their products by (dout's where p.pair_amax has it).
struct PairUnscales {
  float q = 1.f, k = 1.f, v = 1.f, dout = 1.f;
};
__host__ __device__ inline PairUnscales pair_unscales(const AttentionParams& p, int b, int h, int h_kv) {
  const AttentionShape& sh = p.shape;
  PairUnscales u;
  u.q = pow2(-pair_exponent_of(p, p.pair_amax.q, sh.heads_q, b, h));
  u.k = pow2(-pair_exponent_of(p, p.pair_amax.k, sh.heads_kv, b, h_kv));
  u.v = pow2(-pair_exponent_of(p, p.pair_amax.v, sh.heads_kv, b, h_kv));
  if (p.pair_amax.dout != nullptr) u.dout = pow2(-pair_exponent_of(p, p.pair_amax.dout, sh.heads_q, b, h));
  return u;
}

// The pre-pass: splits p's q, k and v (and *dout, the backward's) into p.fp32_pair_scratch (rows
// of padded_dim units: the kernels' head-dim bucket), and points p's inputs (and *dout and its
// strides), p.pair_amax too, at them.
cudaError_t split_fp32_pairs(AttentionParams& p, int padded_dim, cudaStream_t stream, const void** dout = nullptr,
                             TensorStrides* dout_strides = nullptr);

}  // namespace cuflash
