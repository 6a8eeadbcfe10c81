// float32 forward attention on Hopper's TF32 wgmmas in 3xTF32: the float32 default at head dims
// 33-64 on Hopper (CUFLASH_FP32=3xtf32 runs the mma.sync kernel instead; its error and this
// kernel's: benchmarks/fp32_error_margin.py). Head dim 64, plain attention (masks and windows; no
// softcap, ALiBi, attn_mask or dropout), one CTA per (128 query rows, head, batch): two
// warpgroups of 64 rows, as the cp.async Hopper forward (flash_fwd_sm90.cuh), whose masks, online
// softmax and output this kernel shares.
//
// TF32 wgmmas read both operands K-major (tests/sm90/wgmma_probe.cu checks the layouts; the
// design and its register and memory budgets: benchmarks/NOTES.md, sixteenth session):
//   S = Q K^T: A = Q, split once a tile into big and small TF32 parts (split_tf32), the small
//     part in registers (rs), the big one in shared memory (ss: the registers it frees hold S's
//     four sums, below); B = K, split in shared memory by the thread whose cp.async loaded it: the
//     rounded big part in place, the small part beside it. Three products a k8 step, the small
//     ones first: small_q K + big_q small_k + big_q K. (K as loaded, its low bits dropped by the
//     tensor cores, would leave a small part up to 2^-10 |k| where rounding leaves 2^-11: dQ's
//     error at scores near 40 went 1.3x past the float32 bound, tests/test_fp32_paths.py.)
//   O += P V: A = P from registers, split likewise. The accumulator gives a lane columns 2t and
//     2t + 1 of each 8-key group, where an A fragment wants t and t + 4: so V^T (B, [d][key],
//     keys the k dimension) stores each group's keys in the order 0 2 4 6 1 3 5 7, and P's
//     accumulator registers are A fragments as they stand. V^T and its small part are written by
//     the threads from V's rows in global memory.
//   The tensor cores' own sums drift (probe: 2.7x a rounded float sum over 1024 products), so
//   each step's P V goes into a fresh accumulator added to O by FADD, as the mma.sync kernels do.
#pragma once
#include <cuda_runtime.h>
#include "flash_fwd_sm90.cuh"

namespace cuflash::sm90 {

// A template (head dim 64 its one instance), so that only the float32 head-dim-64 file compiles it.
template <int kHeadDim_>
struct FwdSm90Fp32Kernel {
  static_assert(kHeadDim_ == 64, "head dim 64 only (the register budget: benchmarks/NOTES.md)");
  static constexpr int kHeadDim = kHeadDim_, kWarpgroups = 2, kThreads = 128 * kWarpgroups, kBlockM = 64 * kWarpgroups;
  static constexpr int kBlockN = 64;
  // A K tile, K's small part, V^T and V^T's small part: 64 x 64 floats (two 32-float panels) each,
  // double-buffered; and each warpgroup's Q rows' big parts, one tile each. + 1024: the swizzle
  // atoms' alignment.
  static constexpr int kTileBytes = kBlockN * kHeadDim * 4;
  static constexpr int kSmemBytes = 10 * kTileBytes + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
};

// The k8 group j of a [64][64] float tile stored as two 32-float panels (panel_offset<64, 4>).
__device__ __forceinline__ uint64_t fp32_tile_desc(const unsigned char* tile, int j) {
  return smem_desc_k_major_sw128(tile, (j / 4) * 64 * 128 + (j % 4) * 32);
}

// Where key k of an 8-key group sits in V^T: the A fragment's slot t holds P's column 2t, slot
// t + 4 column 2t + 1.
__device__ __forceinline__ int key_slot(int key) { return (key & ~7) | ((key & 7) >> 1) | ((key & 1) << 2); }

template <int kHeadDim_>
__global__ void __launch_bounds__(FwdSm90Fp32Kernel<kHeadDim_>::kThreads, 1)
    flash_fwd_sm90_fp32_kernel(const FlashFwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using K = FwdSm90Fp32Kernel<kHeadDim_>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kHeadDim = K::kHeadDim, kThreads = K::kThreads;
  extern __shared__ char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  auto tile = [&](int which, int buf) { return smem + (2 * which + buf) * K::kTileBytes; };
  enum { kK, kKSmall, kVt, kVtSmall, kQBig };  // kQBig's "buf": the warpgroup

  const AttentionShape& sh = p.shape;
  const CpAsyncTile<float, kBlockM, kBlockN> t(p);
  if (t.empty()) return;
  const Sequence& seq = t.seq;
  const Range n_blocks = t.n_blocks;
  const int tid = threadIdx.x, lane = tid % 32;
  if (p.tile_counters && tid == 0) count_tiles(p.tile_counters, seq, n_blocks, kBlockM, kBlockN);
  static_assert(kPageSizeMultiple % kBlockN == 0, "a key block lies in one page");

  // K's rows by cp.async into the swizzled panels (columns past head_dim zero); 16 chunks of 4
  // floats a row, 4 chunks a thread. The same thread later splits its chunks (split_k).
  constexpr int kChunksPerThread = kBlockN * kHeadDim / 4 / kThreads;
  auto chunk_at = [&](int i, int* row, int* col) {
    const int c = tid + i * kThreads;
    *row = c / (kHeadDim / 4);
    *col = (c % (kHeadDim / 4)) * 4;
  };
  auto load_k = [&](int n_block, int buf) {
    const int n0 = n_block * kBlockN, rows = seq.seqlen_k - n0;
    const float* src = t.k + key_offset(p, p.k_strides, t.b, n0);
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      int r, col;
      chunk_at(i, &r, &col);
      const bool valid = r < rows && col < sh.head_dim;
      cp_async_16(tile(kK, buf) + panel_offset<kBlockN, 4>(r, col), valid ? src + r * p.k_strides.row + col : src,
                  valid);
    }
  };
  auto split_k = [&](int buf) {  // after this thread's cp.async chunks landed
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      int r, col;
      chunk_at(i, &r, &col);
      const uint32_t at = panel_offset<kBlockN, 4>(r, col);
      const uint4 x = *reinterpret_cast<const uint4*>(tile(kK, buf) + at);
      const Tf32Split s[4] = {split_tf32(__uint_as_float(x.x)), split_tf32(__uint_as_float(x.y)),
                              split_tf32(__uint_as_float(x.z)), split_tf32(__uint_as_float(x.w))};
      *reinterpret_cast<uint4*>(tile(kK, buf) + at) = make_uint4(s[0].big, s[1].big, s[2].big, s[3].big);
      *reinterpret_cast<uint4*>(tile(kKSmall, buf) + at) = make_uint4(s[0].small, s[1].small, s[2].small, s[3].small);
    }
  };
  // V's rows from global memory (4 floats a load), written transposed, keys in key_slot order,
  // with their small parts; keys past the sequence's and columns past head_dim as 0 (P V
  // multiplies padded keys by P = 0, which must not meet a NaN). A warp takes 32 keys of the same
  // 4 columns, so that each of its stores is one 128-byte row of V^T: no bank conflict.
  auto v_chunk_at = [&](int i, int* key, int* col) {
    const int c = tid + i * kThreads;
    *key = c % kBlockN;
    *col = (c / kBlockN) * 4;
  };
  auto load_v_transposed = [&](int n_block, int buf) {
    const int n0 = n_block * kBlockN, rows = seq.seqlen_k - n0;
    const float* src = t.v + key_offset(p, p.v_strides, t.b, n0);
    float4 x[kChunksPerThread];
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      int key, col;
      v_chunk_at(i, &key, &col);
      x[i] = key < rows && col < sh.head_dim ? *reinterpret_cast<const float4*>(src + key * p.v_strides.row + col)
                                             : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      int key, col;
      v_chunk_at(i, &key, &col);
      const float values[4] = {x[i].x, x[i].y, x[i].z, x[i].w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t at = panel_offset<kHeadDim, 4>(col + e, key_slot(key));
        const Tf32Split x = split_tf32(values[e]);
        *reinterpret_cast<uint32_t*>(tile(kVt, buf) + at) = x.big;
        *reinterpret_cast<uint32_t*>(tile(kVtSmall, buf) + at) = x.small;
      }
    }
  };

  // This warp's 16 rows (warpgroup g: rows 64 g ..); lane: rows g = lane / 4 and g + 8, k columns
  // t = lane % 4 and t + 4 of each k8 group: Q's A fragments, split, loaded once.
  const int warp_row = 16 * (tid / 32), row0 = t.m_start + warp_row;
  WarpAcc<kHeadDim> o;
  o.zero();
  OnlineSoftmax softmax;
  const ScoreMod<float> mod(p, t.b, t.h);

  if (n_blocks.end > n_blocks.begin) {
    load_k(n_blocks.end - 1, 0);  // keys last block first, as the other forwards
    cp_async_commit();
    uint32_t q_small[kHeadDim / 8][4];
    // Q's big parts in this warpgroup's tile (64 rows, as K's), read by S's ss wgmmas.
    const int warpgroup = warpgroup_index();  // warp-uniform: the descriptors stay in uniform registers
    unsigned char* q_big = tile(kQBig, warpgroup);
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = row0 + (lane >> 2) + 8 * (r & 1), col = 8 * j + (lane & 3) + 4 * (r >> 1);
        const Tf32Split x = split_tf32(row < seq.seqlen_q && col < sh.head_dim ? t.q[row * p.q_strides.row + col] : 0.f);
        *reinterpret_cast<uint32_t*>(q_big + panel_offset<64, 4>(row - t.m_start - 64 * warpgroup, col)) = x.big;
        q_small[j][r] = x.small;
      }
    load_v_transposed(n_blocks.end - 1, 0);

    for (int n_block = n_blocks.end - 1, buf = 0; n_block >= n_blocks.begin; --n_block, buf ^= 1) {
      cp_async_wait_all();
      asm volatile("" ::: "memory");  // split_k's loads stay after the wait
      split_k(buf);
      fence_async_shared();  // this thread's generic and cp.async writes, visible to the wgmmas
      __syncthreads();       // every thread's part written; both warpgroups done with buf ^ 1
      const bool next = n_block > n_blocks.begin;
      if (next) load_k(n_block - 1, buf ^ 1);
      cp_async_commit();

      // S in four fresh sums of 16 head dims (six wgmmas each, as the mma.sync kernel's k16
      // steps), added by FADD: the tensor cores truncate each wgmma's sum toward zero, and at
      // scores near 40 an ulp of S is a relative error of P (one sum of 24 wgmmas put dK 1.06x
      // past the float32 bound, two of 12 at 0.97x, four of 6 at 0.23x as the mma.sync kernel:
      // benchmarks/fp32_error_margin.py). Three sums in flight: registers freed by Q's big part
      // in shared memory (ss).
      WarpAcc<kBlockN> s, s_b, s_c, s_d;  // four accumulators (ptxas: s_d gets registers of its own)
      auto qk_chunk = [&](WarpAcc<kBlockN>& acc, int chunk) {
#pragma unroll
        for (int j = 2 * chunk; j < 2 * chunk + 2; ++j) {
          Wgmma<float, kBlockN>::rs(acc_regs<kBlockN>(acc, 0), q_small[j], fp32_tile_desc(tile(kK, buf), j),
                                    j > 2 * chunk);
          Wgmma<float, kBlockN>::ss(acc_regs<kBlockN>(acc, 0), fp32_tile_desc(q_big, j),
                                    fp32_tile_desc(tile(kKSmall, buf), j), 1);
          Wgmma<float, kBlockN>::ss(acc_regs<kBlockN>(acc, 0), fp32_tile_desc(q_big, j),
                                    fp32_tile_desc(tile(kK, buf), j), 1);
        }
      };
      static_assert(kHeadDim == 64, "four 16-dim sums");
      wgmma_fence();
      qk_chunk(s, 0);
      qk_chunk(s_b, 1);
      wgmma_commit();
      qk_chunk(s_c, 2);
      wgmma_commit();
      wgmma_wait<1>();
      s.add(s_b);
      wgmma_fence();
      qk_chunk(s_d, 3);
      wgmma_commit();
      if (next) load_v_transposed(n_block - 1, buf ^ 1);  // while S runs on the tensor cores
      wgmma_wait<0>();
      s.add(s_c);
      s.add(s_d);

      scores_from_qk<false>(s, mod, p.mask, seq, row0, n_block * kBlockN, lane);
      softmax.rescale_and_exp(s, o);

      // P's 8-key group j: registers (g, 2t), (g + 8, 2t), (g, 2t + 1), (g + 8, 2t + 1): the A
      // fragment's slots t, t (row + 8), t + 4, t + 4 (row + 8) in key_slot order.
      uint32_t p_big[kBlockN / 8][4], p_small[kBlockN / 8][4];
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        const float fragment[4] = {s.v[j][0], s.v[j][2], s.v[j][1], s.v[j][3]};
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const Tf32Split x = split_tf32(fragment[r]);
          p_big[j][r] = x.big;
          p_small[j][r] = x.small;
        }
      }
      WarpAcc<kHeadDim> o_step;
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        Wgmma<float, kHeadDim>::rs(acc_regs<kHeadDim>(o_step, 0), p_small[j], fp32_tile_desc(tile(kVt, buf), j),
                                   j > 0);
        Wgmma<float, kHeadDim>::rs(acc_regs<kHeadDim>(o_step, 0), p_big[j], fp32_tile_desc(tile(kVtSmall, buf), j),
                                   1);
        Wgmma<float, kHeadDim>::rs(acc_regs<kHeadDim>(o_step, 0), p_big[j], fp32_tile_desc(tile(kVt, buf), j), 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
      o.add(o_step);
    }
  }

  // The output, staged through shared memory (now free) as in the other forwards.
  t.template store_output<K::kSmemBytes>(p, o, softmax, 1.f, smem, warp_row, lane);  // no dropout here
#endif
}

}  // namespace cuflash::sm90
