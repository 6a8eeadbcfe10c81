// The fused Hopper backward at head dim 256 (dQ added up in fp32 by TMA reduce, unordered or in
// a fixed order; plain 16-bit attention, inputs TMA can address; benchmarks/NOTES.md, "Head dim
// 256 backward: a build plan"): one warp-specialized kernel of 5 matmuls a step where the pair
// runs three launches of 8 (dQ; dK; dV). FlashAttention-3's hdim-256 tile: 80 resident keys, 64
// streamed queries a step, two consumer warpgroups and a producer one, Q double-buffered, dO not.
// At 256 a 64 x 256 fp32 accumulator is 128 registers a thread, so each consumer holds half of
// the head dims of dK and dV, transposed (dK^T, dV^T: head dims 128c.. x 80 keys, two 64-row
// slices each, 160 registers), and computes S and dP for 40 of the keys (64 queries x 40). P and
// dS reach the other consumer through shared memory, stored transposed ([key][query], one
// 128B-swizzled panel each, stmatrix .trans), the B operand of dV^T = dO^T P and dK^T = Q^T dS
// and the (MN-major) A operand of dQ = dS K. dQ: each consumer's 128 head dims in two 64-column
// slices, each out in two 64 x 32 fp32 boxes through a ring of three shared slots, from which a
// drain warp of the producer adds them to dq_accum by TMA reduce (FlashAttention-3 adds with
// atomics from the consumers here; ours keeps them off the consumers' path and allows the fixed
// order).
// Hand-offs between the warpgroups on named barriers, not mbarrier spin loops, so that no branch
// runs while wgmmas are in flight (ptxas serializes them then).
#pragma once
#include "flash_bwd_sm90_tma.cuh"

// Measurements (benchmarks/NOTES.md, "Head dim 256: what the dQ path costs"; dQ is wrong under
// them): CUFLASH_BWD256_DQ_BOUND=1, no dQ leaves the consumers (the backward ran 1.5-1.7x faster
// so on the H200); =2, the consumers store their boxes and the drain takes them but adds nothing
// (the shared-memory path and its waits without the global traffic); =3, the drain stores the
// boxes by TMA instead of adding them (the same bytes to L2 without the reduction).
#ifndef CUFLASH_BWD256_DQ_BOUND
#define CUFLASH_BWD256_DQ_BOUND 0
#endif
namespace cuflash::sm90 {

template <typename T, bool kOrderedDq>
struct BwdFused256Kernel {
  static constexpr int kHeadDim = 256, kPanels = kHeadDim / 64;
  static constexpr bool kMayPack = true;  // packed sequences: kPacked below
  static constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1), kConsumerThreads = 128 * kConsumers;
  static constexpr int kBlockN = 80;  // resident keys: S and dP 40 a consumer
  static constexpr int kBlockM = 64;  // streamed queries a step (a dq_semaphores block)
  static constexpr int kKeysPerConsumer = kBlockN / kConsumers;
  static constexpr int kQStages = 2;
  static constexpr int kKPanelBytes = kBlockN * 128, kQPanelBytes = kBlockM * 128;
  static constexpr int kKVBytes = kPanels * kKPanelBytes, kQBytes = kPanels * kQPanelBytes;
  static constexpr int kPdsBytes = kBlockN * 128;  // P^T or dS^T: [key][query], one panel
  static constexpr int kDqBound = CUFLASH_BWD256_DQ_BOUND;  // the measurements above
  static constexpr int kDqBoxBytes = kDqPartRows * 32 * 4;  // a dq_accum map box: 64 queries x 32 floats
  // The boxes' ring: a step's 8 boxes in a fixed order (consumer 0's first, consumer 1's first,
  // consumer 0's second, ...), box j in slot j % 3. With one slot a consumer each waited for the
  // drain's read of its last box before storing the next: 34% of the consumers' stall samples
  // (benchmarks/NOTES.md); three slots leave the drain two boxes to read each one in.
  // (Each consumer its own ring and drain warp measured 4-9% slower: benchmarks/NOTES.md.)
  // The drain frees a slot for the box after the one it waits for (once the box two before that
  // is read), so that a consumer's next box need not wait for the other consumer's box to be
  // stored: 1.03-1.13x the backward (benchmarks/NOTES.md). The free signal is the consumer's own
  // barrier, not the slot's: with a box of slack, the other consumer could reach a slot's barrier
  // first and take the phase meant for this one (a first build raced so).
  static constexpr int kDqSlots = 3, kDqBoxesPerStep = 8;
  // The ordered kernel's boxes go out through two drain warps (the producer's warps 2 and 3),
  // alternate steps each: drain d takes the ring once the other has read the step before's boxes
  // (dq_handoff[d]), so that one step's wait for its adds to complete and the turn's release
  // overlap the next step's turn and boxes (H100, bf16: the deterministic backward +4-10% at
  // 512-4096 keys, causal 512 +1%; benchmarks/NOTES.md, "Head dim 256: two dQ drains"; head dims
  // 64 and 128: kTwoDqDrains). The unordered kernel keeps one.
  static constexpr int kDqDrains = kOrderedDq ? 2 : 1;
  static constexpr int kDqHandoffs = kDqDrains == 2 ? 2 : 0;
  static constexpr int kStatsBytes = kQStages * 2 * kBlockM * 4;  // lse2, delta per Q stage
  // kv_full, kv_empty, q_full[2], q_empty[2], do_full, do_empty, tile_full[2], tile_empty[2],
  // dq_handoff[kDqHandoffs].
  static constexpr int kBarriers = 2 + 2 * kQStages + 2 + 4 + kDqHandoffs;
  static constexpr int kSmemBytes = 2 * kKVBytes + (kQStages + 1) * kQBytes + 2 * kPdsBytes +
                                    kDqSlots * kDqBoxBytes + kStatsBytes + kBarriers * 8 + 32 + 1024;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(fits_launch_registers<kThreads>(kProducerRegs, kConsumerRegs), "setmaxnreg's split");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
  static_assert(kBlockM == kDqPartRows, "the dq_accum map's boxes are one step's queries");
  // Named barriers (0 is __syncthreads): both consumers at a tile's end (the epilogue), and where
  // packed sequences' rows are zeroed (kZeroed); consumer
  // c's P^T rows in (kPReady + c) and dS^T rows in (kDsReady + c), waited for by the other; c done
  // with a step's wgmmas (kStepDone + c), before the other overwrites its rows of P^T and dS^T; c's
  // epilogue stores (kDkvStore + c); a dQ slot's box stored (kDqFull + slot) and free for consumer c's
  // next box (kDqEmpty + c), between the storing consumer and the drain warp
  // (160 threads).
  enum : int {
    kEpilogue = 1, kPReady = 2, kDsReady = 4, kStepDone = 6, kDkvStore = 8, kDqFull = 10, kDqEmpty = 13, kZeroed = 15
  };
  static_assert(kDqFull + kDqSlots <= kDqEmpty && kDqEmpty + kConsumers <= kZeroed && kZeroed < 16,
                "named barrier ids");
};

// kPacked: packed sequences (the "bwdvarlen" part), as the head-dim-64/128 kernels' (flash_bwd_sm90_tma.cuh):
// boxes at their sequence's rows of the one batch; the rows of another sequence a box brought
// zeroed before any wgmma reads them; dQ's rows past the sequence added as exact zeros; dK and dV
// of a tile that passes the sequence's last key stored by the consumers' threads, not a box.
// kFeatures (the "bwdfeatures" part): softcap, ALiBi, attn_mask and dropout, S and dP turned into
// P z and dS in one pass by probs_and_ds_with_features (mask.cuh), as in the head-dim-64/128
// fused kernel.
template <typename T, bool kOrderedDq, bool kPacked, bool kFeatures>
__global__ void __launch_bounds__(BwdFused256Kernel<T, kOrderedDq>::kThreads, 1)
    flash_bwd_fused_sm90_tma_kernel(const FlashBwdParams p, const __grid_constant__ CUtensorMap map_q,
                                    const __grid_constant__ CUtensorMap map_dout,
                                    const __grid_constant__ CUtensorMap map_k,
                                    const __grid_constant__ CUtensorMap map_v,
                                    const __grid_constant__ CUtensorMap map_dq_accum,
                                    const __grid_constant__ CUtensorMap map_dk,
                                    const __grid_constant__ CUtensorMap map_dv) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using K = BwdFused256Kernel<T, kOrderedDq>;
  constexpr int kBlockN = K::kBlockN, kBlockM = K::kBlockM, kPanels = K::kPanels;
  constexpr int kKPanelBytes = K::kKPanelBytes, kQPanelBytes = K::kQPanelBytes;
  extern __shared__ char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  unsigned char* sK = smem;
  unsigned char* sV = sK + K::kKVBytes;
  unsigned char* sQ = sV + K::kKVBytes;  // [kQStages]
  unsigned char* sdO = sQ + K::kQStages * K::kQBytes;
  unsigned char* sPt = sdO + K::kQBytes;
  unsigned char* sdSt = sPt + K::kPdsBytes;
  unsigned char* sdQ = sdSt + K::kPdsBytes;                          // [kDqSlots] boxes
  float* sStats = reinterpret_cast<float*>(sdQ + K::kDqSlots * K::kDqBoxBytes);  // [stage][lse2, delta][64]
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(sStats + K::kQStages * 2 * kBlockM);
  uint64_t* kv_empty = kv_full + 1;
  uint64_t* q_full = kv_empty + 1;  // [kQStages]
  uint64_t* q_empty = q_full + K::kQStages;
  uint64_t* do_full = q_empty + K::kQStages;
  uint64_t* do_empty = do_full + 1;
  uint64_t* tile_full = do_empty + 1;  // [2]
  uint64_t* tile_empty = tile_full + 2;
  uint64_t* dq_handoff = tile_empty + 2;  // [kDqHandoffs]
  int* tile_slot = reinterpret_cast<int*>(dq_handoff + K::kDqHandoffs);

  const AttentionShape& sh = p.shape;
  const int tid = threadIdx.x, warpgroup = warpgroup_index(), lane = tid % 32;
  const int group = sh.heads_q / sh.heads_kv;
  const MaskParams mask = unpacked_mask(p.mask);  // rows_per_query a compile-time 1
  // Packed: a tile's boxes at its sequence's rows of the one batch.
  constexpr bool packed = kPacked;
  auto box_row = [](int64_t sequence_row0, int row) { return packed ? static_cast<int>(sequence_row0) + row : row; };
  auto box_batch = [](int b) { return packed ? 0 : b; };
  // Persistent CTAs, tiles in DkvTileRing's order, the Q/dO ring, stats and drain running on
  // across tiles (global step g), ordered adds as the head-dim-64/128 fused kernel's
  // (flash_bwd_sm90_tma.cuh).
  using Ring = DkvTileRing<kBlockN, kBlockM, K::kHeadDim, kOrderedDq>;
  const Ring ring(p, tile_full, tile_empty, tile_slot);
  auto block_of = [&](const DkvTile& t, int step) { return t.block(step, !kOrderedDq); };

  if (tid == 0) {
    mbarrier_init(kv_full, 1);
    mbarrier_init(kv_empty, K::kConsumers);  // each consumer's storing thread
    for (int s = 0; s < K::kQStages; ++s) {
      mbarrier_init(&q_full[s], 1 + 32);                // the TMA thread, the stats warp's lanes
      mbarrier_init(&q_empty[s], K::kConsumerThreads);  // every consumer thread
    }
    mbarrier_init(do_full, 1);
    mbarrier_init(do_empty, K::kConsumerThreads);
    for (int s = 0; s < 2; ++s) {
      mbarrier_init(&tile_full[s], 1);
      // The stats and drain warps, the consumers.
      mbarrier_init(&tile_empty[s], 32 + 32 * K::kDqDrains + K::kConsumerThreads);
    }
    for (int d = 0; d < K::kDqHandoffs; ++d) mbarrier_init(&dq_handoff[d], 1);  // the other drain's lane 0
    fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {  // producer
    setmaxnreg_dec<K::kProducerRegs>();
    const int warp = tid / 32;
    // The dQ drains, whole warps (named barriers count warps): boxes to dq_accum. With two, drain
    // d takes the global steps gs with gs % 2 == d: its turn first, then the ring, once the other
    // drain has read the step before's boxes (so that one drain warp at a time meets the ring's
    // named barriers); it hands the ring back once its own boxes are read, then waits for their
    // adds to complete and passes the turn while the other drain goes on.
    if (warp == 2 || (K::kDqDrains == 2 && warp == 3)) {
      const int drain = warp - 2;
      DkvTile tile;
      for (int i = 0, g = 0; ring.next(p, mask, i, Ring::kWarp, &tile); ++i, g += tile.steps) {
        for (int step = 0; step < tile.steps; ++step) {
          const int gs = g + step;
          if (gs % K::kDqDrains != drain) continue;  // the other drain's step
          const int h = tile.head(step, group), block = block_of(tile, step);
          int* counter = nullptr;
          if constexpr (kOrderedDq) {
            if (lane == 0) counter = wait_for_dq_turn<kBlockN, kBlockM>(p, mask, tile, h, block);
            __syncwarp();
          }
          if constexpr (K::kDqDrains == 2) {
            if (lane == 0 && gs > 0) mbarrier_wait(&dq_handoff[drain], ((gs - 1) / 2) & 1);
            __syncwarp();
          }
          // Box b of the step: consumer b % 2's box b / 2 (its slice b / 4, columns 32 ((b / 2) % 2)..).
#pragma unroll 1
          for (int b = 0; b < (K::kDqBound == 1 ? 0 : K::kDqBoxesPerStep); ++b) {
            const int slot = (K::kDqBoxesPerStep * (g + step) + b) % K::kDqSlots;
            // Free the slot of the next box (the one two before it read; only the box before
            // this one may still be in flight), for that box's consumer, (b + 1) % 2: every
            // signal has its wait, so none after the tile's last box. A tile's first box waits
            // for every read of its slot's box three before. With two drains the boxes before
            // this step's are the other drain's, read before its hand-over (below), which these
            // waits of this drain's own groups rely on.
            const int in_tile = K::kDqBoxesPerStep * step + b;  // this box's index in the tile
            if (in_tile == 0) {
              if (lane == 0) bulk_wait_group_read<K::kDqSlots - 1>();
              __syncwarp();
              named_barrier_arrive<160>(K::kDqEmpty + 0);
            }
            if (in_tile + 1 < K::kDqBoxesPerStep * tile.steps) {
              if (lane == 0) bulk_wait_group_read<K::kDqSlots - 2>();
              __syncwarp();
              named_barrier_arrive<160>(K::kDqEmpty + (b + 1) % 2);
            }
            named_barrier_sync<160>(K::kDqFull + slot);
            const int col = 128 * (b % 2) + 32 * (b / 2), row = box_row(tile.seq.q_row0, block * kBlockM);
            // Rows past seqlen_q: dropped, or packed, zeros added to the next sequence's rows;
            // columns past head_dim: dropped.
            if (lane == 0 && K::kDqBound != 2) {
              if constexpr (K::kDqBound == 3)
                tma_store_4d(&map_dq_accum, sdQ + slot * K::kDqBoxBytes, col, row, h, box_batch(tile.b));
              else
                tma_reduce_add_4d(&map_dq_accum, sdQ + slot * K::kDqBoxBytes, col, row, h, box_batch(tile.b));
              bulk_commit_group();
            }
            __syncwarp();
          }
          if constexpr (K::kDqDrains == 2) {  // the ring to the other drain, this step's boxes read
            if (lane == 0) {
              bulk_wait_group_read<0>();
              mbarrier_arrive(&dq_handoff[1 - drain]);
            }
            __syncwarp();
          }
          if constexpr (kOrderedDq) {  // the step's adds done, then the next key block's turn
            if (lane == 0) pass_dq_turn(counter);
            __syncwarp();
          }
        }
      }
      if (lane == 0) bulk_wait_group_all();  // the adds themselves, before the CTA's shared memory goes
    } else if (warp == 0 && lane == 0) {  // TMA
      DkvTile tile;
      for (int i = 0, g = 0; ring.next(p, mask, i, Ring::kPublish, &tile); ++i, g += tile.steps) {
        // Step s's Q (after the consumers released its stage, two steps back) and dO (one step back).
        auto load_step = [&](int step) {
          const int gs = g + step, stage = gs % K::kQStages;
          const int h = tile.head(step, group), m0 = block_of(tile, step) * kBlockM;
          if (gs >= K::kQStages) mbarrier_wait(&q_empty[stage], ((gs / K::kQStages) - 1) & 1);
          mbarrier_arrive_expect_tx(&q_full[stage], K::kQBytes);
#pragma unroll
          for (int panel = 0; panel < kPanels; ++panel)
            tma_load_4d(sQ + stage * K::kQBytes + panel * kQPanelBytes, &map_q, &q_full[stage], panel * 64,
                        box_row(tile.seq.q_row0, m0), h, box_batch(tile.b));
          if (gs >= 1) mbarrier_wait(do_empty, (gs - 1) & 1);
          mbarrier_arrive_expect_tx(do_full, K::kQBytes);
#pragma unroll
          for (int panel = 0; panel < kPanels; ++panel)
            tma_load_4d(sdO + panel * kQPanelBytes, &map_dout, do_full, panel * 64, box_row(tile.seq.q_row0, m0), h,
                        box_batch(tile.b));
        };
        // The first step's Q and dO before K and V, which wait for the last tile's epilogue to
        // have stored from their buffers.
        const int early = i > 0 ? min(tile.steps, 1) : 0;
        for (int step = 0; step < early; ++step) load_step(step);
        if (i > 0) mbarrier_wait(kv_empty, (i - 1) & 1);
        if (tile.steps > 0) {
          mbarrier_arrive_expect_tx(kv_full, 2 * K::kKVBytes);
#pragma unroll
          for (int panel = 0; panel < kPanels; ++panel) {
            const int row = box_row(tile.seq.k_row0, tile.n_start);
            tma_load_4d(sK + panel * kKPanelBytes, &map_k, kv_full, panel * 64, row, tile.h_kv, box_batch(tile.b));
            tma_load_4d(sV + panel * kKPanelBytes, &map_v, kv_full, panel * 64, row, tile.h_kv, box_batch(tile.b));
          }
        } else {
          // A tile without steps still stores zeros for its keys (as the head-dim-64/128 kernel).
          mbarrier_arrive(kv_full);
        }
        for (int step = early; step < tile.steps; ++step) load_step(step);
      }
    } else if (warp == 1) {  // lse (as log2) and delta of each step's queries, in the step's Q stage
      DkvTile tile;
      for (int i = 0, g = 0; ring.next(p, mask, i, Ring::kWarp, &tile); ++i, g += tile.steps) {
        for (int step = 0; step < tile.steps; ++step) {
          const int gs = g + step, stage = gs % K::kQStages;
          if (gs >= K::kQStages) mbarrier_wait(&q_empty[stage], ((gs / K::kQStages) - 1) & 1);
          float* stats = sStats + stage * 2 * kBlockM;
          block_row_stats<kBlockM, 32>(p, tile.seq, tile.b, tile.head(step, group), block_of(tile, step) * kBlockM,
                                       lane, stats, stats + kBlockM);
          mbarrier_arrive(&q_full[stage]);
        }
      }
    }
    return;
  }

  // Consumers: warpgroup c = 1, 2; consumer c computes S and dP for keys 40c.. of the tile and
  // dK^T, dV^T, dQ for head dims 128c.. .
  setmaxnreg_inc<K::kConsumerRegs>();
  const bool dropout = kFeatures && p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};
  const int consumer = warpgroup - 1;
  const int warp_row = warp_uniform(16 * ((tid % 128) / 32));  // this warp's 16 rows of a 64-row tile
  // Descriptors: one base per operand, the consumer's rows or panels in it, each k-step's offset an
  // immediate and the Q stage's added (building them per k-step from a pointer spilled 420-460
  // bytes: benchmarks/NOTES.md, the register model).
  auto at = [](uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); };
  const uint32_t my_keys = K::kKeysPerConsumer * consumer * 128;
  const uint64_t k_rows = smem_desc_k_major_sw128(sK, my_keys), v_rows = smem_desc_k_major_sw128(sV, my_keys);
  const uint64_t q_rows = smem_desc_k_major_sw128(sQ), do_rows = smem_desc_k_major_sw128(sdO);
  const uint64_t q_cols = smem_desc_mn_major_sw128(sQ, 2 * consumer * kQPanelBytes, kQPanelBytes);
  const uint64_t do_cols = smem_desc_mn_major_sw128(sdO, 2 * consumer * kQPanelBytes, kQPanelBytes);
  const uint64_t k_cols = smem_desc_mn_major_sw128(sK, 2 * consumer * kKPanelBytes, kKPanelBytes);
  const uint64_t pt_rows = smem_desc_k_major_sw128(sPt), dst_rows = smem_desc_k_major_sw128(sdSt);
  const uint64_t dst_cols = smem_desc_mn_major_sw128(sdSt, 0, K::kPdsBytes);
  const uint32_t pt_panel = smem_u32(sPt), dst_panel = smem_u32(sdSt);
  const uint32_t dq_slots = smem_u32(sdQ);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  // Slice `slice` of global step gs's dQ (64 x 64) out as two boxes of 32 columns, each into its
  // slot of the ring once the drain has read that slot's last box. No branch here: dK^T's wgmmas
  // are in flight (ptxas serializes wgmmas across divergent paths, C7520).
  // The box and slot numbering is the drain's (above): box b of a step is 4 slice + 2 half + consumer.
  auto store_dq_slice = [&](const WarpAcc<64>& dq, int gs, int slice) {
    if constexpr (K::kDqBound == 1) return;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int slot = (K::kDqBoxesPerStep * gs + 4 * slice + 2 * half + consumer) % K::kDqSlots;
      const uint32_t dq_box = dq_slots + slot * K::kDqBoxBytes;
      named_barrier_sync<160>(K::kDqEmpty + consumer);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = warp_row + WarpAcc<64>::row_of(2 * r, lane);
          const int col = WarpAcc<64>::col_of(4 * half + j, 2 * r, lane) % 32;
          st_shared_f32x2(dq_box + swizzle128_offset_f32(row, col), dq.v[4 * half + j][2 * r],
                          dq.v[4 * half + j][2 * r + 1]);
        }
      fence_async_shared();  // the bulk reduce (async proxy) reads these stores
      named_barrier_arrive<160>(K::kDqFull + slot);
    }
  };
  // A 64-row accumulator's 16-bit pairs in stmatrix_acc40_trans's order, times scale: n8 tiles
  // 5 half .. 5 half + 4.
  auto pack40 = [](const auto& acc, int half, float scale, uint32_t (&f)[10]) {
#pragma unroll
    for (int j = 0; j < 5; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        f[2 * j + h] = MmaOperand<T>::pack(acc.v[5 * half + j][2 * h] * scale, acc.v[5 * half + j][2 * h + 1] * scale);
  };

  DkvTile tile;
  for (int i = 0, g = 0; ring.next(p, mask, i, Ring::kWarp, &tile); ++i, g += tile.steps) {
    WarpAcc<kBlockN> dkt[2], dvt[2];  // dK^T, dV^T: head dims 128c + 64 slice.., the tile's 80 keys
#pragma unroll
    for (int slice = 0; slice < 2; ++slice) dkt[slice].zero(), dvt[slice].zero();
    mbarrier_wait(kv_full, i & 1);
    // Packed: the keys past the sequence's last one are another sequence's rows (their masked dS
    // columns would take its K into dQ, and its V into dP, as 0 x an Inf or NaN). The last tile's
    // epilogue read these buffers, ordered before this tile's loads through kv_empty and kv_full,
    // a chain compute-sanitizer's racecheck may not follow: a barrier of both consumers first puts
    // them in an order it sees (as in the head-dim-64/128 kernel).
    const int keys_in_block = tile.seq.seqlen_k - tile.n_start;
    if (packed && tile.steps > 0 && keys_in_block < kBlockN) {  // the same for both consumers
      if (i > 0) named_barrier_sync<K::kConsumerThreads>(K::kZeroed);
      zero_rows_before_wgmma<kPanels, kBlockN, K::kConsumerThreads>(keys_in_block, tid - 128, K::kZeroed, sK, sV);
    }
    for (int step = 0; step < tile.steps; ++step) {
      const int gs = g + step, stage = gs % K::kQStages;
      const uint32_t q_stage = stage * K::kQBytes;
      const int row0 = block_of(tile, step) * kBlockM + warp_row;
      WarpAcc<K::kKeysPerConsumer> s, dp;  // 64 queries x this consumer's 40 keys
      // kFeatures: the step's score rules, made before the wgmmas so that their loads (the ALiBi
      // slope, the parameters) overlap them rather than stall the pass after the wait.
      const int h = tile.head(step, group);
      const auto mod = score_mod_if<kFeatures, T>(p, tile.b, h);
      // Both tiles waited for before either product goes out (a spin loop between two wgmma
      // groups makes ptxas fence them: C7519).
      mbarrier_wait(&q_full[stage], (gs / K::kQStages) & 1);
      mbarrier_wait(do_full, gs & 1);
      // Packed: the queries past the sequence's last one are another sequence's rows (their S rows
      // are not masked, only their lse2 is +inf, and dV^T and dK^T would take their dO and q).
      const int queries_in_block = tile.seq.seqlen_q - block_of(tile, step) * kBlockM;
      if (packed && queries_in_block < kBlockM)  // the same for both consumers
        zero_rows_before_wgmma<kPanels, kBlockM, K::kConsumerThreads>(queries_in_block, tid - 128, K::kZeroed,
                                                                      sQ + q_stage, sdO);
      wgmma_fence();
      issue_qk<T, K::kHeadDim, kQPanelBytes, K::kKeysPerConsumer, kBlockN>(s, at(q_rows, q_stage), k_rows);
      issue_qk<T, K::kHeadDim, kQPanelBytes, K::kKeysPerConsumer, kBlockN>(dp, do_rows, v_rows);
      const float* stats = sStats + stage * 2 * kBlockM;
      float lse2[2], delta[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        lse2[r] = stats[warp_row + WarpAcc<64>::row_of(2 * r, lane)];
        delta[r] = stats[kBlockM + warp_row + WarpAcc<64>::row_of(2 * r, lane)];
      }
      auto row_lse2 = [&](int, int e) { return lse2[e >> 1]; };
      auto row_delta = [&](int, int e) { return delta[e >> 1]; };
      const int key0 = tile.n_start + K::kKeysPerConsumer * consumer;
      if constexpr (kFeatures) {  // s becomes the kept P and dp dS (one pass over both: dP waited for too)
        wgmma_wait<0>();
        probs_and_ds_with_features<false, true>(s, dp, mod, mask, tile.seq, dropout, rng, tile.b, h, sh.heads_q, row0,
                                                key0, lane, row_lse2, row_delta);
      } else {
        wgmma_wait<1>();
        probs_then_mask<false>(s, scale_log2, mask, tile.seq, row0, key0, lane, row_lse2);
        wgmma_wait<0>();
        ds_from_dp(dp, s, row_delta);
      }
      uint32_t p_pairs[10], ds_pairs[10];
      pack40(s, 0, 1.f, p_pairs);
      pack40(dp, 0, 1.f, ds_pairs);
      // P^T and dS^T rows 40c..: the other consumer's wgmmas of the step before are done with them.
      if (step > 0) named_barrier_sync<K::kConsumerThreads>(K::kStepDone + 1 - consumer);
      stmatrix_acc40_trans(pt_panel, K::kKeysPerConsumer * consumer, p_pairs);
      fence_async_shared();  // the wgmmas (async proxy) read these stores
      named_barrier_arrive<K::kConsumerThreads>(K::kPReady + consumer);
      stmatrix_acc40_trans(dst_panel, K::kKeysPerConsumer * consumer, ds_pairs);
      fence_async_shared();
      named_barrier_arrive<K::kConsumerThreads>(K::kDsReady + consumer);
      named_barrier_sync<K::kConsumerThreads>(K::kPReady + 1 - consumer);
      // dV^T += dO^T P: A = dO's panels 2c, 2c + 1 MN-major (16 queries a k-step, +2048 bytes), B =
      // P^T K-major (80 key rows, +32 bytes a k-step).
      wgmma_fence();
#pragma unroll
      for (int slice = 0; slice < 2; ++slice)
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk)
          Wgmma<T, kBlockN>::template ss<0, 1>(acc_regs<kBlockN>(dvt[slice], 0),
                                               at(do_cols, slice * kQPanelBytes + kk * 2048), at(pt_rows, kk * 32), 1);
      wgmma_commit();
      named_barrier_sync<K::kConsumerThreads>(K::kDsReady + 1 - consumer);
      // dQ slice = dS K (A = dS^T MN-major, B = K's panel MN-major, 16 keys a k-step) and dK^T
      // slice += Q^T dS (as dV^T), by slices, each dQ slice stored while the next products run.
      WarpAcc<64> dq;
#pragma unroll
      for (int slice = 0; slice < 2; ++slice) {
        if (slice > 0) wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk)
          Wgmma<T, 64>::template ss<1, 1>(acc_regs<64>(dq, 0), at(dst_cols, kk * 2048),
                                          at(k_cols, slice * kKPanelBytes + kk * 2048), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk)
          Wgmma<T, kBlockN>::template ss<0, 1>(acc_regs<kBlockN>(dkt[slice], 0),
                                               at(q_cols, q_stage + slice * kQPanelBytes + kk * 2048),
                                               at(dst_rows, kk * 32), 1);
        wgmma_commit();
        wgmma_wait<1>();  // this dQ slice (and, at slice 0, dV^T: dO is free)
        if (slice == 0) mbarrier_arrive(do_empty);
        // Packed: the rows past the sequence's last query are added to the next sequence's
        // dq_accum rows, so exact zeros there (0 x an Inf of this sequence's K is NaN), with
        // dK^T's wgmmas in flight.
        if constexpr (packed) dq.zero_rows_past(row0, tile.seq.seqlen_q, lane);
        store_dq_slice(dq, gs, slice);
      }
      wgmma_wait<0>();
      mbarrier_arrive(&q_empty[stage]);  // Q and its stats
      if (step + 1 < tile.steps) named_barrier_arrive<K::kConsumerThreads>(K::kStepDone + consumer);
    }

    // dK^T (times the softmax scale) and dV^T transposed into K's and V's panels 2c, 2c + 1 as
    // [key][head dim], once both consumers' wgmmas are done reading them; then this consumer's
    // first thread's bulk stores (80-row boxes; rows past seqlen_k not written), read before the
    // next tile's K and V load (kv_empty). Packed, where the tile passes the sequence's last key, a
    // box would write the next sequence's rows: the consumer's 128 threads store the rows inside
    // the sequence instead.
    named_barrier_sync<K::kConsumerThreads>(K::kEpilogue);
    const float dk_scale = static_cast<float>(p.scale);
#pragma unroll
    for (int slice = 0; slice < 2; ++slice) {
      const uint32_t panel = (2 * consumer + slice) * kKPanelBytes;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint32_t f[10];
        pack40(dkt[slice], half, dk_scale, f);
        stmatrix_acc40_trans(smem_u32(sK) + panel, 40 * half, f);
        pack40(dvt[slice], half, rng.keep_scale, f);  // kept P entered dV unscaled
        stmatrix_acc40_trans(smem_u32(sV) + panel, 40 * half, f);
      }
    }
    fence_async_shared();  // these writes before the bulk stores' (async proxy) reads
    named_barrier_sync<128>(K::kDkvStore + consumer);
    const bool boxed = !packed || keys_in_block >= kBlockN;
    if (!boxed) {  // (packed only)
      if (keys_in_block > 0) {
        store_staged_block<T, kBlockN, kBlockN, 128>(
            sK, 0, 128 * consumer, row_at<T>(p.dk, p.dk_strides, tile.seq, false, tile.b, tile.h_kv, 0),
            p.dk_strides.row, tile.n_start, tile.seq.seqlen_k, sh.head_dim, tid % 128);
        store_staged_block<T, kBlockN, kBlockN, 128>(
            sV, 0, 128 * consumer, row_at<T>(p.dv, p.dv_strides, tile.seq, false, tile.b, tile.h_kv, 0),
            p.dv_strides.row, tile.n_start, tile.seq.seqlen_k, sh.head_dim, tid % 128);
      }
      named_barrier_sync<128>(K::kDkvStore + consumer);  // every thread's reads before the buffers take the next tile's
    }
    if (tid % 128 == 0) {
      if (boxed && keys_in_block > 0) {
#pragma unroll
        for (int slice = 0; slice < 2; ++slice) {
          const int panel = 2 * consumer + slice, row = box_row(tile.seq.k_row0, tile.n_start);
          tma_store_4d(&map_dk, sK + panel * kKPanelBytes, panel * 64, row, tile.h_kv, box_batch(tile.b));
          tma_store_4d(&map_dv, sV + panel * kKPanelBytes, panel * 64, row, tile.h_kv, box_batch(tile.b));
        }
        bulk_commit_group();
        bulk_wait_group_read<0>();
      }
      mbarrier_arrive(kv_empty);  // K's and V's buffers may take the next tile's
    }
  }
#endif
}

}  // namespace cuflash::sm90
