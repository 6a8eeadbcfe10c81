#include "reference.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace cuflash_test {

int Problem::used_keys(int b) const {
  return seqused_k.empty() ? seqlen_k : std::min(std::max(seqused_k[b], 0), seqlen_k);
}

bool Problem::visible(int b, int i, int j) const {
  const int used = used_keys(b);
  if (j >= used) return false;
  const int diagonal = bottom_right ? used - seqlen_q : 0;
  const int rel = j - i - diagonal;
  const int right = causal ? 0 : window_right;
  return (right < 0 || rel <= right) && (window_left < 0 || -rel <= window_left);
}

double no_rounding(double x) { return x; }

namespace {

// Acc: the type sums and the softmax are computed in (double for the reference, float for the
// baseline, as PyTorch's half-precision matmuls and softmax accumulate in float).
template <typename Acc>
Attention attention(const Problem& p, const std::vector<double>& q, const std::vector<double>& k,
                    const std::vector<double>& v, const std::vector<double>& dout, Rounding R) {
  const int D = p.head_dim, Nq = p.seqlen_q, Nk = p.seqlen_k, group = p.heads_q / p.heads_kv;
  Attention r;
  r.out.assign(size_t(p.batch) * p.heads_q * Nq * D, 0.0);
  r.dq.assign(r.out.size(), 0.0);
  r.lse.assign(size_t(p.batch) * p.heads_q * Nq, -std::numeric_limits<double>::infinity());
  r.dk.assign(size_t(p.batch) * p.heads_kv * Nk * D, 0.0);
  r.dv.assign(r.dk.size(), 0.0);
  std::vector<double> k_scaled(size_t(Nk) * D), s(Nk), prob(Nk), dp(Nk), ds(Nk);
  std::vector<Acc> dk_head(size_t(Nk) * D), dv_head(size_t(Nk) * D);

  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.heads_q; ++h) {
      const int hk = h / group;
      const size_t q0 = (size_t(b) * p.heads_q + h) * Nq, k0 = (size_t(b) * p.heads_kv + hk) * Nk;
      const double* K = &k[k0 * D];
      const double* V = &v[k0 * D];
      for (size_t e = 0; e < k_scaled.size(); ++e) k_scaled[e] = R(K[e] * p.scale);
      std::fill(dk_head.begin(), dk_head.end(), Acc(0));
      std::fill(dv_head.begin(), dv_head.end(), Acc(0));

      for (int i = 0; i < Nq; ++i) {
        const double* Qi = &q[(q0 + i) * D];
        const double* dOi = &dout[(q0 + i) * D];
        double m = -std::numeric_limits<double>::infinity();
        for (int j = 0; j < Nk; ++j) {
          if (!p.visible(b, i, j)) continue;
          Acc dot = 0;
          for (int d = 0; d < D; ++d) dot += Acc(Qi[d]) * Acc(k_scaled[size_t(j) * D + d]);
          s[j] = R(dot);
          m = std::max(m, s[j]);
        }
        if (m == -std::numeric_limits<double>::infinity()) continue;  // sees no key: zeros, lse -inf
        Acc sum = 0;
        for (int j = 0; j < Nk; ++j) sum += p.visible(b, i, j) ? std::exp(Acc(s[j] - m)) : Acc(0);
        r.lse[q0 + i] = m + std::log(double(sum));
        for (int j = 0; j < Nk; ++j) prob[j] = p.visible(b, i, j) ? R(std::exp(Acc(s[j] - m)) / sum) : 0.0;
        double* Oi = &r.out[(q0 + i) * D];
        for (int d = 0; d < D; ++d) {
          Acc acc = 0;
          for (int j = 0; j < Nk; ++j) acc += Acc(prob[j]) * Acc(V[size_t(j) * D + d]);
          Oi[d] = R(acc);
        }
        // Backward of out = prob @ v and prob = softmax(q @ (k * scale)^T).
        Acc prob_dot_dp = 0;
        for (int j = 0; j < Nk; ++j) {
          Acc acc = 0;
          for (int d = 0; d < D; ++d) acc += Acc(dOi[d]) * Acc(V[size_t(j) * D + d]);
          dp[j] = R(acc);
          prob_dot_dp += Acc(prob[j]) * Acc(dp[j]);
        }
        for (int j = 0; j < Nk; ++j) ds[j] = R(Acc(prob[j]) * (Acc(dp[j]) - prob_dot_dp));
        double* dQi = &r.dq[(q0 + i) * D];
        for (int d = 0; d < D; ++d) {
          Acc acc = 0;
          for (int j = 0; j < Nk; ++j) acc += Acc(ds[j]) * Acc(k_scaled[size_t(j) * D + d]);
          dQi[d] = R(acc);
        }
        for (int j = 0; j < Nk; ++j)
          for (int d = 0; d < D; ++d) {
            dv_head[size_t(j) * D + d] += Acc(prob[j]) * Acc(dOi[d]);
            dk_head[size_t(j) * D + d] += Acc(ds[j]) * Acc(Qi[d]);
          }
      }
      // The heads of a group add their (rounded) gradients into their key head.
      for (size_t e = 0; e < dk_head.size(); ++e) {
        r.dk[k0 * D + e] += R(R(dk_head[e]) * p.scale);
        r.dv[k0 * D + e] += R(dv_head[e]);
      }
    }
  }
  if (group > 1)
    for (size_t e = 0; e < r.dk.size(); ++e) r.dk[e] = R(r.dk[e]), r.dv[e] = R(r.dv[e]);
  return r;
}

}  // namespace

Attention attention_reference(const Problem& p, const std::vector<double>& q, const std::vector<double>& k,
                              const std::vector<double>& v, const std::vector<double>& dout, Rounding round) {
  return round == no_rounding ? attention<double>(p, q, k, v, dout, round) : attention<float>(p, q, k, v, dout, round);
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    if (a[i] == b[i]) continue;  // equal infinities too
    const double d = std::abs(a[i] - b[i]);
    if (std::isnan(d)) return std::numeric_limits<double>::infinity();
    m = std::max(m, d);
  }
  return a.size() == b.size() ? m : std::numeric_limits<double>::infinity();
}

double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::abs(x));
  return m;
}

double rounding_floor(const std::vector<double>& ref, Rounding R) {
  double m = 0, top = 0;
  auto add = [&](double x) {
    const double r = R(x);
    m = std::max(m, std::abs(R(R(r + 0.3) - 0.3) - r));
  };
  for (double x : ref) {
    add(x);
    if (std::isfinite(x)) top = std::max(top, std::abs(x));
  }
  if (ref.empty()) return 0;
  for (int i = 0; i < kFloorGrid; ++i) add(top * i / (kFloorGrid - 1));
  return 2 * m;
}

}  // namespace cuflash_test
