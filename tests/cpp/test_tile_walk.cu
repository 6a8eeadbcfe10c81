// The persistent TMA forward's tile walk (csrc/cuda/sm90/tile_walk.h), on the host: FastDivmod
// against integer division over divisors and dividends up to 2^31 - 1, and TileWalk's decode
// against the order written out with plain divisions (L2 sections of (head, batch) pairs, the last
// one ragged; query blocks descending inside a section), every tile exactly once.
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
  int m_blocks, heads_q, heads_kv, batch;
  int64_t kv_bytes, l2_bytes;
};

// The order as the kernel wrote it before TileWalk, with plain divisions.
std::tuple<int, int, int> reference_tile(const Shape& s, int index) {
  const int heads_batches = s.heads_q * s.batch;
  int64_t fit = s.l2_bytes / std::max<int64_t>(1, s.kv_bytes);
  const int section_heads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(heads_batches, fit)));
  const int section = index / (s.m_blocks * section_heads), local = index - section * s.m_blocks * section_heads;
  const int heads_here = std::min(section_heads, heads_batches - section * section_heads);
  const int m_block = s.m_blocks - 1 - local / heads_here;
  const int head_batch = section * section_heads + local % heads_here;
  return {m_block, head_batch % s.heads_q, head_batch / s.heads_q};
}

TEST(TileWalk, DecodesTheKernelsOrderOnceEach) {
  const std::vector<Shape> shapes = {
      {1, 1, 1, 1, 1 << 10, 32 << 20},      // one tile
      {4, 32, 32, 32, 256 << 10, 32 << 20},  // sections of 128 pairs: 1024 pairs in 8
      {3, 12, 3, 5, 1 << 20, 7 << 20},       // 7 pairs a section: the last of 60 pairs ragged (4)
      {6, 16, 16, 8, 40 << 20, 32 << 20},    // K/V past L2: a pair a section
      {17, 7, 1, 3, 100, 1 << 30},           // one section of all 21 pairs; GQA 7:1
      {2, 64, 8, 1, 3 << 20, 32 << 20},      // 10 pairs a section, the last of 64 ragged (4)
      {1, 48, 48, 250, 4096, 32 << 20},      // one query block, 12,000 pairs in one section
  };
  for (const Shape& s : shapes) {
    const TileWalk w = make_tile_walk(s.m_blocks, s.heads_q, s.heads_kv, s.batch, s.kv_bytes, s.l2_bytes);
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

}  // namespace
