// The per-element rules every kernel family (tensor-core, exact CUDA-core, CPU) follows, in
// one place: where a sequence lives, which keys a query sees, how scores are changed, and which
// probabilities dropout keeps. Host and device code.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>
#include "flash_params.h"
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__)
#define CUFLASH_HD __host__ __device__ __forceinline__
#else
#define CUFLASH_HD inline
#endif

namespace cuflash {

CUFLASH_HD int min_int(int a, int b) { return a < b ? a : b; }
CUFLASH_HD int max_int(int a, int b) { return a > b ? a : b; }

// The query of row `row` (MaskParams::rows_per_query).
CUFLASH_HD int query_of_row(const MaskParams& m, int row) {
  return m.rows_per_query == 1 ? row : row / m.rows_per_query;
}

// Sequence b of a batch: its lengths, where its rows start in the packed tensors (0 for padded
// batches) and its diagonal.
struct Sequence {
  int seqlen_q, seqlen_k;
  int64_t q_row0, k_row0;  // first row in q (and out, lse) and in k (and v)
  int diagonal;            // query i faces key i + diagonal
};

// Sequence b's rows of a packed tensor of `total` rows, clamped to it and to the grid's `rows`
// (the kernels write no others: the glue fills the rest, flash_launch.h's fill_packed_gaps on
// CUDA); a padded one's (no cu_seqlens) are the grid's.
CUFLASH_HD void packed_rows_of(const int* cu_seqlens, int b, int total, int rows, int64_t& row0, int& count) {
  const int first = cu_seqlens ? min_int(max_int(cu_seqlens[b], 0), total) : 0;
  row0 = first;
  count = cu_seqlens ? min_int(min_int(max_int(cu_seqlens[b + 1], first), total) - first, rows) : rows;
}

CUFLASH_HD Sequence sequence_of(const AttentionParams& p, int b) {
  Sequence s;
  const VarlenParams& v = p.varlen;
  packed_rows_of(v.cu_seqlens_q, b, v.total_q, p.shape.seqlen_q, s.q_row0, s.seqlen_q);
  // Packed queries come with packed keys, or with a paged cache (each sequence's keys from 0).
  packed_rows_of(v.cu_seqlens_k, b, v.total_k, p.shape.seqlen_k, s.k_row0, s.seqlen_k);
  if (v.seqused_k) s.seqlen_k = min_int(max_int(p.varlen.seqused_k[b], 0), s.seqlen_k);
  s.diagonal = p.mask.bottom_right ? s.seqlen_k - query_of_row(p.mask, s.seqlen_q) : 0;
  return s;
}

// FlashBwdParams::dq_semaphores: the counter of (batch b, query head h, query block `block`; a
// kernel's blocks are 64 rows or more, so there is one for each), and how many there are with
// dkdv_tile_counter (the last).
CUFLASH_HD int64_t dq_semaphore_index(const AttentionShape& sh, int b, int h, int block) {
  return (int64_t{b} * sh.heads_q + h) * ((sh.seqlen_q + 63) / 64) + block;
}
CUFLASH_HD int64_t dq_semaphore_count(const AttentionShape& sh) { return dq_semaphore_index(sh, sh.batch, 0, 0) + 1; }
// The fused backward's scratch, one block of 4-byte elements: dq_accum (accum_elems floats), then
// its int32 counters: with ordered adds dq_semaphores (dkdv_tile_counter their last), else dkdv_tile_counter.
inline int64_t fused_dq_scratch_elems(const AttentionShape& sh, int64_t accum_elems, bool ordered) {
  return accum_elems + (ordered ? dq_semaphore_count(sh) : 1);
}
// p's dq_accum (strides left to the caller; zeroed by flash_bwd_delta_kernel), dq_semaphores and
// dkdv_tile_counter (zeroed by the caller) in that block.
inline void set_fused_dq_scratch(FlashBwdParams& p, void* scratch, int64_t accum_elems, bool ordered) {
  int* counters = reinterpret_cast<int*>(static_cast<float*>(scratch) + accum_elems);
  p.dq_accum = scratch;
  p.dq_semaphores = ordered ? counters : nullptr;
  p.dkdv_tile_counter = counters + (ordered ? dq_semaphore_count(p.shape) - 1 : 0);
}

// Offset of row `row` of (sequence b, head h) in a tensor with strides t.
CUFLASH_HD int64_t row_offset(const TensorStrides& t, const Sequence& s, bool is_q, int b, int h, int row) {
  return b * t.batch + h * t.head + ((is_q ? s.q_row0 : s.k_row0) + row) * t.row;
}
// Row `row` of (sequence b, head h) of a tensor of T at `base` (const or not).
template <typename T, typename Base>
CUFLASH_HD T* row_at(Base* base, const TensorStrides& t, const Sequence& s, bool is_q, int b, int h, int row) {
  return static_cast<T*>(base) + row_offset(t, s, is_q, b, h, row);
}
// The forward's key reads, paged or not: key j of (sequence b, head h) in k or v (strides t) is
// at key_rows(...) + key_offset(..., j) (the rows after it, to the end of its page, are the next
// keys). The kernels that load a block of keys at a time keep key_rows and add key_offset.
template <typename T, typename Base>
CUFLASH_HD T* key_rows(const AttentionParams& p, Base* base, const TensorStrides& t, const Sequence& s, int b,
                       int h) {
  if (p.paged.block_table == nullptr) return row_at<T>(base, t, s, false, b, h, 0);
  return static_cast<T*>(base) + h * t.head;
}
// Key j of sequence b as (row, batch) of k or v: row j of batch b, or in a paged cache row
// j % page_size of page block_table[b][j / page_size], the page id clamped into the cache (the TMA
// forward addresses its boxes by it).
struct KeyAt {
  int row, batch;
};
CUFLASH_HD KeyAt key_at(const PagedKvParams& pg, int b, int j) {
  if (pg.block_table == nullptr) return {j, b};
  const int page = min_int(max_int(pg.block_table[b * pg.table_stride + j / pg.page_size], 0), pg.num_pages - 1);
  return {j % pg.page_size, page};
}
CUFLASH_HD int64_t key_offset(const AttentionParams& p, const TensorStrides& t, int b, int j) {
  if (p.paged.block_table == nullptr) return j * t.row;
  const KeyAt at = key_at(p.paged, b, j);
  return at.batch * t.batch + int64_t{at.row} * t.row;
}
template <typename T, typename Base>
CUFLASH_HD T* key_row_at(const AttentionParams& p, Base* base, const TensorStrides& t, const Sequence& s, int b,
                         int h, int j) {
  return key_rows<T>(p, base, t, s, b, h) + key_offset(p, t, b, j);
}
CUFLASH_HD int64_t stats_offset(const StatsStrides& t, const Sequence& s, int b, int h) {
  return b * t.batch + h * t.head + s.q_row0;
}

// The backward's mask: never packed, and rows_per_query a compile-time 1 in its kernels, so that
// query_of_row's test folds away there.
CUFLASH_HD MaskParams unpacked_mask(MaskParams m) {
  m.rows_per_query = 1;
  return m;
}

// Keys [first, end) that rows [row_begin, row_end) can see, for row_begin < row_end.
struct Range {
  int begin, end;
};
CUFLASH_HD Range visible_keys(const MaskParams& m, const Sequence& s, int row_begin, int row_end) {
  const int first = query_of_row(m, row_begin), last = query_of_row(m, row_end - 1);
  Range r{0, s.seqlen_k};
  if (m.window_left >= 0) r.begin = max_int(0, first + s.diagonal - m.window_left);
  if (m.window_right >= 0) r.end = min_int(s.seqlen_k, last + s.diagonal + m.window_right + 1);
  if (r.end < r.begin) r.end = r.begin;
  return r;
}
// Queries [first, end) that keys [key_begin, key_end) are visible to (the backward's key-side
// tiles, as mask.cuh's transposed TileVisibility: rows_per_query 1, never packed).
CUFLASH_HD Range visible_queries(const MaskParams& m, const Sequence& s, int key_begin, int key_end) {
  Range r{0, s.seqlen_q};
  if (m.window_right >= 0) r.begin = max_int(0, key_begin - s.diagonal - m.window_right);
  if (m.window_left >= 0) r.end = min_int(s.seqlen_q, key_end - 1 - s.diagonal + m.window_left + 1);
  if (r.end < r.begin) r.end = r.begin;
  return r;
}
CUFLASH_HD bool is_visible(const MaskParams& m, const Sequence& s, int row, int j) {
  const int rel = j - query_of_row(m, row) - s.diagonal;
  return j < s.seqlen_k && (m.window_right < 0 || rel <= m.window_right) &&
         (m.window_left < 0 || -rel <= m.window_left);
}
// Whether every key in [key_begin, key_end) is visible to every row in [row_begin, row_end).
CUFLASH_HD bool block_fully_visible(const MaskParams& m, const Sequence& s, int row_begin, int row_end,
                                    int key_begin, int key_end) {
  const int first = query_of_row(m, row_begin), last = query_of_row(m, row_end - 1);
  return key_end <= s.seqlen_k &&
         (m.window_right < 0 || key_end - 1 - (first + s.diagonal) <= m.window_right) &&
         (m.window_left < 0 || (last + s.diagonal) - key_begin <= m.window_left);
}

CUFLASH_HD float alibi_slope(const ScoreParams& sp, int b, int h) {
  return sp.alibi_slopes ? sp.alibi_slopes[b * sp.alibi_batch_stride + h] : 0.f;
}
// The ALiBi bias of (i, j): -slope * |i + diagonal - j|.
template <typename T>
CUFLASH_HD T alibi_bias(T slope, const Sequence& s, int i, int j) {
  const int d = i + s.diagonal - j;
  return -slope * static_cast<T>(d < 0 ? -d : d);
}

// Element conversion to the accumulator type. Torch builds with __CUDA_NO_HALF_CONVERSIONS__,
// so 16-bit values are converted explicitly.
template <typename Acc, typename T>
CUFLASH_HD Acc to_acc(T x) {
#if defined(__CUDACC__)
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else
#endif
    return static_cast<Acc>(x);
}

// attn_mask's (batch, head) slice.
struct AttnMaskSlice {
  const void* data;  // null: no mask
  int64_t base, row_stride, col_stride;  // in elements
  bool is_bool;
  CUFLASH_HD AttnMaskSlice(const AttnMaskParams& m, int b, int h)
      : data(m.data), base(b * m.batch_stride + h * m.head_stride), row_stride(m.row_stride),
        col_stride(m.col_stride), is_bool(m.is_bool) {}
  // What the mask adds to score (i, j), in Acc: a float mask's element (of type T), or a boolean
  // one's bool_bias.
  template <typename Acc, typename T>
  CUFLASH_HD Acc bias(int i, int j) const {
    const int64_t e = base + i * row_stride + j * col_stride;
    if (is_bool) return bool_bias<Acc>(static_cast<const bool*>(data)[e]);
    return to_acc<Acc>(static_cast<const T*>(data)[e]);
  }
  template <typename Acc>
  CUFLASH_HD static Acc bool_bias(bool keep) {
    return keep ? Acc(0) : -static_cast<Acc>(INFINITY);
  }
};

// The exact kernels' (float32, float64 on CUDA cores; the CPU's) score of one (batch, head),
// computed in T: scaled, soft-capped, ALiBi-biased, masked.
template <typename T>
struct ExactScore {
  T scale, softcap, slope;
  bool alibi;
  AttnMaskSlice mask;
  CUFLASH_HD ExactScore(const AttentionParams& p, int b, int h)
      : scale(static_cast<T>(p.scale)), softcap(static_cast<T>(p.score.softcap)),
        slope(static_cast<T>(alibi_slope(p.score, b, h))), alibi(p.score.alibi_slopes != nullptr),
        mask(p.score.attn_mask, b, h) {}
  // The score of (i, j) from qk = q.k; *capped receives tanh(scale * q.k / softcap): the
  // backward's chain-rule factor is 1 - capped^2.
  CUFLASH_HD T operator()(const Sequence& s, T qk, int i, int j, T* capped) const {
    using std::tanh;
    T x = qk * scale;
    if (softcap > T(0)) {
      *capped = tanh(x / softcap);
      x = softcap * *capped;
    }
    if (alibi) x += alibi_bias(slope, s, i, j);
    if (mask.data) x += mask.bias<T, T>(i, j);
    return x;
  }
};

// Offset of score (i, 0) of (b, h) in FlashBwdParams::dscores.
CUFLASH_HD int64_t dscores_offset(const AttentionShape& sh, int b, int h, int i) {
  return ((static_cast<int64_t>(b) * sh.heads_q + h) * sh.seqlen_q + i) * sh.seqlen_k;
}

// ---- Philox 4x32-7 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3") ----
// Seven rounds, FlashAttention-2's (and so torch's flash backend's) count: the paper finds
// Philox4x32 passes TestU01's BigCrush from 7 rounds and takes 10 as its default, a safety margin
// that costs dropout 3 rounds of integer work a call (benchmarks/NOTES.md).
struct Philox4 {
  uint32_t x[4];
};
CUFLASH_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}
CUFLASH_HD Philox4 philox4x32_7(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 7; ++round) {
    const uint32_t hi0 = mulhi32(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi32(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return {{c0, c1, c2, c3}};
}

// Dropout's threshold of a 16-bit draw for p in [0, 1) (keep iff draw >= threshold), and the
// factor of the kept probabilities: 1 / (1 - threshold / 2^16), the keep rate's inverse.
CUFLASH_HD uint32_t dropout_threshold(double p) {
  const double t = p * 65536.0 + 0.5;
  return t >= 65535.0 ? 65535u : static_cast<uint32_t>(t);
}
CUFLASH_HD double dropout_keep_scale(double p) { return 65536.0 / (65536.0 - dropout_threshold(p)); }

// Dropout draws are 16 bits, compared with dropout_threshold(p); the kept probabilities are
// scaled by dropout_keep_scale(p), the keep rate's own inverse (not 1 / (1 - p)), so that dropout
// keeps the expectation. One Philox call (128 bits) draws a block of 4 queries x 2 keys: queries
// (i0, i0 + 1, i0 + 8, i0 + 9) with i0 = i & ~9, keys (j, j ^ 1). A warp tile holds its
// rows r and r + 8 in one thread and rows r, r ^ 1 in lanes 4 apart, so in each pair of 8-column
// tiles two such lanes hold the 16 elements of two blocks between them, whichever operand the
// queries are (forward: rows; dK/dV kernel: columns), and each draws one (mask.cuh's
// dropout_factors). Everything that names the element goes into the counter; the seed is the key.
struct DropoutRng {
  uint32_t seed_lo, seed_hi, offset, threshold;  // keep iff draw >= threshold (a 16-bit draw)
  // 2^16 / (2^16 - threshold): the float kernels' factor of a kept probability, and the 16-bit
  // kernels' factor of O and dV in their epilogues (kept P enters the 16-bit GEMMs unscaled, so it
  // stays within fp16's range at any p). 1 in a DropoutRng{} (no dropout).
  float keep_scale = 1.f;
  // Block counter of query i: the quad index (i >> 4, (i >> 1) & 3).
  CUFLASH_HD static uint32_t query_quad(int i) { return static_cast<uint32_t>(((i >> 4) << 2) | ((i >> 1) & 3)); }
  CUFLASH_HD Philox4 block(int b, int h, int heads, int i, int j) const {
    const uint64_t bh = static_cast<uint64_t>(b) * heads + h;
    return philox4x32_7(static_cast<uint32_t>(j >> 1), query_quad(i), static_cast<uint32_t>(bh),
                         static_cast<uint32_t>(bh >> 32) + offset, seed_lo, seed_hi);
  }
  // Element (i, j) of its block: word 2 (i & 1) + ((i >> 3) & 1), the low half for an even key.
  // Selects rather than indexes, so that the draws stay in registers on the GPU.
  CUFLASH_HD static uint32_t word_at(const Philox4& r, int query_odd, int query_bit3) {
    const uint32_t even_row = query_bit3 ? r.x[1] : r.x[0], odd_row = query_bit3 ? r.x[3] : r.x[2];
    return query_odd ? odd_row : even_row;
  }
  CUFLASH_HD static uint32_t word_of(const Philox4& r, int i) { return word_at(r, i & 1, i & 8); }
  CUFLASH_HD static uint32_t draw_of(uint32_t word, int j) { return (j & 1) ? word >> 16 : word & 0xffffu; }
  CUFLASH_HD bool keep(int b, int h, int heads, int i, int j) const {
    return draw_of(word_of(block(b, h, heads, i, j), i), j) >= threshold;
  }
};

// rng_state is [seed, offset], read where it lives (device memory for the CUDA kernels).
CUFLASH_HD DropoutRng make_dropout_rng(const DropoutParams& d) {
  DropoutRng r;
  const uint64_t seed = static_cast<uint64_t>(d.rng_state[0]);
  r.seed_lo = static_cast<uint32_t>(seed);
  r.seed_hi = static_cast<uint32_t>(seed >> 32);
  r.offset = static_cast<uint32_t>(d.rng_state[1]);
  r.threshold = dropout_threshold(d.p);
  r.keep_scale = static_cast<float>(dropout_keep_scale(d.p));
  return r;
}

}  // namespace cuflash
