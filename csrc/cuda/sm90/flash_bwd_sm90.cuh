// Backward attention on Hopper warpgroup MMAs: the default for plain 16-bit attention at head-dim
// buckets 64, 128 and 256 (run_switches.h; speed in benchmarks/NOTES.md).
//
// The two deterministic kernels of flash_bwd_kernel.cuh, with every matmul a wgmma: the
// products with both operands in shared memory (S = Q K^T, dP = dO V^T and their transposes)
// are issue_qk's pattern, the ones with an accumulator turned into the A operand (dQ += dS K,
// dV += P^T dO, dK += dS^T Q) issue_pv's, B transposed by the wgmma (MN-major). A warpgroup owns
// 64 rows (queries in the dQ kernel, keys in the dK/dV kernel); each warp's share of an
// accumulator is a WarpAcc, so the masks (probs_then_mask), ds_from_dp and the stores are the sm_80
// kernels'. Tiles are loaded by cp.async into the swizzled panels, double-buffered.
// Head dim 256: 32 streamed rows a step (the resident tiles take 128 KB of shared memory), and
// dK and dV in two launches of the dK/dV kernel (kWithDk, kWithDv), since one 64 x 256
// accumulator is 128 registers per thread.
// With p.dq_accum (deterministic=False or CUFLASH_BWD_DQ=atomic: 5 matmuls instead of 7, not
// bitwise reproducible; where TMA cannot address the inputs) only
// the dK/dV kernel runs (kAccumDq): it stages each step's dS in shared memory and adds dQ = dS K
// to the fp32 buffer with vector atomics; flash_bwd_dq_convert_kernel writes dq.
#pragma once
#include "../flash_bwd_kernel.cuh"
#include "flash_fwd_sm90.cuh"

namespace cuflash::sm90 {

template <int kHeadDim>
constexpr bool kBwdHeadDim = kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256;
// Rows streamed per step (the other side's are resident, 128): 64, but 32 at head dim 256, where
// the two resident tiles take 128 KB of shared memory.
template <int kHeadDim>
constexpr int kBwdStreamedRows = kHeadDim <= 128 ? 64 : 32;

template <typename T, int kHeadDim>
struct BwdSm90Kernel {
  static constexpr int kWarpgroups = 2, kThreads = 128 * kWarpgroups;
  static constexpr int kResident = 64 * kWarpgroups;  // rows a CTA keeps: queries (dQ), keys (dK/dV)
  static constexpr int kStreamed = kBwdStreamedRows<kHeadDim>;  // rows per step of the other side
  static constexpr bool kSplitDkDv = kHeadDim > 128;           // dK and dV in two launches
  static constexpr int kResidentBytes = kResident * kHeadDim * 2, kStreamedBytes = kStreamed * kHeadDim * 2;
  // Two resident tiles (Q and dO, or K and V), two double-buffered streamed ones, and for the
  // dK/dV kernel the streamed queries' lse and delta ([2][kStreamed] each); + 1024 for alignment.
  static constexpr int kSmemBytes = 2 * kResidentBytes + 4 * kStreamedBytes + 4 * kStreamed * 4 + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
  // kAccumDq: one step's dS, [kStreamed queries][kResident keys] in 64-key panels, more.
  static constexpr int kDsBytes = kStreamed * kResident * 2;
  // dQ = dS K split between the warpgroups: at head dim 128 by columns (warpgroup w: 64 of them,
  // over all 128 keys), at 64 by keys (warpgroup w: its own 64 keys, every column); both are one
  // 64 x 64 wgmma accumulator per warpgroup and step.
  static constexpr bool kDqSplitColumns = kHeadDim == 128;
};

// dQ part (64 queries x kN columns) = dS K for one warpgroup: A = dS from shared memory
// ([query][key] panels, K-major; kSteps k-steps of 16 keys), B = the resident K tile, MN-major
// (keys down, head dim across). One wgmma group.
// kDsPanelBytes: the bytes of one 64-key panel of dS (its query rows x 128).
template <typename T, int kSteps, int kN = 64, int kDsPanelBytes = 64 * 128>
__device__ __forceinline__ void issue_ds_k(WarpAcc<kN>& dq, uint64_t desc_ds, uint64_t desc_k) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk)
    Wgmma<T, kN>::template ss<1>(acc_regs<kN>(dq, 0), desc_ds + (((kk / 4) * kDsPanelBytes + (kk % 4) * 32) >> 4),
                                 desc_k + ((kk * 2048) >> 4), kk > 0);
  wgmma_commit();
}

// acc[row][col] += v for a warp's WarpAcc<64> (16 rows from row0, columns from col0), rows
// below `rows` and columns below `cols` only; pairs of adjacent columns in one vector atomic.
__device__ __forceinline__ void red_add_rows(float* acc, int64_t row_stride, const WarpAcc<64>& v, int row0, int col0,
                                             int rows, int cols, int lane) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + WarpAcc<64>::row_of(2 * half, lane), col = col0 + WarpAcc<64>::col_of(j, 2 * half, lane);
      if (row < rows && col < cols)
        asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(acc + row * row_stride + col),
                     "f"(v.v[j][2 * half]), "f"(v.v[j][2 * half + 1])
                     : "memory");
    }
}

// One key block's share of dQ for a warp's 16 query rows (both dQ kernels' step): S = Q K^T and
// dP = dO V^T recomputed, dS = P (dP - delta), dq += dS K (K's tile read MN-major).
// kBlockM: the resident query rows (the Q and dO tiles' panel height).
template <typename T, int kHeadDim, int kBlockM, int kBlockN>
__device__ __forceinline__ void add_dq_part(WarpAcc<kHeadDim>& dq, uint64_t desc_q, uint64_t desc_do, uint64_t desc_k,
                                            uint64_t desc_v, uint64_t desc_k_mn, const float (&lse2)[2],
                                            const float (&delta)[2], float scale_log2, const MaskParams& mask,
                                            const Sequence& seq, int row0, int n_block, int lane) {
  WarpAcc<kBlockN> s, dp;
  wgmma_fence();
  issue_qk<T, kHeadDim, kBlockM * 128>(s, desc_q, desc_k);
  issue_qk<T, kHeadDim, kBlockM * 128>(dp, desc_do, desc_v);
  wgmma_wait<0>();
  auto row_lse2 = [&](int, int e) { return lse2[e >> 1]; };
  auto row_delta = [&](int, int e) { return delta[e >> 1]; };
  probs_then_mask<false>(s, scale_log2, mask, seq, row0, n_block * kBlockN, lane, row_lse2);
  ds_from_dp(dp, s, row_delta);
  uint32_t ds[kBlockN / 16][4];
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) dp.template to_a<T>(ds[kk], kk);
  wgmma_fence();
  issue_pv<T, kHeadDim, kBlockN>(dq, ds, desc_k_mn);
  wgmma_wait<0>();
}

// dQ: queries resident (64 per warpgroup), keys streamed: S = Q K^T, dP = dO V^T,
// dS = P (dP - delta), dQ += dS K.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BwdSm90Kernel<T, kHeadDim>::kThreads, 1)
    flash_bwd_dq_sm90_kernel(const FlashBwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using K = BwdSm90Kernel<T, kHeadDim>;
  constexpr int kBlockM = K::kResident, kBlockN = K::kStreamed, kThreads = K::kThreads;
  extern __shared__ char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  unsigned char* sQ = smem;
  unsigned char* sdO = smem + K::kResidentBytes;
  auto sK = [&](int buf) { return smem + 2 * K::kResidentBytes + buf * K::kStreamedBytes; };
  auto sV = [&](int buf) { return smem + 2 * K::kResidentBytes + (2 + buf) * K::kStreamedBytes; };

  const AttentionShape& sh = p.shape;
  const int m_block = query_block_longest_first(), h = blockIdx.y, b = blockIdx.z;
  const int h_kv = h / (sh.heads_q / sh.heads_kv);
  const int tid = threadIdx.x, warpgroup = warpgroup_index(), lane = tid % 32;
  const int m_start = m_block * kBlockM, warp_row = 16 * (tid / 32), row0 = m_start + warp_row;
  const Sequence seq = sequence_of(p, b);
  if (m_start >= seq.seqlen_q) return;

  const T* q = row_at<const T>(p.q, p.q_strides, seq, true, b, h, 0);
  const T* dout = row_at<const T>(p.dout, p.dout_strides, seq, true, b, h, 0);
  const T* k = row_at<const T>(p.k, p.k_strides, seq, false, b, h_kv, 0);
  const T* v = row_at<const T>(p.v, p.v_strides, seq, false, b, h_kv, 0);
  float lse2[2], delta[2];
  lane_row_stats(p, seq, b, h, row0, lane, lse2, delta);
  auto load_kv = [&](int n_block, int buf) {
    const int n0 = n_block * kBlockN, rows = seq.seqlen_k - n0;
    load_panels_async<kBlockN, kHeadDim, kThreads>(sK(buf), k + n0 * p.k_strides.row, p.k_strides.row, rows,
                                                   sh.head_dim, tid);
    load_panels_async<kBlockN, kHeadDim, kThreads>(sV(buf), v + n0 * p.v_strides.row, p.v_strides.row, rows,
                                                   sh.head_dim, tid);
  };

  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const MaskParams mask = unpacked_mask(p.mask);  // rows_per_query a compile-time 1
  const Range n_blocks = key_blocks(mask, seq, m_start, min(m_start + kBlockM, seq.seqlen_q), kBlockN);
  WarpAcc<kHeadDim> dq;
  dq.zero();
  if (n_blocks.end > n_blocks.begin) {
    const int rows = seq.seqlen_q - m_start;
    load_panels_async<kBlockM, kHeadDim, kThreads>(sQ, q + m_start * p.q_strides.row, p.q_strides.row, rows,
                                                   sh.head_dim, tid);
    load_panels_async<kBlockM, kHeadDim, kThreads>(sdO, dout + m_start * p.dout_strides.row, p.dout_strides.row,
                                                   rows, sh.head_dim, tid);
    load_kv(n_blocks.begin, 0);
    cp_async_commit();
    const uint32_t my_rows = warpgroup * 64 * 128;
    const uint64_t desc_q = smem_desc_k_major_sw128(sQ, my_rows), desc_do = smem_desc_k_major_sw128(sdO, my_rows);
    auto step_bytes = [&](int buf) { return static_cast<uint64_t>((buf * K::kStreamedBytes) >> 4); };
    const uint64_t desc_k0 = smem_desc_k_major_sw128(sK(0)), desc_v0 = smem_desc_k_major_sw128(sV(0));
    const uint64_t desc_k0_mn = smem_desc_mn_major_sw128(sK(0), 0, kBlockN * 128);
    for (int n_block = n_blocks.begin, buf = 0; n_block < n_blocks.end; ++n_block, buf ^= 1) {
      cp_async_wait_all();
      fence_async_shared();
      __syncthreads();
      if (n_block + 1 < n_blocks.end) load_kv(n_block + 1, buf ^ 1);
      cp_async_commit();

      add_dq_part<T, kHeadDim, kBlockM, kBlockN>(dq, desc_q, desc_do, desc_k0 + step_bytes(buf),
                                                 desc_v0 + step_bytes(buf), desc_k0_mn + step_bytes(buf), lse2,
                                                 delta, scale_log2, mask, seq, row0, n_block, lane);
    }
  }
  __syncthreads();  // every warpgroup's wgmmas are done with the tiles the staging overwrites
  const SmemTile<T, kBlockM, kHeadDim> stage{reinterpret_cast<T*>(smem)};
  const float row_scale[2] = {static_cast<float>(p.scale), static_cast<float>(p.scale)};
  T* dq_out = row_at<T>(p.dq, p.dq_strides, seq, true, b, h, 0);
  warp_store_rows<T, kHeadDim>(dq, row_scale, stage, warp_row, dq_out + row0 * p.dq_strides.row, p.dq_strides.row,
                               seq.seqlen_q - row0, sh.head_dim, lane);
#endif
}

// dK and dV: keys resident (64 per warpgroup), the queries of every query head of the key's
// group streamed (GQA sums here, no atomics): S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
// dS^T = P^T (dP^T - delta), dK += dS^T Q.
// kWithDk, kWithDv: which of the two it computes (both but at head dim 256); kAccumDq needs dK.
template <typename T, int kHeadDim, bool kAccumDq, bool kWithDk = true, bool kWithDv = true>
__global__ void __launch_bounds__(BwdSm90Kernel<T, kHeadDim>::kThreads, 1)
    flash_bwd_dkdv_sm90_kernel(const FlashBwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using K = BwdSm90Kernel<T, kHeadDim>;
  static_assert(kWithDk || kWithDv, "something to compute");
  static_assert(!kAccumDq || (kWithDk && kHeadDim <= 128), "dQ comes with dK, in 64-row steps");
  constexpr int kBlockN = K::kResident, kBlockM = K::kStreamed, kThreads = K::kThreads;
  extern __shared__ char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  unsigned char* sK = smem;
  unsigned char* sV = smem + K::kResidentBytes;
  auto sQ = [&](int buf) { return smem + 2 * K::kResidentBytes + buf * K::kStreamedBytes; };
  auto sdO = [&](int buf) { return smem + 2 * K::kResidentBytes + (2 + buf) * K::kStreamedBytes; };
  unsigned char* sdS = smem + 2 * K::kResidentBytes + 4 * K::kStreamedBytes;   // kAccumDq only
  float* sLse2 = reinterpret_cast<float*>(sdS + (kAccumDq ? K::kDsBytes : 0));  // [2][kBlockM]
  float* sDelta = sLse2 + 2 * kBlockM;                                        // [2][kBlockM]

  const AttentionShape& sh = p.shape;
  const int n_block = blockIdx.x, h_kv = blockIdx.y, b = blockIdx.z;
  const int group = sh.heads_q / sh.heads_kv;
  const int tid = threadIdx.x, warpgroup = warpgroup_index(), lane = tid % 32;
  const int n_start = n_block * kBlockN, warp_row = 16 * (tid / 32), key0 = n_start + warp_row;
  const Sequence seq = sequence_of(p, b);
  if (n_start >= seq.seqlen_k) return;

  const T* k = row_at<const T>(p.k, p.k_strides, seq, false, b, h_kv, 0);
  const T* v = row_at<const T>(p.v, p.v_strides, seq, false, b, h_kv, 0);
  // Step t: query head h_kv * group + t / per_head, block m.begin + t % per_head.
  const MaskParams mask = unpacked_mask(p.mask);  // rows_per_query a compile-time 1
  const Range m = query_blocks(mask, seq, n_start, min(n_start + kBlockN, seq.seqlen_k), kBlockM);
  const int per_head = m.end - m.begin, steps = per_head * group;
  auto head_of = [&](int step) { return h_kv * group + step / per_head; };
  // With kAccumDq each CTA starts at its own query block, so that the CTAs of a head do not all
  // add to the same dQ rows at once.
  auto block_of = [&](int step) {
    return m.begin + (kAccumDq ? (step % per_head + n_block) % per_head : step % per_head);
  };
  auto load_queries = [&](int step, int buf) {
    const int h = head_of(step), m0 = block_of(step) * kBlockM, rows = seq.seqlen_q - m0;
    const T* q = row_at<const T>(p.q, p.q_strides, seq, true, b, h, m0);
    const T* dout = row_at<const T>(p.dout, p.dout_strides, seq, true, b, h, m0);
    load_panels_async<kBlockM, kHeadDim, kThreads>(sQ(buf), q, p.q_strides.row, rows, sh.head_dim, tid);
    load_panels_async<kBlockM, kHeadDim, kThreads>(sdO(buf), dout, p.dout_strides.row, rows, sh.head_dim, tid);
    block_row_stats<kBlockM, kThreads>(p, seq, b, h, m0, tid, sLse2 + buf * kBlockM, sDelta + buf * kBlockM);
  };

  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  WarpAcc<kHeadDim> dk, dv;
  dk.zero();
  dv.zero();
  if (steps > 0) {
    const int rows = seq.seqlen_k - n_start;
    load_panels_async<kBlockN, kHeadDim, kThreads>(sK, k + n_start * p.k_strides.row, p.k_strides.row, rows,
                                                   sh.head_dim, tid);
    if constexpr (kWithDk)  // dP needs V; dV alone does not
      load_panels_async<kBlockN, kHeadDim, kThreads>(sV, v + n_start * p.v_strides.row, p.v_strides.row, rows,
                                                     sh.head_dim, tid);
    load_queries(0, 0);
    cp_async_commit();
    const uint32_t my_rows = warpgroup * 64 * 128;
    const uint64_t desc_k = smem_desc_k_major_sw128(sK, my_rows), desc_v = smem_desc_k_major_sw128(sV, my_rows);
    auto step_bytes = [&](int buf) { return static_cast<uint64_t>((buf * K::kStreamedBytes) >> 4); };
    const uint64_t desc_q0 = smem_desc_k_major_sw128(sQ(0)), desc_do0 = smem_desc_k_major_sw128(sdO(0));
    const uint64_t desc_q0_mn = smem_desc_mn_major_sw128(sQ(0), 0, kBlockM * 128);
    const uint64_t desc_do0_mn = smem_desc_mn_major_sw128(sdO(0), 0, kBlockM * 128);
    for (int step = 0, buf = 0; step < steps; ++step, buf ^= 1) {
      cp_async_wait_all();
      fence_async_shared();
      __syncthreads();  // this step's tiles landed (and its lse, delta); the other buffer is free
      if (step + 1 < steps) load_queries(step + 1, buf ^ 1);
      cp_async_commit();

      const int m0 = block_of(step) * kBlockM;
      const float* lse2 = sLse2 + buf * kBlockM;
      const float* delta = sDelta + buf * kBlockM;
      WarpAcc<kBlockM> s, dp;  // S^T and dP^T: this warp's 16 keys x kBlockM queries
      wgmma_fence();
      issue_qk<T, kHeadDim, kBlockN * 128>(s, desc_k, desc_q0 + step_bytes(buf));
      if constexpr (kWithDk) issue_qk<T, kHeadDim, kBlockN * 128>(dp, desc_v, desc_do0 + step_bytes(buf));
      wgmma_wait<0>();
      auto col_lse2 = [&](int j, int e) { return lse2[WarpAcc<kBlockM>::col_of(j, e, lane)]; };
      auto col_delta = [&](int j, int e) { return delta[WarpAcc<kBlockM>::col_of(j, e, lane)]; };
      probs_then_mask<true>(s, scale_log2, mask, seq, key0, m0, lane, col_lse2);
      uint32_t pt[kBlockM / 16][4], dst[kBlockM / 16][4];
      if constexpr (kWithDv) {
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) s.template to_a<T>(pt[kk], kk);
        wgmma_fence();
        issue_pv<T, kHeadDim, kBlockM>(dv, pt, desc_do0_mn + step_bytes(buf));  // runs while dS is formed
      }
      if constexpr (kWithDk) {
        ds_from_dp(dp, s, col_delta);
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) dp.template to_a<T>(dst[kk], kk);
        if constexpr (kAccumDq) {
          // dS^T (this warp's 16 keys x kBlockM queries, packed in dst as to_a left it) into sdS as
          // [query][key]: element pairs along the queries go to two rows.
#pragma unroll
          for (int kk = 0; kk < kBlockM / 16; ++kk)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int j = 2 * kk + i / 2, e = 2 * (i % 2);
              const int key = warp_row + WarpAcc<kBlockM>::row_of(e, lane);
              const int query = WarpAcc<kBlockM>::col_of(j, e, lane);
              *reinterpret_cast<uint16_t*>(sdS + panel_offset<kBlockM>(query, key)) = dst[kk][i] & 0xffffu;
              *reinterpret_cast<uint16_t*>(sdS + panel_offset<kBlockM>(query + 1, key)) = dst[kk][i] >> 16;
            }
          fence_async_shared();  // the wgmma (async proxy) reads what these stores wrote
        }
        wgmma_fence();
        issue_pv<T, kHeadDim, kBlockM>(dk, dst, desc_q0_mn + step_bytes(buf));
        wgmma_wait<0>();  // with kAccumDq too: dst dies here, before dQ's accumulator lives
        if constexpr (kAccumDq) {
          __syncthreads();  // both warpgroups' keys are in
          constexpr bool kSplitColumns = K::kDqSplitColumns;
          const int col0 = kSplitColumns ? 64 * warpgroup : 0;
          const uint64_t desc_ds = smem_desc_k_major_sw128(sdS, kSplitColumns ? 0 : warpgroup * 64 * 128);
          const uint64_t desc_kb = smem_desc_mn_major_sw128(
              sK, kSplitColumns ? warpgroup * kBlockN * 128 : warpgroup * 64 * 128, kBlockN * 128);
          WarpAcc<64> dq;
          wgmma_fence();
          issue_ds_k<T, kSplitColumns ? kBlockN / 16 : 4>(dq, desc_ds, desc_kb);
          wgmma_wait<0>();
          const int h = head_of(step);
          float* acc = row_at<float>(p.dq_accum, p.dq_accum_strides, seq, true, b, h, m0);
          red_add_rows(acc, p.dq_accum_strides.row, dq, 16 * ((tid % 128) / 32), col0, seq.seqlen_q - m0, sh.head_dim,
                       lane);
        }
      } else {
        wgmma_wait<0>();  // dV's
      }
    }
  }
  __syncthreads();  // every warpgroup's wgmmas are done with the tiles the staging overwrites
  const SmemTile<T, kBlockN, kHeadDim> stage{reinterpret_cast<T*>(smem)};
  const int rows_valid = seq.seqlen_k - key0;
  const float dk_scale[2] = {static_cast<float>(p.scale), static_cast<float>(p.scale)}, dv_scale[2] = {1.f, 1.f};
  T* dk_out = row_at<T>(p.dk, p.dk_strides, seq, false, b, h_kv, key0);
  T* dv_out = row_at<T>(p.dv, p.dv_strides, seq, false, b, h_kv, key0);
  // Each warp stages through its own rows only, dK then dV (warp_store_rows syncs the warp).
  if constexpr (kWithDk)
    warp_store_rows<T, kHeadDim>(dk, dk_scale, stage, warp_row, dk_out, p.dk_strides.row, rows_valid, sh.head_dim,
                                 lane);
  if constexpr (kWithDv)
    warp_store_rows<T, kHeadDim>(dv, dv_scale, stage, warp_row, dv_out, p.dv_strides.row, rows_valid, sh.head_dim,
                                 lane);
#endif
}

}  // namespace cuflash::sm90
