// Forward attention on tensor cores (mma.sync, sm_80+): one CTA per (kBlockM query rows, head,
// batch), each warp owning kMTiles tiles of 16 rows; K/V tiles double-buffered through shared
// memory with cp.async; online softmax in registers; P stays in registers for P V; no N x N
// buffer anywhere. Only the key blocks the mask leaves visible are visited (attention_math.h).
#pragma once
#include "../flash_params.h"
#include "flash_launch.h"
#include "fp32_pair_tiles.cuh"
#include "mask.cuh"
#include "mma_sm80.cuh"
#include "online_softmax.cuh"
#include "tile_shapes.h"

namespace cuflash {

// Tile: FwdTile, or FwdSplitTile for split-KV's launches (flash_launch.cuh's SplitTile).
// T: __half, __nv_bfloat16, float (3xTF32) or Fp32Pair (float32 as fp16 pairs: fp32_pairs.h).
template <typename T, int kHeadDim, class TileShape = FwdTileOf<T, kHeadDim>>
struct FwdKernel {
  using Tile = TileShape;
  static constexpr int kWarps = Tile::kWarps, kThreads = 32 * kWarps, kMTiles = Tile::kMTiles;
  static constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN;
  using QTile = SmemTileOf<T, kBlockM, kHeadDim>;
  using KVTile = SmemTileOf<T, kBlockN, kHeadDim>;
  // Fp32Pair: the rows' scales after the tiles (q's, then k's and v's of each buffer).
  static constexpr int kPairScales = kIsPair<T> ? kBlockM + 4 * kBlockN : 0;
  static constexpr int kSmemBytes = (QTile::kElems + 4 * KVTile::kElems) * sizeof(T) + kPairScales * 4;
};

// The logsumexp of a warp's 16 rows (first row row0 of the sequence; OnlineSoftmax::finalize's).
__device__ __forceinline__ void store_lse(const float (&lse)[2], float* lse_out, int row0, int seqlen_q, int lane) {
  if ((lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + (lane >> 2) + 8 * r;
      if (row < seqlen_q) lse_out[row] = lse[r];
    }
  }
}

// A warp's 16 finished rows (first row row0 of the sequence): out = O / rowsum (times dropout's
// keep scale, 1 without), staged through rows stage_row.. of an smem tile, and the logsumexp of
// each row.
template <typename T, int kHeadDim, class Tile>
__device__ __forceinline__ void store_out_and_lse(const WarpAcc<kHeadDim>& o, const OnlineSoftmax& softmax,
                                                  float keep_scale, const Tile& stage, int stage_row, T* out,
                                                  int64_t out_row_stride, float* lse_out, int row0, int seqlen_q,
                                                  int head_dim, int lane) {
  float inv_l[2], lse[2];
  softmax.finalize(inv_l, lse, keep_scale);
  warp_store_rows<T, kHeadDim>(o, inv_l, stage, stage_row, out + row0 * out_row_stride, out_row_stride,
                               seqlen_q - row0, head_dim, lane);
  store_lse(lse, lse_out, row0, seqlen_q, lane);
}

// Split-KV (FlashFwdParams::num_splits): row i of sequence s, head h, split `split` in out_partial
// and lse_partial: padded [splits, batch, heads_q, seqlen_q], packed [splits, heads_q, total_q].
__host__ __device__ inline int64_t partial_row(const FlashFwdParams& p, const Sequence& s, int split, int b, int h,
                                               int i) {
  if (p.varlen.cu_seqlens_q) return (int64_t{split} * p.shape.heads_q + h) * p.varlen.total_q + s.q_row0 + i;
  return ((int64_t{split} * p.shape.batch + b) * p.shape.heads_q + h) * p.shape.seqlen_q + i;
}
// Split `split` of num_splits of a CTA's key blocks: consecutive ranges of equal length (the last
// ones shorter or empty).
__device__ __forceinline__ Range split_of(Range blocks, int split, int num_splits) {
  const int per = (blocks.end - blocks.begin + num_splits - 1) / num_splits;
  const int begin = min(blocks.begin + split * per, blocks.end);
  return Range{begin, min(begin + per, blocks.end)};
}

// A warp's 16 finished rows of one split: out = O / rowsum over the split's keys (times dropout's
// keep scale; float32, from registers) and the logsumexp of each row (-inf where the split saw no
// key).
template <int kHeadDim>
__device__ __forceinline__ void store_partial(const WarpAcc<kHeadDim>& o, const OnlineSoftmax& softmax,
                                              float keep_scale, const FlashFwdParams& p, const Sequence& seq,
                                              int split, int b, int h, int row0, int lane) {
  float inv_l[2], lse[2];
  softmax.finalize(inv_l, lse, keep_scale);
  const int head_dim = p.shape.head_dim;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + (lane >> 2) + 8 * r;
    if (row >= seq.seqlen_q) continue;
    const int64_t at = partial_row(p, seq, split, b, h, row);
    float* out = p.out_partial + at * head_dim;
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      const int col = 8 * j + 2 * (lane & 3);
      if (col < head_dim)
        *reinterpret_cast<float2*>(out + col) = make_float2(o.v[j][2 * r] * inv_l[r], o.v[j][2 * r + 1] * inv_l[r]);
    }
    if ((lane & 3) == 0) p.lse_partial[at] = lse[r];
  }
}

// kFeatures: softcap, ALiBi, attn_mask or dropout may be on (mask.cuh's needs_feature_path); without it
// the kernel keeps only what plain attention needs in registers.
template <typename T, int kHeadDim, bool kFeatures, class Tile = FwdTileOf<T, kHeadDim>>
__global__ void __launch_bounds__(FwdKernel<T, kHeadDim, Tile>::kThreads, Tile::kMinBlocks)
    flash_fwd_kernel(const FlashFwdParams p) {
  using K = FwdKernel<T, kHeadDim, Tile>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kThreads = K::kThreads, kMT = K::kMTiles;
  extern __shared__ __align__(16) char smem[];
  const typename K::QTile sQ{reinterpret_cast<T*>(smem)};
  // Double-buffered K and V: buffer i of K at kv_base + i * stride, V after both.
  T* kv_base = sQ.ptr + K::QTile::kElems;
  auto sK = [&](int buf) { return typename K::KVTile{kv_base + buf * K::KVTile::kElems}; };
  auto sV = [&](int buf) { return typename K::KVTile{kv_base + (2 + buf) * K::KVTile::kElems}; };
  float* const sQScale = reinterpret_cast<float*>(kv_base + 4 * K::KVTile::kElems);  // Fp32Pair's (K::kPairScales)
  auto sKScale = [&](int buf) { return sQScale + kBlockM + buf * kBlockN; };
  auto sVScale = [&](int buf) { return sQScale + kBlockM + (2 + buf) * kBlockN; };

  const AttentionShape& sh = p.shape;
  // Split-KV: grid z holds (sequence, split) pairs.
  const int m_block = query_block_longest_first(), h = blockIdx.y;
  const int b = blockIdx.z / p.num_splits, split = blockIdx.z % p.num_splits;
  const int h_kv = h / (sh.heads_q / sh.heads_kv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m_start = m_block * kBlockM;
  const Sequence seq = sequence_of(p, b);
  if (m_start >= seq.seqlen_q) return;  // a packed sequence shorter than the grid

  const T* q = row_at<const T>(p.q, p.q_strides, seq, true, b, h, 0);
  const T* k = key_rows<const T>(p, p.k, p.k_strides, seq, b, h_kv);
  const T* v = key_rows<const T>(p, p.v, p.v_strides, seq, b, h_kv);
  Range n_blocks = key_blocks(p.mask, seq, m_start, min(m_start + kBlockM, seq.seqlen_q), kBlockN);
  if (p.num_splits > 1) n_blocks = split_of(n_blocks, split, p.num_splits);
  if (p.tile_counters && tid == 0) count_tiles(p.tile_counters, seq, n_blocks, kBlockM, kBlockN);

  // A block's rows are consecutive (in one page of a paged cache: page_size % kBlockN == 0).
  static_assert(kPageSizeMultiple % kBlockN == 0, "a key block lies in one page");
  auto load_kv = [&](int n_block, int buf) {
    const int n0 = n_block * kBlockN, rows = seq.seqlen_k - n0;
    sK(buf).template load_async<kThreads>(k + key_offset(p, p.k_strides, b, n0), p.k_strides.row, rows,
                                          sh.head_dim, tid);
    sV(buf).template load_async<kThreads>(v + key_offset(p, p.v_strides, b, n0), p.v_strides.row, rows,
                                          sh.head_dim, tid);
    if constexpr (kIsPair<T>) {
      stage_row_unscales<kBlockN, kThreads>(sKScale(buf), p.pair_scales.k, seq, false, b, h_kv, n0, seq.seqlen_k, tid);
      stage_row_unscales<kBlockN, kThreads>(sVScale(buf), p.pair_scales.v, seq, false, b, h_kv, n0, seq.seqlen_k, tid);
    }
  };

  // Row tile m of this warp holds query rows row0 + 16 m ..
  WarpAcc<kHeadDim> o[kMT];
  OnlineSoftmax softmax[kMT];
#pragma unroll
  for (int m = 0; m < kMT; ++m) o[m].zero();
  const ScoreMod<UserType<T>> mod(p, b, h);
  const bool dropout = kFeatures && p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};
  const int warp_row = warp * 16 * kMT, row0 = m_start + warp_row;  // this warp's first row

  if (n_blocks.end > n_blocks.begin) {
    sQ.template load_async<kThreads>(q + m_start * p.q_strides.row, p.q_strides.row,
                                     seq.seqlen_q - m_start, sh.head_dim, tid);
    if constexpr (kIsPair<T>)
      stage_row_unscales<kBlockM, kThreads>(sQScale, p.pair_scales.q, seq, true, b, h, m_start, seq.seqlen_q, tid);
    // Keys are visited last block first, so the masked (diagonal, ragged) blocks come first.
    load_kv(n_blocks.end - 1, 0);
    cp_async_commit();
    for (int n_block = n_blocks.end - 1, buf = 0; n_block >= n_blocks.begin; --n_block, buf ^= 1) {
      cp_async_wait_all();
      __syncthreads();  // this block's K/V landed; every warp is done with the other buffer
      if (n_block > n_blocks.begin) load_kv(n_block - 1, buf ^ 1);
      cp_async_commit();
      // A warp whose rows all lie past the sequence's end (a ragged last block; decoding's few
      // rows) skips the math: nothing of it is stored, and no barrier is inside.
      if (row0 >= seq.seqlen_q) continue;

      WarpAcc<kBlockN> s[kMT];
#pragma unroll
      for (int m = 0; m < kMT; ++m) s[m].zero();
      warp_gemm_abt<T, kHeadDim, kBlockN, kMT>(s, sQ, warp_row, sK(buf), 0, lane);
      const int n0 = n_block * kBlockN;
      // Fp32Pair: each row of q, k and v comes split at a power of two of its own (fp32_pairs.h):
      // S takes back its rows' (q's) and columns' (k's); v's are P's column factors in P V.
      if constexpr (kIsPair<T>)
#pragma unroll
        for (int m = 0; m < kMT; ++m) scale_tile(s[m], sQScale + warp_row + 16 * m, ColumnUnscales{sKScale(buf), lane});
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
        scores_from_qk<kFeatures>(s[m], mod, p.mask, seq, row0 + 16 * m, n0, lane);
        softmax[m].rescale_and_exp(s[m], o[m]);
        if (dropout) apply_dropout(s[m], rng, b, h, sh.heads_q, row0 + 16 * m, n0, lane);
        // Pairs: P on padding query rows (which no lse zeroes, as the backward's) would take part in
        // the warp's split scale (pair_split_of) with the keys they see.
        if constexpr (kIsPair<T>)
          if (row0 + 16 * (m + 1) > seq.seqlen_q) s[m].zero_rows_past(row0 + 16 * m, seq.seqlen_q, lane);
      }
      // (v's scales as P's column factors: Fp32Pair's; the other types ignore them)
      warp_gemm_rb<T, kBlockN, kHeadDim, kMT>(o, s, sV(buf), 0, lane, ColumnUnscales{sVScale(buf), lane});
    }
  }

  if (p.num_splits > 1) {
#pragma unroll
    for (int m = 0; m < kMT; ++m)
      store_partial(o[m], softmax[m], rng.keep_scale, p, seq, split, b, h, row0 + 16 * m, lane);
    return;
  }
  UserType<T>* out = row_at<UserType<T>>(p.out, p.out_strides, seq, true, b, h, 0);
  float* lse_out = static_cast<float*>(p.lse) + stats_offset(p.stats_strides, seq, b, h);
  // Each warp reuses its own rows of sQ (read only by this warp) to stage the output.
#pragma unroll
  for (int m = 0; m < kMT; ++m)
    store_out_and_lse(o[m], softmax[m], rng.keep_scale, staging_of(sQ), warp_row + 16 * m, out, p.out_strides.row,
                      lse_out, row0 + 16 * m, seq.seqlen_q, sh.head_dim, lane);
}

// Split-KV's merge: row i of (b, h) is sum_s exp(lse_s - lse) out_s with lse = log sum_s
// exp(lse_s). A decoding step has a few rows (32 at batch 1), so the kernel's time is its
// dependent trips to memory: a row a CTA, one trip for the splits' lse (a split a thread), one
// for their partial rows (a thread a float4 column of a few splits: ptxas issues a thread's
// loads one at a time, each beside its adds, so the splits are spread over many threads), then
// the shares summed through shared memory in a fixed order.
constexpr int kCombineThreads = 512;
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) flash_fwd_combine_kernel(const FlashFwdParams p) {
  static_assert(kMaxFwdSplits <= kCombineThreads, "a split's lse a thread");
  constexpr int kWarps = kCombineThreads / 32, kUnroll = 4;
  __shared__ float weight_of[kMaxFwdSplits];
  __shared__ float warp_top[kWarps], warp_sum[kWarps];
  __shared__ float4 shares[kCombineThreads];
  const int row = blockIdx.x, h = blockIdx.y, b = blockIdx.z, splits = p.num_splits, head_dim = p.shape.head_dim;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const Sequence seq = sequence_of(p, b);
  if (row >= seq.seqlen_q) return;  // the whole CTA
  const int64_t first = partial_row(p, seq, 0, b, h, row);
  const int64_t split_stride = partial_row(p, seq, 1, b, h, row) - first;
  const float lse_s = tid < splits ? p.lse_partial[first + tid * split_stride] : -INFINITY;
  float top = lse_s;
  for (int offset = 16; offset > 0; offset /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
  if (lane == 0) warp_top[warp] = top;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) top = fmaxf(top, warp_top[w]);
  // No split saw a key: lse -inf and out 0, as the unsplit kernel writes (exp(-inf - -inf) is NaN).
  const float base = top == -INFINITY ? 0.f : top;
  float sum = expf(lse_s - base);
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) warp_sum[warp] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += warp_sum[w];
  const float lse = sum != 0.f ? base + logf(sum) : -INFINITY;  // NaN propagates
  if (tid < splits) weight_of[tid] = sum != 0.f ? expf(lse_s - lse) : 0.f;
  if (tid == 0) static_cast<float*>(p.lse)[stats_offset(p.stats_strides, seq, b, h) + row] = lse;
  __syncthreads();

  // head_dim is a multiple of 8 on the tensor-core kernels (16-byte rows) and at most 256, so a
  // row is up to 64 float4s: thread (group, part) sums column part of splits group, group +
  // groups, ... (at D=128: 16 groups, 2 splits each of a 28-way split).
  static_assert(256 / 4 * 2 <= kCombineThreads, "two groups at least");
  const int vecs = head_dim / 4, groups = kCombineThreads / vecs, part = tid % vecs, group = tid / vecs;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (group < groups) {
    const float4* column = reinterpret_cast<const float4*>(p.out_partial + first * head_dim) + part;
    for (int s0 = group; s0 < splits; s0 += kUnroll * groups) {
      float weight[kUnroll];
      float4 x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        // A split of weight 0 (no key, or past the last: the last one's row read again) adds
        // nothing, whatever its row holds; NaN weights go on (they propagate). The loads do not
        // depend on the weights, so that all of them are in flight at once.
        const int s = min(s0 + u * groups, splits - 1);
        const float w = weight_of[s];
        weight[u] = s0 + u * groups < splits ? w : 0.f;
        x[u] = __ldg(column + s * split_stride * vecs);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (weight[u] != 0.f) {
          acc.x = fmaf(weight[u], x[u].x, acc.x);
          acc.y = fmaf(weight[u], x[u].y, acc.y);
          acc.z = fmaf(weight[u], x[u].z, acc.z);
          acc.w = fmaf(weight[u], x[u].w, acc.w);
        }
    }
  }
  shares[tid] = acc;
  __syncthreads();
  if (group != 0) return;
  for (int g = 1; g < groups; ++g) {
    const float4 other = shares[g * vecs + part];
    acc.x += other.x;
    acc.y += other.y;
    acc.z += other.z;
    acc.w += other.w;
  }
  T* out = row_at<T>(p.out, p.out_strides, seq, true, b, h, row) + 4 * part;
  out[0] = from_float<T>(acc.x);
  out[1] = from_float<T>(acc.y);
  out[2] = from_float<T>(acc.z);
  out[3] = from_float<T>(acc.w);
}

}  // namespace cuflash
