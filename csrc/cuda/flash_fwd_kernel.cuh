// Forward attention on tensor cores (mma.sync, sm_80+): one CTA per (64 query rows, head,
// batch); K/V tiles double-buffered through shared memory with cp.async; online softmax in
// registers; P stays in registers for P V; no N x N buffer anywhere.
#pragma once
#include "../flash_params.h"
#include "mask.cuh"
#include "mma_sm80.cuh"
#include "online_softmax.cuh"
#include "tile_shapes.h"

namespace cuflash {

template <typename T, int kHeadDim>
struct FwdKernel {
  using Tile = FwdTile<kHeadDim>;
  static constexpr int kWarps = Tile::kWarps, kThreads = 32 * kWarps;
  static constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN;
  using QTile = SmemTile<T, kBlockM, kHeadDim>;
  using KVTile = SmemTile<T, kBlockN, kHeadDim>;
  static constexpr int kSmemBytes = (QTile::kElems + 4 * KVTile::kElems) * sizeof(T);
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(FwdKernel<T, kHeadDim>::kThreads)
    flash_fwd_kernel(const FlashFwdParams p) {
  using K = FwdKernel<T, kHeadDim>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kThreads = K::kThreads;
  extern __shared__ __align__(16) char smem[];
  const typename K::QTile sQ{reinterpret_cast<T*>(smem)};
  // Double-buffered K and V: buffer i of K at kv_base + i * stride, V after both.
  T* kv_base = sQ.ptr + K::QTile::kElems;
  auto sK = [&](int buf) { return typename K::KVTile{kv_base + buf * K::KVTile::kElems}; };
  auto sV = [&](int buf) { return typename K::KVTile{kv_base + (2 + buf) * K::KVTile::kElems}; };

  const AttentionShape& sh = p.shape;
  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int h_kv = h / (sh.heads_q / sh.heads_kv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m_start = m_block * kBlockM;

  const T* q = static_cast<const T*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides.batch + h_kv * p.k_strides.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides.batch + h_kv * p.v_strides.head;
  const int n_blocks =
      key_blocks_for_queries(p.mask, m_start, kBlockM, sh.seqlen_q, sh.seqlen_k, kBlockN);

  auto load_kv = [&](int n_block, int buf) {
    const int n0 = n_block * kBlockN, rows = sh.seqlen_k - n0;
    sK(buf).template load_async<kThreads>(k + n0 * p.k_strides.row, p.k_strides.row, rows, sh.head_dim, tid);
    sV(buf).template load_async<kThreads>(v + n0 * p.v_strides.row, p.v_strides.row, rows, sh.head_dim, tid);
  };

  WarpAcc<kHeadDim> o;
  o.zero();
  const float scale_log2 = static_cast<float>(p.scale) * 1.4426950408889634f;
  OnlineSoftmax softmax;
  const int row0 = m_start + warp * 16;  // first query row of this warp

  if (n_blocks > 0) {
    sQ.template load_async<kThreads>(q + m_start * p.q_strides.row, p.q_strides.row,
                                     sh.seqlen_q - m_start, sh.head_dim, tid);
    // Keys are visited last block first, so the masked (diagonal, ragged) blocks come first.
    load_kv(n_blocks - 1, 0);
    cp_async_commit();
    for (int it = 0; it < n_blocks; ++it) {
      const int n_block = n_blocks - 1 - it, buf = it & 1;
      cp_async_wait_all();
      __syncthreads();  // this block's K/V landed; every warp is done with the other buffer
      if (n_block > 0) load_kv(n_block - 1, buf ^ 1);
      cp_async_commit();

      WarpAcc<kBlockN> s;
      s.zero();
      warp_gemm_abt<T, kHeadDim, kBlockN>(s, sQ, warp * 16, sK(buf), 0, lane);
      const int n0 = n_block * kBlockN;
      scale_scores(s, scale_log2);
      if (block_needs_mask(p.mask, row0, n0, kBlockN, sh.seqlen_k))
        apply_mask(s, p.mask, row0, n0, sh.seqlen_k, lane);
      softmax.rescale_and_exp(s, o);
      warp_gemm_rb<T, kBlockN, kHeadDim>(o, s, sV(buf), 0, lane);
    }
  }

  float inv_l[2], lse[2];
  softmax.finalize(inv_l, lse);
  // Each warp reuses its own rows of sQ (read only by this warp) to stage the output.
  T* out = static_cast<T*>(p.out) + b * p.out_strides.batch + h * p.out_strides.head;
  warp_store_rows<T, kHeadDim>(o, inv_l, sQ, warp * 16, out + row0 * p.out_strides.row,
                               p.out_strides.row, sh.seqlen_q - row0, sh.head_dim, lane);
  if ((lane & 3) == 0) {
    float* lse_out = static_cast<float*>(p.lse) + (static_cast<int64_t>(b) * sh.heads_q + h) * sh.seqlen_q;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + (lane >> 2) + 8 * r;
      if (row < sh.seqlen_q) lse_out[row] = lse[r];
    }
  }
}

}  // namespace cuflash
