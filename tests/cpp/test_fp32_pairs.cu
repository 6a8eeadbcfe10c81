// float32 as fp16 pairs (csrc/cuda/fp32_pairs.h). On the host: the exponent the pre-pass scales
// each (batch, head) by puts its largest |x| in [2^14, 2^15) (fp16's top binade but one, so that
// hi cannot overflow and lo keeps 11 bits down to 2^-18 of it), wherever 2^e is a normal float
// (e <= 126: largest values from 2^-112; below, e stays 126 and the largest lands lower);
// pow2 is exact; and the scratch layout gives every input its own 16-byte aligned span. On a GPU
// (skipped without one): one warp's products on pairs (mma_sm80.cuh: PairTile's fragments,
// MmaOperand<Fp32Pair>, WarpAcc::to_a's split, the factors) against double precision, in both
// of the kernels' patterns (Q K^T from two tiles, P V from registers and a tile), at scales far
// apart: each element within 2^-20 of the sum of its products' magnitudes, where one fp16 or
// TF32 product per element (the lo halves lost) would be off by about 2^-11.
#include <gtest/gtest.h>
#include <cuda_runtime.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>
#include "../../csrc/cuda/fp32_pairs.h"
#include "../../csrc/cuda/mma_sm80.cuh"

namespace {

uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

TEST(Fp32Pairs, ExponentPutsTheLargestInFp16sTopBinadeButOne) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> mantissa(1.f, 2.f);
  for (int k = -126; k <= 127; ++k) {
    for (int draw = 0; draw < 20; ++draw) {
      const float amax = std::ldexp(draw == 0 ? 1.f : mantissa(rng), k);
      if (!std::isfinite(amax)) continue;
      const int e = cuflash::pair_exponent(bits_of(amax));
      ASSERT_EQ(e, k >= -112 ? 14 - k : 126) << "amax " << amax;
      const double scaled = std::ldexp(static_cast<double>(amax), e);
      if (k >= -112) {
        ASSERT_GE(scaled, 16384.0) << "amax " << amax;
      }
      ASSERT_LT(scaled, 32768.0) << "amax " << amax;
    }
  }
  EXPECT_EQ(cuflash::pair_exponent(bits_of(3.4028235e38f)), -113);  // the largest float
}

TEST(Fp32Pairs, ZeroAndSubnormalMaximaTakeTheLargestExponent) {
  for (const float amax : {0.f, 1e-45f, 1e-40f, 1.1754942e-38f}) {  // 0 and subnormals
    const int e = cuflash::pair_exponent(bits_of(amax));
    EXPECT_EQ(e, 126) << "amax " << amax;
    EXPECT_LT(std::ldexp(static_cast<double>(amax), e), 32768.0) << "amax " << amax;
  }
}

TEST(Fp32Pairs, Pow2IsExactOverTheExponentsUsed) {
  for (int e = -126; e <= 126; ++e) EXPECT_EQ(cuflash::pow2(e), std::ldexp(1.f, e)) << "e " << e;
  EXPECT_EQ(cuflash::pair_scale_for_bound(1.f), 16384.f);  // P <= 1
  EXPECT_EQ(cuflash::pair_scale_for_bound(1.25f), 16384.f);  // dropout 0.2's 1 / (1 - p)
  EXPECT_EQ(cuflash::pair_scale_for_bound(10.f), 2048.f);  // dropout 0.9's: 10 * 2048 < 2^15
}

TEST(Fp32Pairs, ScratchGivesEachInputItsOwnAlignedSpan) {
  cuflash::AttentionParams p;
  p.shape.batch = 3;
  p.shape.heads_q = 6;
  p.shape.heads_kv = 2;
  p.shape.seqlen_q = 77;
  p.shape.seqlen_k = 130;
  p.shape.head_dim = 40;
  for (const bool with_dout : {false, true}) {
    const cuflash::PairScratchLayout l = cuflash::pair_scratch_layout(p, 64, with_dout);
    const int inputs = with_dout ? 4 : 3;
    const int64_t heads[4] = {6, 2, 2, 6}, rows[4] = {3 * 77, 3 * 130, 3 * 130, 3 * 77};
    int64_t end = 0;
    for (int i = 0; i < inputs; ++i) {  // the amax counters first, zeroed by one memset
      EXPECT_GE(l.amax_offset[i], end);
      EXPECT_LT(l.amax_offset[i], end + 16);
      EXPECT_EQ(l.amax_offset[i] % 16, 0);
      end = l.amax_offset[i] + 3 * heads[i] * 4;
    }
    for (int i = 0; i < inputs; ++i) {
      EXPECT_GE(l.rows_offset[i], end);
      EXPECT_LT(l.rows_offset[i], end + 16);
      EXPECT_EQ(l.rows_offset[i] % 16, 0);
      end = l.rows_offset[i] + rows[i] * heads[i] * 64 * 4;
    }
    EXPECT_EQ(l.bytes, end);
  }
  // Packed: one amax a head, the rows the totals.
  int cu[4] = {0, 70, 70, 199};
  p.varlen.cu_seqlens_q = cu;
  p.varlen.total_q = 199;
  p.varlen.total_k = 166;
  const cuflash::PairScratchLayout l = cuflash::pair_scratch_layout(p, 64, false);
  EXPECT_EQ(l.amax_offset[1] - l.amax_offset[0], 32);  // 6 heads' 24 bytes, rounded up
  EXPECT_EQ(l.rows_offset[1] - l.rows_offset[0], 199 * 6 * 64 * 4);
  EXPECT_EQ(l.bytes - l.rows_offset[2], 166 * 2 * 64 * 4);
}

// x (a row-major [kRows][kCols] float block) times 2^e, split into a PairTile's rows, by one warp.
template <int kRows, int kCols>
__device__ void split_into(const cuflash::PairTile<kRows, kCols>& tile, const float* x, float scale, int lane) {
  for (int i = lane; i < kRows * kCols / 2; i += 32) {
    const int r = i / (kCols / 2), c = 2 * (i % (kCols / 2));
    uint32_t hi, lo;
    cuflash::split_half2(x[r * kCols + c] * scale, x[r * kCols + c + 1] * scale, hi, lo);
    *reinterpret_cast<uint32_t*>(tile.halves().at(r, c)) = hi;
    *reinterpret_cast<uint32_t*>(tile.halves().at(r, kCols + c)) = lo;
  }
}
template <int kCols>
__device__ void store_acc(const cuflash::WarpAcc<kCols>& acc, float* out, int lane) {
  using Acc = cuflash::WarpAcc<kCols>;
  for (int j = 0; j < Acc::kTiles; ++j)
    for (int e = 0; e < 4; ++e) out[Acc::row_of(e, lane) * kCols + Acc::col_of(j, e, lane)] = acc.v[j][e];
}

// out (16 x kN) = a (16 x kK) b^T (b: kN x kK): the Q K^T pattern, both operands split into tiles
// at 2^ea and 2^eb, the product scaled back by 2^-(ea + eb).
template <int kK, int kN>
__global__ void pair_abt_kernel(const float* a, const float* b, int ea, int eb, float* out) {
  __shared__ alignas(16) cuflash::Fp32Pair a_rows[cuflash::PairTile<16, kK>::kElems];
  __shared__ alignas(16) cuflash::Fp32Pair b_rows[cuflash::PairTile<kN, kK>::kElems];
  const cuflash::PairTile<16, kK> ta{a_rows};
  const cuflash::PairTile<kN, kK> tb{b_rows};
  const int lane = threadIdx.x;
  split_into(ta, a, cuflash::pow2(ea), lane);
  split_into(tb, b, cuflash::pow2(eb), lane);
  __syncwarp();
  cuflash::WarpAcc<kN> acc;
  acc.zero();
  cuflash::warp_gemm_abt<cuflash::Fp32Pair, kK, kN>(acc, ta, 0, tb, 0, lane, cuflash::pow2(-ea) * cuflash::pow2(-eb));
  store_acc(acc, out, lane);
}

// out (16 x kN) = p (16 x kK, an accumulator split in registers at p_scale) v (kK x kN, a tile
// at 2^ev): the P V pattern.
template <int kK, int kN>
__global__ void pair_rb_kernel(const float* p, const float* v, float p_scale, int ev, float* out) {
  __shared__ alignas(16) cuflash::Fp32Pair v_rows[cuflash::PairTile<kK, kN>::kElems];
  const cuflash::PairTile<kK, kN> tv{v_rows};
  const int lane = threadIdx.x;
  split_into(tv, v, cuflash::pow2(ev), lane);
  __syncwarp();
  using PAcc = cuflash::WarpAcc<kK>;
  PAcc pacc;
  for (int j = 0; j < PAcc::kTiles; ++j)
    for (int e = 0; e < 4; ++e) pacc.v[j][e] = p[PAcc::row_of(e, lane) * kK + PAcc::col_of(j, e, lane)];
  cuflash::WarpAcc<kN> acc;
  acc.zero();
  cuflash::warp_gemm_rb<cuflash::Fp32Pair, kK, kN>(acc, pacc, tv, 0, lane, p_scale, cuflash::pow2(-ev) / p_scale);
  store_acc(acc, out, lane);
}

float largest(const std::vector<float>& x) {
  float top = 0.f;
  for (const float v : x) top = std::fmax(top, std::fabs(v));
  return top;
}
std::vector<float> random_block(int n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> x(n);
  for (float& v : x) v = scale * normal(rng);
  return x;
}
float* to_device(const std::vector<float>& x) {
  float* d = nullptr;
  cudaMalloc(&d, x.size() * sizeof(float));
  cudaMemcpy(d, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice);
  return d;
}
// The first element of got (16 x n) off from sum_k a(i, k) b(k, j) (a_at, b_at) by more than
// 2^-20 sum_k |a b|, or "".
template <class A, class B>
std::string product_mismatch(const std::vector<float>& got, int n, int k, A&& a_at, B&& b_at) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < n; ++j) {
      double want = 0.0, magnitude = 0.0;
      for (int t = 0; t < k; ++t) {
        want += static_cast<double>(a_at(i, t)) * b_at(t, j);
        magnitude += std::fabs(static_cast<double>(a_at(i, t)) * b_at(t, j));
      }
      if (!(std::fabs(got[i * n + j] - want) <= std::ldexp(magnitude, -20)))
        return "element (" + std::to_string(i) + ", " + std::to_string(j) + "): " + std::to_string(got[i * n + j]) +
               " for " + std::to_string(want);
    }
  return "";
}

TEST(Fp32Pairs, WarpProductsKeepFloat32sAccuracy) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) GTEST_SKIP() << "no CUDA device";
  constexpr int kK = 64, kN = 32;  // Q K^T: head dim 64, 32 keys; P V: 64 keys, head dim 32
  std::mt19937 rng(3);
  for (const auto& [sa, sb] : {std::pair{1.f, 1.f}, std::pair{1e-20f, 1e15f}, std::pair{3e18f, 2e-25f}}) {
    SCOPED_TRACE("scales " + std::to_string(sa) + ", " + std::to_string(sb));
    const std::vector<float> a = random_block(16 * kK, sa, rng), b = random_block(kN * kK, sb, rng);
    const int ea = cuflash::pair_exponent(bits_of(largest(a))), eb = cuflash::pair_exponent(bits_of(largest(b)));
    float *da = to_device(a), *db = to_device(b), *dout = nullptr;
    cudaMalloc(&dout, 16 * kN * sizeof(float));
    std::vector<float> got(16 * kN);
    pair_abt_kernel<kK, kN><<<1, 32>>>(da, db, ea, eb, dout);
    ASSERT_EQ(cudaMemcpy(got.data(), dout, got.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(product_mismatch(got, kN, kK, [&](int i, int t) { return a[i * kK + t]; },
                               [&](int t, int j) { return b[j * kK + t]; }),
              "")
        << "Q K^T";
    // P V: p of P's range (0 to 1, or a dropout factor's 1 / (1 - p) = 5) at its bound's scale, v of b's.
    for (const float bound : {1.f, 5.f}) {
      std::uniform_real_distribution<float> prob(0.f, bound);
      std::vector<float> p(16 * kK);
      for (float& x : p) x = prob(rng);
      float* dp = to_device(p);
      pair_rb_kernel<kK, kN><<<1, 32>>>(dp, db, cuflash::pair_scale_for_bound(bound), eb, dout);
      ASSERT_EQ(cudaMemcpy(got.data(), dout, got.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
      EXPECT_EQ(product_mismatch(got, kN, kK, [&](int i, int t) { return p[i * kK + t]; },
                                 [&](int t, int j) { return b[t * kN + j]; }),
                "")
          << "P V, P up to " << bound;
      cudaFree(dp);
    }
    cudaFree(da);
    cudaFree(db);
    cudaFree(dout);
  }
}

}  // namespace
