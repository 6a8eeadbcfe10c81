// Scores, masks and dropout on a warp's accumulator tile, following attention_math.h's rules.
// A tile is 16 rows x kN columns of WarpAcc; in the forward and dQ kernels rows are queries and
// columns keys, in the dK/dV kernel (kTransposed) rows are keys and columns queries. Only tiles
// that cross a mask edge pay for the mask; tiles wholly outside it are never visited.
#pragma once
#include <math.h>
#include "../attention_math.h"
#include "mma_sm80.cuh"

namespace cuflash {

constexpr float kLog2e = 1.4426950408889634f;
// Whether x can be a factor folded into the exponent's argument (the plain TMA forward's scale,
// the features backward's cap_out): a positive normal float (no flush to zero can make it 0; NaN
// is not).
__host__ __device__ constexpr bool positive_normal(float x) { return x >= 0x1p-126f; }

// ScoreMod::scores' one-sided ALiBi pass (0: every ALiBi tile takes the general pass; for
// scripts/gpu_ab_define.sh's measurement).
#ifndef CUFLASH_ALIBI_ONE_SIDED
#define CUFLASH_ALIBI_ONE_SIDED 1
#endif
// ScoreMod::scores' pass over attn_mask tiles inside the sequence (0: every tile takes the
// general pass; for scripts/gpu_ab_define.sh's measurement).
#ifndef CUFLASH_MASK_INSIDE
#define CUFLASH_MASK_INSIDE 1
#endif

// Block indices [begin, end) of the key blocks (block_n keys each) that queries
// [row_begin, row_end) see. (Host too, as tile_needs_mask: tests/cpp/test_mask_tiles.cu.)
CUFLASH_HD Range key_blocks(const MaskParams& m, const Sequence& s, int row_begin, int row_end, int block_n) {
  const Range keys = visible_keys(m, s, row_begin, row_end);
  if (keys.end <= keys.begin) return {0, 0};
  return {keys.begin / block_n, (keys.end + block_n - 1) / block_n};
}
// Block indices of the query blocks that keys [key_begin, key_end) are visible to.
CUFLASH_HD Range query_blocks(const MaskParams& m, const Sequence& s, int key_begin, int key_end, int block_m) {
  const Range rows = visible_queries(m, s, key_begin, key_end);
  if (rows.end <= rows.begin) return {0, 0};
  return {rows.begin / block_m, (rows.end + block_m - 1) / block_m};
}

// The query block of this CTA (grid x): the last block first. Under a causal mask later query
// blocks see more keys, and CTAs start in blockIdx order, so the longest ones start first and the
// short ones fill the tail; without a mask every block is equal and the order does not matter.
__device__ __forceinline__ int query_block_longest_first() { return gridDim.x - 1 - blockIdx.x; }

// fwd_tile_counts (debug): a forward CTA adds its visited and skipped key blocks, and the tile
// shape, to counters[0..3].
__device__ __forceinline__ void count_tiles(unsigned long long* counters, const Sequence& s, const Range& n_blocks,
                                            int block_m, int block_n) {
  const int all = (s.seqlen_k + block_n - 1) / block_n, done = n_blocks.end - n_blocks.begin;
  atomicAdd(counters, static_cast<unsigned long long>(done));
  atomicAdd(counters + 1, static_cast<unsigned long long>(all - done));
  atomicMax(counters + 2, static_cast<unsigned long long>(block_m));
  atomicMax(counters + 3, static_cast<unsigned long long>(block_n));
}

// i + diagonal - k, ALiBi's distance, of the elements (j, e) of a warp tile, in float: the
// fragment layout puts element (j, e) at a lane-independent offset from element (0, 0), so one
// conversion per tile and a constant per element (exact below 2^24). Host too:
// tests/cpp/test_mask_tiles.cu checks it against alibi_bias's distance.
template <bool kTransposed, int kN>
struct TileDistance {
  float base;  // element (0, 0)'s
  int sign;    // +1: no element of the warp's tile (all 32 lanes) has a negative distance, -1: none a
               // positive one, 0: both signs (the tile crosses the diagonal)
  CUFLASH_HD TileDistance(const Sequence& s, int row0, int col0, int lane) {
    const int row = row0 + WarpAcc<kN>::row_of(0, lane), col = col0 + WarpAcc<kN>::col_of(0, 0, lane);
    base = static_cast<float>(kTransposed ? col + s.diagonal - row : row + s.diagonal - col);
    // Rows row0 .. row0 + 15, columns col0 .. col0 + kN - 1: warp-uniform.
    const int lowest = (kTransposed ? col0 - (row0 + 15) : row0 - (col0 + kN - 1)) + s.diagonal;
    const int highest = (kTransposed ? col0 + kN - 1 - row0 : row0 + 15 - col0) + s.diagonal;
    sign = lowest >= 0 ? 1 : highest <= 0 ? -1 : 0;
  }
  // Element (j, e)'s distance from element (0, 0)'s: a compile-time constant once unrolled.
  CUFLASH_HD static float offset(int j, int e) {
    const int dr = WarpAcc<kN>::row_of(e, 0), dc = WarpAcc<kN>::col_of(j, e, 0);
    return static_cast<float>(kTransposed ? dc - dr : dr - dc);
  }
  CUFLASH_HD float operator()(int j, int e) const { return base + offset(j, e); }
};

// is_visible for the elements (j, e) of a warp tile whose mask is not trivial (tile_needs_mask):
// each of the lane's two rows gets its visible columns once, as bounds relative to the lane's
// element (0, 0), so that an element's test is two comparisons against a compile-time column
// offset instead of is_visible's subtraction and four comparisons (the diagonal tiles of short
// causal rows were ALU-bound on it: benchmarks/NOTES.md, 2026-12-01). Rows are queries (the keys
// they see, visible_keys) or, kTransposed, keys (the queries that see them: is_visible's bounds
// without a seqlen_q limit, columns past the tile counting as past any window). Host too:
// tests/cpp/test_mask_tiles.cu checks it against is_visible element by element.
template <bool kTransposed, int kN>
struct TileVisibility {
  int lo[2], hi[2];  // row half e / 2: offsets c = col - (this lane's column of (0, 0)) in [lo, hi)
  CUFLASH_HD TileVisibility(const MaskParams& m, const Sequence& s, int row0, int col0, int lane) {
    const int base = col0 + WarpAcc<kN>::col_of(0, 0, lane);
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + WarpAcc<kN>::row_of(2 * half, lane);
      Range cols;
      if (kTransposed) {  // row = key k: queries i with k - i - diagonal in [-window_left, window_right]
        cols.begin = m.window_right >= 0 ? row - s.diagonal - m.window_right : 0;
        cols.end = m.window_left >= 0 ? row - s.diagonal + m.window_left + 1 : col0 + kN;
        if (row >= s.seqlen_k || cols.end < cols.begin) cols.end = cols.begin;
      } else {
        cols = visible_keys(m, s, row, row + 1);
      }
      lo[half] = cols.begin - base;
      hi[half] = cols.end - base;
    }
  }
  CUFLASH_HD bool operator()(int j, int e) const {
    const int c = WarpAcc<kN>::col_of(j, e, 0);
    return c >= lo[e >> 1] && c < hi[e >> 1];
  }
};

// Visits every element of a warp tile with its (query, key) indices.
template <bool kTransposed, int kN, class F>
__device__ __forceinline__ void for_each_element(WarpAcc<kN>& t, int row0, int col0, int lane, F&& f) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = row0 + WarpAcc<kN>::row_of(e, lane), col = col0 + WarpAcc<kN>::col_of(j, e, lane);
      f(t.v[j][e], kTransposed ? col : row, kTransposed ? row : col, j, e);
    }
}
template <int kN, class F>
__device__ __forceinline__ void for_each_value(WarpAcc<kN>& t, F&& f) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) f(t.v[j][e], j, e);
}

// The add_bias of ScoreMod::scores and its callers that adds nothing: where the TMA kernels stage
// an attn_mask's tiles in shared memory, their pass over them takes its place (and the ScoreMod
// then has no mask of its own).
struct NoBias {
  template <class Tile>
  __device__ __forceinline__ void operator()(Tile&) const {}
};
template <class AddBias>
constexpr bool kAddsBias = !std::is_same_v<std::decay_t<AddBias>, NoBias>;
// Element i (0: the low half) of a pair of 16-bit T (a staged mask's elements, loaded in pairs), as
// a float.
template <typename T>
__device__ __forceinline__ float pair_element(const uint32_t& pair, int i) {
  static_assert(sizeof(T) == 2, "a 16-bit mask element");
  return to_acc<float>(reinterpret_cast<const T*>(&pair)[i]);
}

// What turns q.k into the scaled-log2 score of one (sequence, head): scale, softcap, ALiBi,
// attn_mask (whose float elements have type T, the kernel's). Both directions apply it a tile
// at a time (scores), through element steps rounded explicitly, so that the backward recomputes
// the forward's scores from the same q.k bit for bit; but for ALiBi, whose one-sided pass rounds
// the bias three times (each of order 2^-24 |bias|) from a tile's own base, and the forward's
// and the backward's tiles differ in base and in which ones cross the diagonal.
template <typename T>
struct ScoreMod {
  float scale_log2;  // scale * log2(e): the whole job without softcap, ALiBi and attn_mask
  float cap_in;      // softcap: t = tanh(q.k * cap_in), score = cap_out * t
  float cap_out;
  float alibi_log2;  // slope * log2(e)
  bool softcap, alibi;
  AttnMaskSlice mask;

  __device__ __forceinline__ ScoreMod(const AttentionParams& p, int b, int h) : mask(p.score.attn_mask, b, h) {
    scale_log2 = static_cast<float>(p.scale) * kLog2e;
    softcap = p.score.softcap > 0.0;
    cap_in = softcap ? static_cast<float>(p.scale / p.score.softcap) : 0.f;
    cap_out = static_cast<float>(p.score.softcap) * kLog2e;
    alibi = p.score.alibi_slopes != nullptr;
    alibi_log2 = alibi ? alibi_slope(p.score, b, h) * kLog2e : 0.f;
  }
  __device__ __forceinline__ bool plain() const { return !softcap && !alibi && !mask.data; }

  // The element steps. t: tanh(q.k * cap_in) with softcap (float inputs: tanhf, fast_tanh's
  // 2^-11 being the 16-bit operands' rounding, not fp32's).
  __device__ __forceinline__ float tanh_of(float raw) const {
    if constexpr (std::is_same_v<T, float>) return tanhf(__fmul_rn(raw, cap_in));
    else return fast_tanh(__fmul_rn(raw, cap_in));
  }
  __device__ __forceinline__ float capped(float raw, float* t) const {
    *t = tanh_of(raw);
    return __fmul_rn(cap_out, *t);
  }
  __device__ __forceinline__ float scaled(float raw) const {
    return __fmul_rn(raw, scale_log2);  // rounded as in the forward (see probs_from_qk)
  }
  __device__ __forceinline__ float with_alibi(float x, float distance) const {
    return __fmaf_rn(-alibi_log2, fabsf(distance), x);
  }
  // A score with an attn_mask element's bias (AttnMaskSlice::bias): one rounding, the same in
  // every route that reads the mask (element by element, a tile's pass, the TMA forward's staged
  // tiles), so that their scores agree bit for bit.
  __device__ __forceinline__ static float plus_bias(float x, float bias) { return __fmaf_rn(bias, kLog2e, x); }
  // Elements past the sequence (tile padding) are masked by is_visible or never stored.
  __device__ __forceinline__ float with_mask(float x, const Sequence& s, int i, int j) const {
    return i < s.seqlen_q && j < s.seqlen_k ? plus_bias(x, mask.bias<float, T>(i, j)) : x;
  }

  // The raw q.k of a warp tile become its scores, a pass over the tile per feature (a branch per
  // tile, not per element: tested per element, they cost the head-dim-64 fused Hopper backward
  // half its speed; benchmarks/NOTES.md). With softcap, capped_at(j, e, t) receives element
  // (j, e)'s tanh (the backward's chain rule; the forward passes none). add_bias(t) adds, last,
  // what the ScoreMod does not (a staged attn_mask's tiles).
  template <bool kTransposed, int kN, class CappedAt = void (*)(int, int, float), class AddBias = NoBias>
  __device__ __forceinline__ void scores(WarpAcc<kN>& t, const Sequence& s, int row0, int col0, int lane,
                                         CappedAt&& capped_at = [](int, int, float) {},
                                         AddBias&& add_bias = NoBias{}) const {
    const TileDistance<kTransposed, kN> distance(s, row0, col0, lane);  // the ALiBi passes'
    if (CUFLASH_ALIBI_ONE_SIDED && alibi && !softcap && distance.sign != 0) {
      // Off the diagonal the distance has one sign over the tile, so the bias is linear in the
      // element's constant offset: one FFMA a score (q.k * scale_log2 + bias) and one per distinct
      // offset (shared by the tile's elements that have it), where the general pass below takes a
      // multiply, the distance's addition and an FFMA per score.
      const float slope = distance.sign > 0 ? -alibi_log2 : alibi_log2;  // bias = slope * distance
      const float at_base = slope * distance.base;
      for_each_value(t, [&](float& x, int j, int e) {
        x = __fmaf_rn(x, scale_log2, __fmaf_rn(slope, TileDistance<kTransposed, kN>::offset(j, e), at_base));
      });
    } else {
      if (softcap) {
        for_each_value(t, [&](float& x, int j, int e) {
          float tanh_of;
          x = capped(x, &tanh_of);
          capped_at(j, e, tanh_of);
        });
      } else {
        for_each_value(t, [&](float& x, int, int) { x = scaled(x); });
      }
      if (alibi) for_each_value(t, [&](float& x, int j, int e) { x = with_alibi(x, distance(j, e)); });
    }
    if (mask.data) {
      const int queries0 = kTransposed ? col0 : row0, keys0 = kTransposed ? row0 : col0;
      const int queries = kTransposed ? kN : 16, keys = kTransposed ? 16 : kN;
      const bool inside = queries0 + queries <= s.seqlen_q && keys0 + keys <= s.seqlen_k;
      if (CUFLASH_MASK_INSIDE && mask.col_stride == 1 && inside) {
        with_mask_inside<kTransposed>(t, row0, col0, lane);
      } else {
        for_each_element<kTransposed>(t, row0, col0, lane,
                                      [&](float& x, int i, int k, int, int) { x = with_mask(x, s, i, k); });
      }
    }
    add_bias(t);
  }

  // with_mask over a tile inside the sequence (no bounds to test) of a mask whose keys are
  // contiguous: a thread's elements of a tile row lie at multiples of one stride from one address,
  // 1 (query-major tiles: loads at immediate offsets) or the mask's row stride (kTransposed: a
  // pointer stepped 8 columns at a time), where with_mask computes each element's 64-bit index
  // from both strides and tests its bounds (about 30 instructions an element in the D=64 TMA
  // features forward's SASS; here 3, about 6 in transposed tiles). The same arithmetic as
  // with_mask, so that every kernel's scores agree bit for bit.
  template <bool kTransposed, int kN>
  __device__ __forceinline__ void with_mask_inside(WarpAcc<kN>& t, int row0, int col0, int lane) const {
    const int64_t step = kTransposed ? mask.row_stride : 1;  // between the tile's columns
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + WarpAcc<kN>::row_of(2 * half, lane), col = col0 + WarpAcc<kN>::col_of(0, 0, lane);
      const int64_t first = mask.base + (kTransposed ? int64_t{col} * mask.row_stride + row
                                                     : int64_t{row} * mask.row_stride + col);
      auto each = [&](auto* m, auto&& bias) {
#pragma unroll
        for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e)
            t.v[j][e] = plus_bias(t.v[j][e], bias(m[(e & 1) * step]));
          if (j + 1 < kN / 8) m += 8 * step;  // not past the tile's last column
        }
      };
      if (mask.is_bool) {
        each(static_cast<const bool*>(mask.data) + first,
             [](bool keep) { return AttnMaskSlice::bool_bias<float>(keep); });
      } else {
        each(static_cast<const T*>(mask.data) + first, [](T x) { return to_acc<float>(x); });
      }
    }
  }

  // The backward's scores up to a positive factor, returned, which P's exponent takes (one FFMA a
  // score for a multiply and a subtraction): with softcap alone (no ALiBi, no attn_mask)
  // t = tanh(q.k cap_in), the factor cap_out; otherwise t = the scores, the factor 1 (the FFMA
  // then exact). Only for 16-bit inputs, and cap_out only below 2^8: the exact product and the
  // forward's rounded one differ by at most 2^-17 in the exponent there, far below a 16-bit P's
  // rounding (float32's would not be, to its own accuracy). The forward does not fold it: its
  // run-time factor made the forward slower (H100, benchmarks/NOTES.md). capped_at and add_bias
  // as in scores.
  template <bool kTransposed, int kN, class CappedAt = void (*)(int, int, float), class AddBias = NoBias>
  __device__ __forceinline__ float scores_up_to_factor(WarpAcc<kN>& t, const Sequence& s, int row0, int col0,
                                                       int lane, CappedAt&& capped_at = [](int, int, float) {},
                                                       AddBias&& add_bias = NoBias{}) const {
    constexpr bool k16Bit = !std::is_same_v<T, float>;
    if (k16Bit && !kAddsBias<AddBias> && !alibi && !mask.data) {
      if (softcap && positive_normal(cap_out) && cap_out < 0x1p8f) {
        for_each_value(t, [&](float& x, int j, int e) {
          x = tanh_of(x);
          capped_at(j, e, x);
        });
        return cap_out;
      }
    }
    scores<kTransposed>(t, s, row0, col0, lane, capped_at, add_bias);
    return 1.f;
  }
};

// A kernel's ScoreMod for (b, h) where it has the features (kFeatures), else nothing to make.
template <bool kFeatures, typename T>
__device__ __forceinline__ auto score_mod_if(const AttentionParams& p, int b, int h) {
  if constexpr (kFeatures) return ScoreMod<T>(p, b, h);
  else return 0;
}

// Whether a 16-row warp tile (rows row0.., columns col0..col0 + kN) needs the element mask.
template <bool kTransposed, int kN>
CUFLASH_HD bool tile_needs_mask(const MaskParams& m, const Sequence& s, int row0, int col0) {
  if (kTransposed) return !block_fully_visible(m, s, col0, col0 + kN, row0, row0 + 16);
  return !block_fully_visible(m, s, row0, row0 + 16, col0, col0 + kN);
}

// -inf in `t` where the mask hides the score (forward), on the tiles that need the element mask.
template <int kN>
__device__ __forceinline__ void mask_scores(WarpAcc<kN>& t, const MaskParams& m, const Sequence& s, int row0, int col0,
                                            int lane) {
  if (tile_needs_mask<false, kN>(m, s, row0, col0)) {
    const TileVisibility<false, kN> visible(m, s, row0, col0, lane);
    for_each_value(t, [&](float& x, int j, int e) {
      if (!visible(j, e)) x = -INFINITY;
    });
  }
}

// Raw q.k in `t` becomes the scaled-log2 score, -inf where masked (forward). Without kFeatures
// (no softcap or ALiBi) the score is q.k * scale_log2. add_bias(t), where given, adds what mod
// does not (the TMA forward's staged attn_mask) before the mask's -inf.
template <bool kFeatures, int kN, typename T, class AddBias = NoBias>
__device__ __forceinline__ void scores_from_qk(WarpAcc<kN>& t, const ScoreMod<T>& mod, const MaskParams& m,
                                               const Sequence& s, int row0, int col0, int lane,
                                               AddBias&& add_bias = NoBias{}) {
  if (kFeatures && !mod.plain()) {
    mod.template scores<false>(t, s, row0, col0, lane);
  } else {
    for_each_value(t, [&](float& x, int, int) { x *= mod.scale_log2; });
  }
  add_bias(t);
  mask_scores(t, m, s, row0, col0, lane);
}

// Dropout's draws for a warp tile, by DropoutRng's rule (a Philox call draws 4 queries x 2 keys).
// Lanes lane and lane ^ 4 (rows r and r ^ 1) hold between them the 16 elements of two blocks in
// each pair of 8-column tiles (j, j + 1):
//   forward (queries the rows): block t the key pair of tile j + t, rows r, r ^ 1, r + 8, r ^ 1 + 8;
//   transposed (keys the rows): block t the key pair of rows r + 8t, r ^ 1 + 8t, columns 2c, 2c + 1
//   of both tiles.
// Each lane draws block `odd` and hands the other lane, by two shuffles, the two words of it that
// lane needs: one call per 8 of a lane's elements. The query quads must be whole: row0 (forward)
// or col0 (transposed) a multiple of 16, the other even. An odd number of tiles (the head-dim-256
// fused backward's 40 keys a consumer, forward only) leaves the last one unpaired: both lanes draw
// its block.
// Lanes lane and lane ^ 4 swap the words each drew for the other (sent): words[t] the block of
// the lane with odd == t, from this lane's own (mine) or the other's.
__device__ __forceinline__ void exchange_dropout_words(const uint32_t (&mine)[2], const uint32_t (&sent)[2], int odd,
                                                       uint32_t (&words)[2][2]) {
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const uint32_t got = __shfl_xor_sync(0xffffffffu, sent[q], 4);
    words[0][q] = odd ? got : mine[q];
    words[1][q] = odd ? mine[q] : got;
  }
}
// Forward: visit(j, rh, word) for each word of tile j, row r + 8 rh: the draws of keys 2c and
// 2c + 1 in the low and high halves, the layout of a packed 16-bit pair of P.
template <int kN, class Visit>
__device__ __forceinline__ void forward_dropout_words(const DropoutRng& rng, int b, int h, int heads, int row0,
                                                      int col0, int lane, Visit&& visit) {
  static_assert(kN % 8 == 0, "8-column tiles");
  constexpr int kPaired = kN / 16 * 2;  // tiles drawn in pairs
  const int odd = (lane >> 2) & 1;      // this lane's rows are odd
  auto block_of_tile = [&](int j) {     // the block of tile j's key pair and this lane's query quad
    const int row = row0 + WarpAcc<kN>::row_of(0, lane), col = col0 + WarpAcc<kN>::col_of(j, 0, lane);
    return rng.block(b, h, heads, row, col);
  };
  if constexpr (kPaired < kN / 8) {  // both lanes draw the last tile's block
    const Philox4 block = block_of_tile(kPaired);
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) visit(kPaired, rh, DropoutRng::word_at(block, odd, rh));
  }
#pragma unroll
  for (int j = 0; j < kPaired; j += 2) {
    // Whole words of block j + odd: this lane's rows' (query parity odd, bit 3 rh) and the other's.
    const Philox4 block = block_of_tile(j + odd);
    uint32_t mine[2], sent[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      mine[rh] = DropoutRng::word_at(block, odd, rh);
      sent[rh] = DropoutRng::word_at(block, odd ^ 1, rh);
    }
    uint32_t words[2][2];  // [tile j + t][rh]
    exchange_dropout_words(mine, sent, odd, words);
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) visit(j + t, rh, words[t][rh]);
  }
}

// Dropout keep factors (0 or `kept`) of a warp tile: z[j][e] for element (j, e) (the draws above).
template <bool kTransposed, int kN>
__device__ __forceinline__ void dropout_factors(float (&z)[kN / 8][4], float kept, const DropoutRng& rng, int b,
                                                int h, int heads, int row0, int col0, int lane) {
  static_assert(kN % 8 == 0 && (!kTransposed || kN % 16 == 0), "8-column tiles; transposed, whole query quads");
  // The factor of a 16-bit draw, half 1 the word's high bits: compared as the high half, against
  // threshold << 16, so that the low bits play no part.
  const uint32_t threshold_hi = rng.threshold << 16;
  auto factor = [&](uint32_t word, int half) {
    return (half ? word : word << 16) >= threshold_hi ? kept : 0.f;
  };
  if constexpr (!kTransposed) {
    forward_dropout_words<kN>(rng, b, h, heads, row0, col0, lane, [&](int j, int rh, uint32_t word) {
#pragma unroll
      for (int c = 0; c < 2; ++c) z[j][2 * rh + c] = factor(word, c);
    });
  } else {
    const int odd = (lane >> 2) & 1;  // this lane's rows are odd
#pragma unroll
    for (int j = 0; j < kN / 8; j += 2) {
      // mine[q], sent[q]: for query parity q (= c), the halves of the key's parity of the words of
      // tile j (bit 3 clear) and j + 1, packed low and high: this lane's and the other's.
      const int row = row0 + WarpAcc<kN>::row_of(2 * odd, lane), col = col0 + WarpAcc<kN>::col_of(j, 0, lane);
      const Philox4 block = rng.block(b, h, heads, col, row);
      const uint32_t low_halves = 0x5410u, high_halves = 0x7632u;  // __byte_perm selectors
      uint32_t mine[2], sent[2];
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const uint32_t tile_j = DropoutRng::word_at(block, q, 0), tile_j1 = DropoutRng::word_at(block, q, 1);
        mine[q] = __byte_perm(tile_j, tile_j1, odd ? high_halves : low_halves);
        sent[q] = __byte_perm(tile_j, tile_j1, odd ? low_halves : high_halves);
      }
      uint32_t words[2][2];  // [block][q]
      exchange_dropout_words(mine, sent, odd, words);
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) z[j + t][e] = factor(words[e >> 1][e & 1], t);
    }
  }
}

// Forward: P (rows queries, columns keys) with its dropped elements zeroed. The softmax has summed
// every probability; only the kept ones reach P V, unscaled: the keep scale multiplies O in the
// epilogue (OnlineSoftmax::finalize's out_factor), so that fp16 P stays within range at any p.
template <int kN>
__device__ __forceinline__ void apply_dropout(WarpAcc<kN>& p, const DropoutRng& rng, int b, int h, int heads, int row0,
                                              int col0, int lane) {
  float z[kN / 8][4];
  dropout_factors<false, kN>(z, 1.f, rng, b, h, heads, row0, col0, lane);
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) p.v[j][e] *= z[j][e];
}

// The backward's elementwise steps. lse2 and delta are indexed by the tile element (j, e)
// through accessors (the two tile orientations store them differently).
//
// Plain (no softcap, ALiBi or dropout): s holds raw q.k and becomes P = exp2(score - lse2).
// The score is rounded exactly as the forward rounded it (no fused multiply-add): for huge
// scores a differently rounded one can exceed lse by more than an exponent's range.
template <bool kTransposed, int kN, class Lse2>
__device__ __forceinline__ void probs_from_qk(WarpAcc<kN>& s, float scale_log2, const MaskParams& m,
                                              const Sequence& seq, int row0, int col0, int lane, Lse2&& lse2) {
  if (tile_needs_mask<kTransposed, kN>(m, seq, row0, col0)) {
    const TileVisibility<kTransposed, kN> visible(m, seq, row0, col0, lane);
    for_each_value(s, [&](float& x, int j, int e) {
      x = visible(j, e) ? fast_exp2(__fmul_rn(x, scale_log2) - lse2(j, e)) : 0.f;
    });
  } else {
#pragma unroll
    for (int j = 0; j < kN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s.v[j][e] = fast_exp2(__fmul_rn(s.v[j][e], scale_log2) - lse2(j, e));
  }
}
// dp holds dP = dO.v and becomes dS = P * (dP - delta) (the scale is applied later).
template <int kN, class Delta>
__device__ __forceinline__ void ds_from_dp(WarpAcc<kN>& dp, const WarpAcc<kN>& probs, Delta&& delta) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dp.v[j][e] = probs.v[j][e] * (dp.v[j][e] - delta(j, e));
}

// probs_from_qk's values in another order: every element first, then the mask zeroes the hidden
// ones. Branch-free over s, which lets ptxas keep wgmma accumulators where the wgmma wrote them
// (the two-branch form makes it serialize the Hopper kernels' wgmmas, C7511).
template <bool kTransposed, int kN, class Lse2>
__device__ __forceinline__ void probs_then_mask(WarpAcc<kN>& s, float scale_log2, const MaskParams& m,
                                                const Sequence& seq, int row0, int col0, int lane, Lse2&& lse2) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s.v[j][e] = fast_exp2(__fmul_rn(s.v[j][e], scale_log2) - lse2(j, e));
  if (tile_needs_mask<kTransposed, kN>(m, seq, row0, col0)) {
    const TileVisibility<kTransposed, kN> visible(m, seq, row0, col0, lane);
    for_each_value(s, [&](float& x, int j, int e) {
      if (!visible(j, e)) x = 0.f;
    });
  }
}

// With softcap, ALiBi, attn_mask or dropout, from raw q.k (s) and dP (dp), a pass over the tile
// per step (each feature's branch taken once a tile, as in ScoreMod::scores):
//   s  <- P * [z != 0]                   (the operand of dV, whose epilogue multiplies by keep_scale)
//   dp <- P * ((dP * z - delta) * dcap)  (dS, the operand of dQ and dK)
// z is the dropout factor, 0 or keep_scale (1 without dropout): kept P enters dV's 16-bit GEMM
// unscaled, as in the forward, so that fp16 holds it at any p. dcap is the softcap's chain-rule
// factor, folded into dp as soon as the softcap pass has it (no tile of factors kept: the
// head-dim-64 fused Hopper backward spilled 80-116 bytes with one). dscores, if not null,
// receives the score gradients P * (dP * z - delta) of the elements inside the sequence (dcap
// applied after them): the (b, h) slice of FlashBwdParams::dscores, rows dscores_stride apart.
// add_bias as in ScoreMod::scores.
template <bool kTransposed, bool kWithDs, int kN, typename T, class Lse2, class Delta, class AddBias = NoBias>
__device__ __forceinline__ void probs_and_ds_with_features(WarpAcc<kN>& s, WarpAcc<kN>& dp, const ScoreMod<T>& mod,
                                                           const MaskParams& m, const Sequence& seq, bool dropout,
                                                           const DropoutRng& rng, int b, int h, int heads, int row0,
                                                           int col0, int lane, Lse2&& lse2, Delta&& delta,
                                                           float* dscores = nullptr, int64_t dscores_stride = 0,
                                                           AddBias&& add_bias = NoBias{}) {
  float z[kN / 8][4];  // with dropout
  if (dropout) dropout_factors<kTransposed, kN>(z, rng.keep_scale, rng, b, h, heads, row0, col0, lane);
  if (kWithDs) {
    if (dropout) {
      for_each_value(dp, [&](float& d, int j, int e) { d = d * z[j][e] - delta(j, e); });
    } else {
      for_each_value(dp, [&](float& d, int j, int e) { d -= delta(j, e); });
    }
  }
  // The scores up to a factor, as the forward makes them (ScoreMod::scores_up_to_factor).
  float dcap[kN / 8][4];  // with softcap and dscores: 1 - t^2, applied once dscores is stored
  auto scores_then = [&](auto&& capped_at) {
    return mod.template scores_up_to_factor<kTransposed>(s, seq, row0, col0, lane, capped_at, add_bias);
  };
  float factor;
  if (!kWithDs) {
    factor = scores_then([](int, int, float) {});
  } else if (dscores) {
    factor = scores_then([&](int j, int e, float t) { dcap[j][e] = 1.f - t * t; });
  } else {
    factor = scores_then([&](int j, int e, float t) { dp.v[j][e] *= 1.f - t * t; });
  }
  // P, zero where the mask hides the score (a select over every element's exponential, as
  // probs_then_mask's).
  for_each_value(s, [&](float& x, int j, int e) { x = fast_exp2(__fmaf_rn(x, factor, -lse2(j, e))); });
  if (tile_needs_mask<kTransposed, kN>(m, seq, row0, col0)) {
    const TileVisibility<kTransposed, kN> visible(m, seq, row0, col0, lane);
    for_each_value(s, [&](float& x, int j, int e) {
      if (!visible(j, e)) x = 0.f;
    });
  }
  if (kWithDs) {
    for_each_value(dp, [&](float& d, int j, int e) { d *= s.v[j][e]; });
    if (dscores) {
      for_each_element<kTransposed>(dp, row0, col0, lane, [&](float& d, int i, int k, int, int) {
        if (i < seq.seqlen_q && k < seq.seqlen_k) dscores[i * dscores_stride + k] = d;
      });
      if (mod.softcap) for_each_value(dp, [&](float& d, int j, int e) { d *= dcap[j][e]; });
    }
  }
  if (dropout) for_each_value(s, [&](float& x, int j, int e) { x = z[j][e] != 0.f ? x : 0.f; });
}

// Whether a launch needs the kernels' feature path (kFeatures): anything that changes the
// scores or the probabilities element by element. Causal and window masks, GQA and packed
// batches do not.
inline bool needs_feature_path(const AttentionParams& p) {
  return p.score.softcap > 0.0 || p.score.alibi_slopes != nullptr || p.score.attn_mask.data != nullptr ||
         p.dropout.p > 0.0;
}

}  // namespace cuflash
