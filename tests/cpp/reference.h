// Plain attention on the CPU in double, and shared/TESTING.md's accuracy rule.
#pragma once
#include <vector>

namespace cuflash_test {

struct Problem {
  int batch = 1, heads_q = 1, heads_kv = 1, seqlen_q = 1, seqlen_k = 1, head_dim = 64;
  double scale = 0.125;
  bool causal = false, bottom_right = false;
  int window_left = -1, window_right = -1;
  std::vector<int> seqused_k;  // per sequence, the keys that take part (empty: all)

  // The keys sequence b uses (seqused_k clamped to [0, seqlen_k]).
  int used_keys(int b) const;
  // Whether query i of sequence b sees key j (the API's rule: flash_attention.h, AttentionConfig).
  bool visible(int b, int i, int j) const;
};

// Logical [batch, heads, seqlen, head_dim] tensors (lse: [batch, heads_q, seqlen_q]), dense.
struct Attention {
  std::vector<double> out, lse, dq, dk, dv;
};

// Applied to each intermediate result: no_rounding gives the float64 reference; rounding to the
// input dtype gives the `pt` baseline of TESTING.md (plain attention run in that dtype as
// PyTorch's ops run it: the scale applied to k; scores, probabilities, outputs and gradients
// rounded once each; sums and the softmax computed in float).
using Rounding = double (*)(double);
double no_rounding(double x);

// Forward and backward (gradients for `dout`). A query row that sees no key gets output 0,
// lse -inf and zero gradients.
Attention attention_reference(const Problem& p, const std::vector<double>& q, const std::vector<double>& k,
                              const std::vector<double>& v, const std::vector<double>& dout, Rounding round);

// max |a - b|, infinite if either holds a NaN where the other does not hold the same value.
double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b);
double max_abs(const std::vector<double>& a);
// 2 * max |(r + 0.3 - 0.3) - r| in the input dtype over r = ref's values and kFloorGrid values
// evenly spaced up to max|ref|: the error of one rounding at ref's magnitude (tests/reference.py's
// rounding_floor; over ref's values alone a result of a few elements can get a floor of 0).
constexpr int kFloorGrid = 256;
double rounding_floor(const std::vector<double>& ref, Rounding round);

}  // namespace cuflash_test
