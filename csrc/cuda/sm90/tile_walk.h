// The persistent TMA forward's walk over its tiles (query block, head, batch), decoded from a
// tile's index with divisors fixed at launch (and every TMA forward's K/V head of a query head):
// built on the host, read by every warp at every tile (the plain integer divisions cost ~5% of a short-row tile's consumer time: the profile
// in benchmarks/NOTES.md). Host and device code (tests/cpp/test_tile_walk.cu checks it).
#pragma once
#include <cstdint>
#include "../../attention_math.h"

namespace cuflash::sm90 {

// n / d for 0 <= n < 2^31 and a divisor d >= 1 fixed beforehand: a multiply-high and a shift
// (Granlund and Montgomery; CUTLASS's FastDivmod). multiplier = ceil(2^(31 + s) / d) with
// s = ceil(log2 d), so that n / d = (n * multiplier) >> (32 + s - 1); d = 1 is passed through.
struct FastDivmod {
  int divisor = 1;
  uint32_t multiplier = 0, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(int d) : divisor(d) {
    if (d <= 1) return;
    uint32_t log2_ceil = 0;
    while ((int64_t{1} << log2_ceil) < d) ++log2_ceil;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << (31 + log2_ceil)) + d - 1) / static_cast<uint64_t>(d));
    shift = log2_ceil - 1;
  }
  CUFLASH_HD int div(int n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(static_cast<uint32_t>(n), multiplier);
#else
    const uint32_t high = static_cast<uint32_t>((uint64_t{static_cast<uint32_t>(n)} * multiplier) >> 32);
#endif
    return divisor == 1 ? n : static_cast<int>(high >> shift);
  }
};

// The tiles: m_blocks query blocks of each (head, batch) pair, heads_batches pairs (head fastest).
// Order: sections of section_heads pairs whose K and V fit together in L2, one section after
// another, so that the CTAs in flight re-read K/V from L2 as the 3-D grid's do; inside a section
// query blocks descending (the longest first under a causal mask), then the section's pairs.
struct TileWalk {
  int num_tiles = 1, m_blocks = 1, heads_batches = 1, section_heads = 1, last_section = 0;
  FastDivmod section_tiles;       // m_blocks * section_heads: the tiles of a whole section
  FastDivmod pairs_in_section;    // section_heads
  FastDivmod pairs_in_last;       // the last section's pairs (fewer where they do not divide)
  FastDivmod heads_q;             // a pair's head and batch
  FastDivmod heads_per_kv_head;   // GQA: a query head's K/V head

  // Tile `index`'s query block, query head and batch.
  CUFLASH_HD void tile(int index, int* m_block, int* h, int* b) const {
    const int section = section_tiles.div(index);
    const int local = index - section * section_tiles.divisor;
    // Chosen field by field: a reference into the kernel's parameter would copy it to local memory.
    const bool last = section == last_section;
    FastDivmod pairs;
    pairs.divisor = last ? pairs_in_last.divisor : pairs_in_section.divisor;
    pairs.multiplier = last ? pairs_in_last.multiplier : pairs_in_section.multiplier;
    pairs.shift = last ? pairs_in_last.shift : pairs_in_section.shift;
    const int block_from_last = pairs.div(local);
    *m_block = m_blocks - 1 - block_from_last;
    const int pair = section * section_heads + (local - block_from_last * pairs.divisor);
    *b = heads_q.div(pair);
    *h = pair - *b * heads_q.divisor;
  }
  CUFLASH_HD int kv_head(int h) const { return heads_per_kv_head.div(h); }
};

// How much of L2 a section's K and V may take.
constexpr int64_t kWalkL2Bytes = 32 << 20;

// kv_bytes_per_pair: the bytes of one K/V head of one sequence (K and V).
inline TileWalk make_tile_walk(int m_blocks, int heads_q, int heads_kv, int batch, int64_t kv_bytes_per_pair,
                               int64_t l2_bytes = kWalkL2Bytes) {
  TileWalk w;
  w.m_blocks = m_blocks;
  w.heads_batches = heads_q * batch;
  w.num_tiles = m_blocks * w.heads_batches;
  const int64_t fit = l2_bytes / (kv_bytes_per_pair > 0 ? kv_bytes_per_pair : 1);
  w.section_heads = static_cast<int>(fit < 1 ? 1 : fit < w.heads_batches ? fit : w.heads_batches);
  w.last_section = (w.heads_batches - 1) / w.section_heads;
  w.section_tiles = FastDivmod(m_blocks * w.section_heads);
  w.pairs_in_section = FastDivmod(w.section_heads);
  w.pairs_in_last = FastDivmod(w.heads_batches - w.last_section * w.section_heads);
  w.heads_q = FastDivmod(heads_q);
  w.heads_per_kv_head = FastDivmod(heads_q / heads_kv);
  return w;
}

}  // namespace cuflash::sm90
