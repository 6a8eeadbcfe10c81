// Forward attention on Hopper warpgroup MMAs (wgmma, sm_90a), cp.async loads: what plain attention
// takes where the TMA kernel (flash_fwd_sm90_tma.cuh) cannot address the input, e.g. varlen.
// One CTA per (kBlockM = 128 query rows, head, batch): two warpgroups of 64 rows each. Q and
// the double-buffered K/V tiles sit in shared memory in the 128-byte-swizzled panels wgmma reads
// (panel_offset); S = Q K^T reads both from there, P stays in registers as the A operand of
// O += P V, whose B (V, [key][d]) the wgmma transposes. Masks, the online softmax and the output
// are the sm_80 kernel's, on the same accumulator layout (a warp's share of a 64 x N wgmma
// accumulator is a WarpAcc<N>). Loads are cp.async by every thread, as in the sm_80 kernel.
// kFeatures: softcap, ALiBi, attn_mask, dropout (CUFLASH_SM90's "features" part, a default; the
// TMA kernel runs them where it can address the input).
#pragma once
#include <cuda_runtime.h>
#include "../../flash_params.h"
#include "../device_attributes.h"
#include "../flash_fwd_kernel.cuh"  // store_out_and_lse
#include "../mask.cuh"
#include "../mma_sm80.cuh"
#include "../online_softmax.cuh"
#include "../run_switches.h"
#include "wgmma.cuh"

namespace cuflash::sm90 {

// Head-dim buckets with a Hopper forward; the other buckets keep the sm_80-class kernel.
template <int kHeadDim>
constexpr bool kFwdHeadDim = kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256;

template <typename T, int kHeadDim, bool kFeatures>
struct FwdSm90Kernel {
  static constexpr int kWarpgroups = 2, kThreads = 128 * kWarpgroups, kBlockM = 64 * kWarpgroups;
  // Keys per step: S (kBlockN / 2 floats per thread) beside O (kHeadDim / 2). At 64, 64 keys
  // keep S, P and O within 128 registers, so that two CTAs (16 warps) share an SM: +21-27% on
  // the H200 (the feature path's score code does not fit 128: one CTA). At 128 the same costs
  // 16-21% (benchmarks/NOTES.md): one CTA, 128 keys.
  static constexpr int kBlockN = kHeadDim == 128 ? 128 : 64;
  static constexpr int kMinBlocksPerSm = kHeadDim == 64 && !kFeatures ? 2 : 1;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2, kKVBytes = kBlockN * kHeadDim * 2;
  // + 1024: the swizzle atoms must start on 1024-byte boundaries; the base is aligned by hand.
  static constexpr int kSmemBytes = kQBytes + 4 * kKVBytes + 1024;
};

// Rows [0, rows_valid) x columns [0, cols_valid) of a [kRows][kHeadDim] gmem tile into its
// swizzled panels, zero-filled elsewhere (padded keys must read as 0: P V multiplies them by 0).
template <int kRows, int kHeadDim, int kThreads, typename T>
__device__ __forceinline__ void load_panels_async(unsigned char* tile, const T* gmem, int64_t row_stride,
                                                  int rows_valid, int cols_valid, int tid) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  static_assert(kRows * kChunksPerRow % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kRows * kChunksPerRow / kThreads; ++i) {
    const int c = tid + i * kThreads, r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool valid = r < rows_valid && col < cols_valid;
    cp_async_16(tile + panel_offset<kRows>(r, col), valid ? gmem + r * row_stride + col : gmem, valid);
  }
}

// One CTA's tile of a cp.async Hopper forward (this one and the float32 one): its query block
// (longest first), head and batch, the sequence, the first rows of its q, k and v (a paged
// cache's through key_offset), and the key blocks its rows see; counted where p asks.
template <typename T, int kBlockM, int kBlockN>
struct CpAsyncTile {
  int h, b, m_start;
  Sequence seq;
  const T *q, *k, *v;
  Range n_blocks;
  __device__ explicit CpAsyncTile(const FlashFwdParams& p) {
    const AttentionShape& sh = p.shape;
    h = blockIdx.y;
    b = blockIdx.z;
    const int h_kv = h / (sh.heads_q / sh.heads_kv);
    m_start = query_block_longest_first() * kBlockM;
    seq = sequence_of(p, b);
    q = row_at<const T>(p.q, p.q_strides, seq, true, b, h, 0);
    k = key_rows<const T>(p, p.k, p.k_strides, seq, b, h_kv);
    v = key_rows<const T>(p, p.v, p.v_strides, seq, b, h_kv);
    n_blocks = key_blocks(p.mask, seq, m_start, min(m_start + kBlockM, seq.seqlen_q), kBlockN);
  }
  // No query row: the CTA returns (before count_tiles, as it always has).
  __device__ bool empty() const { return m_start >= seq.seqlen_q; }
  // The output and lse of this warp's rows (warp_row.. of the tile), staged through the CTA's
  // shared memory (smem, kSmemBytes with 1024 of alignment slack), which the caller is done with.
  template <int kSmemBytes, int kHeadDim>
  __device__ void store_output(const FlashFwdParams& p, const WarpAcc<kHeadDim>& o, const OnlineSoftmax& softmax,
                               float keep_scale, unsigned char* smem, int warp_row, int lane) const {
    __syncthreads();
    const SmemTile<T, kBlockM, kHeadDim> stage{reinterpret_cast<T*>(smem)};
    static_assert(SmemTile<T, kBlockM, kHeadDim>::kElems * sizeof(T) <= kSmemBytes - 1024, "staging fits");
    T* out = row_at<T>(p.out, p.out_strides, seq, true, b, h, 0);
    float* lse_out = static_cast<float*>(p.lse) + stats_offset(p.stats_strides, seq, b, h);
    store_out_and_lse(o, softmax, keep_scale, stage, warp_row, out, p.out_strides.row, lse_out, m_start + warp_row,
                      seq.seqlen_q, p.shape.head_dim, lane);
  }
};

// The fp32 accumulator of a WarpAcc as the register list of a wgmma with N columns, starting at
// column n0 (a multiple of N).
template <int N, int kCols>
__device__ __forceinline__ float (&acc_regs(WarpAcc<kCols>& acc, int n0))[N / 2] {
  return *reinterpret_cast<float(*)[N / 2]>(&acc.v[n0 / 8][0]);
}

// S = Q K^T for one warpgroup's 64 rows (desc_q: its rows of the Q panels, kQPanelBytes apart;
// desc_k: the first kBlockN rows of a K tile of kKRows rows): K = kHeadDim in steps of 16, 4 per
// 64-column panel (+32 bytes each). Issued and committed as one wgmma group.
template <typename T, int kHeadDim, int kQPanelBytes, int kBlockN, int kKRows = kBlockN>
__device__ __forceinline__ void issue_qk(WarpAcc<kBlockN>& s, uint64_t desc_q, uint64_t desc_k) {
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    const uint32_t in_panel = (kk % 4) * 32;
    Wgmma<T, kBlockN>::ss(acc_regs<kBlockN>(s, 0), desc_q + (((kk / 4) * kQPanelBytes + in_panel) >> 4),
                          desc_k + (((kk / 4) * (kKRows * 128) + in_panel) >> 4), kk > 0);
  }
  wgmma_commit();
}

// O += P V for one warpgroup (pa: P as A fragments; desc_v: a V tile of kBlockN rows, MN-major):
// K = kBlockN keys in steps of 16 rows of V (+2048 bytes), N = kHeadDim in wgmmas of at most 128
// columns (two panels each, leading byte offset = one panel). One wgmma group.
template <typename T, int kHeadDim, int kBlockN>
__device__ __forceinline__ void issue_pv(WarpAcc<kHeadDim>& o, const uint32_t (&pa)[kBlockN / 16][4],
                                         uint64_t desc_v) {
  constexpr int kPvN = kHeadDim < 128 ? kHeadDim : 128;
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk)
#pragma unroll
    for (int n0 = 0; n0 < kHeadDim; n0 += kPvN)
      Wgmma<T, kPvN>::rs(acc_regs<kPvN>(o, n0), pa[kk], desc_v + (((n0 / 64) * (kBlockN * 128) + kk * 2048) >> 4), 1);
  wgmma_commit();
}

// kFeatures: softcap, ALiBi, attn_mask or dropout may be on, as in the sm_80 kernel.
template <typename T, int kHeadDim, bool kFeatures>
__global__ void __launch_bounds__(FwdSm90Kernel<T, kHeadDim, kFeatures>::kThreads,
                                  FwdSm90Kernel<T, kHeadDim, kFeatures>::kMinBlocksPerSm)
    flash_fwd_sm90_kernel(const FlashFwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using K = FwdSm90Kernel<T, kHeadDim, kFeatures>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kThreads = K::kThreads;
  extern __shared__ char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  unsigned char* sQ = smem;
  auto sK = [&](int buf) { return smem + K::kQBytes + buf * K::kKVBytes; };
  auto sV = [&](int buf) { return smem + K::kQBytes + (2 + buf) * K::kKVBytes; };

  const AttentionShape& sh = p.shape;
  const CpAsyncTile<T, kBlockM, kBlockN> t(p);
  if (t.empty()) return;
  const int h = t.h, b = t.b, m_start = t.m_start;
  const Sequence& seq = t.seq;
  const T *q = t.q, *k = t.k, *v = t.v;
  const Range n_blocks = t.n_blocks;
  const int tid = threadIdx.x, warpgroup = warpgroup_index(), lane = tid % 32;
  if (p.tile_counters && tid == 0) count_tiles(p.tile_counters, seq, n_blocks, kBlockM, kBlockN);

  // A block's rows are consecutive (in one page of a paged cache: page_size % kBlockN == 0).
  static_assert(kPageSizeMultiple % kBlockN == 0, "a key block lies in one page");
  auto load_kv = [&](int n_block, int buf) {
    const int n0 = n_block * kBlockN, rows = seq.seqlen_k - n0;
    load_panels_async<kBlockN, kHeadDim, kThreads>(sK(buf), k + key_offset(p, p.k_strides, b, n0), p.k_strides.row,
                                                   rows, sh.head_dim, tid);
    load_panels_async<kBlockN, kHeadDim, kThreads>(sV(buf), v + key_offset(p, p.v_strides, b, n0), p.v_strides.row,
                                                   rows, sh.head_dim, tid);
  };

  // This warp's 16 rows: rows 16 (tid / 32) .. of the CTA's tile (warpgroup g: rows 64 g ..).
  const int warp_row = 16 * (tid / 32), row0 = m_start + warp_row;
  WarpAcc<kHeadDim> o;
  o.zero();
  OnlineSoftmax softmax;
  const ScoreMod<T> mod(p, b, h);
  const bool dropout = kFeatures && p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};

  if (n_blocks.end > n_blocks.begin) {
    load_panels_async<kBlockM, kHeadDim, kThreads>(sQ, q + m_start * p.q_strides.row, p.q_strides.row,
                                                   seq.seqlen_q - m_start, sh.head_dim, tid);
    // Keys last block first, as in the sm_80 kernel: the masked blocks come first.
    load_kv(n_blocks.end - 1, 0);
    cp_async_commit();
    // Descriptors of this warpgroup's 64 rows of Q and of K and V buffer 0; the steps below add
    // byte offsets >> 4 to their start-address field (constants, once buf is known).
    const uint64_t desc_q = smem_desc_k_major_sw128(sQ, warpgroup * 64 * 128);
    const uint64_t desc_k0 = smem_desc_k_major_sw128(sK(0));
    const uint64_t desc_v0 = smem_desc_mn_major_sw128(sV(0), 0, kBlockN * 128);
    for (int n_block = n_blocks.end - 1, buf = 0; n_block >= n_blocks.begin; --n_block, buf ^= 1) {
      cp_async_wait_all();
      fence_async_shared();  // this thread's cp.async writes, visible to the wgmma (async proxy)
      __syncthreads();       // every thread's part landed; every warpgroup is done with the other buffer
      if (n_block > n_blocks.begin) load_kv(n_block - 1, buf ^ 1);
      cp_async_commit();

      WarpAcc<kBlockN> s;
      wgmma_fence();
      issue_qk<T, kHeadDim, kBlockM * 128>(s, desc_q, desc_k0 + ((buf * K::kKVBytes) >> 4));
      wgmma_wait<0>();

      scores_from_qk<kFeatures>(s, mod, p.mask, seq, row0, n_block * kBlockN, lane);
      softmax.rescale_and_exp(s, o);
      if (dropout) apply_dropout(s, rng, b, h, sh.heads_q, row0, n_block * kBlockN, lane);

      uint32_t pa[kBlockN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) s.template to_a<T>(pa[kk], kk);
      wgmma_fence();
      issue_pv<T, kHeadDim, kBlockN>(o, pa, desc_v0 + ((buf * K::kKVBytes) >> 4));
      wgmma_wait<0>();
    }
  }

  // The output, staged through shared memory (now free) as in the sm_80 kernel.
  t.template store_output<K::kSmemBytes>(p, o, softmax, rng.keep_scale, smem, warp_row, lane);
#endif
}

// A warp's 16 finished accumulator rows (rows row0.. of a tile of kRows rows), times scale[0]
// (the lane's row row0 + lane / 4) and scale[1] (+ 8), as T into 64-column panels laid out as TMA
// loads and stores them (panel_offset: each of the warp's 32-bit writes on its own bank), for a
// bulk tensor store (the TMA forward's output, the dK/dV kernel's dK and dV).
template <typename T, int kRows, int kCols>
__device__ __forceinline__ void stage_rows_for_tma(const WarpAcc<kCols>& acc, const float (&scale)[2],
                                                   const unsigned char* tile, int row0, int lane) {
  const uint32_t base = smem_u32(tile);
  const int row = row0 + (lane >> 2);  // and row + 8, 1024 bytes on: the same swizzle
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      st_shared_u32(base + panel_offset<kRows>(row, 8 * j + 2 * (lane & 3)) + h * 8 * 128,
                    MmaOperand<T>::pack(acc.v[j][2 * h] * scale[h], acc.v[j][2 * h + 1] * scale[h]));
}

// Rows [first_row, kRows) of kPanels 128-byte-swizzled panels of kRows rows (a tile as TMA writes
// it) set to zero, by `threads` threads (this one `thread`): the rows a box read past a sequence's
// end. The swizzle permutes a row's 16-byte chunks within the row, so whole rows are whole
// 128-byte runs.
template <int kPanels, int kRows>
__device__ __forceinline__ void zero_rows_of_panels(unsigned char* panels, int first_row, int thread, int threads) {
  const int chunks_per_panel = (kRows - first_row) * 8;
  for (int c = thread; c < kPanels * chunks_per_panel; c += threads) {
    const int panel = c / chunks_per_panel, chunk = c - panel * chunks_per_panel;
    *reinterpret_cast<uint4*>(panels + panel * kRows * 128 + first_row * 128 + chunk * 16) = make_uint4(0, 0, 0, 0);
  }
}

// The same rows of each tile (a V stage; a K and a V stage; a Q and a dO one) zeroed by the
// consumers' kThreads threads (this one `thread`), then fenced and synced on named barrier
// `barrier`, before any wgmma (async proxy) reads them.
template <int kPanels, int kRows, int kThreads, class... Tiles>
__device__ __forceinline__ void zero_rows_before_wgmma(int first_row, int thread, int barrier, Tiles*... tiles) {
  (zero_rows_of_panels<kPanels, kRows>(tiles, first_row, thread, kThreads), ...);
  fence_async_shared();  // these generic-proxy writes before the wgmmas' (async proxy) reads
  named_barrier_sync<kThreads>(barrier);
}

// Rows row0.. (kRowsStored of them) and columns col0.. (kColsStored) of a staged tile (kRows rows
// of 128-byte panels, as stage_rows_for_tma or stmatrix leave it) to out, by 128 threads, 16 bytes
// each: tile rows below seqlen - start and columns below head_dim only (packed sequences: the
// rows after a sequence's end are the next sequence's). out: the sequence's row 0 of its head;
// row_stride in elements; tile row r is the sequence's row start + r.
template <typename T, int kRows, int kRowsStored, int kColsStored>
__device__ __forceinline__ void store_staged_block(const unsigned char* stage, int row0, int col0, T* out,
                                                   int64_t row_stride, int start, int seqlen, int head_dim,
                                                   int thread) {
  constexpr int kChunksPerRow = kColsStored / 8;
  static_assert(kRowsStored * kChunksPerRow % 128 == 0, "whole rounds of 128 threads");
#pragma unroll
  for (int i = 0; i < kRowsStored * kChunksPerRow / 128; ++i) {
    const int c = thread + 128 * i, r = row0 + c / kChunksPerRow, col = col0 + (c % kChunksPerRow) * 8;
    if (start + r < seqlen && col < head_dim)
      *reinterpret_cast<uint4*>(out + (start + r) * row_stride + col) =
          *reinterpret_cast<const uint4*>(stage + panel_offset<kRows>(r, col));
  }
}
// A consumer's 64 staged rows (tile rows 64 consumer..) of every panel.
template <typename T, int kRows, int kPanels>
__device__ __forceinline__ void store_staged_rows(const unsigned char* stage, int consumer, T* out, int64_t row_stride,
                                                  int start, int seqlen, int head_dim, int thread) {
  store_staged_block<T, kRows, 64, 64 * kPanels>(stage, 64 * consumer, 0, out, row_stride, start, seqlen, head_dim,
                                                 thread);
}

// Which Hopper kernels run p: none (the sm_80-class kernels) unless this is an sm_90a build on a
// compute capability 9.0 device; then the parts CUFLASH_SM90 selects (run_switches.h).
struct Sm90Paths {
  bool fwd = false, tma = false, persistent = false, bwd = false, bwd_ws = false;
  bool persistent_features = false;  // the features on the persistent TMA forward (the "persistentfeatures" part)
  bool persistent_window = false;    // long banded rows on it too (the "persistentwindow" part)
  bool tma_splits = false;  // split-KV on the TMA forward (the "splits" part), where it can run
  bool tma_mask = false;    // attn_mask tiles staged by TMA in the TMA forward (the "masktma" part)
  bool bwd_tma_mask = false;  // and in the fused TMA backward with the features (the "bwdmasktma" part)
  bool tma_varlen = false;  // packed sequences on the TMA forward (the "varlen" part), where it can run
  bool bwd_varlen = false;  // packed sequences on the TMA backward (the "bwdvarlen" part; bwd_tma_addressable)
  // The features (softcap, ALiBi, attn_mask, dropout) on the fused warp-specialized backwards (the
  // "bwdfeatures" part; fused_backward_runs), where bwd and bwd_ws are false for them.
  bool bwd_features = false;
};
inline Sm90Paths sm90_paths(const AttentionParams& p) {
  Sm90Paths choice;
#ifdef CUFLASH_SM90A_BUILT
  const Sm90Switch wanted = sm90_switch();
  if (!wanted.on) return choice;
  const bool features = needs_feature_path(p);
  if (features && !wanted.features) return choice;
  choice.fwd = device_attribute<cudaDevAttrComputeCapabilityMajor>(0) == 9 &&
               device_attribute<cudaDevAttrComputeCapabilityMinor>(-1) == 0;
  // TMA boxes read whole key blocks of one tensor: not a paged cache's pages, and past a
  // sequence's seqused_k they read the rows after its keys (their scores are masked, but a NaN or
  // Inf left in a cache's unused rows would still reach P V, dP and dQ as 0 x NaN). The cp.async
  // kernels, which zero-fill every row past the keys, take both; the TMA forward takes both under
  // the "kvcache" part (a default), zeroing those rows of V in shared memory and addressing pages.
  const bool paged = p.paged.block_table != nullptr, seqused = p.varlen.seqused_k != nullptr;
  const bool whole_key_blocks = !paged && !seqused;
  choice.tma = choice.fwd && wanted.tma && (whole_key_blocks || wanted.tma_kv_cache);
  choice.persistent = choice.tma && wanted.persistent;  // plain attention: launch_fwd_tma
  choice.persistent_features = choice.persistent && features && wanted.persistent_features;
  choice.persistent_window = choice.persistent && wanted.persistent_window;
  // Split-KV runs on the plain narrow TMA kernel only (kMaySplit): not with the features, nor
  // with packed queries (the kernel's splits and packed coordinates do not meet: launch_fwd_tma).
  choice.tma_splits = choice.tma && wanted.tma_splits && !features && p.varlen.cu_seqlens_q == nullptr;
  choice.tma_mask = choice.tma && wanted.tma_mask && p.score.attn_mask.data != nullptr;
  // Packed sequences on the plain narrow TMA kernels (kMayPack): not with the features, nor a
  // paged cache (packed queries over pages); not split (tma_splits, launch_fwd_tma). Nor a grid
  // from the total length (max_seqlen_q not given: most query blocks past their sequence's end),
  // which stays on the cp.async kernel as before the part: the TMA kernels run an epilogue for
  // each such empty tile (not measured; benchmarks/NOTES.md), and TileWalk counts tiles in an int.
  const bool total_length_grid = p.varlen.cu_seqlens_q != nullptr && p.shape.batch > 1 &&
                                 p.shape.seqlen_q >= p.varlen.total_q;
  choice.tma_varlen = choice.tma && wanted.tma_varlen && !features && !paged && !total_length_grid;
  choice.bwd = choice.fwd && !features && wanted.bwd;
  choice.bwd_ws = choice.bwd && wanted.bwd_ws && whole_key_blocks;
  choice.bwd_features = choice.fwd && features && wanted.bwd && wanted.bwd_ws && wanted.bwd_features && whole_key_blocks;
  choice.bwd_tma_mask = choice.bwd_features && wanted.bwd_tma_mask && p.score.attn_mask.data != nullptr;
  // Packed sequences on the warp-specialized backward: not from a total-length grid of queries or
  // of keys either (max_seqlen_k not given: the dK/dV kernels' tiles nearly all empty, their
  // persistent walk's count in an int).
  const bool total_length_keys = p.varlen.cu_seqlens_k != nullptr && p.shape.batch > 1 &&
                                 p.shape.seqlen_k >= p.varlen.total_k;
  choice.bwd_varlen =
      (choice.bwd_ws || choice.bwd_features) && wanted.bwd_varlen && !total_length_grid && !total_length_keys;
#else
  (void)p;
#endif
  return choice;
}

}  // namespace cuflash::sm90
