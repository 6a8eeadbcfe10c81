#include "flash_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../attention_math.h"

namespace cuflash {
namespace {

constexpr int kKeyTile = 64;  // keys per online-softmax step

template <typename T>
T dot(const T* a, const T* b, int n) {
  T s = 0;
  for (int d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}
template <typename T>
void axpy(T alpha, const T* x, T* y, int n) {
  for (int d = 0; d < n; ++d) y[d] += alpha * x[d];
}

}  // namespace

template <typename T>
void flash_fwd_cpu(const FlashFwdParams& p, int64_t bh_begin, int64_t bh_end) {
  const AttentionShape& sh = p.shape;
  const int D = sh.head_dim, group = sh.heads_q / sh.heads_kv;
  const T inf = std::numeric_limits<T>::infinity();
  const bool dropout = p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};
  const T keep_scale = T(1) / (T(1) - static_cast<T>(p.dropout.p));
  std::vector<T> scores(kKeyTile), acc(D);
  T unused;
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    const int b = static_cast<int>(bh / sh.heads_q), h = static_cast<int>(bh % sh.heads_q), hk = h / group;
    const Sequence s = sequence_of(p, b);
    const ExactScore<T> score(p, b, h);
    T* lse = static_cast<T*>(p.lse) + stats_offset(p.stats_strides, s, b, h);
    for (int i = 0; i < s.seqlen_q; ++i) {
      const T* q = row_at<const T>(p.q, p.q_strides, s, true, b, h, i);
      const Range keys = visible_keys(p.mask, s, i, i + 1);
      T row_max = -inf, row_sum = 0;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int j0 = keys.begin; j0 < keys.end; j0 += kKeyTile) {
        const int count = std::min(kKeyTile, keys.end - j0);
        T tile_max = row_max;
        for (int jj = 0; jj < count; ++jj) {
          const T qk = dot(q, key_row_at<const T>(p, p.k, p.k_strides, s, b, hk, j0 + jj), D);
          scores[jj] = score(s, qk, i, j0 + jj, &unused);
          tile_max = std::fmax(tile_max, scores[jj]);
        }
        const T base = tile_max == -inf ? T(0) : tile_max;
        const T alpha = std::exp(row_max - base);
        row_sum *= alpha;
        for (T& a : acc) a *= alpha;
        for (int jj = 0; jj < count; ++jj) {
          const T prob = std::exp(scores[jj] - base);
          row_sum += prob;  // the softmax's denominator counts dropped probabilities too
          const int j = j0 + jj;
          const T weight = !dropout ? prob : rng.keep(b, h, sh.heads_q, i, j) ? prob * keep_scale : T(0);
          axpy(weight, key_row_at<const T>(p, p.v, p.v_strides, s, b, hk, j), acc.data(), D);
        }
        row_max = tile_max;
      }
      const bool seen = row_sum != T(0);  // NaN scores give a NaN sum: it propagates
      const T inv = seen ? T(1) / row_sum : T(0);
      T* out = row_at<T>(p.out, p.out_strides, s, true, b, h, i);
      for (int d = 0; d < D; ++d) out[d] = acc[d] * inv;
      lse[i] = seen ? row_max + std::log(row_sum) : -inf;
    }
  }
}

template <typename T>
void flash_bwd_cpu(const FlashBwdParams& p, int64_t bhk_begin, int64_t bhk_end) {
  const AttentionShape& sh = p.shape;
  const int D = sh.head_dim, group = sh.heads_q / sh.heads_kv;
  const T scale = static_cast<T>(p.scale), inf = std::numeric_limits<T>::infinity();
  const bool dropout = p.dropout.p > 0.0;
  const DropoutRng rng = dropout ? make_dropout_rng(p.dropout) : DropoutRng{};
  const T keep_scale = T(1) / (T(1) - static_cast<T>(p.dropout.p));
  std::vector<T> dq(D);
  for (int64_t bhk = bhk_begin; bhk < bhk_end; ++bhk) {
    const int b = static_cast<int>(bhk / sh.heads_kv), hk = static_cast<int>(bhk % sh.heads_kv);
    const Sequence s = sequence_of(p, b);
    for (int j = 0; j < s.seqlen_k; ++j) {
      std::fill_n(row_at<T>(p.dk, p.dk_strides, s, false, b, hk, j), D, T(0));
      std::fill_n(row_at<T>(p.dv, p.dv_strides, s, false, b, hk, j), D, T(0));
    }
    // dk and dv of a key/value head sum over the query heads of its group.
    for (int h = hk * group; h < (hk + 1) * group; ++h) {
      const ExactScore<T> score(p, b, h);
      const int64_t stats = stats_offset(p.stats_strides, s, b, h);
      const T* lse = static_cast<const T*>(p.lse) + stats;
      const T* dlse = p.dlse ? static_cast<const T*>(p.dlse) + stats : nullptr;
      for (int i = 0; i < s.seqlen_q; ++i) {
        std::fill(dq.begin(), dq.end(), T(0));
        const T* q = row_at<const T>(p.q, p.q_strides, s, true, b, h, i);
        const T* dout = row_at<const T>(p.dout, p.dout_strides, s, true, b, h, i);
        // A row that saw no key (lse = -inf) has output 0 and contributes nothing.
        const Range keys = lse[i] == -inf ? Range{0, 0} : visible_keys(p.mask, s, i, i + 1);
        const T delta = dot(dout, row_at<const T>(p.out, p.out_strides, s, true, b, h, i), D) - (dlse ? dlse[i] : T(0));
        T* dscores = p.dscores ? static_cast<T*>(p.dscores) + dscores_offset(sh, b, h, i) : nullptr;
        for (int j = keys.begin; j < keys.end; ++j) {
          const T* k = row_at<const T>(p.k, p.k_strides, s, false, b, hk, j);
          const T* v = row_at<const T>(p.v, p.v_strides, s, false, b, hk, j);
          T capped = 0;
          const T prob = std::exp(score(s, dot(q, k, D), i, j, &capped) - lse[i]);
          // With dropout, out = sum_j prob * z * v with z = keep / (1 - p): dv gets prob * z, and
          // the gradient reaching prob is z * (dout . v).
          const T z = !dropout ? T(1) : rng.keep(b, h, sh.heads_q, i, j) ? keep_scale : T(0);
          T ds = prob * (z * dot(dout, v, D) - delta);
          if (dscores) dscores[j] = ds;
          if (p.score.softcap > 0.0) ds *= T(1) - capped * capped;
          axpy(prob * z, dout, row_at<T>(p.dv, p.dv_strides, s, false, b, hk, j), D);
          axpy(ds * scale, q, row_at<T>(p.dk, p.dk_strides, s, false, b, hk, j), D);
          axpy(ds, k, dq.data(), D);
        }
        T* dq_out = row_at<T>(p.dq, p.dq_strides, s, true, b, h, i);
        for (int d = 0; d < D; ++d) dq_out[d] = dq[d] * scale;
      }
    }
  }
}

void dropout_keep_mask_cpu(const DropoutParams& d, int batch, int heads, int seqlen_q, int seqlen_k, bool* keep) {
  const DropoutRng rng = make_dropout_rng(d);
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < seqlen_q; ++i)
        for (int j = 0; j < seqlen_k; ++j) *keep++ = rng.keep(b, h, heads, i, j);
}

template void flash_fwd_cpu<float>(const FlashFwdParams&, int64_t, int64_t);
template void flash_fwd_cpu<double>(const FlashFwdParams&, int64_t, int64_t);
template void flash_bwd_cpu<float>(const FlashBwdParams&, int64_t, int64_t);
template void flash_bwd_cpu<double>(const FlashBwdParams&, int64_t, int64_t);

}  // namespace cuflash
