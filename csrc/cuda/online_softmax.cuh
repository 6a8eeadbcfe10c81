// The online softmax state of one thread: two query rows (g and g + 8 of its warp's 16),
// running max in the scaled log2 domain and a thread-partial running sum (the quad's four
// partial sums are added once, at the end, since every rescale is uniform across the quad).
#pragma once
#include <math.h>
#include "mma_sm80.cuh"

namespace cuflash {

struct OnlineSoftmax {
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  // s holds scaled-log2 scores (masked ones -inf) and becomes P = exp2(s - max); o is rescaled.
  template <int kN, int kD>
  __device__ __forceinline__ void rescale_and_exp(WarpAcc<kN>& s, WarpAcc<kD>& o) {
    float alpha[2];
    exp_rows<true>(s, alpha, &o);
  }
  // The same with o left alone: alpha gets each row's factor, for rescale_rows once whatever
  // still accumulates into o (an asynchronous P V) is done.
  template <int kN>
  __device__ __forceinline__ void exp_and_rescale_factor(WarpAcc<kN>& s, float (&alpha)[2]) {
    exp_rows<false>(s, alpha, static_cast<WarpAcc<8>*>(nullptr));
  }
  template <int kD>
  __device__ __forceinline__ static void rescale_rows(WarpAcc<kD>& o, const float (&alpha)[2]) {
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
  // o: rescaled when kRescale (then not null), untouched otherwise.
  template <bool kRescale, int kN, int kD>
  __device__ __forceinline__ void exp_rows(WarpAcc<kN>& s, float (&alpha)[2], WarpAcc<kD>* o) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) mx = fmaxf(mx, fmaxf(s.v[j][2 * r], s.v[j][2 * r + 1]));
      mx = quad_max(mx);
      // A row with nothing visible yet keeps max -inf; exp2 against 0 then gives p = 0.
      const float base = mx == -INFINITY ? 0.f : mx;
      const float a = fast_exp2(row_max[r] - base);
      alpha[r] = a;
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kN / 8; ++j)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s.v[j][e] = fast_exp2(s.v[j][e] - base);
          sum += s.v[j][e];
        }
      row_sum[r] = row_sum[r] * a + sum;
      if constexpr (kRescale) rescale_row(*o, r, a);
    }
  }

 public:
  // 1 / rowsum for the output (0 for a row that saw no key) and the natural-log logsumexp
  // (-inf for such a row).
  __device__ __forceinline__ void finalize(float (&inv_sum)[2], float (&lse)[2]) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_sum[r]);
      const bool seen = l != 0.f;  // NaN scores give a NaN sum: it propagates
      inv_sum[r] = seen ? 1.f / l : 0.f;
      lse[r] = seen ? (row_max[r] + log2f(l)) * 0.6931471805599453f : -INFINITY;
    }
  }
};

// Multiplies every element by the scale (log2 e folded in).
template <int kN>
__device__ __forceinline__ void scale_scores(WarpAcc<kN>& s, float scale_log2) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s.v[j][e] *= scale_log2;
}

}  // namespace cuflash
