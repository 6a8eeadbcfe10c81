#include "flash_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace cuflash {
namespace {

constexpr int kKeyTile = 64;  // keys per online-softmax step

template <typename T>
const T* row_of(const void* base, const TensorStrides& s, int b, int h, int64_t row) {
  return static_cast<const T*>(base) + b * s.batch + h * s.head + row * s.row;
}
template <typename T>
T* row_of(void* base, const TensorStrides& s, int b, int h, int64_t row) {
  return static_cast<T*>(base) + b * s.batch + h * s.head + row * s.row;
}

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

// Keys [0, result) that query `row` sees.
int visible_keys(const MaskParams& mask, int row, int seqlen_k) {
  if (!mask.is_causal) return seqlen_k;
  return static_cast<int>(std::clamp<int64_t>(int64_t{row} + mask.causal_offset + 1, 0, seqlen_k));
}

}  // namespace

template <typename T>
void flash_fwd_cpu(const FlashFwdParams& p, int64_t bh_begin, int64_t bh_end) {
  const AttentionShape& sh = p.shape;
  const int D = sh.head_dim, group = sh.heads_q / sh.heads_kv;
  const T scale = static_cast<T>(p.scale), inf = std::numeric_limits<T>::infinity();
  std::vector<T> scores(kKeyTile), acc(D);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    const int b = static_cast<int>(bh / sh.heads_q), h = static_cast<int>(bh % sh.heads_q);
    T* lse = static_cast<T*>(p.lse) + bh * sh.seqlen_q;
    for (int i = 0; i < sh.seqlen_q; ++i) {
      const T* q = row_of<T>(p.q, p.q_strides, b, h, i);
      const int n_end = visible_keys(p.mask, i, sh.seqlen_k);
      T row_max = -inf, row_sum = 0;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int j0 = 0; j0 < n_end; j0 += kKeyTile) {
        const int count = std::min(kKeyTile, n_end - j0);
        T tile_max = row_max;
        for (int jj = 0; jj < count; ++jj) {
          scores[jj] = dot(q, row_of<T>(p.k, p.k_strides, b, h / group, j0 + jj), D) * scale;
          tile_max = std::fmax(tile_max, scores[jj]);
        }
        const T base = tile_max == -inf ? T(0) : tile_max;
        const T alpha = std::exp(row_max - base);
        row_sum *= alpha;
        for (T& a : acc) a *= alpha;
        for (int jj = 0; jj < count; ++jj) {
          const T prob = std::exp(scores[jj] - base);
          row_sum += prob;
          axpy(prob, row_of<T>(p.v, p.v_strides, b, h / group, j0 + jj), acc.data(), D);
        }
        row_max = tile_max;
      }
      const bool seen = row_sum > T(0);
      const T inv = seen ? T(1) / row_sum : T(0);
      T* out = row_of<T>(p.out, p.out_strides, b, h, i);
      for (int d = 0; d < D; ++d) out[d] = acc[d] * inv;
      lse[i] = seen ? row_max + std::log(row_sum) : -inf;
    }
  }
}

template <typename T>
void flash_bwd_cpu(const FlashBwdParams& p, int64_t bh_begin, int64_t bh_end) {
  const AttentionShape& sh = p.shape;
  const int D = sh.head_dim, group = sh.heads_q / sh.heads_kv;
  const T scale = static_cast<T>(p.scale), inf = std::numeric_limits<T>::infinity();
  std::vector<T> dq(D);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    const int b = static_cast<int>(bh / sh.heads_q), h = static_cast<int>(bh % sh.heads_q);
    const int hk = h / group;
    const T* lse = static_cast<const T*>(p.lse) + bh * sh.seqlen_q;
    const T* dlse = p.dlse ? static_cast<const T*>(p.dlse) + bh * sh.seqlen_q : nullptr;
    for (int j = 0; j < sh.seqlen_k; ++j) {
      std::fill_n(row_of<T>(p.dk, p.dk_strides, b, h, j), D, T(0));
      std::fill_n(row_of<T>(p.dv, p.dv_strides, b, h, j), D, T(0));
    }
    for (int i = 0; i < sh.seqlen_q; ++i) {
      std::fill(dq.begin(), dq.end(), T(0));
      const T* q = row_of<T>(p.q, p.q_strides, b, h, i);
      const T* dout = row_of<T>(p.dout, p.dout_strides, b, h, i);
      // A row that saw no key (lse = -inf) has output 0 and contributes nothing.
      const int n_end = lse[i] == -inf ? 0 : visible_keys(p.mask, i, sh.seqlen_k);
      const T delta = dot(dout, row_of<T>(p.out, p.out_strides, b, h, i), D) - (dlse ? dlse[i] : T(0));
      for (int j = 0; j < n_end; ++j) {
        const T* k = row_of<T>(p.k, p.k_strides, b, hk, j);
        const T* v = row_of<T>(p.v, p.v_strides, b, hk, j);
        const T prob = std::exp(dot(q, k, D) * scale - lse[i]);
        const T ds = prob * (dot(dout, v, D) - delta);
        axpy(prob, dout, row_of<T>(p.dv, p.dv_strides, b, h, j), D);
        axpy(ds * scale, q, row_of<T>(p.dk, p.dk_strides, b, h, j), D);
        axpy(ds, k, dq.data(), D);
      }
      T* dq_out = row_of<T>(p.dq, p.dq_strides, b, h, i);
      for (int d = 0; d < D; ++d) dq_out[d] = dq[d] * scale;
    }
  }
}

template void flash_fwd_cpu<float>(const FlashFwdParams&, int64_t, int64_t);
template void flash_fwd_cpu<double>(const FlashFwdParams&, int64_t, int64_t);
template void flash_bwd_cpu<float>(const FlashBwdParams&, int64_t, int64_t);
template void flash_bwd_cpu<double>(const FlashBwdParams&, int64_t, int64_t);

}  // namespace cuflash
