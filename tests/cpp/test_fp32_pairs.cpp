// float32 as fp16 pairs (csrc/cuda/fp32_pairs.h), on the host: the exponent the pre-pass scales
// each (batch, head) by puts its largest |x| in [2^14, 2^15) (fp16's top binade but one, so that
// hi cannot overflow and lo keeps 11 bits down to 2^-18 of it), wherever 2^e is a normal float
// (e <= 126: largest values from 2^-112; below, e stays 126 and the largest lands lower);
// pow2 is exact; and the scratch layout gives every input its own 16-byte aligned span.
#include <gtest/gtest.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
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

}  // namespace
