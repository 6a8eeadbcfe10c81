// float32 and float64 attention on CUDA cores: exact (no TF32), the same tiled online-softmax
// algorithm as the tensor-core path. One warp per query row (forward, dQ) or key row (dK/dV);
// lane l holds head-dim elements l, l + 32, ... of its row (kChunks = bucket / 32 of them).
// Keys are visited in tiles of 32: lane i keeps score i of the tile, so the running max and
// sum are updated once per tile. Masks, scores and dropout follow attention_math.h.
#pragma once
#include <math.h>
#include "../attention_math.h"

namespace cuflash {

namespace simt {

constexpr int kWarps = 4;
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(kFull, x, off);
  return x;
}
template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = fmax(x, __shfl_xor_sync(kFull, x, off));
  return x;
}

// A row of head_dim elements spread over the warp.
template <typename T, int kChunks>
struct WarpRow {
  T x[kChunks];
  __device__ __forceinline__ void load(const T* row, int head_dim, int lane) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = lane + 32 * c;
      x[c] = d < head_dim ? row[d] : T(0);
    }
  }
  __device__ __forceinline__ void store(T* row, int head_dim, int lane, T scale) const {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = lane + 32 * c;
      if (d < head_dim) row[d] = x[c] * scale;
    }
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) x[c] = T(0);
  }
  __device__ __forceinline__ T dot(const WarpRow& o) const {
    T s = 0;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) s += x[c] * o.x[c];
    return warp_sum(s);
  }
  __device__ __forceinline__ void axpy(T a, const WarpRow& o) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) x[c] += a * o.x[c];
  }
};

}  // namespace simt

template <typename T, int kChunks>
__global__ void __launch_bounds__(32 * simt::kWarps) flash_fwd_simt_kernel(const FlashFwdParams p) {
  using namespace simt;
  const AttentionShape& sh = p.shape;
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / (sh.heads_q / sh.heads_kv);
  const Sequence seq = sequence_of(p, b);
  if (row >= seq.seqlen_q) return;
  const ExactScore<T> score(p, b, h);
  const bool dropout = p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};
  const T keep_scale = static_cast<T>(dropout_keep_scale(p.dropout.p));
  WarpRow<T, kChunks> q, o, kv;
  q.load(row_at<const T>(p.q, p.q_strides, seq, true, b, h, row), sh.head_dim, lane);
  o.zero();
  T row_max = -INFINITY, row_sum = 0, unused;
  const Range keys = visible_keys(p.mask, seq, row, row + 1);
  for (int j0 = keys.begin; j0 < keys.end; j0 += 32) {
    const int count = min(32, keys.end - j0);
    T my_score = -INFINITY;
    for (int jj = 0; jj < count; ++jj) {
      kv.load(key_row_at<const T>(p, p.k, p.k_strides, seq, b, h_kv, j0 + jj), sh.head_dim, lane);
      const T s = score(seq, q.dot(kv), row, j0 + jj, &unused);
      if (lane == jj) my_score = s;
    }
    const T tile_max = fmax(row_max, warp_max(my_score));
    const T base = tile_max == -INFINITY ? T(0) : tile_max;
    const T alpha = exp(row_max - base);
    T prob = exp(my_score - base);
    row_sum = row_sum * alpha + warp_sum(prob);  // dropped probabilities count in the softmax
    row_max = tile_max;
    if (dropout && lane < count) prob = rng.keep(b, h, sh.heads_q, row, j0 + lane) ? prob * keep_scale : T(0);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) o.x[c] *= alpha;
    for (int jj = 0; jj < count; ++jj) {
      kv.load(key_row_at<const T>(p, p.v, p.v_strides, seq, b, h_kv, j0 + jj), sh.head_dim, lane);
      o.axpy(__shfl_sync(kFull, prob, jj), kv);
    }
  }
  const bool seen = row_sum != T(0);  // NaN scores give a NaN sum: it propagates
  o.store(row_at<T>(p.out, p.out_strides, seq, true, b, h, row), sh.head_dim, lane,
          seen ? T(1) / row_sum : T(0));
  if (lane == 0)
    static_cast<T*>(p.lse)[stats_offset(p.stats_strides, seq, b, h) + row] =
        seen ? row_max + log(row_sum) : T(-INFINITY);
}

template <typename T, int kChunks>
__global__ void __launch_bounds__(32 * simt::kWarps) flash_bwd_dq_simt_kernel(const FlashBwdParams p) {
  using namespace simt;
  const AttentionShape& sh = p.shape;
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / (sh.heads_q / sh.heads_kv);
  const Sequence seq = sequence_of(p, b);
  if (row >= seq.seqlen_q) return;
  const T scale = static_cast<T>(p.scale);
  const ExactScore<T> score(p, b, h);
  const bool dropout = p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};
  const T keep_scale = static_cast<T>(dropout_keep_scale(p.dropout.p));
  const int64_t stat = stats_offset(p.stats_strides, seq, b, h) + row;
  const T lse = static_cast<const T*>(p.lse)[stat], delta = static_cast<const T*>(p.delta)[stat];
  WarpRow<T, kChunks> q, dout, dq, k, v;
  q.load(row_at<const T>(p.q, p.q_strides, seq, true, b, h, row), sh.head_dim, lane);
  dout.load(row_at<const T>(p.dout, p.dout_strides, seq, true, b, h, row), sh.head_dim, lane);
  dq.zero();
  T* dscores = p.dscores ? static_cast<T*>(p.dscores) + dscores_offset(sh, b, h, row) : nullptr;
  const MaskParams mask = unpacked_mask(p.mask);  // rows_per_query a compile-time 1
  const Range keys = lse == -INFINITY ? Range{0, 0} : visible_keys(mask, seq, row, row + 1);
  for (int j = keys.begin; j < keys.end; ++j) {
    k.load(row_at<const T>(p.k, p.k_strides, seq, false, b, h_kv, j), sh.head_dim, lane);
    v.load(row_at<const T>(p.v, p.v_strides, seq, false, b, h_kv, j), sh.head_dim, lane);
    T capped = 0;
    const T prob = exp(score(seq, q.dot(k), row, j, &capped) - lse);
    const T z = !dropout ? T(1) : rng.keep(b, h, sh.heads_q, row, j) ? keep_scale : T(0);
    T ds = prob * (z * dout.dot(v) - delta);
    if (dscores && lane == 0) dscores[j] = ds;
    if (p.score.softcap > 0.0) ds *= T(1) - capped * capped;
    dq.axpy(ds, k);
  }
  dq.store(row_at<T>(p.dq, p.dq_strides, seq, true, b, h, row), sh.head_dim, lane, scale);
}

// One warp per key of a key/value head: dk and dv sum over the query heads of its group.
template <typename T, int kChunks>
__global__ void __launch_bounds__(32 * simt::kWarps) flash_bwd_dkdv_simt_kernel(const FlashBwdParams p) {
  using namespace simt;
  const AttentionShape& sh = p.shape;
  const int key = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h_kv = blockIdx.y, b = blockIdx.z, group = sh.heads_q / sh.heads_kv;
  const Sequence seq = sequence_of(p, b);
  if (key >= seq.seqlen_k) return;
  const T scale = static_cast<T>(p.scale);
  const bool dropout = p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};
  const T keep_scale = static_cast<T>(dropout_keep_scale(p.dropout.p));
  WarpRow<T, kChunks> k, v, q, dout, dk, dv;
  k.load(row_at<const T>(p.k, p.k_strides, seq, false, b, h_kv, key), sh.head_dim, lane);
  v.load(row_at<const T>(p.v, p.v_strides, seq, false, b, h_kv, key), sh.head_dim, lane);
  dk.zero();
  dv.zero();
  const MaskParams mask = unpacked_mask(p.mask);  // rows_per_query a compile-time 1
  const Range rows = visible_queries(mask, seq, key, key + 1);
  for (int h = h_kv * group; h < (h_kv + 1) * group; ++h) {
    const ExactScore<T> score(p, b, h);
    const int64_t stats = stats_offset(p.stats_strides, seq, b, h);
    for (int i = rows.begin; i < rows.end; ++i) {
      const T lse = static_cast<const T*>(p.lse)[stats + i];
      if (lse == -INFINITY) continue;  // a row that saw no key contributes nothing
      q.load(row_at<const T>(p.q, p.q_strides, seq, true, b, h, i), sh.head_dim, lane);
      dout.load(row_at<const T>(p.dout, p.dout_strides, seq, true, b, h, i), sh.head_dim, lane);
      T capped = 0;
      const T prob = exp(score(seq, q.dot(k), i, key, &capped) - lse);
      const T z = !dropout ? T(1) : rng.keep(b, h, sh.heads_q, i, key) ? keep_scale : T(0);
      dv.axpy(prob * z, dout);
      T ds = prob * (z * dout.dot(v) - static_cast<const T*>(p.delta)[stats + i]);
      if (p.score.softcap > 0.0) ds *= T(1) - capped * capped;
      dk.axpy(ds, q);
    }
  }
  dk.store(row_at<T>(p.dk, p.dk_strides, seq, false, b, h_kv, key), sh.head_dim, lane, scale);
  dv.store(row_at<T>(p.dv, p.dv_strides, seq, false, b, h_kv, key), sh.head_dim, lane, T(1));
}

}  // namespace cuflash
