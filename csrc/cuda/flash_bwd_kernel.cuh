// Backward attention on tensor cores (mma.sync, sm_80+), recomputing P from q, k and the
// saved logsumexp; no attention matrix is stored. Deterministic by default: two kernels, so that
// no CTA needs another's partial sums:
//   dQ kernel:    queries resident, keys streamed:   S = Q K^T, dP = dO V^T, dQ += dS K
//   dK/dV kernel: keys resident, queries of every query head of the key's group streamed
//                 (GQA sums there, with no atomics): S^T = K Q^T, dP^T = V dO^T,
//                                                     dV += (P z)^T dO, dK += dS^T Q
// Both keep every operand of their matmuls in the layouts mma wants, so P and dS go from
// the accumulators straight back into registers as A operands, never through shared memory.
// delta = rowsum(dO * O) - dlse is computed first by a small kernel (which also zeroes
// p.dq_accum). z is the dropout factor.
// With p.dq_accum (5 matmuls instead of 7, not bitwise reproducible), the dQ kernel is not run:
// the dK/dV kernel stages dS in shared memory and adds dQ += dS K to an fp32 buffer with atomics,
// and flash_bwd_dq_convert_kernel writes dq from it.
#pragma once
#include <type_traits>
#include "../flash_params.h"
#include "fp32_pair_tiles.cuh"
#include "mask.cuh"
#include "mma_sm80.cuh"
#include "online_softmax.cuh"
#include "tile_shapes.h"

namespace cuflash {

// lse in the scaled log2 domain; a row that saw no key (lse = -inf) becomes +inf, so that
// exp2(s - lse) = 0 for every key of it.
__device__ __forceinline__ float lse_to_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// lse (scaled log2) and delta of this lane's two rows (row0 + lane / 4, + 8) of a warp tile;
// rows past the sequence get lse +inf (P = 0) and delta 0.
__device__ __forceinline__ void lane_row_stats(const FlashBwdParams& p, const Sequence& seq, int b, int h, int row0,
                                               int lane, float (&lse2)[2], float (&delta)[2]) {
  const int64_t stats = stats_offset(p.stats_strides, seq, b, h);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + (lane >> 2) + 8 * r;
    const bool valid = row < seq.seqlen_q;
    lse2[r] = valid ? lse_to_log2(static_cast<const float*>(p.lse)[stats + row]) : INFINITY;
    delta[r] = valid ? static_cast<const float*>(p.delta)[stats + row] : 0.f;
  }
}
// The same for rows m0 .. m0 + kRows of head h into shared memory, by all kThreads threads.
template <int kRows, int kThreads>
__device__ __forceinline__ void block_row_stats(const FlashBwdParams& p, const Sequence& seq, int b, int h, int m0,
                                                int tid, float* lse2, float* delta) {
  const int64_t stats = stats_offset(p.stats_strides, seq, b, h) + m0;
  for (int i = tid; i < kRows; i += kThreads) {
    const bool valid = m0 + i < seq.seqlen_q;
    lse2[i] = valid ? lse_to_log2(static_cast<const float*>(p.lse)[stats + i]) : INFINITY;
    delta[i] = valid ? static_cast<const float*>(p.delta)[stats + i] : 0.f;
  }
}

// The backward's row kernels (delta, the dQ conversion) give each query row a group of lanes,
// each lane a chunk of kVec elements at a time: 16 bytes where every row they touch starts
// 16-byte aligned (the launch checks), so that a warp reads whole 128-byte lines (head dim 64 in
// 16 bits: 8 lanes a row, four rows a warp), else kVec = 1. One warp a row with scalar loads
// ran at a quarter (head dim 64) to a half (128) of HBM's bandwidth (benchmarks/NOTES.md).
constexpr int kRowKernelThreads = 256;
// Lanes a row: enough for one chunk each, a power of two up to a warp.
__host__ __device__ inline int row_lanes(int head_dim, int vec) {
  const int chunks = (head_dim + vec - 1) / vec;
  int lanes = 1;
  while (lanes < chunks && lanes < 32) lanes *= 2;
  return lanes;
}
__host__ __device__ inline int rows_per_row_block(int head_dim, int vec) {
  return kRowKernelThreads / row_lanes(head_dim, vec);
}
// kVec elements of T, loaded and stored as one (or, past 16 bytes, a few 16-byte) accesses.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec > 16 ? 16 : sizeof(T) * kVec) Chunk {
  T v[kVec];
};

// delta = sum_d dO * O (minus dlse, the gradient of the returned lse, which enters dS = P (dP -
// delta) the same way); and, with p.dq_accum, that row of the fp32 dQ buffer zeroed, since this
// kernel runs before any that add to it (one pass instead of a separate fill).
template <typename T, typename Acc, int kVec>
__global__ void __launch_bounds__(kRowKernelThreads) flash_bwd_delta_kernel(const FlashBwdParams p) {
  const int head_dim = p.shape.head_dim, lanes = row_lanes(head_dim, kVec);
  const int row = blockIdx.x * (kRowKernelThreads / lanes) + threadIdx.x / lanes, lane = threadIdx.x % lanes;
  const int h = blockIdx.y, b = blockIdx.z;
  const Sequence seq = sequence_of(p, b);
  const bool valid = row < seq.seqlen_q;  // no early return: the sum's shuffles span the warp
  Acc sum = 0;
  if (valid) {
    const auto* o = reinterpret_cast<const Chunk<T, kVec>*>(row_at<const T>(p.out, p.out_strides, seq, true, b, h, row));
    const auto* dout =
        reinterpret_cast<const Chunk<T, kVec>*>(row_at<const T>(p.dout, p.dout_strides, seq, true, b, h, row));
    for (int c = lane; c < head_dim / kVec; c += lanes) {
      const Chunk<T, kVec> x = o[c], y = dout[c];
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum += to_acc<Acc>(x.v[i]) * to_acc<Acc>(y.v[i]);
    }
    if (p.dq_accum != nullptr) {
      constexpr int kFloats = kVec < 4 ? kVec : 4;  // 16 bytes of fp32 at a time where aligned
      auto* acc = reinterpret_cast<Chunk<float, kFloats>*>(
          row_at<float>(p.dq_accum, p.dq_accum_strides, seq, true, b, h, row));
      for (int c = lane; c < head_dim / kFloats; c += lanes) acc[c] = Chunk<float, kFloats>{};
    }
  }
  for (int offset = lanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (valid && lane == 0) {
    const int64_t idx = stats_offset(p.stats_strides, seq, b, h) + row;
    if (p.dlse) sum -= static_cast<const Acc*>(p.dlse)[idx];
    static_cast<Acc*>(p.delta)[idx] = sum;
  }
}

// dq = scale * dq_accum, in dq's type and layout.
template <typename T, int kVec>
__global__ void __launch_bounds__(kRowKernelThreads) flash_bwd_dq_convert_kernel(const FlashBwdParams p) {
  const int head_dim = p.shape.head_dim, lanes = row_lanes(head_dim, kVec);
  const int row = blockIdx.x * (kRowKernelThreads / lanes) + threadIdx.x / lanes, lane = threadIdx.x % lanes;
  const int h = blockIdx.y, b = blockIdx.z;
  const Sequence seq = sequence_of(p, b);
  if (row >= seq.seqlen_q) return;
  const auto* acc = reinterpret_cast<const Chunk<float, kVec>*>(
      row_at<const float>(p.dq_accum, p.dq_accum_strides, seq, true, b, h, row));
  auto* dq = reinterpret_cast<Chunk<T, kVec>*>(row_at<T>(p.dq, p.dq_strides, seq, true, b, h, row));
  const float scale = static_cast<float>(p.scale);
  for (int c = lane; c < head_dim / kVec; c += lanes) {
    const Chunk<float, kVec> a = acc[c];
    Chunk<T, kVec> out;
#pragma unroll
    for (int i = 0; i < kVec; ++i) out.v[i] = from_float<T>(a.v[i] * scale);
    dq[c] = out;
  }
}

// Fp32Pair (float32 as fp16 pairs, fp32_pairs.h): each row of q, k, v and dout comes split at a
// power of two of its own; S and dP take back their rows' and columns' (scale_tile), and the rows
// dV, dK and dQ sum over become the column factors of P and dS (warp_gemm_rb).

template <typename T, int kHeadDim>
struct BwdDqKernel {
  using Tile = BwdTileOf<T, kHeadDim>;
  static constexpr int kThreads = 32 * Tile::kWarps;
  static constexpr int kBlockM = Tile::kDqBlockM, kBlockN = Tile::kDqBlockN;
  using QTile = SmemTileOf<T, kBlockM, kHeadDim>;
  using KVTile = SmemTileOf<T, kBlockN, kHeadDim>;
  // Fp32Pair: the rows' scales after the tiles (q's, dout's, then k's and v's of each buffer).
  static constexpr int kPairScales = kIsPair<T> ? 2 * kBlockM + 4 * kBlockN : 0;
  static constexpr int kSmemBytes = (2 * QTile::kElems + 4 * KVTile::kElems) * sizeof(T) + kPairScales * 4;
};

template <typename T, int kHeadDim, bool kFeatures>
__global__ void __launch_bounds__(BwdDqKernel<T, kHeadDim>::kThreads)
    flash_bwd_dq_kernel(const FlashBwdParams p) {
  using K = BwdDqKernel<T, kHeadDim>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kThreads = K::kThreads;
  extern __shared__ __align__(16) char smem[];
  const typename K::QTile sQ{reinterpret_cast<T*>(smem)};
  const typename K::QTile sdO{sQ.ptr + K::QTile::kElems};
  T* kv_base = sdO.ptr + K::QTile::kElems;
  auto sK = [&](int buf) { return typename K::KVTile{kv_base + buf * K::KVTile::kElems}; };
  auto sV = [&](int buf) { return typename K::KVTile{kv_base + (2 + buf) * K::KVTile::kElems}; };

  const AttentionShape& sh = p.shape;
  const int m_block = query_block_longest_first(), h = blockIdx.y, b = blockIdx.z;
  const int h_kv = h / (sh.heads_q / sh.heads_kv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m_start = m_block * kBlockM, row0 = m_start + warp * 16;
  const Sequence seq = sequence_of(p, b);
  if (m_start >= seq.seqlen_q) return;

  const T* q = row_at<const T>(p.q, p.q_strides, seq, true, b, h, 0);
  const T* dout = row_at<const T>(p.dout, p.dout_strides, seq, true, b, h, 0);
  const T* k = row_at<const T>(p.k, p.k_strides, seq, false, b, h_kv, 0);
  const T* v = row_at<const T>(p.v, p.v_strides, seq, false, b, h_kv, 0);
  float lse2[2], delta[2];
  lane_row_stats(p, seq, b, h, row0, lane, lse2, delta);

  float* const sQScale = reinterpret_cast<float*>(kv_base + 4 * K::KVTile::kElems);  // Fp32Pair's (K::kPairScales)
  float* const sDoutScale = sQScale + kBlockM;
  auto sKScale = [&](int buf) { return sDoutScale + kBlockM + buf * kBlockN; };
  auto sVScale = [&](int buf) { return sDoutScale + kBlockM + (2 + buf) * kBlockN; };
  auto load_kv = [&](int n_block, int buf) {
    const int n0 = n_block * kBlockN, rows = seq.seqlen_k - n0;
    sK(buf).template load_async<kThreads>(k + n0 * p.k_strides.row, p.k_strides.row, rows, sh.head_dim, tid);
    sV(buf).template load_async<kThreads>(v + n0 * p.v_strides.row, p.v_strides.row, rows, sh.head_dim, tid);
    if constexpr (kIsPair<T>) {
      stage_row_unscales<kBlockN, kThreads>(sKScale(buf), p.pair_scales.k, seq, false, b, h_kv, n0, seq.seqlen_k, tid);
      stage_row_unscales<kBlockN, kThreads>(sVScale(buf), p.pair_scales.v, seq, false, b, h_kv, n0, seq.seqlen_k, tid);
    }
  };

  const ScoreMod<UserType<T>> mod(p, b, h);
  const bool dropout = kFeatures && p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};
  // The score gradients (for attn_mask's) come from this kernel: it visits every score once.
  float* dscores = kFeatures && p.dscores ? static_cast<float*>(p.dscores) + dscores_offset(sh, b, h, 0) : nullptr;
  const MaskParams mask = unpacked_mask(p.mask);  // rows_per_query a compile-time 1
  const Range n_blocks = key_blocks(mask, seq, m_start, min(m_start + kBlockM, seq.seqlen_q), kBlockN);
  WarpAcc<kHeadDim> dq;
  dq.zero();
  if (n_blocks.end > n_blocks.begin) {
    const int rows = seq.seqlen_q - m_start;
    sQ.template load_async<kThreads>(q + m_start * p.q_strides.row, p.q_strides.row, rows, sh.head_dim, tid);
    sdO.template load_async<kThreads>(dout + m_start * p.dout_strides.row, p.dout_strides.row, rows,
                                      sh.head_dim, tid);
    if constexpr (kIsPair<T>) {
      stage_row_unscales<kBlockM, kThreads>(sQScale, p.pair_scales.q, seq, true, b, h, m_start, seq.seqlen_q, tid);
      stage_row_unscales<kBlockM, kThreads>(sDoutScale, p.pair_scales.dout, seq, true, b, h, m_start, seq.seqlen_q,
                                            tid);
    }
    load_kv(n_blocks.begin, 0);
    cp_async_commit();
    for (int n_block = n_blocks.begin, buf = 0; n_block < n_blocks.end; ++n_block, buf ^= 1) {
      cp_async_wait_all();
      __syncthreads();
      if (n_block + 1 < n_blocks.end) load_kv(n_block + 1, buf ^ 1);
      cp_async_commit();

      WarpAcc<kBlockN> s, dp;
      s.zero();
      dp.zero();
      warp_gemm_abt<T, kHeadDim, kBlockN>(s, sQ, warp * 16, sK(buf), 0, lane);
      warp_gemm_abt<T, kHeadDim, kBlockN>(dp, sdO, warp * 16, sV(buf), 0, lane);
      if constexpr (kIsPair<T>) {  // the rows' scales of q and dout, the columns' of k and v
        scale_tile(s, sQScale + warp * 16, ColumnUnscales{sKScale(buf), lane});
        scale_tile(dp, sDoutScale + warp * 16, ColumnUnscales{sVScale(buf), lane});
      }
      auto row_lse2 = [&](int, int e) { return lse2[e >> 1]; };
      auto row_delta = [&](int, int e) { return delta[e >> 1]; };
      if constexpr (kFeatures) {
        probs_and_ds_with_features<false, true>(s, dp, mod, mask, seq, dropout, rng, b, h, sh.heads_q, row0,
                                                n_block * kBlockN, lane, row_lse2, row_delta, dscores, sh.seqlen_k);
      } else {
        probs_from_qk<false>(s, mod.scale_log2, mask, seq, row0, n_block * kBlockN, lane, row_lse2);
        ds_from_dp(dp, s, row_delta);
      }
      // (k's scales as dS's column factors: Fp32Pair's; the other types ignore them)
      warp_gemm_rb<T, kBlockN, kHeadDim>(dq, dp, sK(buf), 0, lane, ColumnUnscales{sKScale(buf), lane});
    }
  }
  const float row_scale[2] = {static_cast<float>(p.scale), static_cast<float>(p.scale)};
  UserType<T>* dq_out = row_at<UserType<T>>(p.dq, p.dq_strides, seq, true, b, h, 0);
  warp_store_rows<UserType<T>, kHeadDim>(dq, row_scale, staging_of(sQ), warp * 16, dq_out + row0 * p.dq_strides.row,
                                         p.dq_strides.row, seq.seqlen_q - row0, sh.head_dim, lane);
}

template <typename T, int kHeadDim>
struct BwdDkvKernel {
  using Tile = BwdTileOf<T, kHeadDim>;
  static constexpr int kThreads = 32 * Tile::kWarps;
  static constexpr int kBlockM = Tile::kDkvBlockM, kBlockN = Tile::kDkvBlockN;
  using KVTile = SmemTileOf<T, kBlockN, kHeadDim>;
  using QTile = SmemTileOf<T, kBlockM, kHeadDim>;
  // Fp32Pair: the rows' scales after lse and delta (k's, v's, then q's and dout's of each buffer).
  static constexpr int kPairScales = kIsPair<T> ? 2 * kBlockN + 4 * kBlockM : 0;
  static constexpr int kSmemBytes =
      (2 * KVTile::kElems + 4 * QTile::kElems) * sizeof(T) + (4 * kBlockM + kPairScales) * sizeof(float);
  // With p.dq_accum: dS of one step, [queries][keys], after the rest.
  using DsTile = SmemTile<T, kBlockM, kBlockN>;
  static constexpr int kSmemBytesAccumDq = kSmemBytes + DsTile::kElems * sizeof(T);
};

// kAccumDq (with p.dq_accum, and dK): dQ too, by atomics; its own instantiation, so that the
// deterministic kernel's registers do not pay for it.
template <typename T, int kHeadDim, bool kFeatures, bool kComputeDk, bool kComputeDv, bool kAccumDq>
__global__ void __launch_bounds__(BwdDkvKernel<T, kHeadDim>::kThreads)
    flash_bwd_dkdv_kernel(const FlashBwdParams p) {
  static_assert(!kAccumDq || kComputeDk, "dQ comes from dS, which the dK pass computes");
  static_assert(!kAccumDq || !kIsPair<T>, "float32 never adds dQ up (launch_bwd_sm80)");
  using K = BwdDkvKernel<T, kHeadDim>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kThreads = K::kThreads;
  extern __shared__ __align__(16) char smem[];
  const typename K::KVTile sK{reinterpret_cast<T*>(smem)};
  const typename K::KVTile sV{sK.ptr + K::KVTile::kElems};
  T* q_base = sV.ptr + K::KVTile::kElems;
  auto sQ = [&](int buf) { return typename K::QTile{q_base + buf * K::QTile::kElems}; };
  auto sdO = [&](int buf) { return typename K::QTile{q_base + (2 + buf) * K::QTile::kElems}; };
  float* sLse2 = reinterpret_cast<float*>(q_base + 4 * K::QTile::kElems);  // [2][kBlockM]
  float* sDelta = sLse2 + 2 * kBlockM;                                      // [2][kBlockM]
  float* const sKScale = sDelta + 2 * kBlockM;  // Fp32Pair's (K::kPairScales)
  float* const sVScale = sKScale + kBlockN;
  auto sQScale = [&](int buf) { return sVScale + kBlockN + buf * kBlockM; };
  auto sDoutScale = [&](int buf) { return sVScale + kBlockN + (2 + buf) * kBlockM; };
  const typename K::DsTile sdS{reinterpret_cast<T*>(sDelta + 2 * kBlockM + K::kPairScales)};  // only with kAccumDq

  const AttentionShape& sh = p.shape;
  const int n_block = blockIdx.x, h_kv = blockIdx.y, b = blockIdx.z;
  const int group = sh.heads_q / sh.heads_kv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int n_start = n_block * kBlockN, key0 = n_start + warp * 16;
  const Sequence seq = sequence_of(p, b);
  if (n_start >= seq.seqlen_k) return;

  const T* k = row_at<const T>(p.k, p.k_strides, seq, false, b, h_kv, 0);
  const T* v = row_at<const T>(p.v, p.v_strides, seq, false, b, h_kv, 0);
  // The query blocks these keys are visible to, for each query head of the group in turn: step
  // t is head h_kv * group + t / per_head, block m.begin + t % per_head.
  const MaskParams mask = unpacked_mask(p.mask);  // rows_per_query a compile-time 1
  const Range m = query_blocks(mask, seq, n_start, min(n_start + kBlockN, seq.seqlen_k), kBlockM);
  const int per_head = m.end - m.begin, steps = per_head * group;
  auto head_of = [&](int step) { return h_kv * group + step / per_head; };
  auto block_of = [&](int step) { return m.begin + step % per_head; };

  auto load_queries = [&](int step, int buf) {
    const int h = head_of(step), m0 = block_of(step) * kBlockM, rows = seq.seqlen_q - m0;
    const T* q = row_at<const T>(p.q, p.q_strides, seq, true, b, h, m0);
    const T* dout = row_at<const T>(p.dout, p.dout_strides, seq, true, b, h, m0);
    sQ(buf).template load_async<kThreads>(q, p.q_strides.row, rows, sh.head_dim, tid);
    sdO(buf).template load_async<kThreads>(dout, p.dout_strides.row, rows, sh.head_dim, tid);
    block_row_stats<kBlockM, kThreads>(p, seq, b, h, m0, tid, sLse2 + buf * kBlockM, sDelta + buf * kBlockM);
    if constexpr (kIsPair<T>) {
      stage_row_unscales<kBlockM, kThreads>(sQScale(buf), p.pair_scales.q, seq, true, b, h, m0, seq.seqlen_q, tid);
      stage_row_unscales<kBlockM, kThreads>(sDoutScale(buf), p.pair_scales.dout, seq, true, b, h, m0, seq.seqlen_q,
                                            tid);
    }
  };

  // dQ += dS K for this step's queries (head h, rows m0..) over the CTA's keys. Each warp holds
  // dS^T of its own 16 keys only, so dS goes through shared memory ([query][key]); then each
  // warp takes 16-column slices of dQ over all kBlockM rows and adds them to dq_accum (unscaled).
  auto add_dq_share = [&](const auto& ds_t, int h, int m0) {  // generic: instantiated only with kAccumDq
    using Acc = WarpAcc<kBlockM>;
#pragma unroll
    for (int j = 0; j < Acc::kTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        *sdS.at(Acc::col_of(j, e, lane), warp * 16 + Acc::row_of(e, lane)) = from_float<T>(ds_t.v[j][e]);
    __syncthreads();
    constexpr int kRowTiles = kBlockM / 16;
    float* acc_rows = row_at<float>(p.dq_accum, p.dq_accum_strides, seq, true, b, h, m0);
    const int rows_valid = seq.seqlen_q - m0;
    for (int slice = warp; slice < kHeadDim / 16; slice += K::Tile::kWarps) {
      WarpAcc<16> part[kRowTiles];
#pragma unroll
      for (int m = 0; m < kRowTiles; ++m) part[m].zero();
      warp_gemm_ab<T, kBlockN, 16, kRowTiles>(part, sdS, 0, sK, slice * 16, lane);
#pragma unroll
      for (int m = 0; m < kRowTiles; ++m)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = 16 * m + WarpAcc<16>::row_of(e, lane);
            const int col = slice * 16 + WarpAcc<16>::col_of(j, e, lane);
            if (row < rows_valid && col < sh.head_dim)
              atomicAdd(acc_rows + row * p.dq_accum_strides.row + col, part[m].v[j][e]);
          }
    }
  };

  const bool dropout = kFeatures && p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};
  WarpAcc<kHeadDim> dk, dv;
  dk.zero();
  dv.zero();
  if (steps > 0) {
    const int rows = seq.seqlen_k - n_start;
    sK.template load_async<kThreads>(k + n_start * p.k_strides.row, p.k_strides.row, rows, sh.head_dim, tid);
    if (kComputeDk)
      sV.template load_async<kThreads>(v + n_start * p.v_strides.row, p.v_strides.row, rows, sh.head_dim, tid);
    if constexpr (kIsPair<T>) {
      stage_row_unscales<kBlockN, kThreads>(sKScale, p.pair_scales.k, seq, false, b, h_kv, n_start, seq.seqlen_k, tid);
      stage_row_unscales<kBlockN, kThreads>(sVScale, p.pair_scales.v, seq, false, b, h_kv, n_start, seq.seqlen_k, tid);
    }
    load_queries(0, 0);
    cp_async_commit();
    for (int step = 0, buf = 0; step < steps; ++step, buf ^= 1) {
      cp_async_wait_all();
      __syncthreads();
      if (step + 1 < steps) load_queries(step + 1, buf ^ 1);
      cp_async_commit();

      const int h = head_of(step), m0 = block_of(step) * kBlockM;
      const float* lse2 = sLse2 + buf * kBlockM;
      const float* delta = sDelta + buf * kBlockM;
      WarpAcc<kBlockM> s, dp;  // S^T and dP^T: 16 keys x kBlockM queries
      s.zero();
      warp_gemm_abt<T, kHeadDim, kBlockM>(s, sK, warp * 16, sQ(buf), 0, lane);
      // Fp32Pair: S^T and dP^T take back their rows' (k's, v's) and columns' (q's, dout's) scales;
      // dout's and q's are the column factors of dV += (P z)^T dO and dK += dS^T Q (the other types
      // ignore them).
      const ColumnUnscales q_unscale{sQScale(buf), lane}, dout_unscale{sDoutScale(buf), lane};
      if constexpr (kIsPair<T>) scale_tile(s, sKScale + warp * 16, q_unscale);
      auto v_dout_t = [&] {  // dP^T
        dp.zero();
        warp_gemm_abt<T, kHeadDim, kBlockM>(dp, sV, warp * 16, sdO(buf), 0, lane);
        if constexpr (kIsPair<T>) scale_tile(dp, sVScale + warp * 16, dout_unscale);
      };
      auto col_lse2 = [&](int j, int e) { return lse2[WarpAcc<kBlockM>::col_of(j, e, lane)]; };
      auto col_delta = [&](int j, int e) { return delta[WarpAcc<kBlockM>::col_of(j, e, lane)]; };
      if constexpr (kFeatures) {
        if (kComputeDk) v_dout_t();
        // s becomes the kept P^T (dropped elements zero), dp becomes dS^T.
        probs_and_ds_with_features<true, kComputeDk>(s, dp, ScoreMod<UserType<T>>(p, b, h), mask, seq, dropout,
                                                     rng, b, h, sh.heads_q, key0, m0, lane, col_lse2, col_delta);
        if (kComputeDv) warp_gemm_rb<T, kBlockM, kHeadDim>(dv, s, sdO(buf), 0, lane, dout_unscale);
      } else {
        // P^T feeds dV before dP^T is computed, so the two tiles are never live together.
        probs_from_qk<true>(s, static_cast<float>(p.scale) * kLog2e, mask, seq, key0, m0, lane, col_lse2);
        if (kComputeDv) warp_gemm_rb<T, kBlockM, kHeadDim>(dv, s, sdO(buf), 0, lane, dout_unscale);
        if (kComputeDk) {
          v_dout_t();
          ds_from_dp(dp, s, col_delta);
        }
      }
      if constexpr (kAccumDq) add_dq_share(dp, h, m0);
      if (kComputeDk) warp_gemm_rb<T, kBlockM, kHeadDim>(dk, dp, sQ(buf), 0, lane, q_unscale);
    }
    if (kAccumDq) __syncthreads();  // every warp read all of sK for dQ before its rows are reused below
  }
  // Each warp stages its own rows of sK / sV (read only by this warp) for the stores.
  const int rows_valid = seq.seqlen_k - key0;
  using Out = UserType<T>;
  if (kComputeDk) {
    const float row_scale[2] = {static_cast<float>(p.scale), static_cast<float>(p.scale)};
    Out* dk_out = row_at<Out>(p.dk, p.dk_strides, seq, false, b, h_kv, key0);
    warp_store_rows<Out, kHeadDim>(dk, row_scale, staging_of(sK), warp * 16, dk_out, p.dk_strides.row, rows_valid,
                                   sh.head_dim, lane);
  }
  if (kComputeDv) {
    const float row_scale[2] = {rng.keep_scale, rng.keep_scale};  // kept P entered dV unscaled
    Out* dv_out = row_at<Out>(p.dv, p.dv_strides, seq, false, b, h_kv, key0);
    warp_store_rows<Out, kHeadDim>(dv, row_scale, staging_of(sV), warp * 16, dv_out, p.dv_strides.row, rows_valid,
                                   sh.head_dim, lane);
  }
}

}  // namespace cuflash
