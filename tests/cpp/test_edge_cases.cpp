// shared/TESTING.md's edge cases through the C++ API (rows that see no key and empty problems are
// in test_accuracy.cpp): huge equal inputs, |x| ~ 1e4 in float16, uniform attention over 50k
// keys, a NaN in q, k or v. Needs a CUDA device: every test skips without one.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuflash/flash_attention.h"
#include "test_utils.h"

namespace cuflash_test {
namespace {

// One [1, H, N, 64] problem, forward and backward through the extended form; results as double.
struct Results {
  std::vector<double> out, lse, dq, dk, dv;
};

template <typename T>
std::vector<double> as_double(const DeviceBuffer& d) {
  std::vector<double> r;
  for (T x : download<T>(d)) r.push_back(Element<T>::to(x));
  return r;
}

template <typename T>
Results run(int heads, int seqlen_q, int seqlen_k, bool causal, const std::vector<double>& q,
            const std::vector<double>& k, const std::vector<double>& v, const std::vector<double>& dout) {
  constexpr int D = 64;
  auto store = [](const std::vector<double>& x) {
    std::vector<T> s;
    for (double e : x) s.push_back(Element<T>::from(e));
    return upload(s);
  };
  const DeviceBuffer q_dev = store(q), k_dev = store(k), v_dev = store(v), do_dev = store(dout);
  const DeviceBuffer o_dev(q.size() * sizeof(T)), dq_dev(q.size() * sizeof(T)), dk_dev(k.size() * sizeof(T)),
      dv_dev(k.size() * sizeof(T)), lse_dev(size_t(heads) * seqlen_q * sizeof(float));
  for (const DeviceBuffer* out : {&o_dev, &dq_dev, &dk_dev, &dv_dev, &lse_dev}) out->poison();

  cuflash::FlashAttentionForwardArgs f;
  f.dtype = Element<T>::kType;
  f.batch_size = 1, f.num_heads_q = f.num_heads_kv = heads;
  f.seqlen_q = seqlen_q, f.seqlen_k = seqlen_k, f.head_dim = D;
  f.scale = 0.125f;
  f.causal = causal;
  f.q = q_dev.get(), f.k = k_dev.get(), f.v = v_dev.get(), f.o = o_dev.get(), f.lse = lse_dev.as<float>();
  f.q_strides = f.o_strides = cuflash::bhsd_strides(heads, seqlen_q, D);
  f.k_strides = f.v_strides = cuflash::bhsd_strides(heads, seqlen_k, D);
  cuflash::FlashAttentionBackwardArgs g;
  static_cast<cuflash::AttentionConfig&>(g) = f;
  g.q = f.q, g.k = f.k, g.v = f.v, g.o = f.o, g.lse = f.lse, g.d_o = do_dev.get();
  g.dq = dq_dev.get(), g.dk = dk_dev.get(), g.dv = dv_dev.get();
  g.q_strides = g.o_strides = g.d_o_strides = g.dq_strides = f.q_strides;
  g.k_strides = g.v_strides = g.dk_strides = g.dv_strides = f.k_strides;
  EXPECT_EQ(cuflash::flash_attention_forward(f), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  EXPECT_EQ(cuflash::flash_attention_backward(g), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> lse = download<float>(lse_dev);
  return {as_double<T>(o_dev), std::vector<double>(lse.begin(), lse.end()), as_double<T>(dq_dev),
          as_double<T>(dk_dev), as_double<T>(dv_dev)};
}

std::vector<double> normal(size_t n, double scale, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist;
  std::vector<double> x(n);
  for (double& e : x) e = scale * dist(rng);
  return x;
}

bool all_finite(const std::vector<double>& x) {
  for (double e : x)
    if (!std::isfinite(e)) return false;
  return true;
}

constexpr int kD = 64;

template <typename T>
void expect_equal_inputs_give_that_value(double value) {
  const int H = 2, N = 130;
  const std::vector<double> x(size_t(H) * N * kD, value), dout = normal(x.size(), 1.0, 1);
  const Results r = run<T>(H, N, N, true, x, x, x, dout);
  for (double e : r.out) ASSERT_EQ(e, value) << "every key is the same: out = v";
  EXPECT_TRUE(all_finite(r.lse));
  // All values equal: dP is the same for every key, so dS = P (dP - delta) is 0 up to rounding.
  for (const auto* grad : {&r.dq, &r.dk, &r.dv}) EXPECT_TRUE(all_finite(*grad));
}

TEST(CApiEdge, HugeEqualInputsAreFinite) {
  CUFLASH_REQUIRE_CUDA();
  if (!cuflash::flash_attention_supports(DataType::BFLOAT16, kD)) GTEST_SKIP() << "head_dim 64 not compiled";
  expect_equal_inputs_give_that_value<__nv_bfloat16>(133120.0);  // scores ~ 1.4e11
  expect_equal_inputs_give_that_value<half>(256.0);
}

TEST(CApiEdge, LargeMagnitudeFloat16IsFinite) {
  CUFLASH_REQUIRE_CUDA();
  if (!cuflash::flash_attention_supports(DataType::FLOAT16, kD)) GTEST_SKIP() << "head_dim 64 not compiled";
  const int H = 2, N = 200;
  const size_t n = size_t(H) * N * kD;
  // |x| ~ 1e4 (float16's largest is 65504): scores ~ 1e9, far beyond float16, accumulated in float32.
  const Results r = run<half>(H, N, N, false, normal(n, 1e4, 2), normal(n, 1e4, 3), normal(n, 1e4, 4),
                              normal(n, 1.0, 5));
  EXPECT_TRUE(all_finite(r.out));
  EXPECT_TRUE(all_finite(r.lse));
}

TEST(CApiEdge, UniformAttentionOver50kKeys) {
  CUFLASH_REQUIRE_CUDA();
  if (!cuflash::flash_attention_supports(DataType::BFLOAT16, kD)) GTEST_SKIP() << "head_dim 64 not compiled";
  const int Nq = 5, Nk = 50000;
  const std::vector<double> q(size_t(Nq) * kD, 0.0), k(size_t(Nk) * kD, 0.0);
  std::vector<double> v = normal(size_t(Nk) * kD, 1.0, 6), dout = normal(size_t(Nq) * kD, 1.0, 7);
  for (double& e : v) e = round_to<__nv_bfloat16>(e);
  for (double& e : dout) e = round_to<__nv_bfloat16>(e);
  const Results r = run<__nv_bfloat16>(1, Nq, Nk, false, q, k, v, dout);
  for (int d = 0; d < kD; ++d) {
    double mean = 0;
    for (int j = 0; j < Nk; ++j) mean += v[size_t(j) * kD + d] / Nk;
    for (int i = 0; i < Nq; ++i)  // the mean, to bfloat16's rounding (and float32 accumulation)
      EXPECT_NEAR(r.out[size_t(i) * kD + d], mean, 1e-4 + std::abs(mean) / 128) << "row " << i << " dim " << d;
  }
  for (double e : r.lse) EXPECT_NEAR(e, std::log(double(Nk)), 1e-3 * std::log(double(Nk)));
  // q = k = 0: dq = scale * dS k = 0 and dk = scale * dS^T q = 0 exactly; dv = P^T dO = mean of dO.
  for (double e : r.dq) ASSERT_EQ(e, 0.0);
  for (double e : r.dk) ASSERT_EQ(e, 0.0);
  for (int d = 0; d < kD; ++d) {
    double mean = 0;
    for (int i = 0; i < Nq; ++i) mean += dout[size_t(i) * kD + d] / Nk;
    EXPECT_NEAR(r.dv[size_t(12345) * kD + d], mean, 1e-7 + std::abs(mean) / 128);
  }
}

// A NaN in row 300 of q, k or v (512 rows, causal), as tests/test_edge_cases.py's
// test_nan_propagates_to_affected_rows_only: it reaches the rows that attend to it (out, lse, dq;
// the key rows of dk and dv that those rows reach), and every other row below 192 (no tile of the
// kernels holds both: a tile's products also carry NaN to its other rows, 0 x NaN) has no NaN,
// with out and lse bitwise what the clean inputs give. Rows from 192 on that the NaN does not
// reach mathematically may hold it (the README's NaN guarantee).
struct NanCase {
  DataType dtype;
  char where;  // 'q', 'k' or 'v'
};

// Whether row i of `part` is reached by the NaN (tests/test_edge_cases.py's _reached_by_nan).
bool reached_by_nan(char where, const std::string& part, int i, int pos) {
  if (where == 'q') return part == "dk" || part == "dv" ? i <= pos : i == pos;
  if (where == 'k') return part == "dk" || part == "dv" ? true : i >= pos;
  if (part == "lse" || part == "dv") return false;  // v: P stays finite, and dv has no v in it
  return part == "dk" ? true : i >= pos;
}

template <typename T>
void check_nan_rows(char where) {
  const int N = 512, pos = 300, exact_below = 192;
  const size_t n = size_t(N) * kD;
  std::vector<double> q = normal(n, 1.0, 21), k = normal(n, 1.0, 22), v = normal(n, 1.0, 23);
  const std::vector<double> dout = normal(n, 1.0, 24);
  const Results clean = run<T>(1, N, N, true, q, k, v, dout);
  std::vector<double>& poisoned = where == 'q' ? q : where == 'k' ? k : v;
  poisoned[size_t(pos) * kD + 3] = std::numeric_limits<double>::quiet_NaN();
  const Results r = run<T>(1, N, N, true, q, k, v, dout);
  struct Part {
    std::string name;
    const std::vector<double>&got, &clean;
    int width;
  };
  for (const Part& part : {Part{"out", r.out, clean.out, kD}, Part{"lse", r.lse, clean.lse, 1},
                           Part{"dq", r.dq, clean.dq, kD}, Part{"dk", r.dk, clean.dk, kD}, Part{"dv", r.dv, clean.dv, kD}})
    for (int i = 0; i < N; ++i) {
      bool has_nan = false;
      for (int d = 0; d < part.width; ++d) has_nan = has_nan || std::isnan(part.got[size_t(i) * part.width + d]);
      if (reached_by_nan(where, part.name, i, pos)) {
        ASSERT_TRUE(has_nan) << part.name << " row " << i << " is reached by the NaN in " << where;
      } else if (i < exact_below) {
        for (int d = 0; d < part.width; ++d) {
          const double got = part.got[size_t(i) * part.width + d];
          ASSERT_TRUE(std::isfinite(got)) << part.name << " row " << i << " is not reached by the NaN in " << where;
          if (part.name == "out" || part.name == "lse") {
            ASSERT_EQ(got, part.clean[size_t(i) * part.width + d]) << part.name << " row " << i << " changed";
          }
        }
      }
    }
}

class CApiNan : public ::testing::TestWithParam<NanCase> {};

TEST_P(CApiNan, ReachesTheRowsThatSeeItOnly) {
  CUFLASH_REQUIRE_CUDA();
  const NanCase c = GetParam();
  if (!cuflash::flash_attention_supports(c.dtype, kD)) GTEST_SKIP() << "head_dim 64 not compiled";
  if (c.dtype == DataType::FLOAT16) check_nan_rows<half>(c.where);
  else if (c.dtype == DataType::BFLOAT16) check_nan_rows<__nv_bfloat16>(c.where);
  else check_nan_rows<float>(c.where);
}

INSTANTIATE_TEST_SUITE_P(, CApiNan,
                         ::testing::Values(NanCase{DataType::FLOAT16, 'k'}, NanCase{DataType::FLOAT16, 'q'},
                                           NanCase{DataType::FLOAT16, 'v'}, NanCase{DataType::BFLOAT16, 'k'},
                                           NanCase{DataType::BFLOAT16, 'v'}, NanCase{DataType::FLOAT32, 'q'},
                                           NanCase{DataType::FLOAT32, 'k'}, NanCase{DataType::FLOAT32, 'v'}),
                         [](const ::testing::TestParamInfo<NanCase>& info) {
                           const char* type = info.param.dtype == DataType::FLOAT16    ? "fp16"
                                              : info.param.dtype == DataType::BFLOAT16 ? "bf16"
                                                                                       : "fp32";
                           return std::string(type) + "_nan_in_" + info.param.where;
                         });

}  // namespace
}  // namespace cuflash_test
