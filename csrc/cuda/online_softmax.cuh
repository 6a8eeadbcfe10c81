// The online softmax state of one thread: two query rows (g and g + 8 of its warp's 16),
// running max in the scaled log2 domain and a thread-partial running sum (the quad's four
// partial sums are added once, at the end, since every rescale is uniform across the quad).
#pragma once
#include <math.h>
#include "mma_sm80.cuh"

namespace cuflash {

struct OnlineSoftmax {
  // A lazy rescale (kLazy below) keeps a row's max until a step's scores pass it by more than this
  // (log2 units): P then reaches 2^8.
  static constexpr float kLazyRescaleLog2 = 8.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  // s holds scaled-log2 scores (masked ones -inf) and becomes P = exp2(s - max); o is rescaled.
  template <int kN, int kD>
  __device__ __forceinline__ void rescale_and_exp(WarpAcc<kN>& s, WarpAcc<kD>& o) {
    float alpha[2];
    exp_rows<true>(s, alpha, &o);
  }
  // The same with o left alone: alpha gets each row's factor, for rescale_rows once whatever
  // still accumulates into o (an asynchronous P V) is done. kLazy: as below.
  template <bool kLazy = false, int kN>
  __device__ __forceinline__ void exp_and_rescale_factor(WarpAcc<kN>& s, float (&alpha)[2]) {
    exp_rows<false, kLazy>(s, alpha, static_cast<WarpAcc<8>*>(nullptr));
  }
  // The same from raw q.k (masked ones -inf) and a positive scale_log2 folded into the
  // exponent's argument: p = exp2(fma(s, scale_log2, -max)), one FFMA a score where exp_rows
  // takes a multiply and a subtraction (FlashAttention-3's form). The max is fl(raw max *
  // scale_log2), the scaled scores' max as exp_rows keeps it (rounding is monotonic). For the
  // row's maximum the FFMA returns the rounding error of that product instead of 0: at most 2^-17
  // below |max| = 2^8 (scores up to 177 nats), so that its p, 1 +- 2^-17 ln 2, is still 1 in 16
  // bits (the float sum keeps the difference, which the logsumexp then accounts for). From there
  // (and at the extreme-value tests' scores, where that error would overflow or vanish) the warp
  // rounds the product first, as exp_rows does.
  // kLazy (FlashAttention-4's conditional rescaling): a row keeps its max until a step's passes it
  // by more than kLazyRescaleLog2, alpha 1 meanwhile, so that at most steps a warp's rows all
  // keep theirs and rescale_rows<true> skips O's rescale. 16-bit P, the float sums and O hold
  // p up to 2^8 with the same relative precision, and the logsumexp is taken from the max kept.
  template <bool kLazy = false, int kN>
  __device__ __forceinline__ void exp_folded_and_rescale_factor(WarpAcc<kN>& s, float scale_log2,
                                                                float (&alpha)[2]) {
    float base[2];
    bool moderate = true;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      base[r] = advance_max<kLazy>(r, fmaxf(row_max[r], row_max_of(s, r, -INFINITY) * scale_log2), alpha[r]);
      moderate = moderate && fabsf(base[r]) < 0x1p8f;
    }
    if (__all_sync(0xffffffffu, moderate)) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        exp_and_sum_row(s, r, alpha[r], [&](float x) { return fast_exp2(__fmaf_rn(x, scale_log2, -base[r])); });
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        exp_and_sum_row(s, r, alpha[r], [&](float x) { return fast_exp2(__fmul_rn(x, scale_log2) - base[r]); });
    }
  }
  // kLazy: where the warp's rows all kept their max (alpha 1), as they do at most steps of a lazy
  // rescale, the warp skips it (a vote).
  template <bool kLazy = false, int kD>
  __device__ __forceinline__ static void rescale_rows(WarpAcc<kD>& o, const float (&alpha)[2]) {
    if (kLazy && !__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) rescale_row(o, r, alpha[r]);
  }

 private:
  template <int kD>
  __device__ __forceinline__ static void rescale_row(WarpAcc<kD>& o, int r, float alpha) {
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      o.v[j][2 * r] *= alpha;
      o.v[j][2 * r + 1] *= alpha;
    }
  }
  // The quad's largest of row r's values in s and init.
  template <int kN>
  __device__ __forceinline__ static float row_max_of(const WarpAcc<kN>& s, int r, float init) {
    float mx = init;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) mx = fmaxf(mx, fmaxf(s.v[j][2 * r], s.v[j][2 * r + 1]));
    return quad_max(mx);
  }
  // Row r's running max becomes mx; returns the exponents' base and sets alpha, the rescale of
  // what was summed before. A row with nothing visible yet keeps max -inf; exp2 against base 0
  // then gives p = 0. kLazy: the max moves only past kLazyRescaleLog2 above the one kept (alpha 1
  // otherwise); a row's first finite max always moves it. Selects, not a branch: a branch per row
  // (two BSSY/BSYNC pairs, the exp2 inside) made head dim 64 slower (H100, benchmarks/NOTES.md).
  template <bool kLazy>
  __device__ __forceinline__ float advance_max(int r, float mx, float& alpha) {
    if constexpr (kLazy) {
      const bool keep = !(mx > row_max[r] + kLazyRescaleLog2);
      const float kept = keep ? row_max[r] : mx;
      const float base = kept == -INFINITY ? 0.f : kept;
      const float moved = fast_exp2(row_max[r] - base);
      alpha = keep ? 1.f : moved;
      row_max[r] = kept;
      return base;
    }
    const float base = mx == -INFINITY ? 0.f : mx;
    alpha = fast_exp2(row_max[r] - base);
    row_max[r] = mx;
    return base;
  }
  // p = exp_of(score) for row r's scores, its sum rescaled by alpha and added to.
  template <int kN, class ExpOf>
  __device__ __forceinline__ void exp_and_sum_row(WarpAcc<kN>& s, int r, float alpha, ExpOf exp_of) {
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j)
#pragma unroll
      for (int e = 2 * r; e < 2 * r + 2; ++e) {
        s.v[j][e] = exp_of(s.v[j][e]);
        sum += s.v[j][e];
      }
    row_sum[r] = row_sum[r] * alpha + sum;
  }
  // o: rescaled when kRescale (then not null), untouched otherwise.
  template <bool kRescale, bool kLazy = false, int kN, int kD>
  __device__ __forceinline__ void exp_rows(WarpAcc<kN>& s, float (&alpha)[2], WarpAcc<kD>* o) {
    static_assert(!(kRescale && kLazy), "a lazy rescale's alpha is for rescale_rows<true>");
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float base = advance_max<kLazy>(r, row_max_of(s, r, row_max[r]), alpha[r]);
      exp_and_sum_row(s, r, alpha[r], [&](float x) { return fast_exp2(x - base); });
      if constexpr (kRescale) rescale_row(*o, r, alpha[r]);
    }
  }

 public:
  // out_factor / rowsum for the output (0 for a row that saw no key) and the natural-log
  // logsumexp (-inf for such a row). out_factor: dropout's keep scale (DropoutRng::keep_scale).
  __device__ __forceinline__ void finalize(float (&inv_sum)[2], float (&lse)[2], float out_factor) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_sum[r]);
      const bool seen = l != 0.f;  // NaN scores give a NaN sum: it propagates
      inv_sum[r] = seen ? out_factor / l : 0.f;
      lse[r] = seen ? (row_max[r] + log2f(l)) * 0.6931471805599453f : -INFINITY;
    }
  }
};

}  // namespace cuflash
