// The tensor-core kernels' masking shortcuts (csrc/cuda/mask.cuh) against the rule every kernel
// family follows (is_visible in attention_math.h), on the host:
//  - TileVisibility (a warp tile's per-row column bounds), element by element: every lane and
//    element of tiles that cross the diagonal, the window edges and the sequence ends, in both
//    tile orientations (rows are queries, or keys);
//  - key_blocks and query_blocks (the blocks a CTA visits): no visible element outside them, and
//    their first and last blocks hold one;
//  - tile_needs_mask (false: the element mask is skipped): only for tiles with every element
//    visible;
//  - TileDistance (ALiBi's distances of a warp tile, and their sign over it, which picks
//    ScoreMod::scores' one-sided pass) against alibi_bias's distance.
// Query rows also as packed grouped heads (MaskParams::rows_per_query: row r is query r / G; the
// forward only, so not for tiles whose rows are keys). And a paged cache's key addressing. And, on
// a GPU (skipped without one), dropout_factors (a warp tile's dropout keep factors, two lanes
// sharing each Philox call) against DropoutRng::keep element by element; the rule's Philox
// against Random123's known answers; ScoreMod::scores' attn_mask passes against the mask's
// elements. And the staged attn_mask tiles of the TMA forward and backward (sm90/staged_mask.h):
// each thread's addresses against where TMA's swizzle puts the elements.
#include <gtest/gtest.h>
#include <cuda_runtime.h>
#include <cmath>
#include <string>
#include <utility>
#include <vector>
#include "../../csrc/cuda/mask.cuh"
#include "../../csrc/cuda/sm90/staged_mask.h"

namespace {

using cuflash::MaskParams;
using cuflash::Sequence;

struct Case {
  int seqlen_q, seqlen_k;
  bool bottom_right;
  int window_left, window_right;  // -1: unbounded (causal is window_right = 0)
  int group = 1;                   // rows a query (seqlen_q counts rows)
};

MaskParams mask(const Case& c) {
  MaskParams m;
  m.bottom_right = c.bottom_right;
  m.window_left = c.window_left;
  m.window_right = c.window_right;
  m.rows_per_query = c.group;
  return m;
}
Sequence sequence(const Case& c) {  // as the kernels get it
  cuflash::AttentionParams p;
  p.shape.batch = 1;
  p.shape.seqlen_q = c.seqlen_q;
  p.shape.seqlen_k = c.seqlen_k;
  p.mask = mask(c);
  return cuflash::sequence_of(p, 0);
}
// The rule (is_visible) for one query a row: packed rows are checked against their query of the
// unpacked sequence, so that the row -> query mapping is tested too.
bool visible(const Case& c, int row, int key) {
  Case unpacked = c;
  unpacked.seqlen_q = c.seqlen_q / c.group;
  unpacked.group = 1;
  return cuflash::is_visible(mask(unpacked), sequence(unpacked), row / c.group, key);
}
std::string describe(const Case& c) {
  return "seqlen_q " + std::to_string(c.seqlen_q) + ", seqlen_k " + std::to_string(c.seqlen_k) +
         (c.bottom_right ? ", bottom-right" : ", top-left") + ", window (" + std::to_string(c.window_left) + ", " +
         std::to_string(c.window_right) + "), " + std::to_string(c.group) + " rows a query";
}

// Every element of every tile of kN columns (rows 16 at a time, as a warp holds them) over the
// sequence and one tile past it; returns the first mismatch, or "".
template <bool kTransposed, int kN>
std::string first_mismatch(const Case& c) {
  const MaskParams m = mask(c);
  const Sequence s = sequence(c);
  using Acc = cuflash::WarpAcc<kN>;
  const int rows = kTransposed ? c.seqlen_k : c.seqlen_q, cols = kTransposed ? c.seqlen_q : c.seqlen_k;
  for (int row0 = 0; row0 < rows + 16; row0 += 16)
    for (int col0 = 0; col0 < cols + kN; col0 += kN)
      for (int lane = 0; lane < 32; ++lane) {
        const cuflash::TileVisibility<kTransposed, kN> tile(m, s, row0, col0, lane);
        for (int j = 0; j < kN / 8; ++j)
          for (int e = 0; e < 4; ++e) {
            const int row = row0 + Acc::row_of(e, lane), col = col0 + Acc::col_of(j, e, lane);
            const int query = kTransposed ? col : row, key = kTransposed ? row : col;
            if (tile(j, e) != visible(c, query, key))
              return "query " + std::to_string(query) + ", key " + std::to_string(key) + " (tile at " +
                     std::to_string(row0) + ", " + std::to_string(col0) + ", lane " + std::to_string(lane) + ")";
          }
      }
  return "";
}

const int kWindows[][2] = {{-1, -1}, {-1, 0}, {0, 0}, {5, 0}, {17, 3}, {-1, 40}, {100, -1}, {3, -1}, {0, -1}};
std::vector<Case> cases() {
  std::vector<Case> all;
  const int lengths[][2] = {{1, 1}, {77, 200}, {200, 77}, {130, 130}, {1, 300}, {300, 1}, {0, 50}};
  for (const auto& n : lengths)
    for (bool bottom_right : {false, true})
      for (const auto& w : kWindows) all.push_back({n[0], n[1], bottom_right, w[0], w[1]});
  return all;
}
// Query rows of packed grouped heads: the cases above with 3 and 8 rows a query.
std::vector<Case> query_row_cases() {
  std::vector<Case> all = cases();
  const int lengths[][2] = {{3, 1}, {12, 77}, {231, 200}, {24, 5}, {40, 300}};
  for (int group : {3, 8})
    for (const auto& n : lengths)
      for (bool bottom_right : {false, true})
        for (const auto& w : kWindows)
          if (n[0] % group == 0) all.push_back({n[0], n[1], bottom_right, w[0], w[1], group});
  return all;
}

// The blocks (block rows of one side, blocks of block_cols of the other) that key_blocks or
// query_blocks (kByKeys: rows are keys) gives each block of rows: first mismatch, or "".
template <bool kByKeys>
std::string block_range_mismatch(const Case& c, int block_rows, int block_cols) {
  const MaskParams m = mask(c);
  const Sequence s = sequence(c);
  const int rows = kByKeys ? c.seqlen_k : c.seqlen_q, cols = kByKeys ? c.seqlen_q : c.seqlen_k;
  auto visible_at = [&](int row, int col) { return kByKeys ? visible(c, col, row) : visible(c, row, col); };
  for (int r0 = 0; r0 < rows; r0 += block_rows) {
    const int r1 = r0 + block_rows < rows ? r0 + block_rows : rows;
    const cuflash::Range blocks = kByKeys ? cuflash::query_blocks(m, s, r0, r1, block_cols)
                                          : cuflash::key_blocks(m, s, r0, r1, block_cols);
    const std::string where = "rows " + std::to_string(r0) + ".." + std::to_string(r1) + ", blocks " +
                              std::to_string(blocks.begin) + ".." + std::to_string(blocks.end);
    int first = -1, last = -1;  // the first and last blocks holding a visible element
    for (int row = r0; row < r1; ++row)
      for (int col = 0; col < cols; ++col)
        if (visible_at(row, col)) {
          const int block = col / block_cols;
          if (block < blocks.begin || block >= blocks.end)
            return where + ": visible (" + std::to_string(row) + ", " + std::to_string(col) + ") left out";
          first = first < 0 || block < first ? block : first;
          last = block > last ? block : last;
        }
    if (first < 0 ? blocks.end > blocks.begin : (first != blocks.begin || last != blocks.end - 1))
      return where + ": visits blocks without a visible element";
  }
  return "";
}

// tile_needs_mask false for a 16-row tile with an element hidden: first such tile, or "".
template <bool kTransposed, int kN>
std::string unmasked_tile_mismatch(const Case& c) {
  const MaskParams m = mask(c);
  const Sequence s = sequence(c);
  const int rows = kTransposed ? c.seqlen_k : c.seqlen_q, cols = kTransposed ? c.seqlen_q : c.seqlen_k;
  for (int row0 = 0; row0 < rows; row0 += 16)
    for (int col0 = 0; col0 < cols; col0 += kN) {
      if (cuflash::tile_needs_mask<kTransposed, kN>(m, s, row0, col0)) continue;
      for (int r = row0; r < row0 + 16; ++r)
        for (int col = col0; col < col0 + kN; ++col) {
          const int query = kTransposed ? col : r, key = kTransposed ? r : col;
          // Rows past the sequence are never stored; a key row past seqlen_k is hidden.
          if ((kTransposed ? r < c.seqlen_k : r < c.seqlen_q) && !visible(c, query, key))
            return "tile at " + std::to_string(row0) + ", " + std::to_string(col0) + " hides (query " +
                   std::to_string(query) + ", key " + std::to_string(key) + ")";
        }
    }
  return "";
}

template <bool kTransposed, int kN>
void check_all() {
  for (const Case& c : kTransposed ? cases() : query_row_cases()) {
    SCOPED_TRACE(describe(c));
    EXPECT_EQ((first_mismatch<kTransposed, kN>(c)), "");
  }
}

TEST(MaskTiles, QueryRowsMatchIsVisible) {  // the forward's scores, the dQ kernels' probabilities
  check_all<false, 16>();  // float32's key blocks (16 and 32)
  check_all<false, 32>();
  check_all<false, 64>();
  check_all<false, 80>();
  check_all<false, 128>();
}

TEST(MaskTiles, BlockRangesCoverEveryVisibleElement) {  // the CTAs' loops over key or query blocks
  for (const Case& c : query_row_cases())
    for (const auto& b : {std::pair{128, 64}, {128, 128}, {192, 128}, {128, 192}, {128, 80}, {64, 32}, {128, 176}, {64, 16}}) {
      SCOPED_TRACE(describe(c) + ", blocks " + std::to_string(b.first) + " x " + std::to_string(b.second));
      EXPECT_EQ(block_range_mismatch<false>(c, b.first, b.second), "");
      if (c.group == 1) EXPECT_EQ(block_range_mismatch<true>(c, b.first, b.second), "");
    }
}

TEST(MaskTiles, UnmaskedTilesHideNothing) {  // tile_needs_mask's shortcut
  for (const Case& c : query_row_cases()) {
    SCOPED_TRACE(describe(c));
    EXPECT_EQ((unmasked_tile_mismatch<false, 16>(c)), "");  // float32's key blocks
    EXPECT_EQ((unmasked_tile_mismatch<false, 32>(c)), "");
    EXPECT_EQ((unmasked_tile_mismatch<false, 64>(c)), "");
    EXPECT_EQ((unmasked_tile_mismatch<false, 128>(c)), "");
    if (c.group > 1) continue;  // rows are keys below
    EXPECT_EQ((unmasked_tile_mismatch<true, 16>(c)), "");  // float32's query steps
    EXPECT_EQ((unmasked_tile_mismatch<true, 32>(c)), "");
    EXPECT_EQ((unmasked_tile_mismatch<true, 64>(c)), "");
    EXPECT_EQ((unmasked_tile_mismatch<true, 128>(c)), "");
  }
}

TEST(MaskTiles, KeyRowsMatchIsVisible) {  // the dK/dV kernels' transposed tiles
  check_all<true, 16>();  // float32's query steps above head dim 64
  check_all<true, 32>();
  check_all<true, 64>();
  check_all<true, 128>();  // the head-dim-64 dK/dV kernel's 128-query steps
}

// TileDistance (ALiBi's distance i + diagonal - k of a warp tile's elements, and its sign over
// the tile): every element of every lane, both orientations, every diagonal offset a tile can
// meet; the sign is 0 only where the tile holds distances of both signs (else the one-sided pass
// would be skipped for nothing).
template <bool kTransposed, int kN>
std::string distance_mismatch(int diagonal) {
  Sequence s{};
  s.diagonal = diagonal;
  using Acc = cuflash::WarpAcc<kN>;
  for (int row0 = 0; row0 < 4 * kN; row0 += 16)
    for (int col0 = 0; col0 < 4 * kN; col0 += kN) {
      bool negative = false, positive = false;
      int sign = 2;
      const std::string where = " (diagonal " + std::to_string(diagonal) + ", tile at " + std::to_string(row0) +
                                ", " + std::to_string(col0) + ")";
      for (int lane = 0; lane < 32; ++lane) {
        const cuflash::TileDistance<kTransposed, kN> tile(s, row0, col0, lane);
        if (sign != 2 && tile.sign != sign) return "the sign differs between lanes" + where;
        sign = tile.sign;
        for (int j = 0; j < kN / 8; ++j)
          for (int e = 0; e < 4; ++e) {
            const int row = row0 + Acc::row_of(e, lane), col = col0 + Acc::col_of(j, e, lane);
            const int query = kTransposed ? col : row, key = kTransposed ? row : col;
            const int distance = query + diagonal - key;
            if (tile(j, e) != static_cast<float>(distance))
              return "query " + std::to_string(query) + ", key " + std::to_string(key) + ": distance " +
                     std::to_string(tile(j, e)) + ", not " + std::to_string(distance) + where;
            negative = negative || distance < 0;
            positive = positive || distance > 0;
          }
      }
      if ((sign > 0 && negative) || (sign < 0 && positive)) return "a distance against the sign" + where;
      if (sign == 0 && !(negative && positive)) return "sign 0 where the tile has one sign" + where;
    }
  return "";
}

TEST(MaskTiles, TileDistanceFollowsTheAlibiRule) {  // ScoreMod::scores' ALiBi passes
  for (int diagonal = -140; diagonal <= 140; ++diagonal) {
    EXPECT_EQ((distance_mismatch<false, 64>(diagonal)), "");
    EXPECT_EQ((distance_mismatch<false, 128>(diagonal)), "");
    EXPECT_EQ((distance_mismatch<true, 40>(diagonal)), "");  // an odd number of 8-column tiles
    EXPECT_EQ((distance_mismatch<true, 64>(diagonal)), "");
    EXPECT_EQ((distance_mismatch<true, 128>(diagonal)), "");
  }
}

// attention_math.h's key_at (the TMA forward's page and row of a key block) and key_offset (the
// cp.async kernels' element offset): key j of sequence b in a paged cache is row j % page_size of
// page block_table[b][j / page_size], ids clamped into the cache; without a table, row j of b.
TEST(PagedKeys, KeyAtAndKeyOffsetFollowTheTable) {
  const int page = 256, pages = 5, width = 3;
  const std::vector<int> table = {3, 0, -1,   // sequence 0; -1: clamped to page 0
                                  4, 9, 1};  // sequence 1; 9: clamped to page 4
  cuflash::AttentionParams p;
  cuflash::TensorStrides t;
  t.row = 7;
  t.batch = 7 * page * 2;  // pages of [2 heads][page rows][7]
  for (int b = 0; b < 2; ++b)
    for (int j = 0; j < width * page; j += 37) {
      EXPECT_EQ(cuflash::key_at(p.paged, b, j).row, j);  // no table
      EXPECT_EQ(cuflash::key_at(p.paged, b, j).batch, b);
      EXPECT_EQ(cuflash::key_offset(p, t, b, j), int64_t{j} * t.row);
    }
  p.paged.block_table = table.data();
  p.paged.table_stride = width;
  p.paged.page_size = page;
  p.paged.num_pages = pages;
  for (int b = 0; b < 2; ++b)
    for (int j = 0; j < width * page; j += 37) {
      SCOPED_TRACE("sequence " + std::to_string(b) + ", key " + std::to_string(j));
      const int id = table[b * width + j / page], want = id < 0 ? 0 : id >= pages ? pages - 1 : id;
      const cuflash::KeyAt at = cuflash::key_at(p.paged, b, j);
      EXPECT_EQ(at.batch, want);
      EXPECT_EQ(at.row, j % page);
      EXPECT_EQ(cuflash::key_offset(p, t, b, j), int64_t{want} * t.batch + int64_t{j % page} * t.row);
    }
}

// The first element of a warp tile at (row0, col0) (rows queries, or kTransposed keys) for which
// differs(at, i, k) returns a description (element `at` of the lanes' outputs, query i, key k),
// or "".
template <bool kTransposed, int kN, class Differs>
std::string first_tile_mismatch(int row0, int col0, Differs&& differs) {
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < kN / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const int row = row0 + cuflash::WarpAcc<kN>::row_of(e, lane);
        const int col = col0 + cuflash::WarpAcc<kN>::col_of(j, e, lane);
        const int i = kTransposed ? col : row, k = kTransposed ? row : col;
        const std::string what = differs((lane * (kN / 8) + j) * 4 + e, i, k);
        if (!what.empty())
          return "query " + std::to_string(i) + ", key " + std::to_string(k) + " (lane " + std::to_string(lane) +
                 ", tile " + std::to_string(j) + ", element " + std::to_string(e) + ")" + what;
      }
  return "";
}

template <bool kTransposed, int kN>
__global__ void dropout_factors_kernel(cuflash::DropoutRng rng, int b, int h, int heads, int row0, int col0,
                                       float* out) {
  float z[kN / 8][4];
  cuflash::dropout_factors<kTransposed, kN>(z, rng.keep_scale, rng, b, h, heads, row0, col0, threadIdx.x);
  for (int j = 0; j < kN / 8; ++j)
    for (int e = 0; e < 4; ++e) out[(threadIdx.x * (kN / 8) + j) * 4 + e] = z[j][e];
}

// One warp's factors for the tile at (row0, col0), rows queries or (kTransposed) keys; returns the
// first element that differs from the rule, or "".
template <bool kTransposed, int kN>
std::string dropout_mismatch(const cuflash::DropoutRng& rng, int row0, int col0) {
  const int b = 1, h = 2, heads = 3, count = 32 * (kN / 8) * 4;
  std::vector<float> out(count);
  float* device_out = nullptr;
  if (cudaMalloc(&device_out, count * sizeof(float)) != cudaSuccess) return "cudaMalloc failed";
  dropout_factors_kernel<kTransposed, kN><<<1, 32>>>(rng, b, h, heads, row0, col0, device_out);
  const cudaError_t err = cudaMemcpy(out.data(), device_out, count * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(device_out);
  if (err != cudaSuccess) return std::string("kernel: ") + cudaGetErrorString(err);
  return first_tile_mismatch<kTransposed, kN>(row0, col0, [&](int at, int i, int k) {
    const float want = rng.keep(b, h, heads, i, k) ? rng.keep_scale : 0.f;
    return out[at] == want ? std::string() : ": " + std::to_string(out[at]) + ", want " + std::to_string(want);
  });
}

// Tiles of an even number of 8-column tiles (lanes share each call) and of 40 columns (head dim
// 256's fused backward: the last tile drawn unshared), both orientations, rows and columns not at
// 0: the queries' offset a multiple of 16 (whole quads, as every kernel's), the keys' only even.
TEST(Dropout, TileFactorsMatchTheRule) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t rng_state[2] = {0x09abcdef12345678, 7};  // [seed, offset], read on the host here
  const cuflash::DropoutRng rng = cuflash::make_dropout_rng(cuflash::DropoutParams{0.3, rng_state});
  for (const auto& [query0, key0] : {std::pair{0, 0}, std::pair{32, 80}, std::pair{144, 42}}) {
    SCOPED_TRACE("query0 " + std::to_string(query0) + ", key0 " + std::to_string(key0));
    EXPECT_EQ((dropout_mismatch<false, 16>(rng, query0, key0)), "");
    EXPECT_EQ((dropout_mismatch<false, 40>(rng, query0, key0)), "");
    EXPECT_EQ((dropout_mismatch<false, 64>(rng, query0, key0)), "");
    EXPECT_EQ((dropout_mismatch<true, 16>(rng, key0, query0)), "");
    EXPECT_EQ((dropout_mismatch<true, 64>(rng, key0, query0)), "");
    EXPECT_EQ((dropout_mismatch<true, 128>(rng, key0, query0)), "");
  }
}

// The threshold is round(p 2^16), at most 2^16 - 1, and the factor the keep rate's inverse, so
// that a kept probability's expectation is the probability.
TEST(Dropout, ThresholdAndScaleKeepTheExpectation) {
  EXPECT_EQ(cuflash::dropout_threshold(0.0), 0u);
  EXPECT_EQ(cuflash::dropout_threshold(0.1), 6554u);  // 6553.6
  EXPECT_EQ(cuflash::dropout_threshold(0.5), 32768u);
  EXPECT_EQ(cuflash::dropout_threshold(std::nextafter(1.0, 0.0)), 65535u);
  for (const double p : {0.0, 0.1, 0.3, 0.5, 0.9, 0.99999})
    EXPECT_DOUBLE_EQ(cuflash::dropout_keep_scale(p) * (65536.0 - cuflash::dropout_threshold(p)), 65536.0) << p;
}

// The rule's generator is Philox4x32 with 7 rounds: Random123's known-answer vectors (its
// kat_vectors file, philox4x32 7: counter, key, output).
TEST(Dropout, PhiloxMatchesRandom123KnownAnswers) {
  struct Known {
    uint32_t counter[4], key[2], out[4];
  };
  const Known known[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x5f6fb709, 0x0d893f64, 0x4f121f81, 0x4f730a48}},
      {{~0u, ~0u, ~0u, ~0u}, {~0u, ~0u}, {0x5207ddc2, 0x45165e59, 0x4d8ee751, 0x8c52f662}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0x4dfccaba, 0x190a87f0, 0xc47362ba, 0xb6b5242a}}};
  for (const Known& k : known) {
    const cuflash::Philox4 r =
        cuflash::philox4x32_7(k.counter[0], k.counter[1], k.counter[2], k.counter[3], k.key[0], k.key[1]);
    for (int w = 0; w < 4; ++w) EXPECT_EQ(r.x[w], k.out[w]) << "counter " << k.counter[0] << ", word " << w;
  }
}

// ScoreMod::scores with an attn_mask over one warp tile (query-major, or kTransposed: rows keys):
// raw q.k in, scores out.
template <bool kTransposed, int kN, typename T>
__global__ void mask_scores_kernel(cuflash::AttentionParams p, Sequence s, int b, int h, int row0, int col0,
                                   const float* raw, float* out) {
  cuflash::WarpAcc<kN> t;
  const int lane = threadIdx.x;
  for (int j = 0; j < kN / 8; ++j)
    for (int e = 0; e < 4; ++e) t.v[j][e] = raw[(lane * (kN / 8) + j) * 4 + e];
  const cuflash::ScoreMod<T> mod(p, b, h);
  mod.template scores<kTransposed>(t, s, row0, col0, lane);
  for (int j = 0; j < kN / 8; ++j)
    for (int e = 0; e < 4; ++e) out[(lane * (kN / 8) + j) * 4 + e] = t.v[j][e];
}

// A mask of [2, 3, 100, 200] (queries, keys) elements through `strides` (batch, head, row,
// column; in elements), bool or bfloat16, and one warp tile's scores against the rule:
// fma(mask element, log2 e, q.k * scale log2 e) inside the sequence (the bool's element 0 or
// -inf), q.k * scale log2 e past it. Returns the first element that differs, or "".
template <bool kTransposed, int kN>
std::string mask_mismatch(bool is_bool, const int64_t (&strides)[4], int row0, int col0) {
  using T = __nv_bfloat16;
  const int batch = 2, heads = 3, b = 1, h = 2, count = 32 * (kN / 8) * 4;
  Sequence s{};
  s.seqlen_q = 100, s.seqlen_k = 200;
  int64_t span = 1;  // elements the strides reach
  const int sizes[4] = {batch, heads, s.seqlen_q, s.seqlen_k};
  for (int d = 0; d < 4; ++d) span += (sizes[d] - 1) * strides[d];
  const size_t bytes = static_cast<size_t>(span) * (is_bool ? sizeof(bool) : sizeof(T));
  std::vector<unsigned char> mask(bytes);
  uint32_t state = 12345;
  auto next = [&] { return state = state * 1664525u + 1013904223u; };
  for (int64_t e = 0; e < span; ++e) {
    if (is_bool) {
      mask[e] = (next() >> 8) % 10 < 7;  // about 70% kept
    } else {
      const float value = static_cast<float>(static_cast<int>(next() >> 20) - 2048) / 512.f;  // -4 .. 4
      reinterpret_cast<T*>(mask.data())[e] = __float2bfloat16(value);
    }
  }
  std::vector<float> raw(count), out(count);
  for (float& x : raw) x = static_cast<float>(static_cast<int>(next() >> 16) - 32768) / 4096.f;
  void *device_mask = nullptr, *device_io = nullptr;
  if (cudaMalloc(&device_mask, bytes) != cudaSuccess ||
      cudaMalloc(&device_io, 2 * count * sizeof(float)) != cudaSuccess) {
    cudaFree(device_mask);
    return "cudaMalloc failed";
  }
  float* device_raw = static_cast<float*>(device_io);
  cudaMemcpy(device_mask, mask.data(), bytes, cudaMemcpyHostToDevice);
  cudaMemcpy(device_raw, raw.data(), count * sizeof(float), cudaMemcpyHostToDevice);
  cuflash::AttentionParams p;
  p.scale = 0.125;
  p.score.attn_mask = {device_mask, is_bool, strides[0], strides[1], strides[2], strides[3]};
  mask_scores_kernel<kTransposed, kN, T><<<1, 32>>>(p, s, b, h, row0, col0, device_raw, device_raw + count);
  cudaError_t err = cudaGetLastError();  // a launch error, not a value mismatch
  if (err == cudaSuccess)
    err = cudaMemcpy(out.data(), device_raw + count, count * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(device_mask);
  cudaFree(device_io);
  if (err != cudaSuccess) return std::string("kernel: ") + cudaGetErrorString(err);
  const float scale_log2 = static_cast<float>(p.scale) * cuflash::kLog2e;
  return first_tile_mismatch<kTransposed, kN>(row0, col0, [&](int at, int i, int k) {
    float want = raw[at] * scale_log2;
    if (i < s.seqlen_q && k < s.seqlen_k) {
      const int64_t el = b * strides[0] + h * strides[1] + i * strides[2] + k * strides[3];
      const float bias =
          is_bool ? (mask[el] ? 0.f : -INFINITY) : __bfloat162float(reinterpret_cast<const T*>(mask.data())[el]);
      want = std::fma(bias, cuflash::kLog2e, want);
    }
    const bool same = out[at] == want || (std::isnan(out[at]) && std::isnan(want));
    return same ? std::string() : ": " + std::to_string(out[at]) + ", want " + std::to_string(want);
  });
}

// Tiles inside the sequence (ScoreMod::with_mask_inside: keys contiguous) and across its ends
// (the element pass), both orientations, bool and bfloat16 masks: dense, rows padded past the
// keys, rows or heads broadcast (stride 0), and transposed (keys not contiguous: the element pass
// everywhere).
TEST(MaskTiles, AttnMaskScoresFollowTheMask) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t layouts[][4] = {{3 * 100 * 200, 100 * 200, 200, 1},  // dense
                                {3 * 100 * 224, 100 * 224, 224, 1},  // rows padded to 224
                                {200, 0, 0, 1},                      // [batch, 1, 1, keys]: rows broadcast
                                {100 * 200, 0, 200, 1},              // [batch, 1, queries, keys]
                                {3 * 100 * 200, 100 * 200, 1, 100}};  // transposed
  for (const auto& strides : layouts)
    for (const bool is_bool : {false, true}) {
      SCOPED_TRACE("row stride " + std::to_string(strides[2]) + ", column stride " + std::to_string(strides[3]) +
                   (is_bool ? ", bool" : ", bfloat16"));
      // Query-major tiles of 16 queries: inside; past the queries; past the keys.
      EXPECT_EQ((mask_mismatch<false, 64>(is_bool, strides, 16, 64)), "");
      EXPECT_EQ((mask_mismatch<false, 64>(is_bool, strides, 96, 64)), "");
      EXPECT_EQ((mask_mismatch<false, 128>(is_bool, strides, 16, 0)), "");
      EXPECT_EQ((mask_mismatch<false, 128>(is_bool, strides, 32, 128)), "");
      // Key-major tiles of 16 keys (the dK/dV kernels'): inside; past the queries; past the keys.
      EXPECT_EQ((mask_mismatch<true, 64>(is_bool, strides, 48, 32)), "");
      EXPECT_EQ((mask_mismatch<true, 64>(is_bool, strides, 48, 64)), "");
      EXPECT_EQ((mask_mismatch<true, 64>(is_bool, strides, 192, 0)), "");
    }
}

// A staging of boxes of box_rows rows (one for a one-row mask), as encode_mask_map sets it up.
cuflash::sm90::MaskStaging staging(bool is_bool, bool one_row, int box_rows) {
  cuflash::sm90::MaskStaging m;
  m.is_bool = is_bool;
  m.one_row = one_row;
  m.box_slot_bytes = ((one_row ? 1 : box_rows) * 64 * (is_bool ? 1 : 2) + 1023) / 1024 * 1024;
  return m;
}
// TMA's layout of the boxes: element (row, key) of box key / 64 at byte o = row * 64 elem_bytes +
// (key % 64) * elem_bytes of the box, o's 16-byte chunk XORed with o's bits 7-9 (128-byte swizzle)
// or 7-8 (64-byte), a one-row box unswizzled.
uint32_t tma_offset(const cuflash::sm90::MaskStaging& m, int row, int key) {
  const int elem = m.is_bool ? 1 : 2;
  const uint32_t o = row * 64 * elem + (key % 64) * elem;
  const uint32_t bits = m.one_row ? 0 : m.is_bool ? (o >> 7) & 3 : (o >> 7) & 7;
  return (key / 64) * m.box_slot_bytes + (o ^ (bits << 4));
}

// The staged mask tile's addresses (MaskStaging's thread_offset, chunk_xor, tile_offset and
// next_rows, as add_staged_mask sums them) against TMA's layout (tma_offset). Every lane, warp
// tile, 8-key tile, half and element of 128- and 192-row tiles over 128 keys.
TEST(StagedMask, ThreadAddressesFollowTheSwizzle) {
  for (const bool is_bool : {false, true})
    for (const bool one_row : {false, true})
      for (const int rows : {128, 192}) {
        const cuflash::sm90::MaskStaging m = staging(is_bool, one_row, rows);
        const int elem = is_bool ? 1 : 2;
        for (int warp_row = 0; warp_row < rows; warp_row += 16)
          for (int lane = 0; lane < 32; ++lane)
            for (int j = 0; j < 16; ++j)
              for (int half = 0; half < 2; ++half)
                for (int e = 0; e < 2; ++e) {
                  const int row = one_row ? 0 : warp_row + (lane >> 2) + 8 * half;
                  const int key = 8 * j + 2 * (lane & 3) + e;
                  const uint32_t got = m.thread_offset(warp_row, lane) + m.tile_offset(j, m.chunk_xor(lane)) +
                                       half * m.next_rows() + e * elem;
                  ASSERT_EQ(got, tma_offset(m, row, key))
                      << "bool " << is_bool << ", one row " << one_row << ", rows " << rows << ": warp row "
                      << warp_row << ", lane " << lane << ", tile " << j << ", half " << half << ", element " << e;
                }
      }
}

// The backward's transposed reads (keys the warp tile's rows): each lane's element (query
// 8j + 2 (lane % 4) + e, key warp_key + lane / 4 + 8 half) where TMA put it, for the one-row and
// bool byte reads directly, for 16-bit through ldmatrix.x4.trans (the rows' addresses the lanes
// give, then the element of a row that .trans hands each lane: row 2 (lane % 4) + e, column
// lane / 4 of matrix 2 (j % 2) + half).
TEST(StagedMask, TransposedAddressesFollowTheSwizzle) {
  constexpr int kQueries = 64, kKeys = 128;  // the fused backward's step: 64 queries x 128 keys
  for (const bool is_bool : {false, true})
    for (const bool one_row : {false, true}) {
      const cuflash::sm90::MaskStaging m = staging(is_bool, one_row, kQueries);
      const int elem = is_bool ? 1 : 2;
      for (int warp_key = 0; warp_key < kKeys; warp_key += 16)
        for (int lane = 0; lane < 32; ++lane)
          for (int j = 0; j < kQueries / 8; ++j)
            for (int half = 0; half < 2; ++half)
              for (int e = 0; e < 2; ++e) {
                const int query = 8 * j + 2 * (lane & 3) + e, key = warp_key + (lane >> 2) + 8 * half;
                uint32_t got;
                if (one_row) {
                  got = m.one_row_offset(warp_key, lane) + half * 8 * elem;
                } else if (is_bool) {
                  got = m.bool_offset(warp_key, lane) + (8 * j + e) * 64 + 8 * half;
                } else {
                  const int matrix = 2 * (j % 2) + half, row = 2 * (lane & 3) + e;
                  const int giver = 8 * matrix + row;  // the lane that gives that row's address
                  got = m.transposed_ldsm_offset(warp_key, giver) + (j / 2) * 2048 + 2 * (lane >> 2);
                }
                ASSERT_EQ(got, tma_offset(m, one_row ? 0 : query, key))
                    << "bool " << is_bool << ", one row " << one_row << ": warp key " << warp_key << ", lane "
                    << lane << ", tile " << j << ", half " << half << ", element " << e;
              }
    }
}

}  // namespace
