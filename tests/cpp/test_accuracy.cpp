// Forward and backward through the C++ API against the float64 CPU reference (shared/TESTING.md's
// accuracy rule), for float, half and bfloat16, in the simple and the extended form. Needs a
// CUDA device: every test skips without one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuflash/flash_attention.h"
#include "reference.h"
#include "test_utils.h"

namespace cuflash_test {
namespace {

using cuflash::FlashAttentionBackwardArgs;
using cuflash::FlashAttentionForwardArgs;
using cuflash::Strides;

struct Case {
  DataType dtype = DataType::FLOAT16;
  Problem p;
  bool simple_form = false;     // the pointer overloads (needs seqlen_q = seqlen_k, equal heads, top-left)
  bool bshd = false;            // [batch, seqlen, heads, head_dim] storage
  bool user_workspace = false;  // a workspace passed in, and a non-default stream
};

std::string name_of(const Case& c) {
  const Problem& p = c.p;
  std::string n = std::string(dtype_name(c.dtype)) + (c.simple_form ? "_simple" : "_ext") + "_b" +
                  std::to_string(p.batch) + "_h" + std::to_string(p.heads_q) + "x" + std::to_string(p.heads_kv) +
                  "_q" + std::to_string(p.seqlen_q) + "_k" + std::to_string(p.seqlen_k) + "_d" +
                  std::to_string(p.head_dim);
  if (p.causal) n += p.bottom_right ? "_causal_br" : "_causal";
  if (p.window_left >= 0 || p.window_right >= 0)
    n += "_window" + std::to_string(int64_t{p.window_left} + 1) + "_" + std::to_string(int64_t{p.window_right} + 1);
  if (!p.seqused_k.empty()) {
    n += "_used";
    for (int u : p.seqused_k) n += "_" + std::to_string(u);
  }
  if (c.bshd) n += "_bshd";
  if (c.user_workspace) n += "_workspace_stream";
  return n;
}

void PrintTo(const Case& c, std::ostream* os) { *os << name_of(c); }

Problem problem(int batch, int heads_q, int heads_kv, int seqlen_q, int seqlen_k, int head_dim) {
  Problem p;
  p.batch = batch, p.heads_q = heads_q, p.heads_kv = heads_kv;
  p.seqlen_q = seqlen_q, p.seqlen_k = seqlen_k, p.head_dim = head_dim;
  p.scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  return p;
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (DataType dtype : {DataType::FLOAT32, DataType::FLOAT16, DataType::BFLOAT16}) {
    // The simple form: seqlens on and off the 64-row tiles, head dims 64 and 128.
    for (bool causal : {false, true}) {
      for (auto [n, d] : {std::pair{1, 64}, {113, 64}, {256, 64}, {77, 128}, {200, 128}}) {
        Case c{dtype, problem(2, 3, 3, n, n, d), true};
        c.p.causal = causal;
        cases.push_back(c);
      }
    }
    // A head dim inside a bucket: any for float32, a multiple of 8 for the tensor cores.
    cases.push_back({dtype, problem(1, 2, 2, 130, 130, dtype == DataType::FLOAT32 ? 59 : 40), true});

    // The extended form.
    auto add = [&](Problem p, auto&&... tweak) {
      Case c{dtype, p};
      (tweak(c), ...);
      cases.push_back(c);
    };
    auto causal = [](Case& c) { c.p.causal = true; };
    auto bottom_right = [](Case& c) { c.p.bottom_right = true; };
    add(problem(1, 2, 2, 113, 203, 64), causal);
    add(problem(2, 2, 2, 239, 128, 64), causal, bottom_right);  // 111 query rows see no key
    add(problem(2, 2, 2, 128, 217, 128), causal, bottom_right);
    add(problem(2, 4, 2, 150, 150, 64), causal);  // grouped-query
    add(problem(1, 4, 1, 64, 200, 128));          // multi-query
    add(problem(2, 3, 3, 97, 130, 128), [](Case& c) { c.bshd = true; });
    add(problem(1, 2, 2, 200, 230, 64), [](Case& c) { c.p.window_left = 17, c.p.window_right = 5; });
    add(problem(1, 2, 2, 190, 140, 64), causal, bottom_right, [](Case& c) { c.p.window_left = 32; });
    add(problem(1, 2, 2, 190, 140, 64), bottom_right, [](Case& c) {  // as wide as int goes: unbounded
      c.p.window_left = c.p.window_right = std::numeric_limits<int>::max();
    });
    add(problem(2, 2, 2, 300, 300, 64), causal, [](Case& c) { c.user_workspace = true; });
    // seqused_k: no keys, some, and more than seqlen_k (clamped) for a sequence; a decoding step.
    add(problem(3, 2, 2, 40, 200, 64), causal, bottom_right, [](Case& c) { c.p.seqused_k = {0, 77, 500}; });
    add(problem(2, 4, 2, 1, 300, 128), [](Case& c) { c.p.seqused_k = {1, 256}; });
    add(problem(1, 2, 2, 50, 0, 64));  // no keys: output 0, lse -inf, no attention launch
    add(problem(1, 2, 2, 0, 50, 64));  // no queries: dk = dv = 0
    // shared/TESTING.md's (seqlen_q, seqlen_k) list, without a mask and bottom-right causal (rows
    // with no key where seqlen_q > seqlen_k), grouped-query.
    for (auto [nq, nk] : {std::pair{1, 1}, {1, 239}, {3, 799}, {113, 203}, {127, 513}, {128, 217}, {256, 512},
                          {512, 256}, {1023, 1024}, {1024, 1023}, {2048, 2048}, {239, 1}, {799, 3}}) {
      add(problem(1, 2, 1, nq, nk, 64));
      add(problem(1, 2, 1, nq, nk, 64), causal, bottom_right);
    }
  }
  return cases;
}

// Logical [B, H, N, D] values in double <-> storage of T with strides s.
Strides strides_of(const Case& c, int heads, int seqlen) {
  return c.bshd ? cuflash::bshd_strides(heads, seqlen, c.p.head_dim)
                : cuflash::bhsd_strides(heads, seqlen, c.p.head_dim);
}

template <typename T>
std::vector<T> to_storage(const std::vector<double>& logical, const Strides& s, int batch, int heads, int seqlen,
                          int head_dim) {
  std::vector<T> out(logical.size());
  size_t i = 0;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int n = 0; n < seqlen; ++n)
        for (int d = 0; d < head_dim; ++d)
          out[b * s.batch + h * s.head + n * s.row + d] = Element<T>::from(logical[i++]);
  return out;
}

template <typename T>
std::vector<double> to_logical(const std::vector<T>& storage, const Strides& s, int batch, int heads, int seqlen,
                               int head_dim) {
  std::vector<double> out(storage.size());
  size_t i = 0;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int n = 0; n < seqlen; ++n)
        for (int d = 0; d < head_dim; ++d) out[i++] = Element<T>::to(storage[b * s.batch + h * s.head + n * s.row + d]);
  return out;
}

// Random normal values, already representable in T (so the reference sees exactly the inputs).
template <typename T>
std::vector<double> random_tensor(std::mt19937_64& rng, size_t n) {
  std::normal_distribution<double> normal;
  std::vector<double> x(n);
  for (double& e : x) e = round_to<T>(normal(rng));
  return x;
}

template <typename T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// TESTING.md: fp16/bf16 within factor * (the pt baseline's error) + one rounding; fp32 within
// 1e-5 of the largest reference value, or where the reference is exactly zero of zero_ref_scale
// (tests/reference.py's accuracy_bound: dq and dk cancel exactly when every row sees one key, and
// fp32 on tensor cores computes dP and delta by different routes; the check's largest gradient).
void expect_close(const char* name, const std::vector<double>& got, const std::vector<double>& ref,
                  const std::vector<double>& pt, DataType dtype, double factor, Rounding round,
                  double zero_ref_scale = 0) {
  const double err = max_abs_diff(got, ref);
  const double magnitude = max_abs(ref) > 0 ? max_abs(ref) : zero_ref_scale;
  const double bound = dtype == DataType::FLOAT32 ? 1e-5 * std::max(magnitude, 1e-30)
                                                  : factor * max_abs_diff(pt, ref) + rounding_floor(ref, round);
  EXPECT_LE(err, bound) << name << ": max error " << err << " above the bound " << bound;
}

void expect_lse_close(const std::vector<double>& got, const std::vector<double>& ref, DataType dtype) {
  ASSERT_EQ(got.size(), ref.size());
  const double tol = dtype == DataType::FLOAT32 ? 1e-5 : 1e-3;
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i])) {
      ASSERT_EQ(got[i], ref[i]) << "lse[" << i << "]: a row that sees no key must have lse -inf";
      continue;
    }
    ASSERT_TRUE(std::isfinite(got[i])) << "lse[" << i << "] = " << got[i];
    worst = std::max(worst, std::abs(got[i] - ref[i]) / std::max(std::abs(ref[i]), 1.0));
  }
  EXPECT_LE(worst, tol) << "lse: relative error";
}

class Accuracy : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { CUFLASH_REQUIRE_CUDA(); }
};

template <typename T>
void run_case(const Case& c) {
  const Problem& p = c.p;
  if (!cuflash::flash_attention_supports(c.dtype, p.head_dim))
    GTEST_SKIP() << "head_dim " << p.head_dim << " is not compiled into this build (CUFLASH_HEAD_DIMS)";
  const int B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, Nq = p.seqlen_q, Nk = p.seqlen_k, D = p.head_dim;
  const size_t q_elems = size_t(B) * Hq * Nq * D, k_elems = size_t(B) * Hkv * Nk * D;
  std::mt19937_64 rng(std::hash<std::string>{}(name_of(c)));
  const std::vector<double> q = random_tensor<T>(rng, q_elems), k = random_tensor<T>(rng, k_elems),
                            v = random_tensor<T>(rng, k_elems), dout = random_tensor<T>(rng, q_elems);
  const Strides qs = strides_of(c, Hq, Nq), ks = strides_of(c, Hkv, Nk);
  const std::vector<T> q_host = to_storage<T>(q, qs, B, Hq, Nq, D), k_host = to_storage<T>(k, ks, B, Hkv, Nk, D),
                       v_host = to_storage<T>(v, ks, B, Hkv, Nk, D), do_host = to_storage<T>(dout, qs, B, Hq, Nq, D);
  const DeviceBuffer q_dev = upload(q_host), k_dev = upload(k_host), v_dev = upload(v_host), do_dev = upload(do_host);
  const DeviceBuffer o_dev(q_elems * sizeof(T)), dq_dev(q_elems * sizeof(T)), dk_dev(k_elems * sizeof(T)),
      dv_dev(k_elems * sizeof(T)), lse_dev(size_t(B) * Hq * Nq * sizeof(float));
  for (const DeviceBuffer* out : {&o_dev, &dq_dev, &dk_dev, &dv_dev, &lse_dev}) out->poison();
  const DeviceBuffer seqused_dev = p.seqused_k.empty() ? DeviceBuffer() : upload(p.seqused_k);

  cudaStream_t stream = nullptr;
  DeviceBuffer workspace;
  FlashAttentionError fwd_err, bwd_err;
  if (c.simple_form) {
    const float scale = static_cast<float>(p.scale);
    fwd_err = cuflash::flash_attention_forward(q_dev.as<const T>(), k_dev.as<const T>(), v_dev.as<const T>(),
                                               o_dev.as<T>(), lse_dev.as<float>(), B, Hq, Nq, D, scale, p.causal);
    bwd_err = cuflash::flash_attention_backward(q_dev.as<const T>(), k_dev.as<const T>(), v_dev.as<const T>(),
                                                o_dev.as<const T>(), lse_dev.as<const float>(), do_dev.as<const T>(),
                                                dq_dev.as<T>(), dk_dev.as<T>(), dv_dev.as<T>(), B, Hq, Nq, D, scale,
                                                p.causal);
  } else {
    FlashAttentionForwardArgs f;
    f.dtype = c.dtype;
    f.batch_size = B, f.num_heads_q = Hq, f.num_heads_kv = Hkv;
    f.seqlen_q = Nq, f.seqlen_k = Nk, f.head_dim = D;
    f.scale = static_cast<float>(p.scale);
    f.causal = p.causal, f.causal_bottom_right = p.bottom_right;
    f.window_left = p.window_left, f.window_right = p.window_right;
    f.seqused_k = p.seqused_k.empty() ? nullptr : seqused_dev.as<const int>();
    f.q = q_dev.get(), f.k = k_dev.get(), f.v = v_dev.get(), f.o = o_dev.get(), f.lse = lse_dev.as<float>();
    f.q_strides = f.o_strides = qs;
    f.k_strides = f.v_strides = ks;
    FlashAttentionBackwardArgs g;
    static_cast<cuflash::AttentionConfig&>(g) = f;
    g.q = f.q, g.k = f.k, g.v = f.v, g.o = f.o, g.lse = f.lse, g.d_o = do_dev.get();
    g.dq = dq_dev.get(), g.dk = dk_dev.get(), g.dv = dv_dev.get();
    g.q_strides = g.o_strides = g.d_o_strides = g.dq_strides = qs;
    g.k_strides = g.v_strides = g.dk_strides = g.dv_strides = ks;
    if (c.user_workspace) {
      ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
      workspace = DeviceBuffer(cuflash::flash_attention_backward_workspace_size(g));
      workspace.poison();
      g.workspace = workspace.get(), g.workspace_bytes = workspace.bytes();
    }
    fwd_err = cuflash::flash_attention_forward(f, stream);
    bwd_err = cuflash::flash_attention_backward(g, stream);
  }
  ASSERT_EQ(fwd_err, FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  ASSERT_EQ(bwd_err, FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (stream) cudaStreamDestroy(stream);

  // Nothing passed in was modified.
  EXPECT_TRUE(same_bytes(download<T>(q_dev), q_host)) << "q was modified";
  EXPECT_TRUE(same_bytes(download<T>(k_dev), k_host)) << "k was modified";
  EXPECT_TRUE(same_bytes(download<T>(v_dev), v_host)) << "v was modified";
  EXPECT_TRUE(same_bytes(download<T>(do_dev), do_host)) << "dO was modified";

  const Attention ref = attention_reference(p, q, k, v, dout, no_rounding);
  const bool low_precision = c.dtype != DataType::FLOAT32;
  const Attention pt = low_precision ? attention_reference(p, q, k, v, dout, round_to<T>) : ref;
  const std::vector<float> lse_host = download<float>(lse_dev);
  expect_close("out", to_logical(download<T>(o_dev), qs, B, Hq, Nq, D), ref.out, pt.out, c.dtype, 2, round_to<T>);
  expect_lse_close(std::vector<double>(lse_host.begin(), lse_host.end()), ref.lse, c.dtype);
  const double gradient_scale = std::max({max_abs(ref.dq), max_abs(ref.dk), max_abs(ref.dv)});
  expect_close("dq", to_logical(download<T>(dq_dev), qs, B, Hq, Nq, D), ref.dq, pt.dq, c.dtype, 3, round_to<T>,
               gradient_scale);
  expect_close("dk", to_logical(download<T>(dk_dev), ks, B, Hkv, Nk, D), ref.dk, pt.dk, c.dtype, 3, round_to<T>,
               gradient_scale);
  expect_close("dv", to_logical(download<T>(dv_dev), ks, B, Hkv, Nk, D), ref.dv, pt.dv, c.dtype, 3, round_to<T>,
               gradient_scale);
}

TEST_P(Accuracy, MatchesFloat64Reference) {
  const Case& c = GetParam();
  switch (c.dtype) {
    case DataType::FLOAT32: return run_case<float>(c);
    case DataType::FLOAT16: return run_case<half>(c);
    case DataType::BFLOAT16: return run_case<__nv_bfloat16>(c);
  }
}

INSTANTIATE_TEST_SUITE_P(CApi, Accuracy, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) { return name_of(info.param); });

// ---- A paged KV cache and split-KV (the forward's) ---------------------------------------------

// The keys of each sequence dealt into pages of 256 rows in a shuffled order (block_table), the
// used lengths partial pages; the forward unsplit, split 3 ways, and chosen (num_splits 0),
// against the float64 reference over the logical (unpaged) keys.
TEST(PagedCache, ForwardMatchesFloat64Reference) {
  CUFLASH_REQUIRE_CUDA();
  using T = __nv_bfloat16;
  constexpr int kPage = 256;
  Problem p = problem(2, 4, 2, 3, 2 * kPage, 64);
  p.causal = p.bottom_right = true;
  p.seqused_k = {kPage + 30, 17};
  if (!cuflash::flash_attention_supports(DataType::BFLOAT16, p.head_dim)) GTEST_SKIP() << "head_dim not built";
  const int B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, Nq = p.seqlen_q, Nk = p.seqlen_k, D = p.head_dim;
  const int pages_each = Nk / kPage, num_pages = B * pages_each + 1;  // one page no sequence names
  std::mt19937_64 rng(11);
  const std::vector<double> q = random_tensor<T>(rng, size_t(B) * Hq * Nq * D),
                            k = random_tensor<T>(rng, size_t(B) * Hkv * Nk * D),
                            v = random_tensor<T>(rng, size_t(B) * Hkv * Nk * D);
  std::vector<int> table(size_t(B) * pages_each);
  for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int>((i * 3 + 1) % num_pages);
  // Pages [num_pages][Hkv][kPage][D]: logical key j of sequence b at page table[b][j / kPage].
  const Strides page_strides = cuflash::bhsd_strides(Hkv, kPage, D);
  std::vector<T> k_pages(size_t(num_pages) * Hkv * kPage * D), v_pages(k_pages.size());
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h)
      for (int j = 0; j < Nk; ++j)
        for (int d = 0; d < D; ++d) {
          const size_t logical = ((size_t(b) * Hkv + h) * Nk + j) * D + d;
          const size_t paged = size_t(table[size_t(b) * pages_each + j / kPage]) * page_strides.batch +
                               size_t(h) * page_strides.head + size_t(j % kPage) * page_strides.row + d;
          k_pages[paged] = Element<T>::from(k[logical]);
          v_pages[paged] = Element<T>::from(v[logical]);
        }
  const Strides qs = cuflash::bhsd_strides(Hq, Nq, D);
  const DeviceBuffer q_dev = upload(to_storage<T>(q, qs, B, Hq, Nq, D)), k_dev = upload(k_pages),
                     v_dev = upload(v_pages), table_dev = upload(table), used_dev = upload(p.seqused_k);
  const std::vector<double> no_dout(q.size(), 0.0);
  const Attention ref = attention_reference(p, q, k, v, no_dout, no_rounding);
  const Attention pt = attention_reference(p, q, k, v, no_dout, round_to<T>);
  for (int splits : {1, 3, 0}) {
    SCOPED_TRACE("num_splits " + std::to_string(splits));
    const DeviceBuffer o_dev(q.size() * sizeof(T)), lse_dev(size_t(B) * Hq * Nq * sizeof(float));
    o_dev.poison(), lse_dev.poison();
    FlashAttentionForwardArgs f;
    f.dtype = DataType::BFLOAT16;
    f.batch_size = B, f.num_heads_q = Hq, f.num_heads_kv = Hkv, f.seqlen_q = Nq, f.seqlen_k = Nk, f.head_dim = D;
    f.scale = static_cast<float>(p.scale);
    f.causal = f.causal_bottom_right = true;
    f.seqused_k = used_dev.as<const int>();
    f.block_table = table_dev.as<const int>(), f.block_table_stride = pages_each;
    f.page_size = kPage, f.num_pages = num_pages, f.num_splits = splits;
    f.q = q_dev.get(), f.k = k_dev.get(), f.v = v_dev.get(), f.o = o_dev.get(), f.lse = lse_dev.as<float>();
    f.q_strides = f.o_strides = qs;
    f.k_strides = f.v_strides = page_strides;
    ASSERT_EQ(cuflash::flash_attention_forward(f), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_close("out", to_logical(download<T>(o_dev), qs, B, Hq, Nq, D), ref.out, pt.out, DataType::BFLOAT16, 2,
                 round_to<T>);
    const std::vector<float> lse = download<float>(lse_dev);
    expect_lse_close(std::vector<double>(lse.begin(), lse.end()), ref.lse, DataType::BFLOAT16);
  }
}

// ---- Properties of the launches: determinism and CUDA graphs ----------------------------------

// One causal bfloat16 problem on the device (by default 2 x 4 heads of 257 x 64: three key
// blocks adding to each query block's dQ), run through the simple form.
struct DeviceProblem {
  using T = __nv_bfloat16;
  const int B, H, N, D;
  const size_t elems = size_t(B) * H * N * D;
  DeviceBuffer q, k, v, dout, o{elems * sizeof(T)}, lse{size_t(B) * H * N * sizeof(float)}, dq{elems * sizeof(T)},
      dk{elems * sizeof(T)}, dv{elems * sizeof(T)};

  explicit DeviceProblem(int batch = 2, int heads = 4, int seqlen = 257, int head_dim = 64)
      : B(batch), H(heads), N(seqlen), D(head_dim) {
    std::mt19937_64 rng(7);
    const Strides s = cuflash::bhsd_strides(H, N, D);
    auto make = [&] { return upload(to_storage<T>(random_tensor<T>(rng, elems), s, B, H, N, D)); };
    q = make(), k = make(), v = make(), dout = make();
  }
  FlashAttentionError forward(cudaStream_t stream) {
    return cuflash::flash_attention_forward(q.as<const T>(), k.as<const T>(), v.as<const T>(), o.as<T>(),
                                            lse.as<float>(), B, H, N, D, 0.125f, true, stream);
  }
  FlashAttentionError backward(cudaStream_t stream) {
    return cuflash::flash_attention_backward(q.as<const T>(), k.as<const T>(), v.as<const T>(), o.as<const T>(),
                                             lse.as<const float>(), dout.as<const T>(), dq.as<T>(), dk.as<T>(),
                                             dv.as<T>(), B, H, N, D, 0.125f, true, stream);
  }
  std::vector<std::vector<uint16_t>> results() const {  // bit patterns (lse's floats as 16-bit halves)
    return {download<uint16_t>(o), download<uint16_t>(lse), download<uint16_t>(dq), download<uint16_t>(dk),
            download<uint16_t>(dv)};
  }
};

TEST(CApiLaunch, BackwardIsDeterministic) {
  CUFLASH_REQUIRE_CUDA();
  DeviceProblem run;
  ASSERT_EQ(run.forward(nullptr), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  ASSERT_EQ(run.backward(nullptr), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  const auto first = run.results();
  for (int repeat = 0; repeat < 50; ++repeat) {  // TESTING.md: 50 repeats
    run.dq.poison(), run.dk.poison(), run.dv.poison();
    ASSERT_EQ(run.backward(nullptr), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
    ASSERT_EQ(run.results(), first) << "repeat " << repeat << " differs";
  }
}

// TESTING.md's race test: a large batch (every SM busy, many CTAs adding to each dQ block in
// turn), forward and backward 250 times, every output bitwise equal to the first run's.
TEST(CApiLaunch, LargeBatchRaceTest) {
  CUFLASH_REQUIRE_CUDA();
  DeviceProblem run(32, 8, 640, 64);
  ASSERT_EQ(run.forward(nullptr), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  ASSERT_EQ(run.backward(nullptr), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  const auto first = run.results();
  for (int repeat = 0; repeat < 250; ++repeat) {
    ASSERT_EQ(run.forward(nullptr), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
    ASSERT_EQ(run.backward(nullptr), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
    ASSERT_EQ(run.results(), first) << "repeat " << repeat << " differs";
  }
}

// Forward and backward (with its stream-ordered workspace allocation) captured into a CUDA
// graph and replayed give exactly the eager results.
TEST(CApiLaunch, CudaGraphReplayMatchesEager) {
  CUFLASH_REQUIRE_CUDA();
  DeviceProblem run;
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(run.forward(stream), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  ASSERT_EQ(run.backward(stream), FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const auto eager = run.results();
  for (const DeviceBuffer* out : {&run.o, &run.lse, &run.dq, &run.dk, &run.dv}) out->poison();

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  const FlashAttentionError fwd = run.forward(stream), bwd = run.backward(stream);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_EQ(fwd, FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  ASSERT_EQ(bwd, FlashAttentionError::SUCCESS) << cuflash::get_last_error_message();
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int replay = 0; replay < 3; ++replay) ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(run.results(), eager);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace cuflash_test
