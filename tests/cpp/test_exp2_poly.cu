// The exponential by polynomial (csrc/cuda/mma_sm80.cuh's exp2_poly, for the share of a tile's
// exponentials taken off the special function unit), on the host: its relative error
// over every exponent the softmax meets against exp2 in double, exact powers of two at integers,
// 0 below 2^-126 and for -inf, NaN kept.
#include <gtest/gtest.h>
#include <cmath>
#include <limits>
#include "../../csrc/cuda/mma_sm80.cuh"

namespace {

TEST(Exp2Poly, RelativeErrorBelow3e6) {
  double worst = 0.0, worst_at = 0.0;
  for (int i = 0; i <= 2000000; ++i) {
    const float x = -126.f * static_cast<float>(i) / 2000000.f;  // the softmax's exponents: <= 0
    const double want = std::exp2(static_cast<double>(x)), got = cuflash::exp2_poly(x);
    const double err = std::fabs(got - want) / want;
    if (err > worst) worst = err, worst_at = x;
  }
  EXPECT_LT(worst, 3e-6) << "at " << worst_at;
  // A little above 0: the folded exponent's rounding can leave the row's maximum at +2^-17.
  EXPECT_NEAR(cuflash::exp2_poly(0x1p-17f), std::exp2(0x1p-17), 3e-6);
}

TEST(Exp2Poly, IntegersAreExactPowersOfTwo) {
  for (int n = -126; n <= 0; ++n)
    EXPECT_EQ(cuflash::exp2_poly(static_cast<float>(n)), std::ldexp(1.f, n)) << n;
}

TEST(Exp2Poly, UnderflowInfinityAndNaN) {
  EXPECT_EQ(cuflash::exp2_poly(-127.f), 0.f);
  EXPECT_EQ(cuflash::exp2_poly(-1000.f), 0.f);
  EXPECT_EQ(cuflash::exp2_poly(-std::numeric_limits<float>::infinity()), 0.f);
  EXPECT_TRUE(std::isnan(cuflash::exp2_poly(std::numeric_limits<float>::quiet_NaN())));
}

}  // namespace
