// The Hopper backward kernels, warp-specialized (the default part "bwdws" of CUFLASH_SM90; plain
// attention). The arithmetic is flash_bwd_sm90.cuh's (at head dim 256 too: 32 streamed rows a
// step, dK and dV in two launches); the loads move to a
// producer warpgroup, as in the TMA forward: one thread loads the resident tiles once and each
// step's streamed tiles by TMA into a 2-stage ring. The consumers (two warpgroups, 64 rows each)
// wait on the stage's "full" mbarrier and release it on its "empty" one, with no block-wide
// barrier per step: the cp.async kernels' __syncthreads kept both warpgroups in lockstep, so that
// one's exp2 and dS never overlapped the other's wgmmas.
//   dK/dV: keys resident, Q and dO streamed; a second producer warp stages each step's lse and
//          delta (the streamed queries'). kAccumDq (with p.dq_accum: deterministic=False): dQ
//          too, FlashAttention-3's way: both consumer warpgroups stage their keys' dS in one
//          [query][key] buffer (two, alternating by step), then dQ part = dS K over all 128
//          keys is one 64 x 64 wgmma a warpgroup (at D=128 each takes 64 columns, at D=64 the
//          two take turns by step, or with 128-query steps each takes 64 of the rows) issued
//          beside dK's, into an fp32 buffer that a third
//          producer warp adds to dq_accum by TMA reduce (two 64 x 32 boxes a part), off the
//          consumers' path; with kOrderedDq in a fixed order, for a reproducible dQ. (Head dim
//          256 has its own fused kernel, flash_bwd_sm90_fused256.cuh, which shares this file's
//          tile ring, DkvTileRing, and ordered adds.)
//   dQ:    queries resident (their lse and delta in registers), K and V streamed.
#pragma once
#include <type_traits>
#include "flash_bwd_sm90.cuh"
#include "staged_mask.h"
#include "tma_maps.h"

namespace cuflash::sm90 {

// The fused kernel's dQ parts (and so the dq_accum map's boxes): 64 query rows each.
constexpr int kDqPartRows = 64;

// Packed sequences (cu_seqlens; CUFLASH_SM90's "bwdvarlen" part) on the dQ and dK/dV kernels of
// head-dim buckets 64 and 128 (kMayPack), not on the head-dim-256 pair (head dim 256's fused kernel
// takes them, flash_bwd_sm90_fused256.cuh). Their tensors are one batch
// of all the sequences' rows (attention_map_rows), a box starting at its sequence's row. Where a box
// reads past a sequence's end, the rows of another sequence it brought are zeroed in shared
// memory before any wgmma reads them (zero_rows_of_panels), so that they meet the masks as the
// zeros TMA fills past a padded batch's rows do, and a NaN or Inf of another sequence cannot
// reach this one's gradients as 0 x NaN; no box is stored past a sequence's end.
constexpr bool bwd_may_pack(int head_dim) { return head_dim <= 128; }

// The persistent dK/dV kernel's dK and dV by TMA store: each consumer's 64 key rows of a panel a
// box (the maps' boxes).
constexpr int kDkvStoreRows = 64;

// The dQ kernel's shape: 128 resident queries, 64 (32) streamed keys a step.
template <typename T, int kHeadDim>
struct BwdDqSm90TmaKernel {
  static_assert(kBwdHeadDim<kHeadDim>, "a Hopper backward head dim");
  static constexpr bool kMayPack = bwd_may_pack(kHeadDim);
  static constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1), kConsumerThreads = 128 * kConsumers;
  static constexpr int kBlockM = 64 * kConsumers;              // resident queries
  static constexpr int kBlockN = kBwdStreamedRows<kHeadDim>;  // streamed keys per step
  static constexpr int kStages = 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2, kKVBytes = kBlockN * kHeadDim * 2;
  // Barriers: Q/dO full, then per stage full (TMA bytes) and empty (consumer warps).
  static constexpr int kBarriers = 1 + 2 * kStages;
  static constexpr int kSmemBytes = 2 * kQBytes + 2 * kStages * kKVBytes + kBarriers * 8 + 1024;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(fits_launch_registers<kThreads>(kProducerRegs, kConsumerRegs), "setmaxnreg's split");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
};

// kPacked: packed sequences (kMayPack, above); a kernel of its own, so that the padded batches'
// kernels stay as they were.
template <typename T, int kHeadDim, bool kPacked>
__global__ void __launch_bounds__(BwdDqSm90TmaKernel<T, kHeadDim>::kThreads, 1)
    flash_bwd_dq_sm90_tma_kernel(const FlashBwdParams p, const __grid_constant__ CUtensorMap map_q,
                                 const __grid_constant__ CUtensorMap map_dout, const __grid_constant__ CUtensorMap map_k,
                                 const __grid_constant__ CUtensorMap map_v) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using K = BwdDqSm90TmaKernel<T, kHeadDim>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kStages = K::kStages, kPanels = kHeadDim / 64;
  extern __shared__ char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  unsigned char* sQ = smem;
  unsigned char* sdO = smem + K::kQBytes;
  auto sK = [&](int stage) { return smem + 2 * K::kQBytes + stage * K::kKVBytes; };
  auto sV = [&](int stage) { return smem + 2 * K::kQBytes + (kStages + stage) * K::kKVBytes; };
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + 2 * K::kQBytes + 2 * kStages * K::kKVBytes);
  uint64_t* full = q_full + 1;
  uint64_t* empty = full + kStages;

  const AttentionShape& sh = p.shape;
  const int m_block = query_block_longest_first(), h = blockIdx.y, b = blockIdx.z;
  const int h_kv = h / (sh.heads_q / sh.heads_kv);
  const int tid = threadIdx.x, warpgroup = warpgroup_index(), lane = tid % 32;
  const int m_start = m_block * kBlockM;
  const Sequence seq = sequence_of(p, b);
  if (m_start >= seq.seqlen_q) return;
  const MaskParams mask = unpacked_mask(p.mask);  // rows_per_query a compile-time 1
  const Range n_blocks = key_blocks(mask, seq, m_start, min(m_start + kBlockM, seq.seqlen_q), kBlockN);
  const int steps = n_blocks.end - n_blocks.begin;
  // Packed: the boxes at the sequence's rows of the one batch.
  static_assert(!kPacked || K::kMayPack, "packed sequences at this head dim");
  constexpr bool packed = kPacked;
  const int box_batch = packed ? 0 : b;

  if (tid == 0) {
    mbarrier_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], K::kConsumerThreads / 32);  // one arrival per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {  // producer: one thread
    setmaxnreg_dec<K::kProducerRegs>();
    if (tid != 0 || steps == 0) return;
    const int q_row = packed ? static_cast<int>(seq.q_row0) + m_start : m_start;
    const int k_row0 = packed ? static_cast<int>(seq.k_row0) : 0;
    mbarrier_arrive_expect_tx(q_full, 2 * K::kQBytes);
#pragma unroll
    for (int panel = 0; panel < kPanels; ++panel) {
      tma_load_4d(sQ + panel * kBlockM * 128, &map_q, q_full, panel * 64, q_row, h, box_batch);
      tma_load_4d(sdO + panel * kBlockM * 128, &map_dout, q_full, panel * 64, q_row, h, box_batch);
    }
    for (int step = 0; step < steps; ++step) {
      const int stage = step % kStages, use = step / kStages, n0 = k_row0 + (n_blocks.begin + step) * kBlockN;
      if (step >= kStages) mbarrier_wait(&empty[stage], (use - 1) & 1);
      mbarrier_arrive_expect_tx(&full[stage], 2 * K::kKVBytes);
#pragma unroll
      for (int panel = 0; panel < kPanels; ++panel) {
        tma_load_4d(sK(stage) + panel * kBlockN * 128, &map_k, &full[stage], panel * 64, n0, h_kv, box_batch);
        tma_load_4d(sV(stage) + panel * kBlockN * 128, &map_v, &full[stage], panel * 64, n0, h_kv, box_batch);
      }
    }
    return;
  }

  // Consumers: warpgroup c = 1, 2 owns queries 64 (c - 1) .. of the block; this warp 16 of them.
  setmaxnreg_inc<K::kConsumerRegs>();
  const int consumer = warpgroup - 1;
  const int warp_row = 16 * ((tid - 128) / 32), row0 = m_start + warp_row;
  float lse2[2], delta[2];
  lane_row_stats(p, seq, b, h, row0, lane, lse2, delta);
  const uint32_t my_rows = consumer * 64 * 128;
  const uint64_t desc_q = smem_desc_k_major_sw128(sQ, my_rows), desc_do = smem_desc_k_major_sw128(sdO, my_rows);
  auto stage_bytes = [&](int stage) { return static_cast<uint64_t>((stage * K::kKVBytes) >> 4); };
  const uint64_t desc_k0 = smem_desc_k_major_sw128(sK(0)), desc_v0 = smem_desc_k_major_sw128(sV(0));
  const uint64_t desc_k0_mn = smem_desc_mn_major_sw128(sK(0), 0, kBlockN * 128);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  WarpAcc<kHeadDim> dq;
  dq.zero();
  if (steps > 0) mbarrier_wait(q_full, 0);
  for (int step = 0; step < steps; ++step) {
    const int stage = step % kStages, n_block = n_blocks.begin + step;
    mbarrier_wait(&full[stage], (step / kStages) & 1);
    // Packed: the block past the sequence's last key (its masked scores' dP and dS K would take
    // another sequence's V and K). The Q and dO rows past its last query feed only dq rows that
    // are not stored.
    const int keys_in_block = seq.seqlen_k - n_block * kBlockN;  // > 0: the block has a key
    if (packed && keys_in_block < kBlockN)  // the same for both consumers
      zero_rows_before_wgmma<kPanels, kBlockN, K::kConsumerThreads>(keys_in_block, tid - 128, 2, sK(stage), sV(stage));
    add_dq_part<T, kHeadDim, kBlockM, kBlockN>(dq, desc_q, desc_do, desc_k0 + stage_bytes(stage),
                                               desc_v0 + stage_bytes(stage), desc_k0_mn + stage_bytes(stage), lse2,
                                               delta, scale_log2, mask, seq, row0, n_block, lane);
    __syncwarp();
    if (lane == 0) mbarrier_arrive(&empty[stage]);  // this warp is done with the stage
  }

  // The output, staged through the Q/dO tiles once both consumers' wgmmas are done reading them.
  named_barrier_sync<K::kConsumerThreads>(1);
  const SmemTile<T, kBlockM, kHeadDim> stage_tile{reinterpret_cast<T*>(smem)};
  static_assert(SmemTile<T, kBlockM, kHeadDim>::kElems * sizeof(T) <= 2 * K::kQBytes + 2 * kStages * K::kKVBytes,
                "staging fits");
  const float row_scale[2] = {static_cast<float>(p.scale), static_cast<float>(p.scale)};
  T* dq_out = row_at<T>(p.dq, p.dq_strides, seq, true, b, h, 0);
  warp_store_rows<T, kHeadDim>(dq, row_scale, stage_tile, warp_row, dq_out + row0 * p.dq_strides.row,
                               p.dq_strides.row, seq.seqlen_q - row0, sh.head_dim, lane);
#endif
}

// kOrderedDq's tile order: the CTA that takes tile `tile` computes key block n_block of head h_kv
// of batch b (blocks key blocks a head, heads (K/V head, batch) pairs). The heads go in groups whose q, dO and dq_accum fit in about half an H100's L2;
// within a group, the last key block of every head, then the one before, and so on. A key block
// thus starts after the one it waits for, not beside it: with every CTA of a head started at
// once, each waits for the adds of all the key blocks after it, one by one (head by head, the
// first version ran 10-20% behind the unordered adds; benchmarks/NOTES.md).
template <int kHeadDim>
__device__ __forceinline__ void ordered_tile(const FlashBwdParams& p, int tile, int blocks, int heads, int* n_block,
                                             int* h_kv, int* b) {
  const AttentionShape& sh = p.shape;
  const int64_t head_bytes = int64_t{sh.heads_q / sh.heads_kv} * max(sh.seqlen_q, 1) * kHeadDim * (2 + 2 + 4);
  const int group_heads = static_cast<int>(max(int64_t{1}, min(int64_t{heads}, (int64_t{24} << 20) / head_bytes)));
  const int group = tile / (group_heads * blocks), first = group * group_heads;
  const int in_group = tile - first * blocks, width = min(group_heads, heads - first);
  const int head = first + in_group % width, level = in_group / width;
  *n_block = blocks - 1 - level;
  *h_kv = head % sh.heads_kv;
  *b = head / sh.heads_kv;
}

// kWithDk, kWithDv: which of the two it computes (both but at head dim 256, where one 64 x 256
// accumulator is 128 registers per thread: two launches, the dV one loading no V and computing no
// dP, as the cp.async kernel).
// kWideSteps (head dim 64's default; CUFLASH_BWD_TILE=narrow turns it off; with kAccumDq, on
// long columns: fused_wide_steps_pay, CUFLASH_BWD_FUSED_TILE): 128 streamed queries a step,
// FlashAttention-3's head-dim-64 tile, so that each step's wgmmas are twice as long (S^T and dP^T
// 64 registers each); the step's order changes to fit (below).
// kOrderedDq (with kAccumDq, p.dq_semaphores: deterministic): the dQ adds in a fixed order (below).
template <typename T, int kHeadDim, bool kAccumDq = false, bool kWithDk = true, bool kWithDv = true,
          bool kWideSteps = false, bool kOrderedDq = false>
struct BwdDkvSm90TmaKernel {
  static_assert(kBwdHeadDim<kHeadDim>, "a Hopper backward head dim");
  static constexpr bool kMayPack = bwd_may_pack(kHeadDim);
  static_assert(kWithDk || kWithDv, "something to compute");
  static_assert(kWithDk && kWithDv ? kHeadDim <= 128 : kHeadDim > 128, "dK and dV together up to head dim 128");
  static_assert(!kAccumDq || kHeadDim <= 128, "dQ comes with dK and dV, in 64-row parts");
  static_assert(!kWideSteps || (kHeadDim == 64 && kWithDk && kWithDv), "wide steps: head dim 64, dK and dV");
  static_assert(!kOrderedDq || kAccumDq, "ordered adds of dQ");
  // The fused kernel (kAccumDq) runs persistent CTAs, its tiles taken from dkdv_tile_counter in
  // turn (benchmarks/NOTES.md, H200: at head dim 64 the ordered one +7-16% at 512-1024 keys, -1%
  // to +4% at 4096, the unordered one +5-13%; at 128, once its consumers stopped spilling, +0.4%
  // to +6% ordered and +3-7% unordered at 1024-16384 keys, causal from 2048). (An unordered walk
  // of every gridDim.x-th tile ran causal 14-28% slower than the hardware's scheduling of a full
  // grid.) dK and dV then go out by TMA store: the next tile's K and V load waits only for the
  // bulk stores to have read their buffers. (The TMA store alone, in kernels that were not
  // persistent, measured -5% to +1%.)
  static constexpr bool kPersistent = kAccumDq;
  static constexpr bool kTmaStoreDkv = kPersistent;
  static constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1), kConsumerThreads = 128 * kConsumers;
  static constexpr int kBlockN = 64 * kConsumers;              // resident keys
  static constexpr int kBlockM = kWideSteps ? 128 : kBwdStreamedRows<kHeadDim>;  // streamed queries per step
  static constexpr int kStages = 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2, kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kStatsBytes = 2 * kStages * kBlockM * 4;  // lse2 and delta per stage
  // kAccumDq: dS ([query][key] as two 64-key panels, one per consumer) in two buffers, the step's
  // parity picking one, so that a step's stores never wait for the other consumer's dQ wgmma of
  // the step before; and each consumer's fp32 dQ part ([row][64 columns]).
  static constexpr int kDsBufferBytes = kBlockM * kBlockN * 2;
  static constexpr int kDsBytes = kAccumDq ? 2 * kDsBufferBytes : 0;
  // Which dQ part a consumer computes: the 64 columns of its index at D=128; with wide steps the
  // 64 query rows of its index (FlashAttention-3's split at D=64); at D=64 otherwise the whole
  // 64 x 64, by the consumer whose index is the step's parity.
  static constexpr bool kDqByColumns = kHeadDim == 128, kDqByRows = kWideSteps;
  static constexpr bool kDqEveryStep = kDqByColumns || kDqByRows;
  // A dQ part: 64 rows x 64 columns as two 128B-swizzled panels of 32 columns, the boxes of the
  // dq_accum map (the swizzle also spreads the fragment stores over the banks).
  static constexpr int kDqPanelBytes = kDqPartRows * 32 * 4, kDqPartBytes = 2 * kDqPanelBytes;
  static constexpr int kDqBytes = kAccumDq ? kConsumers * kDqPartBytes : 0;
  // Barriers: K/V full, then per stage full (TMA bytes + the stats warp) and empty (consumer
  // threads); kAccumDq: per consumer dq_full (its warps) and dq_empty (the drain warp); kPersistent:
  // K/V empty, and the tile ring's two full and two empty, and its two slots (32 bytes).
  // Ordered: the second drain's buffer's barriers too (kDqBarrierSets; used where two drains run:
  // kTwoDqDrains, no staged mask).
  static constexpr int kDqBarrierSets = kOrderedDq ? 2 : 1;
  static constexpr int kBarriers =
      1 + 2 * kStages + (kAccumDq ? 2 * kConsumers * kDqBarrierSets : 0) + (kPersistent ? 5 : 0);
  static constexpr int kBarrierEnd = 2 * kKVBytes + 2 * kStages * kQBytes + kDsBytes + kDqBytes + kStatsBytes +
                                     kBarriers * 8 + (kPersistent ? 32 : 0);
  // + 1024: the swizzle atoms must start on 1024-byte boundaries; the base is aligned by hand.
  static constexpr int kSmemBytes = kBarrierEnd + 1024;
  // attn_mask tiles staged by TMA (the "bwdmasktma" part; MaskStaging): with each step's Q and dO,
  // its kBlockM queries x kBlockN keys of 16-bit elements (a bool mask fills half), in boxes of 64
  // keys, after the barriers. On the fused kernel's 64-query steps (the features' steps), whose
  // shared memory has room: at head dim 128 exactly (232,448 bytes of 232,448), at 64 with 64 KB
  // to spare; not the 128-query steps of head dim 64.
  static constexpr int kMaskOffset = (kBarrierEnd + 1023) / 1024 * 1024;
  static constexpr int kMaskStageBytes = kBlockM * kBlockN * 2;
  static constexpr int kSmemBytesStagingMask = kMaskOffset + kStages * kMaskStageBytes + 1024;
  static constexpr bool kMayStageMask = kAccumDq && kWithDk && kWithDv && !kWideSteps &&
                                        kSmemBytesStagingMask <= 227 * 1024;
  // Ordered dQ adds go out through two drain threads (warps 2 and 3 of the producer), each owning
  // one of two buffers a consumer and the steps whose parts use it, so that one step's wait for
  // its turn and for its adds to complete overlaps the next step's (H100, bf16: the deterministic
  // backward +4.5-9% at head dim 128 and 2048-4096 keys, flat elsewhere; benchmarks/NOTES.md, "Two
  // dQ drains"). Where shared memory has room, in the kernels without a staged mask: the second
  // drain's dQ parts where the staged mask's stages would be (head dim 128: 232,448 bytes of 232,448).
  // (Head dim 64's 128-query steps fit them only on the base's alignment bytes: measured there,
  // no gain; benchmarks/NOTES.md, "two drains on an aligned base".)
  static constexpr int kSmemBytesTwoDq = kMaskOffset + kDqBytes + 1024;
  static constexpr bool kTwoDqDrains = kDqBarrierSets == 2 && kSmemBytesTwoDq <= 227 * 1024;
  static constexpr int kSmemBytesUnstaged = kTwoDqDrains ? kSmemBytesTwoDq : kSmemBytes;
  // The producer's loop (TMA coordinates per step, the stats warp's rows) spills at 24 registers;
  // the consumers can spare 8 but at head dim 128 (where ptxas would serialize the wgmmas).
  static constexpr int kProducerRegs = kHeadDim != 128 ? 40 : 24, kConsumerRegs = kHeadDim != 128 ? 232 : 240;
  static_assert(fits_launch_registers<kThreads>(kProducerRegs, kConsumerRegs), "setmaxnreg's split");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
};

// One tile of the dK/dV kernel: a key block of a K/V head of a sequence, and its steps: step t
// takes query head h_kv * group + t / per_head, block m.begin + t % per_head (as the cp.async
// kernel).
struct DkvTile {
  int n_block, h_kv, b, n_start;
  Sequence seq;
  Range m;
  int per_head, steps;
  __device__ __forceinline__ int head(int step, int group) const { return h_kv * group + step / per_head; }
  // staggered (unordered dQ adds): each key block starts at its own query block, so that the
  // CTAs of a head do not all add to the same dq_accum rows at once.
  __device__ __forceinline__ int block(int step, bool staggered) const {
    return m.begin + (staggered ? (step % per_head + n_block) % per_head : step % per_head);
  }
};
template <int kBlockN, int kBlockM>
__device__ __forceinline__ DkvTile dkv_tile(const FlashBwdParams& p, const MaskParams& mask, int n_block, int h_kv,
                                            int b) {
  DkvTile t;
  t.n_block = n_block, t.h_kv = h_kv, t.b = b, t.n_start = n_block * kBlockN;
  t.seq = sequence_of(p, b);
  t.m = t.n_start < t.seq.seqlen_k
            ? query_blocks(mask, t.seq, t.n_start, min(t.n_start + kBlockN, t.seq.seqlen_k), kBlockM)
            : Range{0, 0};
  t.per_head = t.m.end - t.m.begin;
  t.steps = t.per_head * (p.shape.heads_q / p.shape.heads_kv);
  return t;
}

// The persistent kernels' tile walk: one CTA an SM, the TMA thread taking each tile from
// dkdv_tile_counter (ordered_tile's order with kOrderedDq, else the grid's: key blocks, then K/V
// heads, then sequences) and publishing it in a two-slot ring (full, empty) that every role
// reads. next(i, reader, tile): tile i of this CTA's walk into *tile, false past its last; the
// TMA thread (kPublish) takes and publishes it, the others read it, a whole warp (kWarp: every
// lane arrives on empty after its reads) or one thread (kLane).
template <int kBlockN, int kBlockM, int kHeadDim, bool kOrderedDq>
struct DkvTileRing {
  uint64_t* full;   // [2]
  uint64_t* empty;  // [2]
  int* slots;       // [2][4]: n_block, h_kv, b, valid
  int key_blocks_per_head, num_tiles;
  enum Reader { kPublish, kWarp, kLane };
  __device__ __forceinline__ DkvTileRing(const FlashBwdParams& p, uint64_t* full_, uint64_t* empty_, int* slots_)
      : full(full_), empty(empty_), slots(slots_) {
    key_blocks_per_head = (p.shape.seqlen_k + kBlockN - 1) / kBlockN;
    num_tiles = key_blocks_per_head * p.shape.heads_kv * p.shape.batch;
  }
  __device__ __forceinline__ bool next(const FlashBwdParams& p, const MaskParams& mask, int i, Reader reader,
                                       DkvTile* tile) const {
    const AttentionShape& sh = p.shape;
    const int slot = i & 1;
    int* fields = slots + 4 * slot;
    if (reader == kPublish) {
      if (i >= 2) mbarrier_wait(&empty[slot], ((i >> 1) - 1) & 1);
      const int index = atomicAdd(p.dkdv_tile_counter, 1);
      fields[3] = index < num_tiles;
      if (index < num_tiles) {
        if constexpr (kOrderedDq) {
          ordered_tile<kHeadDim>(p, index, key_blocks_per_head, sh.heads_kv * sh.batch, &fields[0], &fields[1],
                                 &fields[2]);
        } else {
          const int head_batch = index / key_blocks_per_head;
          fields[0] = index - head_batch * key_blocks_per_head;
          fields[1] = head_batch % sh.heads_kv;
          fields[2] = head_batch / sh.heads_kv;
        }
      }
      mbarrier_arrive(&full[slot]);  // release: the fields before it
    } else {
      mbarrier_wait(&full[slot], (i >> 1) & 1);
    }
    // A whole warp reads: warp-uniform, as above.
    auto field = [&](int f) { return reader == kWarp ? warp_uniform(fields[f]) : fields[f]; };
    const bool valid = field(3) != 0;
    const int n_block = field(0), h_kv = field(1), b = field(2);
    if (reader != kPublish) mbarrier_arrive(&empty[slot]);  // every lane of a kWarp reader
    if (valid) *tile = dkv_tile<kBlockN, kBlockM>(p, mask, n_block, h_kv, b);
    return valid;
  }
};

// Ordered dQ adds: waits until it is key block tile.n_block's turn to add to query block `block`
// of head h (after every later key block that adds there), and returns that block's counter, which
// the caller raises by one once its adds are complete (add_release_gpu).
template <int kBlockN, int kBlockM>
__device__ __forceinline__ int* wait_for_dq_turn(const FlashBwdParams& p, const MaskParams& mask, const DkvTile& tile,
                                                 int h, int block) {
  int* counter = p.dq_semaphores + dq_semaphore_index(p.shape, tile.b, h, block);
  const int row0 = block * kBlockM;
  const Range keys = visible_keys(mask, tile.seq, row0, min(row0 + kBlockM, tile.seq.seqlen_q));
  const int turn = (keys.end - 1) / kBlockN - tile.n_block;
  while (load_acquire_gpu(counter) != turn) {
  }
  fence_async_global();  // the earlier adds, acquired, before this CTA's bulk reduce
  return counter;
}
// Its end: this thread's bulk adds complete (all but the newest kInFlight groups, LateDqTurn's),
// then the next key block's turn on the counter.
template <int kInFlight = 0>
__device__ __forceinline__ void pass_dq_turn(int* counter) {
  bulk_wait_group<kInFlight>();
  fence_async_global();
  add_release_gpu(counter, 1);
}
// The drain thread's turns passed a step late (head dim 128's ordered drain where it is one
// thread: now the staged-mask kernel's only. H100, bf16, measured on the one-drain plain kernel:
// its deterministic backward +3-4% at 512 and 1024 keys without a mask, flat elsewhere; at head dim
// 64 mixed, and 4-17% slower in head dim 256's drain; benchmarks/NOTES.md): a step's turn once
// the next step's adds (kGroupsPerStep bulk groups) are issued too, so that the wait for a step's
// adds to complete overlaps the next step's turn and adds, not precedes them. Still after they
// complete, so the order of the adds is unchanged. Within a tile only (tile_done at its end):
// the turn a step holds then waits only on the key block after this one, a tile the walk handed
// out earlier (ordered_tile), never on a later tile, which could wait on this one's turn. The turn
// held is an index into p.dq_semaphores (one register of the drain thread's few, not a pointer's two).
struct LateDqTurn {
  int pending = -1;
  template <int kGroupsPerStep>
  __device__ __forceinline__ void step_issued(const FlashBwdParams& p, const int* counter) {
    if (pending >= 0) pass_dq_turn<kGroupsPerStep>(p.dq_semaphores + pending);  // every group but this step's
    pending = static_cast<int>(counter - p.dq_semaphores);
  }
  __device__ __forceinline__ void tile_done(const FlashBwdParams& p) {
    if (pending >= 0) pass_dq_turn(p.dq_semaphores + pending);
    pending = -1;
  }
};

// What a staged mask tile (MaskStaging) adds to a transposed warp tile's scores t (S^T: 16 keys
// from warp_key of the CTA's key block, kN queries from the step's first), as
// ScoreMod::with_mask_inside adds it (ScoreMod::plus_bias), bit for bit. Past the mask's rows and
// keys TMA reads zeros: a float mask adds 0 there; a bool one hides them, where the sequence's
// bounds hide the keys anyway and the rows past the queries have P = 0 (their lse2 is +inf).
template <typename T, int kN>
__device__ __forceinline__ void add_staged_mask_transposed(WarpAcc<kN>& t, uint32_t stage, const MaskStaging& m,
                                                           int warp_key, int lane) {
  auto add = [](float& x, float bias) { x = ScoreMod<T>::plus_bias(x, bias); };
  if (m.one_row) {  // keys warp_key + lane / 4 and + 8, the same for every query
    const uint32_t at = stage + m.one_row_offset(warp_key, lane);
    float bias[2];
#pragma unroll
    for (int half = 0; half < 2; ++half)
      bias[half] = m.is_bool ? AttnMaskSlice::bool_bias<float>(ld_shared_u8(at + 8 * half) != 0)
                             : pair_element<T>(ld_shared_u16(at + 16 * half), 0);
    for_each_value(t, [&](float& x, int, int e) { add(x, bias[e >> 1]); });
    return;
  }
  // The address computed here at each step (asm): held across the step loop, it would take a
  // register of the consumers' (the forward's kernels spilled so).
  if (m.is_bool) {
    uint32_t first = stage + m.bool_offset(warp_key, lane);
    asm volatile("" : "+r"(first));
#pragma unroll
    for (int j = 0; j < kN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t keep = ld_shared_u8(first + (8 * j + (e & 1)) * 64 + 8 * (e >> 1));
        add(t.v[j][e], AttnMaskSlice::bool_bias<float>(keep != 0));
      }
  } else {
    uint32_t first = stage + m.transposed_ldsm_offset(warp_key, lane);
    asm volatile("" : "+r"(first));
#pragma unroll
    for (int jj = 0; jj < kN / 16; ++jj) {
      uint32_t pairs[4];  // matrix 2 (j % 2) + half: the queries of elements (j, 2 half), (j, 2 half + 1)
      ldmatrix_x4_trans(pairs, first + jj * 2048);
#pragma unroll
      for (int m4 = 0; m4 < 4; ++m4) {
        const int j = 2 * jj + m4 / 2, half = m4 % 2;
        add(t.v[j][2 * half], pair_element<T>(pairs[m4], 0));
        add(t.v[j][2 * half + 1], pair_element<T>(pairs[m4], 1));
      }
    }
  }
}

// kPacked: packed sequences, as the dQ kernel's. kFeatures (the fused kernel's, 64-query steps:
// the "bwdfeatures" part): softcap, ALiBi, attn_mask and dropout, S^T and dP^T turned into
// (P z)^T and dS^T in one pass by the sm_80-class kernels' probs_and_ds_with_features (mask.cuh),
// so that both recompute the forward's scores and dropout mask alike. kStagedMask (with
// kFeatures, where K::kMayStageMask): the attn_mask's tiles staged in shared memory by the TMA
// thread with each step's Q and dO (MaskStaging, map_mask; the "bwdmasktma" part), a kernel of its
// own as the forward's (its code kept out of the features kernel's registers).
template <typename T, int kHeadDim, bool kAccumDq, bool kWithDk, bool kWithDv, bool kWideSteps, bool kOrderedDq,
          bool kPacked, bool kFeatures, bool kStagedMask = false>
__global__ void __launch_bounds__(
    BwdDkvSm90TmaKernel<T, kHeadDim, kAccumDq, kWithDk, kWithDv, kWideSteps, kOrderedDq>::kThreads, 1)
    flash_bwd_dkdv_sm90_tma_kernel(const FlashBwdParams p, const __grid_constant__ CUtensorMap map_q,
                                   const __grid_constant__ CUtensorMap map_dout,
                                   const __grid_constant__ CUtensorMap map_k,
                                   const __grid_constant__ CUtensorMap map_v,
                                   const __grid_constant__ CUtensorMap map_dq_accum,
                                   const __grid_constant__ CUtensorMap map_dk,
                                   const __grid_constant__ CUtensorMap map_dv,
                                   const __grid_constant__ CUtensorMap map_mask, const MaskStaging mask_staging) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using K = BwdDkvSm90TmaKernel<T, kHeadDim, kAccumDq, kWithDk, kWithDv, kWideSteps, kOrderedDq>;
  static_assert(!kStagedMask || (kFeatures && !kPacked && K::kMayStageMask),
                "a staged mask: the fused features kernels with room, dense batches");
  constexpr int kBlockN = K::kBlockN, kBlockM = K::kBlockM, kStages = K::kStages, kPanels = kHeadDim / 64;
  constexpr bool kPersistent = K::kPersistent;
  extern __shared__ char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  unsigned char* sK = smem;
  unsigned char* sV = smem + K::kKVBytes;
  auto sQ = [&](int stage) { return smem + 2 * K::kKVBytes + stage * K::kQBytes; };
  auto sdO = [&](int stage) { return smem + 2 * K::kKVBytes + (kStages + stage) * K::kQBytes; };
  unsigned char* sdS = smem + 2 * K::kKVBytes + 2 * kStages * K::kQBytes;  // kAccumDq: [buffer][consumer] panels
  unsigned char* sdQ = sdS + K::kDsBytes;                                   // kAccumDq: [consumer][panel]
  float* sLse2 = reinterpret_cast<float*>(sdS + K::kDsBytes + K::kDqBytes);  // [kStages][kBlockM]
  float* sDelta = sLse2 + kStages * kBlockM;                                // [kStages][kBlockM]
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(sDelta + kStages * kBlockM);
  uint64_t* full = kv_full + 1;
  uint64_t* empty = full + kStages;
  uint64_t* dq_full = empty + kStages;                               // kAccumDq: [buffer][consumer]
  uint64_t* dq_empty = dq_full + K::kConsumers * K::kDqBarrierSets;  // kAccumDq: [buffer][consumer]
  uint64_t* kv_empty = dq_empty + K::kConsumers * K::kDqBarrierSets;  // kPersistent: the epilogue's stores read K and V
  uint64_t* tile_full = kv_empty + 1;             // kPersistent: [2] the tile ring's slots
  uint64_t* tile_empty = tile_full + 2;           // kPersistent: [2]
  int* tile_slot = reinterpret_cast<int*>(tile_empty + 2);  // kPersistent: [2][4]
  auto sMask = [&](int stage) { return smem + K::kMaskOffset + stage * K::kMaskStageBytes; };  // kStagedMask
  // kAccumDq: the dQ parts' buffers, one a drain thread (K::kTwoDqDrains): use u of a
  // consumer's in buffer u % kDqBuffers, its barriers' phase (u / kDqBuffers) & 1, drained by
  // drain thread u % kDqBuffers. A step's parts are all one use (dq_use), so one drain takes
  // the step: its turn, adds and the turn's release.
  constexpr int kDqBuffers = K::kTwoDqDrains && !kStagedMask ? 2 : 1;
  auto dq_buffer = [&](int buffer) { return buffer == 0 ? sdQ : smem + K::kMaskOffset; };

  const AttentionShape& sh = p.shape;
  const int tid = threadIdx.x, warpgroup = warpgroup_index(), lane = tid % 32;
  const int group = sh.heads_q / sh.heads_kv;
  const MaskParams mask = unpacked_mask(p.mask);  // rows_per_query a compile-time 1
  // Packed: a tile's boxes at its sequence's rows of the one batch.
  static_assert(!kPacked || K::kMayPack, "packed sequences at this head dim");
  constexpr bool packed = kPacked;
  // (Of values, not of the tile by reference: that changed the padded batches' fused kernels' code.)
  auto box_row = [](int64_t sequence_row0, int row) { return packed ? static_cast<int>(sequence_row0) + row : row; };
  auto box_batch = [](int b) { return packed ? 0 : b; };
  // kOrderedDq (p.dq_semaphores, deterministic): every query block takes its dQ shares from the
  // key blocks in one order, the last first (each step's parts added, complete, then the block's
  // counter raised; the next key block waits for its turn on it). The CTAs take their tiles from a
  // counter, so that a CTA only waits for CTAs that started before it (none waits for one that
  // cannot get an SM), in the order ordered_tile gives: key block by key block over a group of heads.
  // They visit their query blocks in the same order (no stagger): under a causal mask key block n
  // then reaches each block one step after n + 1. (The first key block first, which starts the
  // longest causal key blocks first, ran 7-35% slower: block n reaches each query block a step
  // before n - 1 does and waits for it; benchmarks/NOTES.md.)
  // kPersistent: one CTA an SM walks tiles, the TMA thread taking each (dkdv_tile_counter's
  // next: ordered_tile's order, or the grid's) and publishing it in a two-slot ring that every
  // role reads (tile_full, tile_empty); the Q/dO ring, the stats and the dQ drain run on across
  // tiles (global step g), so that the next tile's first loads go out during this tile's last
  // steps and epilogue; K and V wait for the epilogue's stores to have read their buffers
  // (kv_empty). Otherwise (the pair's dK/dV kernel) a CTA a tile, its blockIdx.
  using Ring = DkvTileRing<kBlockN, kBlockM, kHeadDim, kOrderedDq>;
  const Ring ring(p, tile_full, tile_empty, tile_slot);
  DkvTile first_tile{};
  if constexpr (!kPersistent) {
    first_tile = dkv_tile<kBlockN, kBlockM>(p, mask, blockIdx.x, blockIdx.y, blockIdx.z);
    if (first_tile.n_start >= first_tile.seq.seqlen_k) return;
  }
  // Tile i of this CTA's walk (DkvTileRing), or its one tile (its blockIdx).
  auto next_tile = [&](int i, typename Ring::Reader reader, DkvTile* tile) {
    if constexpr (!kPersistent) {
      *tile = first_tile;
      return i == 0;
    } else {
      return ring.next(p, mask, i, reader, tile);
    }
  };
  constexpr auto kPublish = Ring::kPublish, kWarp = Ring::kWarp, kLane = Ring::kLane;
  auto head_of = [&](const DkvTile& t, int step) { return t.head(step, group); };
  auto block_of = [&](const DkvTile& t, int step) { return t.block(step, kAccumDq && !kOrderedDq); };
  // kAccumDq: whether consumer c computes a dQ part at global step g, and which use of its buffer
  // that is.
  auto makes_dq = [&](int c, int g) { return K::kDqEveryStep || c == (g & 1); };
  // kAccumDq: the dS buffer of global step g, and the named barrier on which consumer c announces
  // its panel of it (ids 2-5: one per buffer and consumer, each used by c's arrival and the other's
  // wait; 1 is the epilogue's).
  auto ds_buffer = [](int g) { return g & 1; };
  auto ds_barrier = [&](int g, int c) { return 2 + 2 * ds_buffer(g) + c; };
  auto dq_use = [&](int g) { return K::kDqEveryStep ? g : g >> 1; };

  // A warp hands the generic shared-memory values it read or wrote (the stats, the tile ring's
  // fields) to another role through an mbarrier by an arrival from every lane, each lane's own
  // accesses released by its own arrival (as CUTLASS's pipelines do), not lane 0's after
  // __syncwarp, whose ordering compute-sanitizer's racecheck does not follow (it reported the
  // stats as races; benchmarks/NOTES.md).
  if (tid == 0) {
    mbarrier_init(kv_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1 + 32);                // the TMA thread, the stats warp's lanes
      mbarrier_init(&empty[s], K::kConsumerThreads);  // every consumer thread
    }
    if constexpr (kAccumDq)
      for (int c = 0; c < K::kConsumers * K::kDqBarrierSets; ++c) {
        mbarrier_init(&dq_full[c], 4);  // the consumer's warps
        mbarrier_init(&dq_empty[c], 1);
      }
    if constexpr (kPersistent) {
      mbarrier_init(kv_empty, K::kConsumers);  // each consumer's storing thread
      for (int s = 0; s < 2; ++s) {
        mbarrier_init(&tile_full[s], 1);
        mbarrier_init(&tile_empty[s], kDqBuffers + 32 + K::kConsumerThreads);  // the drains, stats warp, consumers
      }
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {  // producer
    setmaxnreg_dec<K::kProducerRegs>();
    const int warp = tid / 32;
    if constexpr (kAccumDq) {
      // The dQ drains (warp 2's lane 0, and warp 3's with two): each consumer's part added to
      // dq_accum in L2 by TMA reduce.
      if (warp == 2 || (kDqBuffers == 2 && warp == 3)) {
        if (lane == 0) {
          const int drain = warp - 2;
          DkvTile tile;
          constexpr bool kLateTurn = kOrderedDq && kHeadDim == 128 && kDqBuffers == 1;  // LateDqTurn's
          [[maybe_unused]] LateDqTurn late;
          for (int i = 0, g = 0; next_tile(i, kLane, &tile); ++i, g += tile.steps) {
            for (int step = 0; step < tile.steps; ++step) {
              if (dq_use(g + step) % kDqBuffers != drain) continue;  // the other drain's step
              const int h = head_of(tile, step), block = block_of(tile, step);
              int* counter = nullptr;
              if constexpr (kOrderedDq) counter = wait_for_dq_turn<kBlockN, kBlockM>(p, mask, tile, h, block);
              for (int c = 0; c < K::kConsumers; ++c) {
                if (!makes_dq(c, g + step)) continue;
                const int use = dq_use(g + step), buffer = use % kDqBuffers, slot = buffer * K::kConsumers + c;
                mbarrier_wait(&dq_full[slot], (use / kDqBuffers) & 1);
                const int col0 = K::kDqByColumns ? 64 * c : 0, row0 = K::kDqByRows ? 64 * c : 0;
                // Rows past seqlen_q: dropped, or packed, zeros added to the next sequence's rows.
                for (int panel = 0; panel < 2; ++panel)  // columns past head_dim: dropped
                  tma_reduce_add_4d(&map_dq_accum, dq_buffer(buffer) + c * K::kDqPartBytes + panel * K::kDqPanelBytes,
                                    col0 + 32 * panel, box_row(tile.seq.q_row0, block * kBlockM + row0), h,
                                    box_batch(tile.b));
                bulk_commit_group();
                bulk_wait_group_read<0>();  // the part is read: the consumer may overwrite it
                mbarrier_arrive(&dq_empty[slot]);
              }
              if constexpr (kOrderedDq) {  // the step's adds done
                constexpr int kGroupsPerStep = K::kDqEveryStep ? K::kConsumers : 1;  // makes_dq's parts
                if constexpr (kLateTurn) late.step_issued<kGroupsPerStep>(p, counter);
                else pass_dq_turn(counter);
              }
            }
            if constexpr (kLateTurn) late.tile_done(p);
          }
          bulk_wait_group_all();  // the adds themselves, before the CTA's shared memory goes
        }
        return;
      }
    }
    if (warp == 0 && lane == 0) {  // TMA
      DkvTile tile;
      for (int i = 0, g = 0; next_tile(i, kPublish, &tile); ++i, g += tile.steps) {
        auto load_step = [&](int step) {
          const int stage = (g + step) % kStages, use = (g + step) / kStages;
          if (g + step >= kStages) mbarrier_wait(&empty[stage], (use - 1) & 1);
          const int h = head_of(tile, step), m0 = block_of(tile, step) * kBlockM;
          mbarrier_arrive_expect_tx(&full[stage], 2 * K::kQBytes + (kStagedMask ? mask_staging.stage_tx_bytes : 0));
#pragma unroll
          for (int panel = 0; panel < kPanels; ++panel) {
            tma_load_4d(sQ(stage) + panel * kBlockM * 128, &map_q, &full[stage], panel * 64,
                        box_row(tile.seq.q_row0, m0), h, box_batch(tile.b));
            tma_load_4d(sdO(stage) + panel * kBlockM * 128, &map_dout, &full[stage], panel * 64,
                        box_row(tile.seq.q_row0, m0), h, box_batch(tile.b));
          }
          if constexpr (kStagedMask) {  // the step's mask tile: its queries (or the one row) x the block's keys
#pragma unroll
            for (int box = 0; box < kBlockN / 64; ++box)
              tma_load_4d(sMask(stage) + box * mask_staging.box_slot_bytes, &map_mask, &full[stage],
                          tile.n_start + 64 * box, mask_staging.one_row ? 0 : m0, mask_staging.per_head ? h : 0,
                          mask_staging.per_batch ? tile.b : 0);
          }
        };
        // Persistent: the first steps' Q and dO (their stages freed by the last tile's last steps)
        // before K and V, which wait for the last tile's epilogue to have stored from their buffers.
        const int early = kPersistent && i > 0 ? min(tile.steps, kStages) : 0;
        for (int step = 0; step < early; ++step) load_step(step);
        if (kPersistent && i > 0) mbarrier_wait(kv_empty, (i - 1) & 1);  // every tile's epilogue, in turn
        if (tile.steps > 0) {
          mbarrier_arrive_expect_tx(kv_full, (kWithDk ? 2 : 1) * K::kKVBytes);  // dP needs V; dV alone does not
#pragma unroll
          for (int panel = 0; panel < kPanels; ++panel) {
            tma_load_4d(sK + panel * kBlockN * 128, &map_k, kv_full, panel * 64,
                        box_row(tile.seq.k_row0, tile.n_start), tile.h_kv, box_batch(tile.b));
            if constexpr (kWithDk)
              tma_load_4d(sV + panel * kBlockN * 128, &map_v, kv_full, panel * 64,
                          box_row(tile.seq.k_row0, tile.n_start), tile.h_kv, box_batch(tile.b));
          }
        } else if constexpr (kPersistent) {
          // A tile without steps still stages zeros in K's and V's buffers and arrives on kv_empty:
          // its consumers wait here for this thread to have passed the last tile's kv_empty phase,
          // or kv_empty could complete twice before that wait and the wait never pass.
          mbarrier_arrive(kv_full);
        }
        for (int step = early; step < tile.steps; ++step) load_step(step);
      }
    } else if (warp == 1) {  // lse (as log2) and delta of each step's queries
      DkvTile tile;
      for (int i = 0, g = 0; next_tile(i, kWarp, &tile); ++i, g += tile.steps) {
        for (int step = 0; step < tile.steps; ++step) {
          const int stage = (g + step) % kStages, use = (g + step) / kStages;
          if (g + step >= kStages) mbarrier_wait(&empty[stage], (use - 1) & 1);
          block_row_stats<kBlockM, 32>(p, tile.seq, tile.b, head_of(tile, step), block_of(tile, step) * kBlockM, lane,
                                       sLse2 + stage * kBlockM, sDelta + stage * kBlockM);
          mbarrier_arrive(&full[stage]);
        }
      }
    }
    return;
  }

  // Consumers: warpgroup c = 1, 2 owns keys 64 (c - 1) .. of the block; this warp 16 of them.
  setmaxnreg_inc<K::kConsumerRegs>();
  static_assert(!kFeatures || (kAccumDq && kWithDk && kWithDv && !kWideSteps), "the features: the fused kernel's");
  const bool dropout = kFeatures && p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};
  const int consumer = warpgroup - 1;
  const int warp_row = warp_uniform(16 * ((tid - 128) / 32));  // uniform too (fewer reloads: NOTES)
  const uint32_t my_rows = consumer * 64 * 128;
  const uint64_t desc_k = smem_desc_k_major_sw128(sK, my_rows), desc_v = smem_desc_k_major_sw128(sV, my_rows);
  auto stage_bytes = [&](int stage) { return static_cast<uint64_t>((stage * K::kQBytes) >> 4); };
  const uint64_t desc_q0 = smem_desc_k_major_sw128(sQ(0)), desc_do0 = smem_desc_k_major_sw128(sdO(0));
  const uint64_t desc_q0_mn = smem_desc_mn_major_sw128(sQ(0), 0, kBlockM * 128);
  const uint64_t desc_do0_mn = smem_desc_mn_major_sw128(sdO(0), 0, kBlockM * 128);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  // kAccumDq: this consumer's dQ part of step `part` (64 queries x 64 columns, unscaled), issued
  // from that step's dS buffer as one wgmma group; and, complete, staged for the drain warp.
  auto issue_dq_part = [&](WarpAcc<64>& dq, int part) {
    const int col0 = K::kDqByColumns ? 64 * consumer : 0;
    const int rows = K::kDqByRows ? consumer * 64 * 128 : 0;  // this part's query rows in each panel
    wgmma_fence();
    issue_ds_k<T, kBlockN / 16, 64, kBlockM * 128>(
        dq, smem_desc_k_major_sw128(sdS, ds_buffer(part) * K::kDsBufferBytes + rows),
        smem_desc_mn_major_sw128(sK, (col0 / 64) * kBlockN * 128, kBlockN * 128));
  };
  auto store_dq_part = [&](const WarpAcc<64>& dq, int part) {
    const int use = dq_use(part), buffer = use % kDqBuffers, slot = buffer * K::kConsumers + consumer;
    if (use >= kDqBuffers)  // the drain read the buffer's last part
      mbarrier_wait(&dq_empty[slot], (use / kDqBuffers - 1) & 1);
    // Ordered: the lane's base passes through an empty asm at each call, so that its sixteen
    // addresses are recomputed here (a few integer ops) rather than kept live across the loop
    // (ptxas spilled them, reloaded every step: ordered spills 208/312 -> 80/144 bytes at head
    // dim 128, 148/236 -> 56/120 at 64 wide, measured before the kernels were persistent and
    // their tile values uniform; the unordered kernels spill more that way).
    uint32_t lane_base = smem_u32(dq_buffer(buffer) + consumer * K::kDqPartBytes) + (warp_row % 64) * 128;
    int my_lane = lane;
    if constexpr (kOrderedDq) asm volatile("" : "+r"(lane_base), "+r"(my_lane));
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // (row, col) in panel col / 32: 128-byte rows of 32 floats, 16-byte chunk c at c ^ (row % 8).
        const int row = WarpAcc<64>::row_of(2 * half, my_lane);  // within the warp's 16 rows
        const int col = WarpAcc<64>::col_of(j, 2 * half, my_lane) % 32;
        st_shared_f32x2(lane_base + (j / 4) * K::kDqPanelBytes + row * 128 + (((col / 4) ^ (row % 8)) * 16) +
                            (col % 4) * 4,
                        dq.v[j][2 * half], dq.v[j][2 * half + 1]);
      }
    fence_async_shared();  // the bulk reduce (async proxy) reads what these stores wrote
    __syncwarp();
    if (lane == 0) mbarrier_arrive(&dq_full[slot]);
  };
  DkvTile tile;
  for (int i = 0, g = 0, kv_loads = 0; next_tile(i, kWarp, &tile); ++i, g += tile.steps) {
    const int key0 = tile.n_start + warp_row;
    WarpAcc<kHeadDim> dk, dv;
    dk.zero();
    dv.zero();
    if (kPersistent || tile.steps > 0) mbarrier_wait(kv_full, kv_loads++ & 1);  // persistent: every tile
    // Packed, with dQ: the keys past the sequence's last one (their masked dS^T rows would take
    // another sequence's V into dP, and dQ's dS K its K). Without dQ they reach only the dK and
    // dV rows that are not stored.
    // The last tile's epilogue may have read these rows (store_staged_rows, each consumer its own
    // 64). Its reads are ordered before these writes through kv_empty, the TMA thread and kv_full,
    // a chain that compute-sanitizer's racecheck did not follow (it reported the pair, now and
    // then, where a CTA walked two such tiles: benchmarks/NOTES.md); a barrier of both consumers
    // first puts them in an order it sees, on these tiles only.
    const int keys_in_block = tile.seq.seqlen_k - tile.n_start;
    if (kAccumDq && packed && tile.steps > 0 && keys_in_block < kBlockN) {  // the same for both consumers
      if (kPersistent && i > 0) named_barrier_sync<K::kConsumerThreads>(8);
      zero_rows_before_wgmma<kPanels, kBlockN, K::kConsumerThreads>(keys_in_block, tid - 128, 8, sK, sV);
    }
    for (int step = 0; step < tile.steps; ++step) {
      const int gs = g + step;  // the global step: the Q/dO ring's, the dS buffers' and dQ parts'
      const int stage = gs % kStages;
      const int m0 = block_of(tile, step) * kBlockM;
      const float* lse2 = sLse2 + stage * kBlockM;
      const float* delta = sDelta + stage * kBlockM;
      mbarrier_wait(&full[stage], (gs / kStages) & 1);
      // Packed: the block past the sequence's last query (rows another sequence's: S^T of its q
      // is not masked, only its lse2 is +inf, and dV and dK would take its dO and q).
      const int queries_in_block = tile.seq.seqlen_q - m0;  // > 0: the block has a query
      if (packed && queries_in_block < kBlockM)  // the same for both consumers
        zero_rows_before_wgmma<kPanels, kBlockM, K::kConsumerThreads>(queries_in_block, tid - 128, 8, sQ(stage),
                                                                      sdO(stage));
      // kFeatures: the step's score rules, made before the wgmmas so that their loads (the ALiBi
      // slope, the parameters) overlap them rather than stall the pass after the wait.
      const int h = head_of(tile, step);
      auto mod = score_mod_if<kFeatures, T>(p, tile.b, h);
      if constexpr (kStagedMask) mod.mask.data = nullptr;  // added from shared memory instead (below)
      WarpAcc<kBlockM> s, dp;  // S^T and dP^T: this warp's 16 keys x kBlockM queries
      wgmma_fence();
      issue_qk<T, kHeadDim, kBlockN * 128>(s, desc_k, desc_q0 + stage_bytes(stage));
      if constexpr (kWithDk) issue_qk<T, kHeadDim, kBlockN * 128>(dp, desc_v, desc_do0 + stage_bytes(stage));
      // Both waited for here: waiting for S alone, the exponentials beside dP, measured 3-5% slower
      // at head dim 64 (benchmarks/NOTES.md, 2026-12-01).
      wgmma_wait<0>();
      auto col_lse2 = [&](int j, int e) { return lse2[WarpAcc<kBlockM>::col_of(j, e, lane)]; };
      auto col_delta = [&](int j, int e) { return delta[WarpAcc<kBlockM>::col_of(j, e, lane)]; };
      if constexpr (kFeatures) {  // s becomes the kept P^T and dp dS^T, dV's and dK's operands
        auto staged_mask = [&] {  // kStagedMask: what the ScoreMod's mask would add, from shared memory
          if constexpr (kStagedMask) {
            return [&](WarpAcc<kBlockM>& scores) {
              add_staged_mask_transposed<T>(scores, smem_u32(sMask(stage)), mask_staging, warp_row, lane);
            };
          } else {
            return NoBias{};
          }
        };
        probs_and_ds_with_features<true, true>(s, dp, mod, mask, tile.seq, dropout, rng, tile.b, h, sh.heads_q, key0,
                                               m0, lane, col_lse2, col_delta, nullptr, 0, staged_mask());
      } else {
        probs_then_mask<true>(s, scale_log2, mask, tile.seq, key0, m0, lane, col_lse2);
      }
      auto release_stage = [&] {  // this thread is done with the stage (tiles and stats)
        mbarrier_arrive(&empty[stage]);
      };
      // kAccumDq: dS^T (this warp's 16 keys x kBlockM queries, packed in dst) into this consumer's
      // panel of the step's buffer as [query][key], the A operand of the dQ parts. The buffer was
      // last read by the dQ wgmmas of step - 2, which each consumer waited for before its arrival
      // of step - 1, which this one waited for.
      auto store_ds_panel = [&](const uint32_t(&dst)[kBlockM / 16][4]) {
        // dst[kk] is four 8 x 8 fragments (keys down, queries across: 0-7 x 0-7, 8-15 x 0-7, 0-7 x
        // 8-15, 8-15 x 8-15 of the 16 x 16 block kk); stored transposed, fragment i's query q
        // is 8 keys in a row of the panel, the row this lane (8 i + q) addresses.
        const int fragment = lane / 8, q = lane % 8;
        const uint32_t my_ds = smem_u32(sdS + ds_buffer(gs) * K::kDsBufferBytes + consumer * kBlockM * 128) +
                               swizzle128_offset(8 * (fragment / 2) + q, warp_row % 64 + 8 * (fragment % 2));
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) stmatrix_x4_trans(my_ds + kk * 16 * 128, dst[kk]);
        fence_async_shared();  // the wgmma (async proxy) reads these stores
        // This panel is in: an arrival, not a wait, so that dK's wgmmas go out at once (no lockstep
        // between the consumers); the other's panel is waited for just before dQ.
        named_barrier_arrive<K::kConsumerThreads>(ds_barrier(gs, consumer));
      };
      if constexpr (kWideSteps) {
        // FlashAttention-3's order for its head-dim-64 tile: dS first, then P^T and dS^T both
        // packed as A operands, so that S^T and dP^T (64 fp32 registers each) are dead before any
        // rs wgmma goes out. The default order below (dV issued before dS is formed), or even dV
        // issued between dS and packing dS^T (tried as a way to share that code), keeps fp32
        // values alive beside P^T in flight, and ptxas then serializes every wgmma (C7512).
        ds_from_dp(dp, s, col_delta);
        uint32_t pt[kBlockM / 16][4], dst[kBlockM / 16][4];
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) s.template to_a<T>(pt[kk], kk);
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) dp.template to_a<T>(dst[kk], kk);
        if constexpr (kAccumDq) store_ds_panel(dst);
        wgmma_fence();
        issue_pv<T, kHeadDim, kBlockM>(dv, pt, desc_do0_mn + stage_bytes(stage));
        issue_pv<T, kHeadDim, kBlockM>(dk, dst, desc_q0_mn + stage_bytes(stage));
      } else {
        if constexpr (kWithDv) {
          uint32_t pt[kBlockM / 16][4];
#pragma unroll
          for (int kk = 0; kk < kBlockM / 16; ++kk) s.template to_a<T>(pt[kk], kk);
          wgmma_fence();
          issue_pv<T, kHeadDim, kBlockM>(dv, pt, desc_do0_mn + stage_bytes(stage));  // runs while dS is formed
        }
        if constexpr (!kWithDk) {
          wgmma_wait<0>();
          release_stage();
          continue;
        }
        if constexpr (!kFeatures) ds_from_dp(dp, s, col_delta);
        uint32_t dst[kBlockM / 16][4];
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) dp.template to_a<T>(dst[kk], kk);
        if constexpr (kAccumDq) store_ds_panel(dst);
        wgmma_fence();
        issue_pv<T, kHeadDim, kBlockM>(dk, dst, desc_q0_mn + stage_bytes(stage));
      }
      if constexpr (kAccumDq) {
        const bool with_dq = makes_dq(consumer, gs);
        WarpAcc<64> dq;  // this consumer's part: 64 queries (row0 ..) x 64 columns (col0 ..), unscaled
        // Where the consumers take turns, dK's wgmmas are waited for before the ones in the branch:
        // ptxas serializes wgmmas whose accumulators are in flight across a divergent path (C7520).
        if constexpr (!K::kDqEveryStep) wgmma_wait<0>();
        // The other consumer's panel is in (also when this one makes no dQ part: the wait orders
        // this step's stores after the other's dQ wgmmas of step - 2, see above).
        named_barrier_sync<K::kConsumerThreads>(ds_barrier(gs, 1 - consumer));
        if (with_dq) {
          issue_dq_part(dq, gs);
          if constexpr (!K::kDqEveryStep) wgmma_wait<0>();
        }
        if constexpr (K::kDqEveryStep) wgmma_wait<0>();
        release_stage();
        if (with_dq) {
          // Packed: the part's rows past the sequence's last query are added to the next
          // sequence's dq_accum rows: exact zeros there (0 x an Inf of this sequence's K is NaN).
          if (packed)
            dq.zero_rows_past(m0 + (K::kDqByRows ? 64 * consumer : 0) + warp_row % 64, tile.seq.seqlen_q, lane);
          store_dq_part(dq, gs);
        }
      } else {
        wgmma_wait<0>();
        release_stage();
      }
    }

    // The output, staged through the K/V tiles once both consumers' wgmmas are done reading them.
    named_barrier_sync<K::kConsumerThreads>(1);
    // dV: times dropout's keep scale, since kept P entered it unscaled.
    const float dk_scale[2] = {static_cast<float>(p.scale), static_cast<float>(p.scale)};
    const float dv_scale[2] = {rng.keep_scale, rng.keep_scale};
    if constexpr (K::kTmaStoreDkv) {
      // dK into K's buffer and dV into V's, in the layout TMA loaded them, this consumer's 64 rows
      // of every panel; then its first thread's bulk stores (rows past seqlen_k are not written),
      // read before the CTA's shared memory goes (persistent: before the next tile's K and V load,
      // kv_empty).
      static_assert(kDkvStoreRows == 64, "a consumer's rows a box");
      if constexpr (kWithDk) stage_rows_for_tma<T, kBlockN>(dk, dk_scale, sK, warp_row, lane);
      if constexpr (kWithDv) stage_rows_for_tma<T, kBlockN>(dv, dv_scale, sV, warp_row, lane);
      fence_async_shared();  // these writes before the bulk stores' (async proxy) reads
      named_barrier_sync<128>(6 + consumer);  // after the epilogue's 1 and the dS barriers' 2-5 (8: zeroing)
      const int rows0 = tile.n_start + 64 * consumer;
      // Packed, where the consumer's 64 rows pass the sequence's last key: a box would write the
      // next sequence's rows, so its 128 threads store the rows inside the sequence instead.
      const bool boxed = !packed || rows0 + 64 <= tile.seq.seqlen_k;
      if (!boxed) {  // (packed only)
        if (rows0 < tile.seq.seqlen_k) {
          if constexpr (kWithDk)
            store_staged_rows<T, kBlockN, kPanels>(
                sK, consumer, row_at<T>(p.dk, p.dk_strides, tile.seq, false, tile.b, tile.h_kv, 0), p.dk_strides.row,
                tile.n_start, tile.seq.seqlen_k, sh.head_dim, tid % 128);
          if constexpr (kWithDv)
            store_staged_rows<T, kBlockN, kPanels>(
                sV, consumer, row_at<T>(p.dv, p.dv_strides, tile.seq, false, tile.b, tile.h_kv, 0), p.dv_strides.row,
                tile.n_start, tile.seq.seqlen_k, sh.head_dim, tid % 128);
        }
        named_barrier_sync<128>(6 + consumer);  // every thread's reads before the buffers take the next tile's
      }
      if (tid % 128 == 0) {
        if (boxed && rows0 < tile.seq.seqlen_k) {
#pragma unroll
          for (int panel = 0; panel < kPanels; ++panel) {
            const int offset = panel * kBlockN * 128 + consumer * 64 * 128;
            if constexpr (kWithDk)
              tma_store_4d(&map_dk, sK + offset, panel * 64, box_row(tile.seq.k_row0, rows0), tile.h_kv,
                           box_batch(tile.b));
            if constexpr (kWithDv)
              tma_store_4d(&map_dv, sV + offset, panel * 64, box_row(tile.seq.k_row0, rows0), tile.h_kv,
                           box_batch(tile.b));
          }
          bulk_commit_group();
          bulk_wait_group_read<0>();
        }
        if constexpr (kPersistent) mbarrier_arrive(kv_empty);  // K's and V's buffers may take the next tile's
      }
    } else {
      const SmemTile<T, kBlockN, kHeadDim> stage_tile{reinterpret_cast<T*>(smem)};
      static_assert(SmemTile<T, kBlockN, kHeadDim>::kElems * sizeof(T) <= 2 * K::kKVBytes + 2 * kStages * K::kQBytes,
                    "staging fits");
      const int rows_valid = tile.seq.seqlen_k - key0;
      T* dk_out = row_at<T>(p.dk, p.dk_strides, tile.seq, false, tile.b, tile.h_kv, key0);
      T* dv_out = row_at<T>(p.dv, p.dv_strides, tile.seq, false, tile.b, tile.h_kv, key0);
      if constexpr (kWithDk)
        warp_store_rows<T, kHeadDim>(dk, dk_scale, stage_tile, warp_row, dk_out, p.dk_strides.row, rows_valid,
                                     sh.head_dim, lane);
      if constexpr (kWithDv)
        warp_store_rows<T, kHeadDim>(dv, dv_scale, stage_tile, warp_row, dv_out, p.dv_strides.row, rows_valid,
                                     sh.head_dim, lane);
    }
  }
#endif
}

// The tensor maps of q, dout, k and v for kernel K (one of the two above, or the head-dim-256
// fused one, flash_bwd_sm90_fused256.cuh: their boxes differ),
// and of dq_accum where there is one; false where TMA cannot address them (alignment, zero
// strides, packed sequences outside bwd_tma_addressable's rule): the cp.async kernels run then.
struct BackwardTmaMaps {
  CUtensorMap q, dout, k, v;
  CUtensorMap dq_accum;  // with p.dq_accum (the fused dK/dV kernel's TMA reduce); unused otherwise
  CUtensorMap dk, dv;    // the dK/dV kernel's outputs, where it stores them by TMA (encode_dkdv_maps)
};
// Whether TMA can address q, dout, k and v of p, and dk and dv where stored by TMA (dkdv_stores):
// packed sequences only where the kernel takes them (may_pack: bwd_may_pack) and the "bwdvarlen"
// part is on, and with both offsets (the packed kernels read q's and k's; the op passes both or
// neither, a direct C++ caller might not); aligned, no zero stride. Integer checks only:
// fused_backward_runs asks it before any map is encoded.
inline bool bwd_tma_addressable(const FlashBwdParams& p, bool dkdv_stores, bool may_pack) {
  const AttentionShape& sh = p.shape;
  const bool packed = p.varlen.cu_seqlens_q != nullptr;
  if (packed != (p.varlen.cu_seqlens_k != nullptr)) return false;
  if (packed && !(may_pack && sm90_paths(p).bwd_varlen)) return false;
  const MapRows m = attention_map_rows(p);
  return tma_can_address(p.q, 2, p.q_strides, m.q_batch, sh.heads_q, m.q_rows, sh.head_dim) &&
         tma_can_address(p.dout, 2, p.dout_strides, m.q_batch, sh.heads_q, m.q_rows, sh.head_dim) &&
         tma_can_address(p.k, 2, p.k_strides, m.kv_batch, sh.heads_kv, m.kv_rows, sh.head_dim) &&
         tma_can_address(p.v, 2, p.v_strides, m.kv_batch, sh.heads_kv, m.kv_rows, sh.head_dim) &&
         (!dkdv_stores ||
          (tma_can_address(p.dk, 2, p.dk_strides, m.kv_batch, sh.heads_kv, m.kv_rows, sh.head_dim) &&
           tma_can_address(p.dv, 2, p.dv_strides, m.kv_batch, sh.heads_kv, m.kv_rows, sh.head_dim)));
}
template <typename T, class K>
bool encode_bwd_tma_maps(const FlashBwdParams& p, BackwardTmaMaps* maps) {
  const AttentionShape& sh = p.shape;
  if (!bwd_tma_addressable(p, false, K::kMayPack)) return false;  // dk and dv: encode_dkdv_maps
  const MapRows m = attention_map_rows(p);
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if (p.dq_accum != nullptr && !encode_rows_map(&maps->dq_accum, p.dq_accum, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4,
                                                p.dq_accum_strides, m.q_batch, sh.heads_q, m.q_rows, sh.head_dim,
                                                kDqPartRows))
    return false;
  return encode_attention_map(&maps->q, p.q, kBf16, p.q_strides, m.q_batch, sh.heads_q, m.q_rows, sh.head_dim,
                              K::kBlockM) &&
         encode_attention_map(&maps->dout, p.dout, kBf16, p.dout_strides, m.q_batch, sh.heads_q, m.q_rows,
                              sh.head_dim, K::kBlockM) &&
         encode_attention_map(&maps->k, p.k, kBf16, p.k_strides, m.kv_batch, sh.heads_kv, m.kv_rows, sh.head_dim,
                              K::kBlockN) &&
         encode_attention_map(&maps->v, p.v, kBf16, p.v_strides, m.kv_batch, sh.heads_kv, m.kv_rows, sh.head_dim,
                              K::kBlockN);
}

// The dK/dV kernels' output maps (kTmaStoreDkv; the head-dim-256 fused kernel): box_rows a box
// (a consumer's 64, or the fused head-dim-256 kernel's whole 80-key tile).
inline bool encode_dkdv_maps(const FlashBwdParams& p, bool bf16, BackwardTmaMaps* maps,
                             int box_rows = kDkvStoreRows) {
  const AttentionShape& sh = p.shape;
  const MapRows m = attention_map_rows(p);
  return encode_attention_map(&maps->dk, p.dk, bf16, p.dk_strides, m.kv_batch, sh.heads_kv, m.kv_rows, sh.head_dim,
                              box_rows) &&
         encode_attention_map(&maps->dv, p.dv, bf16, p.dv_strides, m.kv_batch, sh.heads_kv, m.kv_rows, sh.head_dim,
                              box_rows);
}

}  // namespace cuflash::sm90
