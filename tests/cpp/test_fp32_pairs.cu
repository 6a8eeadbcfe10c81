// float32 as fp16 pairs (csrc/cuda/fp32_pairs.h). On the host: the exponent the pre-pass scales
// each row by puts its largest |x| in [2^14, 2^15) (fp16's top binade but one, so that hi cannot
// overflow; lo, the rest times 2^11, keeps its bits down to 2^-28 of it), wherever 2^e is a normal
// float (e <= 126: largest values from 2^-112; below, e stays 126 and the largest lands lower);
// pow2 is exact; and the scratch layout gives every input its own 16-byte aligned spans. On a GPU
// (skipped without one): one warp's products on pairs (mma_sm80.cuh: PairTile's fragments,
// MmaOperand<Fp32Pair>, WarpAcc::to_a's split; fp32_pair_tiles.cuh's row scales) against double
// precision, in both of the kernels' patterns (Q K^T from two tiles, P V from registers and a
// tile), with every row at a scale of its own, 1e-12 to 1e20 (one row of garbage a mask would hide
// among them; a row of P at 1e-7 of its tile's others): each element within 2^-20 of the sum of its
// products' magnitudes, where one fp16 or TF32 product per element (the lo halves lost) would be
// off by about 2^-11.
#include <gtest/gtest.h>
#include <cuda_runtime.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>
#include "../../csrc/cuda/fp32_pair_tiles.cuh"
#include "../../csrc/cuda/fp32_pairs.h"

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
  EXPECT_EQ(cuflash::pow2(cuflash::pair_exponent_for(1.f)), 16384.f);   // P <= 1
  EXPECT_EQ(cuflash::pow2(cuflash::pair_exponent_for(1.25f)), 16384.f);  // dropout 0.2's 1 / (1 - p)
  EXPECT_EQ(cuflash::pow2(cuflash::pair_exponent_for(10.f)), 2048.f);    // dropout 0.9's: 10 * 2048 < 2^15
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
    for (int i = 0; i < inputs; ++i) {  // the row scales first, a float a row
      EXPECT_GE(l.scales_offset[i], end);
      EXPECT_LT(l.scales_offset[i], end + 16);
      EXPECT_EQ(l.scales_offset[i] % 16, 0);
      end = l.scales_offset[i] + rows[i] * heads[i] * 4;
    }
    for (int i = 0; i < inputs; ++i) {
      EXPECT_GE(l.rows_offset[i], end);
      EXPECT_LT(l.rows_offset[i], end + 16);
      EXPECT_EQ(l.rows_offset[i] % 16, 0);
      end = l.rows_offset[i] + rows[i] * heads[i] * 64 * 4;
    }
    EXPECT_EQ(l.bytes, end);
  }
  // Packed: the rows the totals.
  int cu[4] = {0, 70, 70, 199};
  p.varlen.cu_seqlens_q = cu;
  p.varlen.total_q = 199;
  p.varlen.total_k = 166;
  const cuflash::PairScratchLayout l = cuflash::pair_scratch_layout(p, 64, false);
  EXPECT_EQ(l.scales_offset[1] - l.scales_offset[0], (199 * 6 * 4 + 15) / 16 * 16);  // to 16 bytes
  EXPECT_EQ(l.rows_offset[1] - l.rows_offset[0], 199 * 6 * 64 * 4);
  EXPECT_EQ(l.bytes - l.rows_offset[2], 166 * 2 * 64 * 4);
}

// x (a row-major [kRows][kCols] float block), row r times 2^e[r], split into a PairTile's rows,
// and 2^-e[r] into unscale[r], by one warp.
template <int kRows, int kCols>
__device__ void split_into(const cuflash::PairTile<kRows, kCols>& tile, float* unscale, const float* x, const int* e,
                           int lane) {
  for (int i = lane; i < kRows * kCols / 2; i += 32) {
    const int r = i / (kCols / 2), c = 2 * (i % (kCols / 2));
    const float scale = cuflash::pow2(e[r]);
    uint32_t hi, lo;
    cuflash::split_half2(x[r * kCols + c] * scale, x[r * kCols + c + 1] * scale, hi, lo);
    *reinterpret_cast<uint32_t*>(tile.halves().at(r, c)) = hi;
    *reinterpret_cast<uint32_t*>(tile.halves().at(r, kCols + c)) = lo;
  }
  for (int r = lane; r < kRows; r += 32) unscale[r] = cuflash::pow2(-e[r]);
}
template <int kCols>
__device__ void store_acc(const cuflash::WarpAcc<kCols>& acc, float* out, int lane) {
  using Acc = cuflash::WarpAcc<kCols>;
  for (int j = 0; j < Acc::kTiles; ++j)
    for (int e = 0; e < 4; ++e) out[Acc::row_of(e, lane) * kCols + Acc::col_of(j, e, lane)] = acc.v[j][e];
}

// out (16 x kN) = a (16 x kK) b^T (b: kN x kK): the Q K^T pattern, every row of both split at
// its own 2^e, the finished tile scaled back by its rows' and columns'.
template <int kK, int kN>
__global__ void pair_abt_kernel(const float* a, const float* b, const int* ea, const int* eb, float* out) {
  __shared__ alignas(16) cuflash::Fp32Pair a_rows[cuflash::PairTile<16, kK>::kElems];
  __shared__ alignas(16) cuflash::Fp32Pair b_rows[cuflash::PairTile<kN, kK>::kElems];
  __shared__ alignas(16) float a_unscale[16], b_unscale[kN];
  const cuflash::PairTile<16, kK> ta{a_rows};
  const cuflash::PairTile<kN, kK> tb{b_rows};
  const int lane = threadIdx.x;
  split_into(ta, a_unscale, a, ea, lane);
  split_into(tb, b_unscale, b, eb, lane);
  __syncwarp();
  cuflash::WarpAcc<kN> acc;
  acc.zero();
  cuflash::warp_gemm_abt<cuflash::Fp32Pair, kK, kN>(acc, ta, 0, tb, 0, lane);
  cuflash::scale_tile(acc, a_unscale, cuflash::ColumnUnscales{b_unscale, lane});
  store_acc(acc, out, lane);
}

// out (16 x kN) = p (16 x kK, an accumulator split in registers) v (kK x kN, a tile whose rows
// are split at their own 2^e, whose 2^-e are p's column factors): the P V pattern.
template <int kK, int kN>
__global__ void pair_rb_kernel(const float* p, const float* v, const int* ev, float* out) {
  __shared__ alignas(16) cuflash::Fp32Pair v_rows[cuflash::PairTile<kK, kN>::kElems];
  __shared__ alignas(16) float v_unscale[kK];
  const cuflash::PairTile<kK, kN> tv{v_rows};
  const int lane = threadIdx.x;
  split_into(tv, v_unscale, v, ev, lane);
  __syncwarp();
  using PAcc = cuflash::WarpAcc<kK>;
  PAcc pacc;
  for (int j = 0; j < PAcc::kTiles; ++j)
    for (int e = 0; e < 4; ++e) pacc.v[j][e] = p[PAcc::row_of(e, lane) * kK + PAcc::col_of(j, e, lane)];
  cuflash::WarpAcc<kN> acc;
  acc.zero();
  cuflash::warp_gemm_rb<cuflash::Fp32Pair, kK, kN>(acc, pacc, tv, 0, lane, cuflash::ColumnUnscales{v_unscale, lane});
  store_acc(acc, out, lane);
}

// rows x cols normal values, row r times 10^(draw in [-lo, hi]): every row at a scale of its own.
std::vector<float> random_rows(int rows, int cols, float lo, float hi, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> exponent(-lo, hi);
  std::vector<float> x(rows * cols);
  for (int r = 0; r < rows; ++r) {
    const float scale = std::pow(10.f, exponent(rng));
    for (int c = 0; c < cols; ++c) x[r * cols + c] = scale * normal(rng);
  }
  return x;
}
// Each row's exponent, as the pre-pass takes it (its largest finite |x|).
std::vector<int> row_exponents(const std::vector<float>& x, int rows, int cols) {
  std::vector<int> e(rows);
  for (int r = 0; r < rows; ++r) {
    float top = 0.f;
    for (int c = 0; c < cols; ++c) top = std::fmax(top, std::fabs(x[r * cols + c]));
    e[r] = cuflash::pair_exponent(bits_of(top));
  }
  return e;
}
template <class V>
V* to_device(const std::vector<V>& x) {
  V* d = nullptr;
  cudaMalloc(&d, x.size() * sizeof(V));
  cudaMemcpy(d, x.data(), x.size() * sizeof(V), cudaMemcpyHostToDevice);
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
  for (const auto& [lo, hi] : {std::pair{0.f, 0.f}, std::pair{12.f, 8.f}}) {
    SCOPED_TRACE("rows at 1e-" + std::to_string(lo) + " to 1e" + std::to_string(hi));
    const std::vector<float> a = random_rows(16, kK, lo, hi, rng);
    std::vector<float> b = random_rows(kN, kK, lo, hi, rng);
    constexpr int kGarbage = 5;  // a key row near 1e20 (garbage a mask hides): P is 0 on it below
    for (int c = 0; c < kK; ++c) b[kGarbage * kK + c] *= 1e20f / std::pow(10.f, hi);
    float *da = to_device(a), *db = to_device(b), *dout = nullptr;
    int *dea = to_device(row_exponents(a, 16, kK)), *deb = to_device(row_exponents(b, kN, kK));
    cudaMalloc(&dout, 16 * kN * sizeof(float));
    std::vector<float> got(16 * kN);
    pair_abt_kernel<kK, kN><<<1, 32>>>(da, db, dea, deb, dout);
    ASSERT_EQ(cudaMemcpy(got.data(), dout, got.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(product_mismatch(got, kN, kK, [&](int i, int t) { return a[i * kK + t]; },
                               [&](int t, int j) { return b[j * kK + t]; }),
              "")
        << "Q K^T";
    // P V: p of P's range (0 to 1, or a dropout factor's 1 / (1 - p) = 5, or all 0), v rows (b's,
    // as kK x kN) at scales of their own, the garbage ones (b's row 5: v's 10 and 11) where P is 0.
    const std::vector<float>& v = b;
    int* dev = to_device(row_exponents(v, kK, kN));
    for (const float bound : {1.f, 5.f, 0.f}) {  // 0: a tile the mask hides whole (its split scale 2^126)
      std::uniform_real_distribution<float> prob(0.f, bound);
      std::vector<float> p(16 * kK);
      for (float& x : p) x = bound > 0.f ? prob(rng) : 0.f;
      for (int i = 0; i < 16; ++i)
        for (const int key : {2 * kGarbage, 2 * kGarbage + 1}) p[i * kK + key] = 0.f;
      // Row 3 at 1e-7 of the tile's others (a rarely attended key's row of P^T): split at the
      // tile's scale, its rest is an fp16 subnormal, which lo's 2^11 keeps (unscaled it would miss
      // the 2^-20 bound by ~2^4).
      for (int key = 0; key < kK; ++key) p[3 * kK + key] *= 1e-7f;
      float* dp = to_device(p);
      pair_rb_kernel<kK, kN><<<1, 32>>>(dp, db, dev, dout);
      ASSERT_EQ(cudaMemcpy(got.data(), dout, got.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
      EXPECT_EQ(product_mismatch(got, kN, kK, [&](int i, int t) { return p[i * kK + t]; },
                                 [&](int t, int j) { return v[t * kN + j]; }),
                "")
          << "P V, P up to " << bound;
      cudaFree(dp);
    }
    for (void* ptr : {static_cast<void*>(da), static_cast<void*>(db), static_cast<void*>(dout),
                      static_cast<void*>(dea), static_cast<void*>(deb), static_cast<void*>(dev)})
      cudaFree(ptr);
  }
}

}  // namespace
