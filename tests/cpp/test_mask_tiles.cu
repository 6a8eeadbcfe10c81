// The tensor-core kernels' mask of a warp tile (TileVisibility in csrc/cuda/mask.cuh: per-row
// column bounds) against the rule every kernel family follows (is_visible in attention_math.h),
// element by element, on the host: every lane and element of tiles that cross the diagonal, the
// window edges and the sequence ends, in both tile orientations (rows are queries, or keys).
#include <gtest/gtest.h>
#include <string>
#include <vector>
#include "../../csrc/cuda/mask.cuh"

namespace {

using cuflash::MaskParams;
using cuflash::Sequence;

struct Case {
  int seqlen_q, seqlen_k;
  bool bottom_right;
  int window_left, window_right;  // -1: unbounded (causal is window_right = 0)
};

// Every element of every tile of kN columns (rows 16 at a time, as a warp holds them) over the
// sequence and one tile past it; returns the first mismatch, or "".
template <bool kTransposed, int kN>
std::string first_mismatch(const Case& c) {
  MaskParams m;
  m.bottom_right = c.bottom_right;
  m.window_left = c.window_left;
  m.window_right = c.window_right;
  Sequence s{};
  s.seqlen_q = c.seqlen_q;
  s.seqlen_k = c.seqlen_k;
  s.diagonal = c.bottom_right ? c.seqlen_k - c.seqlen_q : 0;
  using Acc = cuflash::WarpAcc<kN>;
  const int rows = kTransposed ? c.seqlen_k : c.seqlen_q, cols = kTransposed ? c.seqlen_q : c.seqlen_k;
  for (int row0 = 0; row0 < rows + 16; row0 += 16)
    for (int col0 = 0; col0 < cols + kN; col0 += kN)
      for (int lane = 0; lane < 32; ++lane) {
        const cuflash::TileVisibility<kTransposed, kN> visible(m, s, row0, col0, lane);
        for (int j = 0; j < kN / 8; ++j)
          for (int e = 0; e < 4; ++e) {
            const int row = row0 + Acc::row_of(e, lane), col = col0 + Acc::col_of(j, e, lane);
            const int query = kTransposed ? col : row, key = kTransposed ? row : col;
            if (visible(j, e) != cuflash::is_visible(m, s, query, key))
              return "query " + std::to_string(query) + ", key " + std::to_string(key) + " (tile at " +
                     std::to_string(row0) + ", " + std::to_string(col0) + ", lane " + std::to_string(lane) + ")";
          }
      }
  return "";
}

std::vector<Case> cases() {
  std::vector<Case> all;
  const int lengths[][2] = {{1, 1}, {77, 200}, {200, 77}, {130, 130}, {1, 300}, {300, 1}, {0, 50}};
  const int windows[][2] = {{-1, -1}, {-1, 0}, {0, 0}, {5, 0}, {17, 3}, {-1, 40}, {100, -1}, {3, -1}, {0, -1}};
  for (const auto& n : lengths)
    for (bool bottom_right : {false, true})
      for (const auto& w : windows) all.push_back({n[0], n[1], bottom_right, w[0], w[1]});
  return all;
}

template <bool kTransposed, int kN>
void check_all() {
  for (const Case& c : cases()) {
    SCOPED_TRACE("seqlen_q " + std::to_string(c.seqlen_q) + ", seqlen_k " + std::to_string(c.seqlen_k) +
                 (c.bottom_right ? ", bottom-right" : ", top-left") + ", window (" + std::to_string(c.window_left) +
                 ", " + std::to_string(c.window_right) + ")");
    EXPECT_EQ((first_mismatch<kTransposed, kN>(c)), "");
  }
}

TEST(MaskTiles, QueryRowsMatchIsVisible) {  // the forward's scores, the dQ kernels' probabilities
  check_all<false, 64>();
  check_all<false, 80>();
  check_all<false, 128>();
}

TEST(MaskTiles, KeyRowsMatchIsVisible) {  // the dK/dV kernels' transposed tiles
  check_all<true, 32>();
  check_all<true, 64>();
  check_all<true, 128>();  // CUFLASH_BWD_TILE=wide's 128-query steps
}

}  // namespace
