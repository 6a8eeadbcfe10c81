// float32 and float64 attention on CUDA cores: exact (no TF32), the same tiled online-softmax
// algorithm as the tensor-core path. One warp per query row (forward, dQ) or key row (dK/dV);
// lane l holds head-dim elements l, l + 32, ... of its row (kChunks = bucket / 32 of them).
// Keys are visited in tiles of 32: lane i keeps score i of the tile, so the running max and
// sum are updated once per tile.
#pragma once
#include <math.h>
#include "../flash_params.h"

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

template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, const TensorStrides& s, int b, int h, int row) {
  return static_cast<const T*>(base) + b * s.batch + h * s.head + row * s.row;
}
template <typename T>
__device__ __forceinline__ T* row_ptr(void* base, const TensorStrides& s, int b, int h, int row) {
  return static_cast<T*>(base) + b * s.batch + h * s.head + row * s.row;
}

// Keys [0, result) visible to query `row`.
__device__ __forceinline__ int visible_keys(const MaskParams& mask, int row, int seqlen_k) {
  return mask.is_causal ? max(0, min(seqlen_k, row + mask.causal_offset + 1)) : seqlen_k;
}

}  // namespace simt

template <typename T, int kChunks>
__global__ void __launch_bounds__(32 * simt::kWarps) flash_fwd_simt_kernel(const FlashFwdParams p) {
  using namespace simt;
  const AttentionShape& sh = p.shape;
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / (sh.heads_q / sh.heads_kv);
  if (row >= sh.seqlen_q) return;
  const T scale = static_cast<T>(p.scale);
  WarpRow<T, kChunks> q, o, kv;
  q.load(row_ptr<T>(p.q, p.q_strides, b, h, row), sh.head_dim, lane);
  o.zero();
  T row_max = -INFINITY, row_sum = 0;
  const int n_end = visible_keys(p.mask, row, sh.seqlen_k);
  for (int j0 = 0; j0 < n_end; j0 += 32) {
    const int count = min(32, n_end - j0);
    T my_score = -INFINITY;
    for (int jj = 0; jj < count; ++jj) {
      kv.load(row_ptr<T>(p.k, p.k_strides, b, h_kv, j0 + jj), sh.head_dim, lane);
      const T s = q.dot(kv) * scale;
      if (lane == jj) my_score = s;
    }
    const T tile_max = fmax(row_max, warp_max(my_score));
    const T base = tile_max == -INFINITY ? T(0) : tile_max;
    const T alpha = exp(row_max - base);
    const T prob = exp(my_score - base);
    row_sum = row_sum * alpha + warp_sum(prob);
    row_max = tile_max;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) o.x[c] *= alpha;
    for (int jj = 0; jj < count; ++jj) {
      kv.load(row_ptr<T>(p.v, p.v_strides, b, h_kv, j0 + jj), sh.head_dim, lane);
      o.axpy(__shfl_sync(kFull, prob, jj), kv);
    }
  }
  const bool seen = row_sum > T(0);
  o.store(row_ptr<T>(p.out, p.out_strides, b, h, row), sh.head_dim, lane, seen ? T(1) / row_sum : T(0));
  if (lane == 0)
    static_cast<T*>(p.lse)[(static_cast<int64_t>(b) * sh.heads_q + h) * sh.seqlen_q + row] =
        seen ? row_max + log(row_sum) : T(-INFINITY);
}

template <typename T, int kChunks>
__global__ void __launch_bounds__(32 * simt::kWarps) flash_bwd_dq_simt_kernel(const FlashBwdParams p) {
  using namespace simt;
  const AttentionShape& sh = p.shape;
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / (sh.heads_q / sh.heads_kv);
  if (row >= sh.seqlen_q) return;
  const T scale = static_cast<T>(p.scale);
  const int64_t stat = (static_cast<int64_t>(b) * sh.heads_q + h) * sh.seqlen_q + row;
  const T lse = static_cast<const T*>(p.lse)[stat], delta = static_cast<const T*>(p.delta)[stat];
  WarpRow<T, kChunks> q, dout, dq, k, v;
  q.load(row_ptr<T>(p.q, p.q_strides, b, h, row), sh.head_dim, lane);
  dout.load(row_ptr<T>(p.dout, p.dout_strides, b, h, row), sh.head_dim, lane);
  dq.zero();
  const int n_end = lse == -INFINITY ? 0 : visible_keys(p.mask, row, sh.seqlen_k);
  for (int j = 0; j < n_end; ++j) {
    k.load(row_ptr<T>(p.k, p.k_strides, b, h_kv, j), sh.head_dim, lane);
    v.load(row_ptr<T>(p.v, p.v_strides, b, h_kv, j), sh.head_dim, lane);
    const T prob = exp(q.dot(k) * scale - lse);
    dq.axpy(prob * (dout.dot(v) - delta), k);
  }
  dq.store(row_ptr<T>(p.dq, p.dq_strides, b, h, row), sh.head_dim, lane, scale);
}

template <typename T, int kChunks>
__global__ void __launch_bounds__(32 * simt::kWarps) flash_bwd_dkdv_simt_kernel(const FlashBwdParams p) {
  using namespace simt;
  const AttentionShape& sh = p.shape;
  const int key = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / (sh.heads_q / sh.heads_kv);
  if (key >= sh.seqlen_k) return;
  const T scale = static_cast<T>(p.scale);
  WarpRow<T, kChunks> k, v, q, dout, dk, dv;
  k.load(row_ptr<T>(p.k, p.k_strides, b, h_kv, key), sh.head_dim, lane);
  v.load(row_ptr<T>(p.v, p.v_strides, b, h_kv, key), sh.head_dim, lane);
  dk.zero();
  dv.zero();
  const int64_t stats = (static_cast<int64_t>(b) * sh.heads_q + h) * sh.seqlen_q;
  const int first_row = p.mask.is_causal ? max(0, key - p.mask.causal_offset) : 0;
  for (int i = first_row; i < sh.seqlen_q; ++i) {
    const T lse = static_cast<const T*>(p.lse)[stats + i];
    if (lse == -INFINITY) continue;  // a row that saw no key contributes nothing
    q.load(row_ptr<T>(p.q, p.q_strides, b, h, i), sh.head_dim, lane);
    dout.load(row_ptr<T>(p.dout, p.dout_strides, b, h, i), sh.head_dim, lane);
    const T prob = exp(q.dot(k) * scale - lse);
    dv.axpy(prob, dout);
    dk.axpy(prob * (dout.dot(v) - static_cast<const T*>(p.delta)[stats + i]), q);
  }
  dk.store(row_ptr<T>(p.dk, p.dk_strides, b, h, key), sh.head_dim, lane, scale);
  dv.store(row_ptr<T>(p.dv, p.dv_strides, b, h, key), sh.head_dim, lane, T(1));
}

}  // namespace cuflash
