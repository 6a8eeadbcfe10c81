// The persistent TMA forward's tile walk (csrc/cuda/sm90/tile_walk.h), on the host: FastDivmod
// against integer division over divisors and dividends up to 2^31 - 1, TileWalk's decode
// against the order written out with plain divisions (L2 sections of (head, batch) pairs, the last
// one ragged; query blocks descending inside a section), every tile exactly once, and the choice
// of the section against a walk worked by hand.
#include <gtest/gtest.h>
#include <algorithm>
#include <climits>
#include <set>
#include <tuple>
#include <vector>
#include "../../csrc/cuda/sm90/tile_walk.h"

namespace {

using cuflash::sm90::FastDivmod;
using cuflash::sm90::make_tile_walk;
using cuflash::sm90::TileWalk;
using cuflash::sm90::walk_imbalance;
using cuflash::sm90::walk_section_heads;

std::vector<int> divisors() {
  std::vector<int> d;
  for (int i = 1; i <= 3000; ++i) d.push_back(i);
  for (int k = 12; k <= 30; ++k)
    for (int delta : {-1, 0, 1}) d.push_back((1 << k) + delta);
  d.push_back(INT_MAX);
  d.push_back(46341);  // about sqrt(2^31)
  return d;
}

TEST(FastDivmod, MatchesIntegerDivision) {
  for (int d : divisors()) {
    const FastDivmod fd(d);
    std::vector<int> dividends = {0, 1, 2, d - 1, d, d + 1, INT_MAX, INT_MAX - 1, INT_MAX - d + 1};
    for (int n = 0; n < 2000; ++n) dividends.push_back(n);
    // Near multiples of d across the range, the largest ones included.
    for (int64_t q : {int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{INT_MAX} / d - 1, int64_t{INT_MAX} / d})
      for (int64_t delta : {-1, 0, 1}) {
        const int64_t n = q * d + delta;
        if (n >= 0 && n <= INT_MAX) dividends.push_back(static_cast<int>(n));
      }
    for (int n : dividends) {
      if (n < 0) continue;
      ASSERT_EQ(fd.div(n), n / d) << n << " / " << d;
    }
  }
}

struct Shape {
  int m_blocks, heads_q, heads_kv, batch, section_heads;
};

// The order as the kernel wrote it before TileWalk, with plain divisions.
std::tuple<int, int, int> reference_tile(const Shape& s, int index) {
  const int heads_batches = s.heads_q * s.batch;
  const int section_heads = std::max(1, std::min(heads_batches, s.section_heads));
  const int section = index / (s.m_blocks * section_heads), local = index - section * s.m_blocks * section_heads;
  const int heads_here = std::min(section_heads, heads_batches - section * section_heads);
  const int m_block = s.m_blocks - 1 - local / heads_here;
  const int head_batch = section * section_heads + local % heads_here;
  return {m_block, head_batch % s.heads_q, head_batch / s.heads_q};
}

TEST(TileWalk, DecodesTheKernelsOrderOnceEach) {
  const std::vector<Shape> shapes = {
      {1, 1, 1, 1, 1},           // one tile
      {4, 32, 32, 32, 128},      // sections of 128 pairs: 1024 pairs in 8
      {3, 12, 3, 5, 7},          // 7 pairs a section: the last of 60 pairs ragged (4)
      {6, 16, 16, 8, 1},         // a pair a section (query blocks fastest)
      {17, 7, 1, 3, 1000},       // one section of all 21 pairs (the count clamped); GQA 7:1
      {2, 64, 8, 1, 10},         // 10 pairs a section, the last of 64 ragged (4)
      {1, 48, 48, 250, 12000},   // one query block, 12,000 pairs in one section
  };
  for (const Shape& s : shapes) {
    const TileWalk w = make_tile_walk(s.m_blocks, s.heads_q, s.heads_kv, s.batch, s.section_heads);
    ASSERT_EQ(w.num_tiles, s.m_blocks * s.heads_q * s.batch);
    std::set<std::tuple<int, int, int>> seen;
    for (int index = 0; index < w.num_tiles; ++index) {
      int m_block = -1, h = -1, b = -1;
      w.tile(index, &m_block, &h, &b);
      ASSERT_EQ(std::make_tuple(m_block, h, b), reference_tile(s, index))
          << "tile " << index << " of m_blocks " << s.m_blocks << ", heads " << s.heads_q << ", batch " << s.batch;
      ASSERT_TRUE(m_block >= 0 && m_block < s.m_blocks && h >= 0 && h < s.heads_q && b >= 0 && b < s.batch);
      seen.insert({m_block, h, b});
      ASSERT_EQ(w.kv_head(h), h / (s.heads_q / s.heads_kv));
    }
    EXPECT_EQ(static_cast<int>(seen.size()), w.num_tiles);  // each (query block, head, batch) once
  }
}

// Two query blocks of 1 and 2 key blocks (a tile costs them plus 1: 2 and 3), 4 pairs, 2 CTAs
// (CTA c takes tiles c, c + 2, ...). Sections of 4 pairs: 3 3 3 3 2 2 2 2, each CTA 10. Of 1 pair:
// 3 2 3 2 3 2 3 2, CTA 0 12 and CTA 1 8 (1.2 x the mean). Of 3: 3 3 3 2 2 2 | 3 2, 11 and 9.
// Of 2: 3 3 2 2 3 3 2 2, 10 and 10.
TEST(TileWalk, ImbalanceOfAWalkByHand) {
  const std::vector<int> steps = {1, 2};
  EXPECT_DOUBLE_EQ(walk_imbalance(steps, 4, 4, 2), 1.0);
  EXPECT_DOUBLE_EQ(walk_imbalance(steps, 4, 1, 2), 1.2);
  EXPECT_DOUBLE_EQ(walk_imbalance(steps, 4, 3, 2), 1.1);
  EXPECT_DOUBLE_EQ(walk_imbalance(steps, 4, 2, 2), 1.0);
  EXPECT_DOUBLE_EQ(walk_imbalance(steps, 4, 2, 100), 1.2);  // more CTAs than tiles: a tile each, 3 against 2.5
}

TEST(TileWalk, SectionChoice) {
  constexpr int64_t kMiB = int64_t{1} << 20;
  // Tiles of one length: a pair a section, whatever fits in L2.
  EXPECT_EQ(walk_section_heads({4, 4, 4, 4}, 512, 132, kMiB), 1);
  // The walk above with 8 MiB a pair (4 pairs fit in 32 MiB): candidates 1, 2, 3, 4 rated 1.2, 1.0,
  // 1.1, 1.0; the smaller of the two best.
  EXPECT_EQ(walk_section_heads({1, 2}, 4, 2, 8 * kMiB), 2);
  // Causal, 1024 keys at head dim 128 in 128 x 128 tiles, 16 x 16 pairs, 132 CTAs: the choice is
  // rated no worse than the largest section (64 pairs of 512 KiB) nor than a pair a section.
  std::vector<int> causal;
  for (int m = 1; m <= 8; ++m) causal.push_back(m);
  const int chosen = walk_section_heads(causal, 256, 132, 512 << 10);
  EXPECT_GE(chosen, 1);
  EXPECT_LE(chosen, 64);
  EXPECT_LE(walk_imbalance(causal, 256, chosen, 132), walk_imbalance(causal, 256, 64, 132));
  EXPECT_LE(walk_imbalance(causal, 256, chosen, 132), walk_imbalance(causal, 256, 1, 132));
  EXPECT_LT(walk_imbalance(causal, 256, chosen, 132), 1.05);
  // More tiles than the model walks: the largest section.
  EXPECT_EQ(walk_section_heads(causal, 100000, 132, 512 << 10), 64);
}

}  // namespace
