// The persistent TMA forward's walk over its tiles (query block, head, batch), decoded from a
// tile's index with divisors fixed at launch (and every TMA forward's K/V head of a query head):
// built on the host, read by every warp at every tile (the plain integer divisions cost ~5% of a short-row tile's consumer time: the profile
// in benchmarks/NOTES.md). Host and device code (tests/cpp/test_tile_walk.cu checks it).
#pragma once
#include <cstdint>
#include <vector>
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
// Order: sections of section_heads pairs whose K and V fit together in L2 (walk_section_heads
// below), one section after another, so that the CTAs in flight re-read K/V from L2 as the 3-D
// grid's do; inside a section query blocks descending (the longest first under a causal mask),
// then the section's pairs.
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

// How much of L2 a section's K and V may take at most.
constexpr int64_t kWalkL2Bytes = 32 << 20;

inline TileWalk make_tile_walk(int m_blocks, int heads_q, int heads_kv, int batch, int section_heads) {
  TileWalk w;
  w.m_blocks = m_blocks;
  w.heads_batches = heads_q * batch;
  w.num_tiles = m_blocks * w.heads_batches;
  w.section_heads = section_heads < 1 ? 1 : section_heads < w.heads_batches ? section_heads : w.heads_batches;
  w.last_section = (w.heads_batches - 1) / w.section_heads;
  w.section_tiles = FastDivmod(m_blocks * w.section_heads);
  w.pairs_in_section = FastDivmod(w.section_heads);
  w.pairs_in_last = FastDivmod(w.heads_batches - w.last_section * w.section_heads);
  w.heads_q = FastDivmod(heads_q);
  w.heads_per_kv_head = FastDivmod(heads_q / heads_kv);
  return w;
}

// A model of the static walk's balance (CTA c takes tiles c, c + ctas, c + 2 ctas, ... of the
// order above): the busiest CTA's work over the mean, a tile costing its key blocks plus one
// (the per-tile work). tile_steps[m]: query block m's key blocks. On the H200 it ranked the
// causal section sizes as their speeds did (benchmarks/NOTES.md, nineteenth session).
inline double walk_imbalance(const std::vector<int>& tile_steps, int heads_batches, int section_heads, int ctas) {
  const int m_blocks = static_cast<int>(tile_steps.size());
  const int64_t tiles = int64_t{m_blocks} * heads_batches;
  const int slots = static_cast<int>(tiles < ctas ? tiles : ctas);
  std::vector<int64_t> work(slots, 0);
  int64_t total = 0;
  int cta = 0;
  for (int first = 0; first < heads_batches; first += section_heads) {
    const int pairs = heads_batches - first < section_heads ? heads_batches - first : section_heads;
    for (int from_last = 0; from_last < m_blocks; ++from_last) {
      const int cost = tile_steps[m_blocks - 1 - from_last] + 1;
      for (int pair = 0; pair < pairs; ++pair) {
        work[cta] += cost;
        total += cost;
        if (++cta == slots) cta = 0;
      }
    }
  }
  int64_t busiest = 0;
  for (int64_t w : work) busiest = w > busiest ? w : busiest;
  return total > 0 ? static_cast<double>(busiest) * slots / static_cast<double>(total) : 1.0;
}

// The pairs a section holds, for tiles of tile_steps[m] key blocks walked by `ctas` CTAs, where
// one pair's K and V take kv_bytes_per_pair. Tiles of one length: a pair a section, i.e. a
// pair's query blocks on neighbouring SMs at once, reading its K/V from L2 together (the
// sections above had every pair's K/V read once per query block across a whole 32 MB
// section, more than L2 keeps: +2-8% without a mask on the H200). Tiles of unequal lengths (a
// mask): the static walk's balance depends on how the section's length meets the CTA count, so
// the section (a fraction of what fits in kWalkL2Bytes) is the one walk_imbalance rates best,
// the smaller on a tie (fewer K/V bytes in flight). Walks of more than kModelledTiles tiles
// (many rounds: balanced at any section) take the largest.
inline int walk_section_heads(const std::vector<int>& tile_steps, int heads_batches, int ctas,
                              int64_t kv_bytes_per_pair) {
  bool equal = true;
  for (int s : tile_steps) equal = equal && s == tile_steps.front();
  if (equal) return 1;
  const int64_t fit = kWalkL2Bytes / (kv_bytes_per_pair > 0 ? kv_bytes_per_pair : 1);
  const int largest = static_cast<int>(fit < 1 ? 1 : fit < heads_batches ? fit : heads_batches);
  constexpr int64_t kModelledTiles = 1 << 16;
  if (int64_t{heads_batches} * static_cast<int64_t>(tile_steps.size()) > kModelledTiles) return largest;
  int best = 0, last = 0;
  double best_imbalance = 0.0;
  // Fractions of the largest in 32nds, ascending: 1/32, 1/16, 1/8, 3/16, 1/4, 3/8, 1/2, 3/4, 1
  // (rounded, so neighbours may coincide: each count rated once).
  for (int n : {1, 2, 4, 6, 8, 12, 16, 24, 32}) {
    const int64_t scaled = (int64_t{largest} * n + 16) / 32;
    const int heads = static_cast<int>(scaled < 1 ? 1 : scaled);
    if (heads == last) continue;
    last = heads;
    const double imbalance = walk_imbalance(tile_steps, heads_batches, heads, ctas);
    if (best == 0 || imbalance < best_imbalance - 0.005) {
      best = heads;
      best_imbalance = imbalance;
    }
  }
  return best;
}

}  // namespace cuflash::sm90
