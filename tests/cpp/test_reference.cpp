// The CPU reference the accuracy tests trust, checked on its own (no GPU needed): its gradients
// against finite differences of its forward, its logsumexp and masks against their definitions.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "reference.h"
#include "test_utils.h"

namespace cuflash_test {
namespace {

std::vector<double> randn(std::mt19937_64& rng, size_t n) {
  std::normal_distribution<double> normal;
  std::vector<double> x(n);
  for (double& e : x) e = normal(rng);
  return x;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Grouped-query heads, seqlen_q > seqlen_k with bottom-right causal alignment and a left window:
// rows that see no key, rows that see a few.
Problem small_problem() {
  Problem p;
  p.batch = 2, p.heads_q = 4, p.heads_kv = 2, p.seqlen_q = 7, p.seqlen_k = 5, p.head_dim = 3;
  p.scale = 0.7, p.causal = true, p.bottom_right = true, p.window_left = 2;
  return p;
}

TEST(Reference, GradientsMatchFiniteDifferences) {
  const Problem p = small_problem();
  std::mt19937_64 rng(3);
  const size_t nq = size_t(p.batch) * p.heads_q * p.seqlen_q * p.head_dim;
  const size_t nk = size_t(p.batch) * p.heads_kv * p.seqlen_k * p.head_dim;
  std::vector<double> q = randn(rng, nq), k = randn(rng, nk), v = randn(rng, nk);
  const std::vector<double> dout = randn(rng, nq);
  const Attention a = attention_reference(p, q, k, v, dout, no_rounding);
  // loss = sum(out * dout): its gradient is what the backward computes.
  auto loss = [&] { return dot(attention_reference(p, q, k, v, dout, no_rounding).out, dout); };
  const double h = 1e-6;
  for (auto [x, grad] : {std::pair{&q, &a.dq}, {&k, &a.dk}, {&v, &a.dv}}) {
    for (size_t i = 0; i < x->size(); ++i) {
      const double saved = (*x)[i];
      (*x)[i] = saved + h;
      const double up = loss();
      (*x)[i] = saved - h;
      const double down = loss();
      (*x)[i] = saved;
      EXPECT_NEAR((up - down) / (2 * h), (*grad)[i], 1e-6) << "element " << i;
    }
  }
}

TEST(Reference, MasksAndLogsumexp) {
  const Problem p = small_problem();
  std::mt19937_64 rng(4);
  const size_t nq = size_t(p.batch) * p.heads_q * p.seqlen_q * p.head_dim;
  const size_t nk = size_t(p.batch) * p.heads_kv * p.seqlen_k * p.head_dim;
  const std::vector<double> q = randn(rng, nq), k = randn(rng, nk), v = randn(rng, nk), dout = randn(rng, nq);
  const Attention a = attention_reference(p, q, k, v, dout, no_rounding);
  const int D = p.head_dim, diagonal = p.seqlen_k - p.seqlen_q;
  for (int b = 0; b < p.batch; ++b)
    for (int h = 0; h < p.heads_q; ++h)
      for (int i = 0; i < p.seqlen_q; ++i) {
        const size_t row = (size_t(b) * p.heads_q + h) * p.seqlen_q + i;
        const size_t k0 = (size_t(b) * p.heads_kv + h / 2) * p.seqlen_k;
        // Keys j with i + diagonal - window_left <= j <= i + diagonal.
        double sum = 0;
        for (int j = std::max(0, i + diagonal - p.window_left); j <= i + diagonal && j < p.seqlen_k; ++j) {
          double s = 0;
          for (int d = 0; d < D; ++d) s += q[row * D + d] * k[(k0 + j) * D + d];
          sum += std::exp(s * p.scale);
        }
        if (sum == 0) {
          EXPECT_EQ(a.lse[row], -INFINITY) << "row " << i << " sees no key";
          for (int d = 0; d < D; ++d) {
            EXPECT_EQ(a.out[row * D + d], 0.0);
            EXPECT_EQ(a.dq[row * D + d], 0.0);
          }
        } else {
          EXPECT_NEAR(a.lse[row], std::log(sum), 1e-12);
        }
      }
}

TEST(Reference, LowPrecisionBaselineDiffersByRounding) {
  Problem p;
  p.batch = 1, p.heads_q = p.heads_kv = 2, p.seqlen_q = 33, p.seqlen_k = 47, p.head_dim = 16, p.scale = 0.25;
  std::mt19937_64 rng(5);
  const size_t nq = size_t(p.heads_q) * p.seqlen_q * p.head_dim, nk = size_t(p.heads_kv) * p.seqlen_k * p.head_dim;
  const std::vector<double> q = randn(rng, nq), k = randn(rng, nk), v = randn(rng, nk), dout = randn(rng, nq);
  const Attention ref = attention_reference(p, q, k, v, dout, no_rounding);
  const Attention fp16 = attention_reference(p, q, k, v, dout, round_to<half>);
  const Attention bf16 = attention_reference(p, q, k, v, dout, round_to<__nv_bfloat16>);
  // Errors of a few roundings: nonzero, within a small multiple of the unit roundoff (2^-11,
  // 2^-8) of the values, and larger for bfloat16.
  const double e16 = max_abs_diff(fp16.out, ref.out), eb16 = max_abs_diff(bf16.out, ref.out);
  EXPECT_GT(e16, 0);
  EXPECT_LT(e16, 8 * std::ldexp(max_abs(ref.out), -11));
  EXPECT_LT(eb16, 8 * std::ldexp(max_abs(ref.out), -8));
  EXPECT_GT(eb16, e16);
  EXPECT_GT(rounding_floor(ref.out, round_to<half>), 0);
}

}  // namespace
}  // namespace cuflash_test
