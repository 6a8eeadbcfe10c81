// Forward attention on Hopper, warp-specialized (FlashAttention-3's structure): the default for
// plain 16-bit attention that TMA can address (run_switches.h; speed in benchmarks/NOTES.md).
//
// CTA = 1 + 2 or 3 warpgroups. The producer (warpgroup 0, 24 or 32 registers per thread after
// setmaxnreg) has one thread that loads Q once and K and V tiles through a 2-stage ring by TMA
// (128B-swizzled boxes, the panels wgmma reads), each stage with a "full" mbarrier (TMA bytes)
// and an "empty" one (an arrival from each consumer warp once its wgmmas have read the stage).
// The consumer warpgroups (240 or 160 registers) own 64 query rows each: at step t they issue
// S_t = Q K_t^T and O += P_{t-1} V_{t-1} together and run the softmax of S_t while the latter
// runs on the tensor cores; and they take turns issuing, so that one's softmax overlaps the
// others' matmuls. No load addresses, cp.async or block-wide barriers in the consumers: that is
// what the cp.async kernel (flash_fwd_sm90.cuh) was short of. Each consumer's output leaves by
// a TMA store from shared memory.
// Dense inputs; with seqused_k and paged caches under CUFLASH_SM90's "kvcache" part (a default:
// the rows past a sequence's keys are zeroed in shared memory, pages addressed by the producer);
// packed sequences (cu_seqlens) under its "varlen" part (a default; the plain kernels, persistent
// or not, narrow or at head dim 64 wide: kMayPack): the boxes read
// from a sequence's first row, past its end into the next sequence's rows, whose keys' V rows
// are zeroed as seqused_k's are and whose query rows are not stored (the output by checked
// stores, not a TMA box that would write into the next sequence).
#pragma once
// Experiment (an A/B build's define; benchmarks/NOTES.md): packed sequences store a consumer's 64
// rows by TMA where they all lie inside the sequence, the checked stores only past its end.
#ifndef CUFLASH_FWD_PACKED_TMA_STORE
#define CUFLASH_FWD_PACKED_TMA_STORE 0
#endif
#include <type_traits>
#include "flash_fwd_sm90.cuh"
#include "staged_mask.h"
#include "tile_walk.h"
#include "tma_maps.h"

namespace cuflash::sm90 {

// Tiles. The narrow ones suit query rows that see up to a few thousand keys; kWide, close to
// FlashAttention-3's tiles for 16-bit inputs, is faster beyond (wide_rows; benchmarks/NOTES.md):
// at head dim 64 three consumer warpgroups (192 query rows) share the producer, so that more
// softmax hides under the matmuls; at 128 and 256, 192 and 80 keys a step (what two stages of K
// and V leave room for beside Q): fewer steps, each a longer run of wgmmas.
// kPersistent (CUFLASH_SM90's "persistent" part, a default; head dims up to 128, short rows, and
// long ones without a mask: persistent_rows): one CTA per SM walks tiles (query block, head,
// batch), loading the next tile's K, V and Q while the last one's P V and output run, with O
// staged in a buffer of its own (Q's buffer takes the next tile's Q; at D=256 there is no room
// for it, nor at D=128 on the wide tile). It pays where tiles are short, so that the 3-D grid's
// per-CTA prologue and epilogue show (benchmarks/NOTES.md); at D=64 on the wide tile too, where
// no mask is set (persistent_wide_pays).
// The persistent walk's tile is decoded by the host-built TileWalk (tile_walk.h: divisions by
// multiply and shift), not five integer divisions a tile in every warp: +1-4% at 512-1024 keys
// (benchmarks/NOTES.md, twelfth session). The output goes out by TMA store (FlashAttention-3's
// epilogue): 1-4% faster than each warp's checked stores for plain attention, 0-6% with the
// features (softcap, ALiBi, dropout) on the H200.
// The diagonal block's empty half: at head dim 64 (128-key blocks), without the features, a
// consumer whose 64 rows see no key of the right half of a tile's first key block (a causal
// tile's diagonal block: the upper consumer's) computes S and its softmax over the left half
// only, the rest of P zero (short causal rows are ALU-bound): causal +4%/+3%/+1% at 512/1024/2048
// keys on the H200; at head dim 128 -2% to +2%, so not there (benchmarks/NOTES.md, thirteenth session).
template <typename T, int kHeadDim, bool kWide, bool kPersistent = false>
struct FwdSm90TmaKernel {
  static constexpr bool kHasPersistent = kHeadDim <= 128;
  // Packed sequences: every tile but the wide ones at head dims 128 and 256 (192- and 80-key
  // blocks), which stay as they were; at head dim 64 the wide tile takes them where it would take
  // a dense batch (H200: packed rows on the narrow tile ran 0.84-0.91x dense; benchmarks/NOTES.md).
  static constexpr bool kMayPack = !kWide || kHeadDim <= 64;
  static_assert(kHasPersistent || !kPersistent, "no room to stage O beside the tiles at head dim 256");
  static constexpr int kConsumers = kWide && kHeadDim <= 64 ? 3 : 2;
  static constexpr int kThreads = 128 * (kConsumers + 1), kBlockM = 64 * kConsumers;
  static constexpr int kBlockN = kHeadDim <= 64 ? 128 : kHeadDim <= 128 ? (kWide ? 192 : 128) : (kWide ? 80 : 64);
  static constexpr int kStages = 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2, kKVBytes = kBlockN * kHeadDim * 2;
  // The persistent kernel's staging tile for the output's TMA store: Q's layout (kernel below).
  static constexpr int kStagingBytes = kPersistent ? kQBytes : 0;
  // Barriers: Q full, Q empty, then per stage K full, V full, K empty, V empty, mask full, mask empty.
  static constexpr int kBarriers = 2 + 6 * kStages;
  static constexpr int kBarrierEnd = kQBytes + 2 * kStages * kKVBytes + kStagingBytes + kBarriers * 8;
  // + 1024: the swizzle atoms must start on 1024-byte boundaries; the base is aligned by hand.
  static constexpr int kSmemBytes = kBarrierEnd + 1024;
  // attn_mask tiles staged by TMA (the "masktma" part; MaskStaging): kStages stages of kBlockM x
  // kBlockN 16-bit elements (a bool mask fills half) after the barriers, in boxes of 64 keys. On
  // the non-persistent kernels whose shared memory has room: every features kernel but head dim
  // 128's and 256's wide ones (head dim 128's narrow one has 1 KB to spare).
  static constexpr int kMaskOffset = (kBarrierEnd + 1023) / 1024 * 1024;
  static constexpr int kMaskStageBytes = kBlockM * kBlockN * 2;
  static constexpr int kSmemBytesStagingMask = kMaskOffset + kStages * kMaskStageBytes + 1024;
  static constexpr bool kMayStageMask = !kPersistent && kBlockN % 64 == 0 && kSmemBytesStagingMask <= 227 * 1024;
  // setmaxnreg: the producer's registers go to the consumers (65536 per SM in all).
  static constexpr int kProducerRegs = kConsumers == 2 ? 24 : 32, kConsumerRegs = kConsumers == 2 ? 240 : 160;
  static_assert(fits_launch_registers<kThreads>(kProducerRegs, kConsumerRegs), "setmaxnreg's split");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
};

// What a mask tile staged in shared memory (MaskStaging) adds to a warp tile's scores t (kN keys
// from the key block's first; the warp's 16 rows from warp_row of the CTA's tile), as
// ScoreMod::with_mask_inside adds it (ScoreMod::plus_bias), bit for bit. Past the mask's
// rows and keys TMA reads zeros: a float mask adds 0 there; a bool one hides the keys, which the
// sequence's bounds hide anyway, and the rows past the queries, never stored.
template <typename T, int kN>
__device__ __forceinline__ void add_staged_mask(WarpAcc<kN>& t, uint32_t stage, const MaskStaging& m, int warp_row,
                                                int lane) {
  auto add = [](float& x, float bias) { x = ScoreMod<T>::plus_bias(x, bias); };
  uint32_t first = stage + m.thread_offset(warp_row, lane), chunk_xor = m.chunk_xor(lane);
  // Computed here at each step: hoisted out of the step loop, each tile's address took a register
  // (spilled: ptxas, the head-dim-64 wide features kernel).
  asm volatile("" : "+r"(first), "+r"(chunk_xor));
  const uint32_t next_rows = m.next_rows();
  if (m.is_bool) {
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t pair = ld_shared_u16(first + m.tile_offset(j, chunk_xor) + half * next_rows);
        add(t.v[j][2 * half], AttnMaskSlice::bool_bias<float>((pair & 0xff) != 0));
        add(t.v[j][2 * half + 1], AttnMaskSlice::bool_bias<float>((pair >> 8) != 0));
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t pair = ld_shared_u32(first + m.tile_offset(j, chunk_xor) + half * next_rows);
        add(t.v[j][2 * half], pair_element<T>(pair, 0));
        add(t.v[j][2 * half + 1], pair_element<T>(pair, 1));
      }
    }
  }
}

// One tile's work: its query block, head and batch (and split), and the key blocks its rows see.
struct TmaTile {
  int m_start, h, b, h_kv, split;
  Sequence seq;
  Range n_blocks;
  __device__ int steps() const { return n_blocks.end - n_blocks.begin; }
  __device__ int block_of(int step) const { return n_blocks.end - 1 - step; }  // last block first
  // No query row (a packed sequence shorter than the grid), as the cp.async kernel's tile says.
  __device__ bool empty() const { return m_start >= seq.seqlen_q; }
};

// kFeatures: softcap, ALiBi, attn_mask or dropout may be on (CUFLASH_SM90's "features" part, a
// default), in the consumers' softmax step as in the other forwards. kStagedMask (a features
// kernel with room for it, K::kMayStageMask): the attn_mask's tiles staged in shared memory by
// the producer (MaskStaging; the "masktma" part). A kernel of its own: in one with the features
// kernel, its code spilled 24-32 more bytes in the head-dim-64 wide one and made softcap and
// ALiBi 2-8% slower there (H100, benchmarks/NOTES.md).
template <typename T, int kHeadDim, bool kWide, bool kFeatures, bool kPersistent, bool kStagedMask = false>
__global__ void __launch_bounds__(FwdSm90TmaKernel<T, kHeadDim, kWide, kPersistent>::kThreads, 1)
    flash_fwd_sm90_tma_kernel(const FlashFwdParams p, const __grid_constant__ CUtensorMap map_q,
                              const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v,
                              const __grid_constant__ CUtensorMap map_o, const TileWalk walk,
                              const __grid_constant__ CUtensorMap map_mask, const MaskStaging mask_staging) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using K = FwdSm90TmaKernel<T, kHeadDim, kWide, kPersistent>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kStages = K::kStages;
  // Split-KV: the plain narrow kernel, one tile a CTA, only (launch_fwd_tma): the others' code
  // stays as it was.
  constexpr bool kMaySplit = !kWide && !kPersistent && !kFeatures;
  // Packed sequences (the "varlen" part) run on the plain kernels only (launch_fwd_tma).
  constexpr bool kMayPack = K::kMayPack && !kFeatures;
  const bool packed = kMayPack && p.varlen.cu_seqlens_q != nullptr;
  // The diagonal block's empty half (above): head dim 64, whose 128-key blocks (narrow and wide
  // tiles) halve into 64 keys.
  constexpr bool kHalfDiagonal = kHeadDim == 64 && kBlockN == 128 && !kFeatures;
  // The plain kernels fold the softmax scale into the exponent's argument, one FFMA a score
  // (OnlineSoftmax::exp_folded_and_rescale_factor; H200, benchmarks/NOTES.md: +1-6%); a positive
  // scale only (folds_scale_safely). The features kernel scales its scores first: folding its
  // run-time factor (cap_out, the scale or 1) made it slower (H100, benchmarks/NOTES.md).
  constexpr bool kFoldScale = !kFeatures;
  // O rescaled lazily (OnlineSoftmax's kLazy, the max kept by selects), most steps skip it:
  // H100, same-run A/Bs (benchmarks/NOTES.md). The plain kernels: forward +1-8% at head dim 256,
  // 0.985-1.027x (median 1.007x) at 64 and 128. The features kernels at head dim 256: softcap
  // +4-8%, ALiBi +1-6%, dropout +8-11%; at 64 and 128 not (0.96-1.05x, dropout at 64 0.97-0.98x).
  // A lazy max lets p reach 2^8, which fp16 P holds: dropout's keep scale waits for the epilogue.
  constexpr bool kLazyRescale = kFoldScale || kHeadDim == 256;
  static_assert(!kStagedMask || (kFeatures && K::kMayStageMask), "a staged mask: the features kernels with room");
  static_assert(kWide || kPageSizeMultiple % kBlockN == 0, "a key block lies in one page (key_at)");
  constexpr int kPanels = kHeadDim / 64, kConsumerThreads = 128 * K::kConsumers;
  extern __shared__ char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  unsigned char* sQ = smem;
  auto sK = [&](int stage) { return smem + K::kQBytes + stage * K::kKVBytes; };
  auto sV = [&](int stage) { return smem + K::kQBytes + (kStages + stage) * K::kKVBytes; };
  unsigned char* staging = smem + K::kQBytes + 2 * kStages * K::kKVBytes;  // persistent only
  uint64_t* q_full = reinterpret_cast<uint64_t*>(staging + K::kStagingBytes);
  uint64_t* q_empty = q_full + 1;
  uint64_t* k_full = q_full + 2;
  uint64_t* v_full = k_full + kStages;
  uint64_t* k_empty = v_full + kStages;
  uint64_t* v_empty = k_empty + kStages;
  uint64_t* mask_full = v_empty + kStages;  // the "masktma" part's
  uint64_t* mask_empty = mask_full + kStages;
  auto sMask = [&](int stage) { return smem + K::kMaskOffset + stage * K::kMaskStageBytes; };

  const AttentionShape& sh = p.shape;
  const int tid = threadIdx.x, warpgroup = warpgroup_index(), lane = tid % 32;
  // Tiles: the grid's one, or, persistent, every gridDim.x-th of all (query block, head, batch),
  // in TileWalk's order (tile_walk.h).
  const int num_tiles = kPersistent ? walk.num_tiles : 1;
  const int first_tile = kPersistent ? static_cast<int>(blockIdx.x) : 0;
  const int tile_stride = kPersistent ? static_cast<int>(gridDim.x) : 1;
  auto tile_at = [&](int index) {
    TmaTile t;
    int m_block;
    if constexpr (kPersistent) {
      walk.tile(index, &m_block, &t.h, &t.b);
    } else {
      m_block = query_block_longest_first();
      t.h = blockIdx.y;
      t.b = blockIdx.z;
    }
    t.split = 0;
    // Split-KV (kMaySplit; the "splits" part): grid z holds (sequence, split) pairs, and a
    // split takes its share of the key blocks (split_of).
    if (kMaySplit && p.num_splits > 1) {
      t.split = t.b % p.num_splits;
      t.b /= p.num_splits;
    }
    t.h_kv = walk.kv_head(t.h);
    t.m_start = m_block * kBlockM;
    t.seq = sequence_of(p, t.b);
    t.n_blocks = key_blocks(p.mask, t.seq, t.m_start, min(t.m_start + kBlockM, t.seq.seqlen_q), kBlockN);
    if (packed && t.empty()) t.n_blocks = Range{0, 0};
    if (kMaySplit && p.num_splits > 1) t.n_blocks = split_of(t.n_blocks, t.split, p.num_splits);
    return t;
  };

  if (tid == 0) {
    mbarrier_init(q_full, 1);
    mbarrier_init(q_empty, kConsumerThreads / 32);  // one arrival per consumer warp
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&k_full[s], 1);
      mbarrier_init(&v_full[s], 1);
      mbarrier_init(&k_empty[s], kConsumerThreads / 32);
      mbarrier_init(&v_empty[s], kConsumerThreads / 32);
      if (kStagedMask) {
        mbarrier_init(&mask_full[s], 1);
        mbarrier_init(&mask_empty[s], kConsumerThreads / 32);
      }
    }
    fence_barrier_init();
  }
  __syncthreads();

  // K/V steps are counted over all of a CTA's tiles: global step g uses stage g % kStages, in
  // its (g / kStages)-th use.
  if (warpgroup == 0) {  // producer
    setmaxnreg_dec<K::kProducerRegs>();
    if (tid != 0) return;
    int step = 0, q_loads = 0;
    for (int index = first_tile, iteration = 0; index < num_tiles; index += tile_stride, ++iteration) {
      const TmaTile tile = tile_at(index);
      const int steps = tile.steps();
      // (An empty query block is no tile, as in the other kernels; dense tiles never are.)
      if (p.tile_counters && !(packed && tile.empty()))
        count_tiles(p.tile_counters, tile.seq, tile.n_blocks, kBlockM, kBlockN);
      auto load = [&](const CUtensorMap* map, unsigned char* dst, uint64_t* full, KeyAt at) {
        mbarrier_arrive_expect_tx(full, K::kKVBytes);
#pragma unroll
        for (int panel = 0; panel < kPanels; ++panel)
          tma_load_4d(dst + panel * kBlockN * 128, map, full, panel * 64, at.row, tile.h_kv, at.batch);
      };
      auto load_step = [&](int t) {
        const int g = step + t, stage = g % kStages, use = g / kStages;
        // A key block's first key (attention_math.h's key_at: in a paged cache, the page and the row
        // in it). A block never straddles pages: page_size is a multiple of 256, and KV caches take
        // the narrow tiles, whose blocks (128 or 64 keys) divide it; the wide ones stay as they were.
        const int key0 = tile.block_of(t) * kBlockN;
        const KeyAt at = packed  ? KeyAt{static_cast<int>(tile.seq.k_row0) + key0, 0}
                         : kWide ? KeyAt{key0, tile.b}
                                 : key_at(p.paged, tile.b, key0);
        // The stage's previous tiles (step g - kStages) were released by every consumer warp.
        if (g >= kStages) mbarrier_wait(&k_empty[stage], (use - 1) & 1);
        load(&map_k, sK(stage), &k_full[stage], at);
        if constexpr (kStagedMask) {  // the block's mask tile (MaskStaging), at its logical keys
          if (g >= kStages) mbarrier_wait(&mask_empty[stage], (use - 1) & 1);
          mbarrier_arrive_expect_tx(&mask_full[stage], mask_staging.stage_tx_bytes);
#pragma unroll
          for (int box = 0; box < kBlockN / 64; ++box)
            tma_load_4d(sMask(stage) + box * mask_staging.box_slot_bytes, &map_mask, &mask_full[stage], key0 + 64 * box,
                        mask_staging.one_row ? 0 : tile.m_start, mask_staging.per_head ? tile.h : 0,
                        mask_staging.per_batch ? tile.b : 0);
        }
        if (g >= kStages) mbarrier_wait(&v_empty[stage], (use - 1) & 1);
        load(&map_v, sV(stage), &v_full[stage], at);
      };
      // After the first tile, the first stages' loads (which wait only on the previous tile's
      // releases) go out before Q, whose buffer the previous tile's consumers may still be reading.
      const int early = iteration == 0 ? 0 : min(steps, kStages);
      for (int t = 0; t < early; ++t) load_step(t);
      if (steps > 0) {
        // Q's buffer was released by every consumer warp of the previous tile that loaded Q
        // (consumers release only tiles with steps, so q_empty never runs two phases ahead).
        if (q_loads > 0) mbarrier_wait(q_empty, (q_loads - 1) & 1);
        ++q_loads;
        mbarrier_arrive_expect_tx(q_full, K::kQBytes);
#pragma unroll
        for (int panel = 0; panel < kPanels; ++panel)
          tma_load_4d(sQ + panel * kBlockM * 128, &map_q, q_full, panel * 64,
                      packed ? static_cast<int>(tile.seq.q_row0) + tile.m_start : tile.m_start, tile.h,
                      packed ? 0 : tile.b);
      }
      for (int t = early; t < steps; ++t) load_step(t);
      step += steps;
    }
    return;
  }

  // Consumers: warpgroup c = 1, 2 (, 3) owns rows 64 (c - 1) .. of a tile; this warp 16 of them.
  setmaxnreg_inc<K::kConsumerRegs>();
  const int consumer = warpgroup - 1;
  const int warp_row = 16 * ((tid - 128) / 32);
  const uint64_t desc_q = smem_desc_k_major_sw128(sQ, consumer * 64 * 128);
  const uint64_t desc_k0 = smem_desc_k_major_sw128(sK(0));
  const uint64_t desc_v0 = smem_desc_mn_major_sw128(sV(0), 0, kBlockN * 128);
  // Descriptors pass through an empty asm each step, so that the compiler adds the per-step
  // offsets there instead of keeping every offset descriptor live across the loop (ptxas: 96 B
  // spilled at D=128 otherwise, the K descriptors reloaded from local memory every step).
  auto opaque = [](uint64_t desc) {
    asm volatile("" : "+l"(desc));
    return desc;
  };
  auto desc_k = [&](int stage) { return opaque(desc_k0) + ((stage * K::kKVBytes) >> 4); };
  auto desc_v = [&](int stage) { return opaque(desc_v0) + ((stage * K::kKVBytes) >> 4); };
  // Turns: the consumers take turns issuing their wgmmas, in a ring (named barrier 2 + c is
  // consumer c's turn, signalled by the consumer before it), so that one's softmax runs while
  // another's matmuls hold the tensor cores. Consumer 0 goes first in every tile.
  constexpr int kTurnThreads = 2 * 128;  // the warpgroup that waits and the one that signals
  auto my_turn = [&] { named_barrier_sync<kTurnThreads>(2 + consumer); };
  auto your_turn = [&] { named_barrier_arrive<kTurnThreads>(2 + (consumer + 1) % K::kConsumers); };
  auto release_q = [&] {  // persistent: this warp's wgmmas are done reading Q
    __syncwarp();
    if (lane == 0) mbarrier_arrive(q_empty);
  };
  const bool dropout = kFeatures && p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};
  int step = 0, q_loads = 0;
  for (int index = first_tile; index < num_tiles; index += tile_stride) {
    const TmaTile tile = tile_at(index);
    const int steps = tile.steps(), row0 = tile.m_start + warp_row;
    WarpAcc<kHeadDim> o;
    o.zero();
    OnlineSoftmax softmax;
    ScoreMod<T> mod(p, tile.b, tile.h);
    if (kStagedMask) mod.mask.data = nullptr;  // added from shared memory instead (softmax_step)
    if (steps > 0) {
      auto full_parity = [&](int t) { return ((step + t) / kStages) & 1; };
      auto stage_of = [&](int t) { return (step + t) % kStages; };
      auto wait_v = [&](int t) { mbarrier_wait(&v_full[stage_of(t)], full_parity(t)); };
      uint32_t pa[kBlockN / 16][4];  // P of the previous step, the A operand of its P V
      // P of S (the raw q.k of step t) as the next P V's A operand; alpha: the rescale of O.
      // Dropout after the softmax has summed every probability: only the kept ones reach P V.
      auto softmax_step = [&](auto& s, int t, float (&alpha)[2]) {
        const int col0 = tile.block_of(t) * kBlockN;
        if constexpr (kFoldScale) {
          mask_scores(s, p.mask, tile.seq, row0, col0, lane);  // raw q.k, -inf where masked
          softmax.exp_folded_and_rescale_factor<kLazyRescale>(s, mod.scale_log2, alpha);
        } else {
          // Staged, the mask is added from shared memory (add_bias), not by mod.
          scores_from_qk<kFeatures>(s, mod, p.mask, tile.seq, row0, col0, lane, [&](auto& scores) {
            if constexpr (kStagedMask) {
              const int stage = stage_of(t);
              mbarrier_wait(&mask_full[stage], full_parity(t));
              add_staged_mask<T>(scores, smem_u32(sMask(stage)), mask_staging, warp_row, lane);
              __syncwarp();  // every lane's reads of the stage done before the release
              if (lane == 0) mbarrier_arrive(&mask_empty[stage]);
            }
          });
          softmax.exp_and_rescale_factor<kLazyRescale>(s, alpha);
        }
        if (dropout) apply_dropout(s, rng, tile.b, tile.h, sh.heads_q, row0, col0, lane);
      };
      auto to_pa = [&](const auto& s) {  // a WarpAcc of kBlockN columns, or of the left half (the rest of P 0)
        constexpr int kCols = std::remove_reference_t<decltype(s)>::kColumns;
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          if (kk < kCols / 16) {
            s.template to_a<T>(pa[kk], kk);
          } else {
#pragma unroll
            for (int r = 0; r < 4; ++r) pa[kk][r] = 0u;
          }
        }
      };
      mbarrier_wait(q_full, q_loads++ & 1);
      // The last consumer's first signal of the tile: after its q_full wait, so that it cannot
      // meet on barrier 2 the previous tile's last signal, which consumer 0 takes at that tile's end.
      if (consumer == K::kConsumers - 1) named_barrier_arrive<kTurnThreads>(2);
      // seqused_k (CUFLASH_SM90's "kvcache" part, on the narrow tiles only) and packed sequences:
      // the first step's block, the sequence's last, may run past its keys into rows the tensor
      // holds but the sequence does not use (a KV cache's, the next sequence's), which TMA reads
      // like any other (past the tensor's rows it fills zeros). Their scores are masked, but P V
      // would still take 0 x NaN from a stale or uninitialized row: the consumers zero those rows
      // of V first, a share each, before any P V of the tile.
      const int used_rows = tile.seq.seqlen_k - tile.block_of(0) * kBlockN;  // > 0: the block has a key
      const bool keys_end_in_block = (!kWide && p.varlen.seqused_k != nullptr) || packed;  // else TMA reads zeros
      if (keys_end_in_block && used_rows < kBlockN) {  // the same for every consumer
        wait_v(0);
        zero_rows_before_wgmma<kPanels, kBlockN, kConsumerThreads>(used_rows, tid - 128, 1, sV(stage_of(0)));
      }
      {  // step 0: S only
        mbarrier_wait(&k_full[stage_of(0)], full_parity(0));
        auto first_step = [&](auto& s) {  // s: S's accumulator, kBlockN columns or the left half
          my_turn();
          wgmma_fence();
          constexpr int kCols = std::remove_reference_t<decltype(s)>::kColumns;
          issue_qk<T, kHeadDim, kBlockM * 128, kCols, kBlockN>(s, opaque(desc_q), desc_k(stage_of(0)));
          your_turn();
          wgmma_wait<0>();
          if (lane == 0) mbarrier_arrive(&k_empty[stage_of(0)]);  // this warp's wgmmas have read K
          float alpha[2];
          softmax_step(s, 0, alpha);  // O is still 0: nothing to rescale
          to_pa(s);
        };
        if constexpr (kHalfDiagonal) {
          // This consumer's rows see no key of the block's right half. The test must stay uniform over
          // the warpgroup (the wgmma is the warpgroup's): consumer and tile fields only.
          const int rows_begin = tile.m_start + 64 * consumer;
          const int rows_end = min(rows_begin + 64, tile.seq.seqlen_q);
          if (rows_begin < rows_end && visible_keys(p.mask, tile.seq, rows_begin, rows_end).end <=
                                           tile.block_of(0) * kBlockN + kBlockN / 2) {
            WarpAcc<kBlockN / 2> s;
            first_step(s);
          } else {
            WarpAcc<kBlockN> s;
            first_step(s);
          }
        } else {
          WarpAcc<kBlockN> s;
          first_step(s);
        }
      }
      for (int t = 1; t < steps; ++t) {
        mbarrier_wait(&k_full[stage_of(t)], full_parity(t));
        wait_v(t - 1);
        WarpAcc<kBlockN> s;
        my_turn();
        wgmma_fence();
        issue_qk<T, kHeadDim, kBlockM * 128>(s, opaque(desc_q), desc_k(stage_of(t)));
        issue_pv<T, kHeadDim, kBlockN>(o, pa, desc_v(stage_of(t - 1)));
        your_turn();
        wgmma_wait<1>();  // S_t done; P_{t-1} V_{t-1} may still run
        if (lane == 0) mbarrier_arrive(&k_empty[stage_of(t)]);
        float alpha[2];
        softmax_step(s, t, alpha);
        wgmma_wait<0>();  // O and pa are free again
        if (lane == 0) mbarrier_arrive(&v_empty[stage_of(t - 1)]);
        OnlineSoftmax::rescale_rows<kLazyRescale>(o, alpha);
        to_pa(s);
      }
      // The last consumer's last turn signal is taken here, so no barrier is left half-arrived.
      if (consumer == 0) my_turn();
      // Every S of the tile is done: Q may be replaced. Only after consumer 0's last turn above,
      // since the next tile's first signal on barrier 2 waits for the next Q.
      if constexpr (kPersistent) release_q();
      wait_v(steps - 1);
      wgmma_fence();
      issue_pv<T, kHeadDim, kBlockN>(o, pa, desc_v(stage_of(steps - 1)));
      wgmma_wait<0>();
      if (lane == 0) mbarrier_arrive(&v_empty[stage_of(steps - 1)]);
      step += steps;
    }

    // Split-KV: this split's rows in float32 from registers, for the combine kernel (every
    // consumer alike: no barrier skipped halfway).
    if (kMaySplit && p.num_splits > 1) {
      store_partial(o, softmax, rng.keep_scale, p, tile.seq, tile.split, tile.b, tile.h, row0, lane);
      continue;
    }
    float* lse_out = static_cast<float*>(p.lse) + stats_offset(p.stats_strides, tile.seq, tile.b, tile.h);
    // The output by TMA: this consumer's rows written into the staging tile as TMA stores it,
    // then one bulk store a panel by the consumer's first thread. Persistent, the staging tile is
    // its own buffer, free once the previous tile's store has read it; otherwise this
    // consumer's rows of Q's buffer, free once its four warps' wgmmas are done with Q.
    unsigned char* stage = kPersistent ? staging : sQ;
    const bool first_thread = tid % 128 == 0;
    const int epilogue_barrier = 2 + K::kConsumers + consumer;  // after the turns' barriers
    if (kPersistent && first_thread) bulk_wait_group_read<0>();
    named_barrier_sync<128>(epilogue_barrier);
    float inv_l[2], lse[2];
    softmax.finalize(inv_l, lse, rng.keep_scale);
    stage_rows_for_tma<T, kBlockM>(o, inv_l, stage, warp_row, lane);
    fence_async_shared();  // these writes before the bulk store's (async proxy) reads
    named_barrier_sync<128>(epilogue_barrier);
    // Packed, a box would write into the next sequence's rows past a sequence's end: the checked
    // stores there (everywhere, unless the experiment stores a consumer's 64 rows that all lie
    // inside the sequence by TMA: the same test for its 128 threads).
    auto store_checked = [&] {
      T* out = row_at<T>(p.out, p.out_strides, tile.seq, true, tile.b, tile.h, 0);
      store_staged_rows<T, kBlockM, kPanels>(stage, consumer, out, p.out_strides.row, tile.m_start, tile.seq.seqlen_q,
                                             sh.head_dim, tid % 128);
    };
    auto store_box = [&](int row, int batch) {
#pragma unroll
      for (int panel = 0; panel < kPanels; ++panel)
        tma_store_4d(&map_o, stage + panel * kBlockM * 128 + consumer * 64 * 128, panel * 64, row, tile.h, batch);
      bulk_commit_group();
    };
#if CUFLASH_FWD_PACKED_TMA_STORE
    const int first_row = tile.m_start + 64 * consumer;
    if (packed && first_row + 64 > tile.seq.seqlen_q) store_checked();
    else if (first_thread && first_row < tile.seq.seqlen_q)
      store_box(packed ? static_cast<int>(tile.seq.q_row0) + first_row : first_row, packed ? 0 : tile.b);
#else
    if (packed) store_checked();
    else if (first_thread && tile.m_start + 64 * consumer < tile.seq.seqlen_q)
      store_box(tile.m_start + 64 * consumer, tile.b);
#endif
    store_lse(lse, lse_out, row0, tile.seq.seqlen_q, lane);
  }
  // The last bulk stores have read the staging tile before the CTA's shared memory goes.
  if (tid % 128 == 0) bulk_wait_group_read<0>();
#endif
}

// How many keys the middle query row of dense p sees (under a causal mask or a window, the mean
// over the rows is about the middle row's): the kernel choices that depend on row length use it.
// Host code: cu_seqlens and seqused_k are device memory, so the grid's lengths stand in for them.
inline int middle_row_keys(const AttentionParams& p) {
  AttentionParams grid = p;
  grid.varlen = VarlenParams{};
  const Sequence s = sequence_of(grid, 0);
  const int middle = s.seqlen_q / 2;
  const Range keys = visible_keys(p.mask, s, middle, middle + 1);
  return keys.end - keys.begin;
}
// Whether dense p has long rows (2048 keys or more): there the persistent kernel does not pay
// (benchmarks/NOTES.md).
inline bool long_rows(const FlashFwdParams& p) { return middle_row_keys(p) >= 2048; }
// Where the wide tile pays (benchmarks/NOTES.md, 2026-12-01): rows of 2048 keys, but 4096 at head
// dim 128, whose wide tile loses 3-9% at 2048 (192 keys a step: the last step's share of idle
// keys and the longer pipeline fill).
template <int kHeadDim>
bool wide_rows(const FlashFwdParams& p) {
  return middle_row_keys(p) >= (kHeadDim == 128 ? 4096 : 2048);
}

// Whether the plain kernels may fold p's scale into the exponent (kFoldScale): a positive one,
// as the kernels compute it, and normal (no flush to zero could make it 0 there). A zero or
// negative scale orders the scores otherwise and would meet the mask's -inf: those take the
// cp.async or sm_80-class kernels.
inline bool folds_scale_safely(const FlashFwdParams& p) {
  return positive_normal(static_cast<float>(p.scale) * kLog2e);
}

// Whether dense p has no mask (no window: causal is one), so that every tile sees every key.
inline bool unmasked(const FlashFwdParams& p) { return p.mask.window_left < 0 && p.mask.window_right < 0; }
// Whether dense p's window is bounded on both sides (a sliding window; causal with a left window
// among them): a row sees at most window_left + window_right + 1 keys, so every tile but those at
// the sequence's edges about as many.
inline bool banded(const FlashFwdParams& p) { return p.mask.window_left >= 0 && p.mask.window_right >= 0; }
// Whether p's tiles are of about one length, which the persistent kernel's static walk needs on
// long rows: no mask, or a band where banded_walks (the "persistentwindow" part).
inline bool balanced_tiles(const FlashFwdParams& p, bool banded_walks) {
  return unmasked(p) || (banded_walks && banded(p));
}

// Where the persistent kernel at head dim 64 (short rows) takes the wide tile: no mask (H200,
// benchmarks/NOTES.md, 2026-12-02: +3-4% at 512 and 1024 keys; causal 7-10% slower, its
// diagonal tiles' masked share being larger on 192 rows), and more than 128 query rows (up to
// 128 the narrow tile is one block too, without the wide one's padded third of rows).
inline bool persistent_wide_pays(const FlashFwdParams& p) {
  return unmasked(p) && p.shape.seqlen_q > 128;
}

// Where the features kernel at head dim 64 takes the wide tile (three consumers): rows of 1024
// keys or more, without dropout (H100, thirty-eighth session, 2048 and 8192 keys, causal or not:
// softcap +10-24%, ALiBi +3-16%, dropout 2-11% slower; benchmarks/NOTES.md), and more than 128
// query rows (as persistent_wide_pays: up to 128 the narrow tile is one block too).
inline bool features_wide_pays(const FlashFwdParams& p) {
  return p.dropout.p == 0.0 && middle_row_keys(p) >= 1024 && p.shape.seqlen_q > 128;
}

// Where the persistent kernel runs dense p (plain attention without a KV cache): short rows, and
// without a mask longer rows too where it has the tile they take: at head dim 64 the wide one
// (persistent_wide_pays), at 128 the narrow one (narrow_tile: below wide_rows' length, or at any
// length under CUFLASH_FWD_TILE=narrow, which compares the two on long rows). Tiles of one length
// leave the static walk nothing to balance; the persistent kernel then saves the 3-D grid's
// per-CTA prologue and epilogue at any length (H200, nineteenth session: +3-6% at head dim 64
// from 2048 to 16384 keys, +2-8% at 128 with 2048 keys over two runs). Under a causal mask long
// rows lose (-6% and -14% at 16384 keys: the static walk's balance; benchmarks/NOTES.md); under a
// band (banded_walks) at head dim 128 they walk too (balanced_tiles).
template <int kHeadDim>
bool persistent_rows(const FlashFwdParams& p, bool banded_walks, bool narrow_tile) {
  return !long_rows(p) || (kHeadDim == 64 ? persistent_wide_pays(p) : balanced_tiles(p, banded_walks) && narrow_tile);
}

// Where the features kernel walks tiles persistently (the "persistentfeatures" part; dense p): where
// plain attention would, short rows and, without a mask (or under a band where banded_walks),
// longer ones; on head dim 64's wide features tile (features_wide_pays) only without a mask
// (launch_fwd_tma). Not with an attn_mask, whose staged kernel has no persistent form
// (kMayStageMask).
inline bool features_persistent_rows(const FlashFwdParams& p, bool banded_walks) {
  return p.score.attn_mask.data == nullptr && (!long_rows(p) || balanced_tiles(p, banded_walks));
}

// The tensor maps of q, k, v and out for the TMA kernel of dense p; false where TMA cannot address them (alignment, zero strides): the
// cp.async kernel runs then.
struct AttentionTmaMaps {
  CUtensorMap q, k, v, o;  // o: 64-row boxes (a consumer's rows)
};
// Extents as attention_map_rows says (tma_maps.h): paged caches and packed sequences too.
template <typename T, int kHeadDim, bool kWide>
bool encode_fwd_tma_maps(const FlashFwdParams& p, AttentionTmaMaps* maps) {
  using K = FwdSm90TmaKernel<T, kHeadDim, kWide>;
  const AttentionShape& sh = p.shape;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const MapRows m = attention_map_rows(p);
  return encode_attention_map(&maps->q, p.q, kBf16, p.q_strides, m.q_batch, sh.heads_q, m.q_rows, sh.head_dim,
                              K::kBlockM) &&
         encode_attention_map(&maps->k, p.k, kBf16, p.k_strides, m.kv_batch, sh.heads_kv, m.kv_rows, sh.head_dim,
                              K::kBlockN) &&
         encode_attention_map(&maps->v, p.v, kBf16, p.v_strides, m.kv_batch, sh.heads_kv, m.kv_rows, sh.head_dim,
                              K::kBlockN) &&
         encode_attention_map(&maps->o, p.out, kBf16, p.out_strides, m.q_batch, sh.heads_q, m.q_rows, sh.head_dim,
                              64);
}

}  // namespace cuflash::sm90
