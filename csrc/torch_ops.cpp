// The one layer that touches ATen: op schemas, argument validation, output allocation,
// and the translation of tensors into the params struct the kernels take.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "cpu/flash_cpu.h"
#include "cuda/flash_launch.h"
#include "cuda/run_switches.h"
#include "attention_math.h"
#include "flash_params.h"

// `import cuflash_attn._C` loads this library, which registers the ops below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace cuflash {
namespace {

using at::Tensor;
constexpr int64_t kMaxHeadDim = 256;

// Numbers in messages go through std::to_string, not an ostream: on some toolchains (seen with
// g++ 13 against torch 2.11's wheel, Ubuntu 24.04's Python) the ostream inserters instantiated in
// this library crash: a segfault inside the library's own std::ostream::_M_insert<long> (H100 host,
// 2026-12-07; benchmarks/NOTES.md).
// tests/test_packaging.py holds every message argument here to this.
std::string num(int64_t x) { return std::to_string(x); }
std::string num(double x) { return std::to_string(x); }
std::string shape(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: return DType::kFloat64;
  }
}

// The logsumexp (and the backward's row statistics) are float32, float64 for float64 inputs.
at::ScalarType stats_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The options fwd and bwd share, as the schemas spell them.
struct Options {
  std::optional<double> scale;
  bool is_causal = false, bottom_right = false;
  int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
  std::optional<Tensor> alibi_slopes;
  double dropout_p = 0.0;
  std::optional<Tensor> rng_state;
  std::optional<Tensor> cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  std::optional<Tensor> attn_mask;
  std::optional<Tensor> seqused_k;
  std::optional<Tensor> block_table;
  int64_t num_splits = 1;
  int64_t rows_per_query = 1;  // not an argument: group_packing's (MaskParams::rows_per_query)
  // Packed queries (cu_seqlens_q); their keys are packed too (cu_seqlens_k) or paged.
  bool varlen() const { return cu_seqlens_q.has_value(); }
  bool paged() const { return block_table.has_value(); }
};

void check_attention_tensor(const Tensor& t, const char* name, bool varlen) {
  TORCH_CHECK_TYPE(t.defined(), "cuflash_attn: ", name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(t.device().is_cpu() || t.device().is_cuda(),
                   "cuflash_attn: ", name, " must be a CUDA or CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), "cuflash_attn: ", name,
                   " must be a CUDA or CPU tensor of dtype float16, bfloat16, float32 or float64, got ",
                   t.scalar_type());
  if (varlen) {
    TORCH_CHECK_VALUE(t.dim() == 3, "cuflash_attn: with cu_seqlens, ", name,
                      " must have 3 dimensions [total_tokens, heads, head_dim], got ", num(t.dim()), " (shape ",
                      shape(t.sizes()), ")");
  } else {
    TORCH_CHECK_VALUE(t.dim() == 4, "cuflash_attn: ", name,
                      " must have 4 dimensions [batch, heads, seqlen, head_dim], got ", num(t.dim()),
                      " (shape ", shape(t.sizes()), ")");
  }
}

void check_same_kind(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "cuflash_attn: ", name,
                   " must have the same dtype as q (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "cuflash_attn: ", name,
                    " must be on the same device as q (", q.device(), "), got ", t.device());
}

// An int32 [batch + 1] offsets tensor; on the CPU its values are checked too (on CUDA that would
// cost a synchronization: the kernels clamp every sequence to the tensors instead).
void check_cu_seqlens(const Tensor& cu, const char* name, const Tensor& q, int64_t total, int64_t max_seqlen) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "cuflash_attn: ", name, " must have dtype int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.device() == q.device(), "cuflash_attn: ", name, " must be on the same device as q (",
                    q.device(), "), got ", cu.device());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, "cuflash_attn: ", name,
                    " must have shape [batch + 1], got ", shape(cu.sizes()));
  if (!cu.is_cpu()) return;
  const Tensor c = cu.contiguous();
  const int* v = c.data_ptr<int>();
  TORCH_CHECK_VALUE(v[0] >= 0, "cuflash_attn: ", name, "[0] must be >= 0, got ", num(int64_t{v[0]}));
  for (int64_t b = 0; b + 1 < c.size(0); ++b) {
    TORCH_CHECK_VALUE(v[b + 1] >= v[b], "cuflash_attn: ", name, " must be non-decreasing, got ",
                      num(int64_t{v[b]}), " then ", num(int64_t{v[b + 1]}), " at index ", num(b));
    TORCH_CHECK_VALUE(max_seqlen <= 0 || v[b + 1] - v[b] <= max_seqlen, "cuflash_attn: sequence ", num(b),
                      " of ", name, " has length ", num(int64_t{v[b + 1] - v[b]}), ", above the max_seqlen given (",
                      num(max_seqlen), ")");
  }
  TORCH_CHECK_VALUE(v[c.size(0) - 1] <= total, "cuflash_attn: ", name, " ends at ", num(int64_t{v[c.size(0) - 1]}),
                    ", past the ", num(total), " rows of the packed tensor");
}

// A paged cache's block table, int32 [batch, pages a sequence], against k ([num_pages, heads,
// page_size, head_dim]); returns the keys a sequence can have (the table's width in pages). On
// the CPU the pages each sequence uses (all of its row, or the first seqused_k keys' worth) are
// checked to be pages of k; on CUDA that would cost a synchronization: the kernels clamp them.
int check_block_table(const Tensor& table, const Tensor& q, const Tensor& k, int64_t batch,
                      const std::optional<Tensor>& seqused_k) {
  TORCH_CHECK_TYPE(table.scalar_type() == at::kInt, "cuflash_attn: block_table must have dtype int32, got ",
                   table.scalar_type());
  TORCH_CHECK_VALUE(table.device() == q.device(), "cuflash_attn: block_table must be on the same device as q (",
                    q.device(), "), got ", table.device());
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == batch, "cuflash_attn: block_table must have shape ",
                    "[batch, pages a sequence] = [", num(batch), ", ...], got ", shape(table.sizes()));
  const int64_t page_size = k.size(2), num_pages = k.size(0);
  TORCH_CHECK_VALUE(page_size > 0 && page_size % kPageSizeMultiple == 0, "cuflash_attn: with block_table, k's ",
                    "page_size (its dimension 2) must be a positive multiple of ", num(int64_t{kPageSizeMultiple}),
                    ", got ", num(page_size));
  const int64_t keys = table.size(1) * page_size;
  TORCH_CHECK_VALUE(keys <= std::numeric_limits<int>::max(), "cuflash_attn: block_table's pages hold ", num(keys),
                    " keys a sequence, more than 2^31 - 1");
  // (seqused_k was checked by check_qkv; it is on q's device.)
  if (table.is_cpu()) {
    const Tensor t = table.contiguous();
    const Tensor used = seqused_k ? seqused_k->contiguous() : Tensor();
    for (int64_t b = 0; b < batch; ++b) {
      int64_t n = keys;
      if (used.defined()) n = std::clamp<int64_t>(used.data_ptr<int>()[b], 0, keys);
      for (int64_t i = 0; i < (n + page_size - 1) / page_size; ++i) {
        const int page = t.data_ptr<int>()[b * t.size(1) + i];
        TORCH_CHECK_VALUE(page >= 0 && page < num_pages, "cuflash_attn: block_table[", num(b), "][", num(i), "] = ",
                          num(int64_t{page}), " is not a page of k (it has ", num(num_pages), ")");
      }
    }
  }
  return static_cast<int>(keys);
}

AttentionShape check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const Options& o) {
  const std::string bad_switch = run_switch_error();
  TORCH_CHECK_VALUE(bad_switch.empty(), "cuflash_attn: ", bad_switch);
  const bool varlen = o.varlen(), paged = o.paged();
  if (paged) {
    TORCH_CHECK_VALUE(!o.cu_seqlens_k.has_value(), "cuflash_attn: with block_table, cu_seqlens_k cannot be given: ",
                      "each sequence's keys start at its first page, and seqused_k says how many it has");
    TORCH_CHECK_VALUE(o.max_seqlen_k == 0, "cuflash_attn: with block_table, max_seqlen_k must be 0 (the table's ",
                      "width sets the keys), got ", num(o.max_seqlen_k));
    for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}})
      TORCH_CHECK_VALUE(!t->defined() || t->dim() == 4, "cuflash_attn: with block_table, ", name,
                        " must have 4 dimensions [num_pages, heads, page_size, head_dim], got ", num(t->dim()),
                        " (shape ", shape(t->sizes()), ")");
  } else {
    TORCH_CHECK_VALUE(o.cu_seqlens_q.has_value() == o.cu_seqlens_k.has_value(),
                      "cuflash_attn: cu_seqlens_q and cu_seqlens_k must be given together");
  }
  const bool packed_kv = varlen && !paged;
  check_attention_tensor(q, "q", varlen);
  check_attention_tensor(k, "k", packed_kv);
  check_attention_tensor(v, "v", packed_kv);
  check_same_kind(k, "k", q);
  check_same_kind(v, "v", q);
  // Padded inputs are [batch, heads, seqlen, head_dim]; packed ones [total_tokens, heads, head_dim];
  // a paged cache's [num_pages, heads, page_size, head_dim].
  const int64_t hd = 1, rows = varlen ? 0 : 2, k_rows = packed_kv ? 0 : 2;
  if (paged) {
    TORCH_CHECK_VALUE(k.size(0) == v.size(0), "cuflash_attn: k and v must have the same num_pages, got ",
                      num(k.size(0)), " and ", num(v.size(0)));
  } else if (!varlen) {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                      "cuflash_attn: q, k and v must have the same batch size, got ", num(q.size(0)), ", ",
                      num(k.size(0)), " and ", num(v.size(0)));
  }
  TORCH_CHECK_VALUE(k.size(hd) == v.size(hd), "cuflash_attn: k and v must have the same number of heads, got ",
                    num(k.size(hd)), " and ", num(v.size(hd)));
  TORCH_CHECK_VALUE(k.size(k_rows) == v.size(k_rows), "cuflash_attn: k and v must have the same ",
                    packed_kv ? "total_tokens" : paged ? "page_size" : "seqlen", ", got ", num(k.size(k_rows)),
                    " and ", num(v.size(k_rows)));
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1) && v.size(-1) == q.size(-1),
                    "cuflash_attn: q, k and v must have the same head_dim, got ", num(q.size(-1)), ", ",
                    num(k.size(-1)), " and ", num(v.size(-1)));
  const int64_t heads_q = q.size(hd), heads_kv = k.size(hd);
  TORCH_CHECK_VALUE(heads_kv > 0 ? heads_q % heads_kv == 0 : heads_q == 0,
                    "cuflash_attn: the heads of q (", num(heads_q), ") must be a multiple of the heads of k and v (",
                    num(heads_kv), ")");
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= kMaxHeadDim, "cuflash_attn: head_dim must be in [1, ",
                    num(kMaxHeadDim), "], got ", num(head_dim));
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(q.size(rows) <= kMaxInt && k.size(k_rows) <= kMaxInt && k.size(0) <= kMaxInt, "cuflash_attn: ",
                    varlen ? "total_tokens" : "seqlen", " must be below 2^31");

  AttentionShape sh;
  sh.heads_q = static_cast<int>(heads_q);
  sh.heads_kv = static_cast<int>(heads_kv);
  sh.head_dim = static_cast<int>(head_dim);
  if (varlen) {
    const int64_t total_q = q.size(0);
    TORCH_CHECK_VALUE(o.max_seqlen_q >= 0 && o.max_seqlen_k >= 0,
                      "cuflash_attn: max_seqlen_q and max_seqlen_k must be >= 0 (0: not known), got ",
                      num(o.max_seqlen_q), " and ", num(o.max_seqlen_k));
    check_cu_seqlens(*o.cu_seqlens_q, "cu_seqlens_q", q, total_q, o.max_seqlen_q);
    sh.batch = static_cast<int>(o.cu_seqlens_q->size(0) - 1);
    // The grid covers max_seqlen rows; without one, the packed length bounds every sequence.
    sh.seqlen_q = static_cast<int>(o.max_seqlen_q > 0 ? std::min(o.max_seqlen_q, total_q) : total_q);
  } else {
    sh.batch = static_cast<int>(q.size(0));
    sh.seqlen_q = static_cast<int>(q.size(2));
  }
  if (o.seqused_k) {
    const Tensor& u = *o.seqused_k;
    TORCH_CHECK_TYPE(u.scalar_type() == at::kInt, "cuflash_attn: seqused_k must have dtype int32, got ",
                     u.scalar_type());
    TORCH_CHECK_VALUE(u.dim() == 1 && u.size(0) == sh.batch, "cuflash_attn: seqused_k must have shape [batch] = [",
                      num(int64_t{sh.batch}), "], got ", shape(u.sizes()));
    TORCH_CHECK_VALUE(u.device() == q.device(), "cuflash_attn: seqused_k must be on the same device as q (",
                      q.device(), "), got ", u.device());
  }
  if (paged) {
    sh.seqlen_k = check_block_table(*o.block_table, q, k, sh.batch, o.seqused_k);
  } else if (varlen) {
    const int64_t total_k = k.size(0);
    check_cu_seqlens(*o.cu_seqlens_k, "cu_seqlens_k", q, total_k, o.max_seqlen_k);
    TORCH_CHECK_VALUE(o.cu_seqlens_q->size(0) == o.cu_seqlens_k->size(0),
                      "cuflash_attn: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got ",
                      num(o.cu_seqlens_q->size(0)), " and ", num(o.cu_seqlens_k->size(0)));
    sh.seqlen_k = static_cast<int>(o.max_seqlen_k > 0 ? std::min(o.max_seqlen_k, total_k) : total_k);
  } else {
    sh.seqlen_k = static_cast<int>(k.size(2));
  }
  if (q.is_cuda()) {
    // The grid is (query blocks, heads, batch).
    TORCH_CHECK_VALUE(sh.batch <= 65535 && heads_q <= 65535,
                      "cuflash_attn: batch and heads must be at most 65535 on CUDA, got ", num(int64_t{sh.batch}),
                      " and ", num(heads_q));
  }
  return sh;
}

double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  if (!scale) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  TORCH_CHECK_VALUE(std::isfinite(*scale), "cuflash_attn: scale must be a finite number, got ", num(*scale));
  return *scale;
}

MaskParams make_mask(const Options& o, const AttentionShape& sh) {
  TORCH_CHECK_VALUE(o.window_left >= -1 && o.window_right >= -1,
                    "cuflash_attn: window_left and window_right must be >= -1 (-1: unbounded), got ",
                    num(o.window_left), " and ", num(o.window_right));
  MaskParams m = make_mask_params(o.bottom_right, o.is_causal, o.window_left, o.window_right,
                                  sh.seqlen_q / o.rows_per_query, sh.seqlen_k);  // queries, not rows
  m.rows_per_query = static_cast<int>(o.rows_per_query);
  return m;
}

void check_dropout_p(double p) {
  TORCH_CHECK_VALUE(std::isfinite(p) && p >= 0.0 && p < 1.0, "cuflash_attn: dropout_p must be in [0, 1), got ",
                    num(p));
}
void check_rng_state(const Tensor& r) {
  TORCH_CHECK_TYPE(r.scalar_type() == at::kLong, "cuflash_attn: rng_state must have dtype int64, got ",
                   r.scalar_type());
  TORCH_CHECK_VALUE(r.numel() == 2, "cuflash_attn: rng_state must hold 2 values [seed, offset], got shape ",
                    shape(r.sizes()));
}

// Validates the score and dropout options and fills them in; returns the tensors the params
// point into (they must outlive the launch).
std::vector<Tensor> fill_features(AttentionParams& p, const Options& o, const Tensor& q, const Tensor& k) {
  std::vector<Tensor> keep;
  p.mask = make_mask(o, p.shape);
  TORCH_CHECK_VALUE(std::isfinite(o.softcap) && o.softcap >= 0.0,
                    "cuflash_attn: softcap must be a finite number >= 0 (0: off), got ", num(o.softcap));
  p.score.softcap = o.softcap;
  if (o.alibi_slopes) {
    const Tensor& a = *o.alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "cuflash_attn: alibi_slopes must have dtype float32, got ",
                     a.scalar_type());
    TORCH_CHECK_VALUE(a.device() == q.device(), "cuflash_attn: alibi_slopes must be on the same device as q (",
                      q.device(), "), got ", a.device());
    const int64_t heads = p.shape.heads_q, batch = p.shape.batch;
    TORCH_CHECK_VALUE((a.dim() == 1 && a.size(0) == heads) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == heads),
                      "cuflash_attn: alibi_slopes must have shape [heads] = [", num(heads),
                      "] or [batch, heads] = [", num(batch), ", ", num(heads), "], got ", shape(a.sizes()));
    keep.push_back(a.contiguous());
    p.score.alibi_slopes = keep.back().data_ptr<float>();
    p.score.alibi_batch_stride = a.dim() == 2 ? heads : 0;
  }
  check_dropout_p(o.dropout_p);
  if (o.dropout_p > 0.0) {
    TORCH_CHECK_VALUE(o.rng_state.has_value(), "cuflash_attn: dropout_p > 0 needs rng_state ([seed, offset])");
    const Tensor& r = *o.rng_state;
    check_rng_state(r);
    TORCH_CHECK_VALUE(r.device() == q.device(), "cuflash_attn: rng_state must be on the same device as q (",
                      q.device(), "), got ", r.device());
    keep.push_back(r.contiguous());
    p.dropout.p = o.dropout_p;
    p.dropout.rng_state = keep.back().data_ptr<int64_t>();
  }
  if (o.varlen()) {
    keep.push_back(o.cu_seqlens_q->contiguous());
    p.varlen.cu_seqlens_q = keep.back().data_ptr<int>();
    p.varlen.total_q = static_cast<int>(q.size(0));
  }
  if (o.cu_seqlens_k) {
    keep.push_back(o.cu_seqlens_k->contiguous());
    p.varlen.cu_seqlens_k = keep.back().data_ptr<int>();
    p.varlen.total_k = static_cast<int>(k.size(0));
  }
  if (o.seqused_k) {  // checked by check_qkv
    keep.push_back(o.seqused_k->contiguous());
    p.varlen.seqused_k = keep.back().data_ptr<int>();
  }
  if (o.paged()) {  // its shape was checked by check_qkv
    keep.push_back(o.block_table->contiguous());
    p.paged.block_table = keep.back().data_ptr<int>();
    p.paged.table_stride = o.block_table->size(1);
    p.paged.page_size = static_cast<int>(k.size(2));
    p.paged.num_pages = static_cast<int>(k.size(0));
  }
  return keep;
}

// Outputs take the input's layout when its last dimension is contiguous (so a
// [batch, seqlen, heads, head_dim] view gives an output of the same layout), else contiguous.
// The fake in cuflash_attn/ops.py applies the same rule.
Tensor empty_like_input(const Tensor& t) {
  return t.stride(-1) == 1 ? at::empty_like(t) : at::empty(t.sizes(), t.options());
}

// Padded [B, H, N, D] or packed [total, H, D] (batch stride 0: sequences start at cu_seqlens).
TensorStrides strides_of(const Tensor& t) {
  if (t.dim() == 3) return {0, t.stride(1), t.stride(0)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// lse (and delta): [batch, heads, seqlen_q], or [heads, total_q] for packed inputs.
std::vector<int64_t> stats_sizes(const Tensor& q, bool varlen) {
  if (varlen) return {q.size(1), q.size(0)};
  return {q.size(0), q.size(1), q.size(2)};
}
Tensor empty_stats(const Tensor& q, bool varlen) {
  return at::empty(stats_sizes(q, varlen), q.options().dtype(stats_dtype(q.scalar_type())));
}
StatsStrides stats_strides_of(const Tensor& stats, bool varlen) {
  if (varlen) return {0, stats.size(1)};
  return {stats.size(1) * stats.size(2), stats.size(2)};
}

// float32 as fp16 pairs' scratch (fp32_pair_scratch_bytes) on like's device, set in p and to be
// kept alive until the kernels have run; where the device has no memory left for it, none: the
// 3xTF32 kernels, which need none, take the call (as the C API's do).
template <class Params>
Tensor fp32_pair_scratch_for(Params& p, const Tensor& like) {
  const int64_t bytes = fp32_pair_scratch_bytes(p);
  if (bytes <= 0) return {};
  try {
    Tensor scratch = at::empty({bytes}, like.options().dtype(at::kByte));
    p.fp32_pair_scratch = scratch.data_ptr();
    return scratch;
  } catch (const c10::OutOfMemoryError&) {
    return {};
  }
}

// Tensors as a kernel family can read or write them. The tensor-core kernels (CUDA float16,
// bfloat16 and float32) move 16-byte rows, so they need 16-byte aligned rows and a head_dim
// padded to a multiple of 8 (float32 keeps that layout for the CUDA-core kernels too, which
// CUFLASH_FP32 or the device's shared memory can pick at launch); the CUDA float64 and CPU
// kernels need a contiguous last dimension. Anything else is copied (and
// CPU float16/bfloat16 is computed in float32).
struct KernelLayout {
  at::ScalarType dtype;
  int64_t head_dim;
  bool tensor_cores;
  // The type the kernels take a float attn_mask in and sum the backward's gradients in: dtype on
  // CUDA; on the CPU, which reads 16-bit rows itself, float (double for double).
  at::ScalarType sums;

  bool accepts(const Tensor& t) const {
    if (t.scalar_type() != dtype || t.size(-1) != head_dim || t.stride(-1) != 1) return false;
    if (!tensor_cores) return true;
    const int64_t elem = t.element_size();
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
    for (int64_t d = 0; d + 1 < t.dim(); ++d)
      if ((t.stride(d) * elem) % 16 != 0) return false;
    return true;
  }
  Tensor input(const Tensor& t) const {
    if (accepts(t)) return t;
    const Tensor c = t.to(dtype);
    if (c.size(-1) != head_dim) return at::constant_pad_nd(c, {0, head_dim - c.size(-1)}, 0);
    if (!c.is_same(t) && accepts(c)) return c;
    return c.clone(at::MemoryFormat::Contiguous);
  }
  // Where the kernel writes an output that belongs in `dst`: dst itself, or a staging tensor
  // that finish() copies back.
  Tensor output(const Tensor& dst) const {
    if (accepts(dst)) return dst;
    auto sizes = dst.sizes().vec();
    sizes.back() = head_dim;
    return at::empty(sizes, dst.options().dtype(dtype));
  }
  // Where the kernel sums an output (the backward's gradients): output(dst), or staging in `sums`.
  Tensor sums_output(const Tensor& dst) const {
    return sums == dtype ? output(dst) : at::empty(dst.sizes(), dst.options().dtype(sums));
  }
  static void finish(const Tensor& staged, Tensor& dst) {
    if (!staged.is_same(dst)) dst.copy_(staged.narrow(-1, 0, dst.size(-1)));
  }
};

// The CPU kernels read every dtype's rows as they are (float16 and bfloat16 converted a tile at a
// time, so that nothing is converted whole: a KV cache at every call).
KernelLayout layout_for(const Tensor& q) {
  const at::ScalarType t = q.scalar_type();
  const int64_t d = q.size(-1);
  if (!q.is_cuda()) return {t, d, false, t == at::kDouble ? at::kDouble : at::kFloat};
  const bool tc = t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
  return {t, tc ? (d + 7) / 8 * 8 : d, tc, t};
}

// The CPU kernels on torch's threads, in T = layout.sums: work(T* partials, begin, end) over
// `items` work items, then, where the work came in parts (split-KV, the backward's parts of a
// pair), merge(partials, begin, end) over `merge_items` once every part is done (partial_elems of
// T of partial results between them).
template <class Work, class Merge>
void run_cpu_kernels(const Tensor& q, const KernelLayout& layout, int64_t partial_elems, int64_t items,
                     int64_t merge_items, Work work, Merge merge) {
  const Tensor partials = at::empty({partial_elems}, q.options().dtype(layout.sums));
  auto run = [&](auto* partial) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) { work(partial, begin, end); });
    if (merge_items > 0)
      at::parallel_for(0, merge_items, 1, [&](int64_t begin, int64_t end) { merge(partial, begin, end); });
  };
  if (layout.sums == at::kDouble) run(partials.data_ptr<double>());
  else run(partials.data_ptr<float>());
}

int padded_head_dim_bucket(const Tensor& q, int64_t padded_head_dim) {
  const int bucket = cuda_head_dim_bucket(to_dtype(q.scalar_type()), static_cast<int>(padded_head_dim));
  TORCH_CHECK_NOT_IMPLEMENTED(bucket > 0, "cuflash_attn: head_dim ", num(q.size(-1)), " for ", q.scalar_type(),
                              " was not compiled into this build (see CUFLASH_HEAD_DIMS)");
  return bucket;
}

void check_cuda(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "cuflash_attn: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// attn_mask: boolean, or q's dtype (as torch's SDPA requires), broadcastable to
// [batch, heads_q, seqlen_q, seqlen_k]. The kernels read it through broadcast strides; only a
// float mask whose dtype the kernels do not compute in (16-bit ones on the CPU) is converted.
void fill_attn_mask(AttentionParams& p, const Options& o, const KernelLayout& layout, const Tensor& q,
                    std::vector<Tensor>& keep) {
  if (!o.attn_mask) return;
  const Tensor& m = *o.attn_mask;
  const bool is_bool = m.scalar_type() == at::kBool;
  TORCH_CHECK_TYPE(is_bool || m.scalar_type() == q.scalar_type(), "cuflash_attn: attn_mask must be boolean or have ",
                   "q's dtype (", q.scalar_type(), "), got ", m.scalar_type());
  TORCH_CHECK_VALUE(m.device() == q.device(), "cuflash_attn: attn_mask must be on the same device as q (",
                    q.device(), "), got ", m.device());
  TORCH_CHECK_VALUE(!o.varlen(), "cuflash_attn: attn_mask is not supported with cu_seqlens (packed sequences)");
  const AttentionShape& sh = p.shape;
  const std::vector<int64_t> full = {sh.batch, sh.heads_q, sh.seqlen_q, sh.seqlen_k};
  bool broadcasts = m.dim() <= 4;
  for (int64_t d = 1; broadcasts && d <= m.dim(); ++d)
    broadcasts = m.size(-d) == 1 || m.size(-d) == full[4 - d];
  TORCH_CHECK_VALUE(broadcasts, "cuflash_attn: attn_mask must broadcast to [batch, heads_q, seqlen_q, seqlen_k] = ",
                    shape(full), ", got shape ", shape(m.sizes()));
  keep.push_back((is_bool ? m : m.to(layout.sums)).expand(full));
  const Tensor& e = keep.back();
  p.score.attn_mask = {e.data_ptr(), is_bool, e.stride(0), e.stride(1), e.stride(2), e.stride(3)};
}

// Fills what fwd and bwd share: shape, features, q/k/v.
std::vector<Tensor> fill_common(AttentionParams& p, AttentionShape sh, const Options& o, const KernelLayout& layout,
                                const Tensor& q, const Tensor& k, const Tensor& qk, const Tensor& kk, const Tensor& vk,
                                const Tensor& stats) {
  p.dtype = to_dtype(layout.dtype);
  p.scale = resolve_scale(o.scale, sh.head_dim);
  sh.head_dim = static_cast<int>(layout.head_dim);
  p.shape = sh;
  std::vector<Tensor> keep = fill_features(p, o, q, k);
  fill_attn_mask(p, o, layout, q, keep);
  p.q = qk.data_ptr();
  p.k = kk.data_ptr();
  p.v = vk.data_ptr();
  p.q_strides = strides_of(qk);
  p.k_strides = strides_of(kk);
  p.v_strides = strides_of(vk);
  p.stats_strides = stats_strides_of(stats, o.varlen());
  return keep;
}

// Grouped-query heads as rows of their KV head (CUFLASH_PACK_GQA, run_switches.h): the G query
// heads of a KV head become G rows of one head a query, so that one CTA reads its KV head once
// for all of them instead of G CTAs reading it each; on padded batches where nothing depends on
// the query's head (no ALiBi, attn_mask, dropout). On the CPU by default where a head's queries
// fill less than one of the kernels' 32-row blocks (decoding steps: the block's K and V tiles
// are then read once for the group) and the packed blocks' rounds over the threads, split-KV
// sharing out their keys where num_splits lets it, cost no more than the unpacked ones'
// (benchmarks/NOTES.md, thirty-first and thirty-second sessions: 2 threads, 32 query heads on 8
// KV heads over 4096 keys, 1.3x at one token, 1.8x at four).
enum class GroupPacking { kNone, kOneQuery, kRows };
GroupPacking group_packing(const Tensor& q, const Tensor& k, const Options& o) {
  if (o.varlen() || q.dim() != 4 || k.dim() != 4 || k.size(1) == 0 || q.size(1) <= k.size(1) ||
      q.size(1) % k.size(1) != 0 || o.alibi_slopes || o.attn_mask || o.dropout_p != 0.0)
    return GroupPacking::kNone;
  const PackGqaSwitch mode = pack_gqa_switch();  // (read only for grouped heads: every forward asks)
  if (mode == PackGqaSwitch::kNever) return GroupPacking::kNone;
  if (!q.is_cuda() && mode != PackGqaSwitch::kAlways) {
    if (q.size(2) >= kCpuBlockRows) return GroupPacking::kNone;
    // Fewer packed blocks leave threads idle unless split-KV shares their keys out: packed where
    // the rounds of work the threads take, blocks split as they would be, cost no more
    // (flash_fwd_cpu_block_cost; a block split in n costs 1/n a split).
    const int threads = at::get_num_threads();
    const int64_t rows = q.size(2) * (q.size(1) / k.size(1)), key_tiles = (k.size(2) + kCpuKeyTile - 1) / kCpuKeyTile;
    auto time = [&](int64_t heads, int64_t block_rows) {
      const int64_t blocks = q.size(0) * heads * ((block_rows + kCpuBlockRows - 1) / kCpuBlockRows);
      const int splits = flash_fwd_cpu_split_count(blocks, key_tiles, threads, o.num_splits);
      const int64_t rounds = (blocks * splits + threads - 1) / threads;
      const int cost_rows = static_cast<int>(std::min<int64_t>(block_rows, kCpuBlockRows));
      return static_cast<double>(rounds) * flash_fwd_cpu_block_cost(cost_rows) / splits;
    };
    if (time(k.size(1), rows) > time(q.size(1), q.size(2))) return GroupPacking::kNone;
  }
  // One query a sequence that sees every key (no window; causal only aligned bottom-right):
  // FlashAttention-2's swap, a view, no mask.
  const bool sees_every_key = o.window_left < 0 && (o.bottom_right || (!o.is_causal && o.window_right < 0));
  if (q.size(2) == 1 && sees_every_key) return GroupPacking::kOneQuery;
  // Several queries (FlashAttention-3's PackGQA): rows r = i * G + g of copies of q and out, the
  // mask taking query r / G (MaskParams::rows_per_query). By default where a head's queries would
  // leave its 128-row query tiles mostly empty and the group's rows fill them better (FA3's
  // rule), up to two tiles of rows: a step of a few tokens then reads each KV head once, not G
  // times (4 tokens, 4096 keys: 170 -> 65 us; 64 tokens 170 -> 119), while 100 tokens and more
  // measured slower packed (benchmarks/NOTES.md, "Decoding several tokens").
  if (q.size(2) == 0) return GroupPacking::kNone;
  if (mode == PackGqaSwitch::kAlways || !q.is_cuda()) return GroupPacking::kRows;
  constexpr int64_t kTileRows = 128;
  const int64_t queries = q.size(2), rows = queries * (q.size(1) / k.size(1));
  const auto tile_fill = [](int64_t n) {
    return static_cast<double>(n) / static_cast<double>((n + kTileRows - 1) / kTileRows * kTileRows);
  };
  return rows <= 2 * kTileRows && tile_fill(queries) < 0.9 * tile_fill(rows) ? GroupPacking::kRows
                                                                            : GroupPacking::kNone;
}

std::tuple<Tensor, Tensor> fwd_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Options& o,
                                    unsigned long long* tile_counters) {
  const GroupPacking packing =
      tile_counters == nullptr && q.defined() && k.defined() ? group_packing(q, k, o) : GroupPacking::kNone;
  if (packing != GroupPacking::kNone) {
    make_mask(o, check_qkv(q, k, v, o));  // the arguments as given, windows included
    const int64_t batch = q.size(0), heads_kv = k.size(1), group = q.size(1) / heads_kv;
    const int64_t queries = q.size(2), head_dim = q.size(3);
    if (packing == GroupPacking::kOneQuery) {
      Options rows = o;  // every key is seen: no mask
      rows.is_causal = false;
      rows.window_left = rows.window_right = -1;
      auto [out, lse] = fwd_impl(q.reshape({batch, heads_kv, group, head_dim}), k, v, rows, nullptr);
      // Not views (reshape's would be views of tensors made here, which autograd refuses to let
      // the caller modify in place): the same memory, as new tensors.
      return {at::_unsafe_view(out, q.sizes()), at::_unsafe_view(lse, {batch, q.size(1), 1})};
    }
    Options rows = o;
    rows.rows_per_query = group;
    TORCH_CHECK_VALUE(queries * group <= std::numeric_limits<int>::max(), "cuflash_attn: ", num(queries),
                      " queries of ", num(group), " grouped heads are more rows than 2^31 - 1");
    // q [B, Hkv * G, N, D] -> rows [B, Hkv, N * G, D] (a copy: i and g are not one stride).
    const Tensor q_rows = q.reshape({batch, heads_kv, group, queries, head_dim})
                              .transpose(2, 3)
                              .reshape({batch, heads_kv, queries * group, head_dim});
    auto [out_rows, lse_rows] = fwd_impl(q_rows, k, v, rows, nullptr);
    Tensor out = empty_like_input(q);
    Tensor lse = empty_stats(q, false);
    out.view({batch, heads_kv, group, queries, head_dim})
        .copy_(out_rows.reshape({batch, heads_kv, queries, group, head_dim}).transpose(2, 3));
    lse.view({batch, heads_kv, group, queries})
        .copy_(lse_rows.reshape({batch, heads_kv, queries, group}).transpose(2, 3));
    return {out, lse};
  }
  const AttentionShape sh = check_qkv(q, k, v, o);
  Tensor out = empty_like_input(q);
  Tensor lse = empty_stats(q, o.varlen());
  const KernelLayout layout = layout_for(q);
  const Tensor qk = layout.input(q), kk = layout.input(k), vk = layout.input(v);
  FlashFwdParams p;
  const std::vector<Tensor> keep = fill_common(p, sh, o, layout, q, k, qk, kk, vk, lse);
  if (q.is_cuda()) padded_head_dim_bucket(q, layout.head_dim);  // before any early return
  if (out.numel() == 0) return {out, lse};
  constexpr double kInf = std::numeric_limits<double>::infinity();
  if (k.numel() == 0) {  // nothing to attend to: output 0, logsumexp of an empty set
    out.zero_();
    lse.fill_(-kInf);
    return {out, lse};
  }
  Tensor out_k = layout.output(out);
  // Packed: rows no sequence covers are rows that see no key (out 0, lse -inf); on CUDA only
  // those rows are written (fill_packed_gaps), the usual batch having none.
  if (o.varlen() && !q.is_cuda()) {
    out_k.zero_();
    lse.fill_(-kInf);
  }
  p.out = out_k.data_ptr();
  p.lse = lse.data_ptr();
  p.out_strides = strides_of(out_k);
  p.tile_counters = tile_counters;

  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    if (o.varlen()) {
      const VarlenParams& v = p.varlen;
      const GapFill fills[] = {{p.out, p.out_strides.row, p.out_strides.head, sh.heads_q, sh.head_dim,
                                static_cast<int>(out_k.element_size()), 0.0, v.cu_seqlens_q, v.total_q, sh.seqlen_q},
                               {p.lse, 1, p.stats_strides.head, sh.heads_q, 1, static_cast<int>(lse.element_size()),
                                -kInf, v.cu_seqlens_q, v.total_q, sh.seqlen_q}};
      check_cuda(fill_packed_gaps(sh.batch, fills, 2, at::cuda::getCurrentCUDAStream()));
    }
    p.num_splits = fwd_num_splits(p, static_cast<int>(std::min<int64_t>(o.num_splits, kMaxFwdSplits)));
    Tensor out_partial, lse_partial;  // split-KV's, alive until the kernels have run (stream order)
    if (p.num_splits > 1) {
      const at::TensorOptions f32 = q.options().dtype(at::kFloat);
      std::vector<int64_t> rows = {p.num_splits, sh.batch, sh.heads_q, sh.seqlen_q};  // partial_row's layout
      if (o.varlen()) rows = {p.num_splits, sh.heads_q, q.size(0)};
      lse_partial = at::empty(rows, f32);
      rows.push_back(layout.head_dim);
      out_partial = at::empty(rows, f32);
      p.out_partial = out_partial.data_ptr<float>();
      p.lse_partial = lse_partial.data_ptr<float>();
    }
    const Tensor pair_scratch = fp32_pair_scratch_for(p, q);
    check_cuda(run_flash_fwd_cuda(p, at::cuda::getCurrentCUDAStream()));
  } else {
    // Split-KV: each split's rows normalized over its keys, merged once all are done.
    const int splits = flash_fwd_cpu_splits(p, at::get_num_threads(), o.num_splits);
    run_cpu_kernels(
        q, layout, flash_fwd_cpu_partial_elems(p, splits), flash_fwd_cpu_items(p, splits),
        splits > 1 ? flash_fwd_cpu_combine_items(p) : 0,
        [&](auto* partial_rows, int64_t begin, int64_t end) { flash_fwd_cpu(p, splits, partial_rows, begin, end); },
        [&](auto* partial_rows, int64_t begin, int64_t end) {
          flash_fwd_cpu_combine(p, splits, partial_rows, begin, end);
        });
  }
  KernelLayout::finish(out_k, out);
  return {out, lse};
}

Options make_options(std::optional<double> scale, bool is_causal, bool bottom_right, int64_t window_left,
                     int64_t window_right, double softcap, const std::optional<Tensor>& alibi_slopes,
                     double dropout_p, const std::optional<Tensor>& rng_state,
                     const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k,
                     int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<Tensor>& attn_mask,
                     const std::optional<Tensor>& seqused_k, const std::optional<Tensor>& block_table,
                     int64_t num_splits) {
  TORCH_CHECK_VALUE(num_splits >= 0, "cuflash_attn: num_splits must be >= 0 (0: chosen, 1: none), got ",
                    num(num_splits));
  return Options{scale,        is_causal,    bottom_right, window_left, window_right, softcap,
                 alibi_slopes, dropout_p,    rng_state,    cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, attn_mask,    seqused_k,    block_table,  num_splits};
}

std::tuple<Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v, std::optional<double> scale,
                               bool is_causal, bool bottom_right, int64_t window_left, int64_t window_right,
                               double softcap, const std::optional<Tensor>& alibi_slopes, double dropout_p,
                               const std::optional<Tensor>& rng_state, const std::optional<Tensor>& cu_seqlens_q,
                               const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                               const std::optional<Tensor>& attn_mask, bool /*deterministic: the backward's*/,
                               const std::optional<Tensor>& seqused_k, const std::optional<Tensor>& block_table,
                               int64_t num_splits) {
  return fwd_impl(q, k, v,
                  make_options(scale, is_causal, bottom_right, window_left, window_right, softcap, alibi_slopes,
                               dropout_p, rng_state, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
                               seqused_k, block_table, num_splits),
                  nullptr);
}

// Debug: runs the forward and returns int64 [computed, skipped, block_m, block_n]: the key tiles
// the tensor-core forward computed and the ones it skipped as wholly masked, summed over its
// CTAs, and its tile shape (query rows x keys).
Tensor fwd_tile_counts(const Tensor& q, const Tensor& k, const Tensor& v, bool is_causal, bool bottom_right,
                       int64_t window_left, int64_t window_right, const std::optional<Tensor>& cu_seqlens_q,
                       const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK_NOT_IMPLEMENTED(q.is_cuda() && (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16),
                              "cuflash_attn: fwd_tile_counts counts the tiles of the tensor-core forward: q must "
                              "be a float16 or bfloat16 CUDA tensor, got ", q.scalar_type(), " on ", q.device());
  Tensor counters = at::zeros({4}, q.options().dtype(at::kLong));
  fwd_impl(q, k, v,
           make_options(std::nullopt, is_causal, bottom_right, window_left, window_right, 0.0, std::nullopt, 0.0,
                        std::nullopt, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, std::nullopt,
                        std::nullopt, std::nullopt, 1),
           reinterpret_cast<unsigned long long*>(counters.data_ptr<int64_t>()));
  return counters;
}

void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name, bool varlen) {
  check_attention_tensor(t, name, varlen);
  check_same_kind(t, name, ref);
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "cuflash_attn: ", name, " must have the shape of ", ref_name, " ",
                    shape(ref.sizes()), ", got ", shape(t.sizes()));
}

Tensor check_stats(const Tensor& t, const char* name, const Tensor& q, bool varlen) {
  TORCH_CHECK_TYPE(t.defined(), "cuflash_attn: ", name, " must be a tensor, got None");
  const at::ScalarType want = stats_dtype(q.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == want, "cuflash_attn: ", name, " must have dtype ", want, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "cuflash_attn: ", name, " must be on the same device as q (",
                    q.device(), "), got ", t.device());
  const std::vector<int64_t> expected = stats_sizes(q, varlen);
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), "cuflash_attn: ", name, " must have shape ",
                    varlen ? "[heads, total_q] = " : "[batch, heads, seqlen_q] = ", shape(expected), ", got ",
                    shape(t.sizes()));
  return t.contiguous();
}

// Returns dq, dk, dv and, with attn_mask_grad, the gradient of the float attn_mask (in its shape
// and dtype; an empty tensor otherwise).
std::tuple<Tensor, Tensor, Tensor, Tensor> bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& out, const Tensor& lse, const std::optional<Tensor>& dlse,
                                       std::optional<double> scale, bool is_causal, bool bottom_right,
                                       int64_t window_left, int64_t window_right, double softcap,
                                       const std::optional<Tensor>& alibi_slopes, double dropout_p,
                                       const std::optional<Tensor>& rng_state,
                                       const std::optional<Tensor>& cu_seqlens_q,
                                       const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, const std::optional<Tensor>& attn_mask,
                                       bool deterministic, const std::optional<Tensor>& seqused_k,
                                       const std::optional<Tensor>& block_table, int64_t num_splits,
                                       bool attn_mask_grad) {
  const Options o = make_options(scale, is_causal, bottom_right, window_left, window_right, softcap, alibi_slopes,
                                 dropout_p, rng_state, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 attn_mask, seqused_k, block_table, num_splits);
  TORCH_CHECK_NOT_IMPLEMENTED(!o.paged(), "cuflash_attn: a paged KV cache (block_table) has no backward: it is ",
                              "for inference (call under torch.no_grad(), or with k and v that do not require grad)");
  TORCH_CHECK_VALUE(!attn_mask_grad || (attn_mask && attn_mask->is_floating_point()),
                    "cuflash_attn: attn_mask_grad needs a floating-point attn_mask");
  const AttentionShape sh = check_qkv(q, k, v, o);
  check_like(out, "out", q, "q", o.varlen());
  check_like(dout, "dout", q, "q", o.varlen());
  const Tensor lse_c = check_stats(lse, "lse", q, o.varlen());
  const Tensor dlse_c = dlse ? check_stats(*dlse, "dlse", q, o.varlen()) : Tensor();
  Tensor dq = empty_like_input(q), dk = empty_like_input(k), dv = empty_like_input(v);
  const KernelLayout layout = layout_for(q);
  const Tensor qk = layout.input(q), kk = layout.input(k), vk = layout.input(v);
  FlashBwdParams p;
  const std::vector<Tensor> keep = fill_common(p, sh, o, layout, q, k, qk, kk, vk, lse_c);
  // The gradient of every score, summed over attn_mask's broadcast dimensions at the end.
  Tensor dscores = attn_mask_grad ? at::zeros({sh.batch, sh.heads_q, sh.seqlen_q, sh.seqlen_k},
                                              q.options().dtype(stats_dtype(q.scalar_type())))
                                  : Tensor();
  auto dattn_mask = [&]() {
    if (!attn_mask_grad) return at::empty({0}, q.options());
    return dscores.sum_to_size(attn_mask->sizes()).to(attn_mask->scalar_type());
  };
  if (q.numel() == 0 || k.numel() == 0) {  // no query sees a key: every gradient is 0
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dattn_mask()};
  }
  const Tensor outk = layout.input(out), doutk = layout.input(dout);
  Tensor dq_k = layout.sums_output(dq), dk_k = layout.sums_output(dk), dv_k = layout.sums_output(dv);
  // Rows no sequence covers (packed) and keys past seqused_k get gradient 0: no kernel writes
  // them (every query row of a sequence gets its dq, keys or none). On CUDA, packed, only those
  // rows are written (fill_packed_gaps, below).
  const bool zero_packed = o.varlen() && !q.is_cuda();
  if (zero_packed) dq_k.zero_();
  if (zero_packed || o.seqused_k) {
    dk_k.zero_();
    dv_k.zero_();
  }
  Tensor delta = at::empty_like(lse_c);
  p.out = outk.data_ptr();
  p.dout = doutk.data_ptr();
  p.lse = lse_c.data_ptr();
  p.dlse = dlse_c.defined() ? dlse_c.data_ptr() : nullptr;
  p.delta = delta.data_ptr();
  p.dscores = attn_mask_grad ? dscores.data_ptr() : nullptr;
  p.dq = dq_k.data_ptr();
  p.out_strides = strides_of(outk);
  p.dout_strides = strides_of(doutk);
  p.dq_strides = strides_of(dq_k);
  auto write_dkdv_to = [&](const Tensor& dk_t, const Tensor& dv_t) {
    p.dk = dk_t.data_ptr();
    p.dv = dv_t.data_ptr();
    p.dk_strides = strides_of(dk_t);
    p.dv_strides = strides_of(dv_t);
  };
  write_dkdv_to(dk_k, dv_k);
  // q's device for the kernel choice (its compute capability) and the launches.
  std::optional<c10::cuda::CUDAGuard> guard;
  if (q.is_cuda()) guard.emplace(q.device());
  // dQ added up in an fp32 buffer by the dK/dV kernel (atomics; the fused Hopper kernel's TMA
  // reduce-adds), for the 16-bit tensor-core kernels and without the attn_mask gradient (which the dQ
  // kernel writes), where the fused kernel is faster than the pair (prefers_fused_backward):
  // unordered where deterministic=False and torch's deterministic mode is off, else in a fixed
  // order (dq_semaphores: reproducible). CUFLASH_BWD_DQ forces a route: unordered adds wherever
  // the dK/dV kernel can add, ordered ones wherever the fused kernel runs, or the pair.
  Tensor dq_accum;
  const bool may_use_atomics = !deterministic && !at::globalContext().deterministicAlgorithms();
  const bool sixteen_bit = layout.dtype == at::kHalf || layout.dtype == at::kBFloat16;
  if (q.is_cuda() && sixteen_bit && !attn_mask_grad) {
    const DqSwitch route = dq_switch();
    const bool fused = route == DqSwitch::kAuto && prefers_fused_backward(p);
    const bool atomic = route == DqSwitch::kAtomic || (fused && may_use_atomics);
    const bool ordered = (route == DqSwitch::kOrdered && fused_backward_runs(p)) || (fused && !may_use_atomics);
    if (atomic || ordered) {
      // dq_accum is zeroed by the backward's first kernel (flash_bwd_delta_kernel); the ordered
      // adds' counters here.
      const int64_t accum_elems = dq_k.numel();
      const Tensor scratch =
          at::empty({fused_dq_scratch_elems(p.shape, accum_elems, ordered)}, dq_k.options().dtype(at::kFloat));
      scratch.narrow(0, accum_elems, scratch.numel() - accum_elems).zero_();
      dq_accum = scratch.narrow(0, 0, accum_elems).view(dq_k.sizes());
      set_fused_dq_scratch(p, scratch.data_ptr(), accum_elems, ordered);
      p.dq_accum_strides = strides_of(dq_accum);
    }
  }
  // GQA under a causal mask: the fused kernel sees kv_splits copies of each K/V head, each over a
  // share of its query heads (fused_backward_kv_splits: shorter tiles, more of them); each head's
  // copies of dK and dV are summed below, in float (the reduction's accumulator), into dk_k, dv_k.
  // Packed too (the copies' rows no sequence covers zeroed as dk's are); not with seqused_k, whose
  // keys past it only dk_k's zeroing above covers.
  Tensor k_copies, v_copies, dk_copies, dv_copies;
  const int kv_splits = dq_accum.defined() && !o.seqused_k ? fused_backward_kv_splits(p) : 1;
  if (kv_splits > 1) {
    k_copies = kk.repeat_interleave(kv_splits, 1);  // copy s of head h at h * kv_splits + s
    v_copies = vk.repeat_interleave(kv_splits, 1);
    dk_copies = at::empty_like(k_copies);
    dv_copies = at::empty_like(v_copies);
    p.shape.heads_kv *= kv_splits;
    p.k = k_copies.data_ptr();
    p.v = v_copies.data_ptr();
    p.k_strides = strides_of(k_copies);
    p.v_strides = strides_of(v_copies);
    write_dkdv_to(dk_copies, dv_copies);
  }

  if (q.is_cuda()) {
    padded_head_dim_bucket(q, layout.head_dim);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (o.varlen()) {  // dq's rows are the queries', dk's and dv's the keys' (zeroed whole above with seqused_k)
      const VarlenParams& v = p.varlen;
      const int elem_bytes = static_cast<int>(dq_k.element_size());
      const int kv_heads = p.shape.heads_kv;  // (the copies' where the kernel writes those)
      const GapFill fills[] = {
          {p.dq, p.dq_strides.row, p.dq_strides.head, sh.heads_q, sh.head_dim, elem_bytes, 0.0, v.cu_seqlens_q,
           v.total_q, sh.seqlen_q},
          {p.dk, p.dk_strides.row, p.dk_strides.head, kv_heads, sh.head_dim, elem_bytes, 0.0, v.cu_seqlens_k,
           v.total_k, sh.seqlen_k},
          {p.dv, p.dv_strides.row, p.dv_strides.head, kv_heads, sh.head_dim, elem_bytes, 0.0, v.cu_seqlens_k,
           v.total_k, sh.seqlen_k}};
      check_cuda(fill_packed_gaps(sh.batch, fills, o.seqused_k ? 1 : 3, stream));
    }
    const Tensor pair_scratch = fp32_pair_scratch_for(p, q);
    check_cuda(run_flash_bwd_cuda(p, stream));
    if (kv_splits > 1) {
      at::sum_out(dk_k, dk_copies.unflatten(1, {sh.heads_kv, kv_splits}), {2});
      at::sum_out(dv_k, dv_copies.unflatten(1, {sh.heads_kv, kv_splits}), {2});
    }
  } else {
    // A pair's parts sum dK and dV into buffers of their own, added in once all are done.
    const int parts = flash_bwd_cpu_parts(p, at::get_num_threads());
    run_cpu_kernels(
        q, layout, flash_bwd_cpu_partial_elems(p, parts), flash_bwd_cpu_items(p, parts),
        parts > 1 ? flash_bwd_cpu_finish_items(p) : 0,
        [&](auto* partial_sums, int64_t begin, int64_t end) { flash_bwd_cpu(p, parts, partial_sums, begin, end); },
        [&](auto* partial_sums, int64_t begin, int64_t end) {
          flash_bwd_cpu_finish(p, parts, partial_sums, begin, end);
        });
  }
  KernelLayout::finish(dq_k, dq);
  KernelLayout::finish(dk_k, dk);
  KernelLayout::finish(dv_k, dv);
  return {dq, dk, dv, dattn_mask()};
}

// The keep-mask dropout applies for rng_state and dropout_p: bool [batch, heads, seqlen_q,
// seqlen_k], on rng_state's device (sequence-local indices, as the kernels use them).
Tensor dropout_mask(const Tensor& rng_state, double dropout_p, int64_t batch, int64_t heads, int64_t seqlen_q,
                    int64_t seqlen_k) {
  check_rng_state(rng_state);
  check_dropout_p(dropout_p);
  TORCH_CHECK_VALUE(batch >= 0 && heads >= 0 && seqlen_q >= 0 && seqlen_k >= 0 && batch <= 65535 && heads <= 65535 &&
                        seqlen_q <= std::numeric_limits<int>::max() && seqlen_k <= std::numeric_limits<int>::max(),
                    "cuflash_attn: dropout_mask's batch and heads must be in [0, 65535] and its seqlen_q and "
                    "seqlen_k in [0, 2^31 - 1], got batch ", num(batch), ", heads ", num(heads), ", seqlen_q ",
                    num(seqlen_q), ", seqlen_k ", num(seqlen_k));
  const Tensor state = rng_state.contiguous();
  Tensor keep = at::empty({batch, heads, seqlen_q, seqlen_k}, state.options().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  DropoutParams d;
  d.p = dropout_p;
  d.rng_state = state.data_ptr<int64_t>();
  if (state.is_cuda()) {
    const c10::cuda::CUDAGuard guard(state.device());
    check_cuda(dropout_keep_mask_cuda(d, static_cast<int>(batch), static_cast<int>(heads), static_cast<int>(seqlen_q),
                                      static_cast<int>(seqlen_k), keep.data_ptr<bool>(),
                                      at::cuda::getCurrentCUDAStream()));
  } else {
    dropout_keep_mask_cpu(d, static_cast<int>(batch), static_cast<int>(heads), static_cast<int>(seqlen_q),
                          static_cast<int>(seqlen_k), keep.data_ptr<bool>());
  }
  return keep;
}

}  // namespace

// The options, in the order every op takes them. Inputs are [batch, heads, seqlen, head_dim],
// or packed [total_tokens, heads, head_dim] with cu_seqlens_q/k (int32 [batch + 1]); lse is
// [batch, heads, seqlen_q] ([heads, total_q] packed). Masks and ALiBi are aligned top-left, or
// bottom-right (query i faces key i + seqlen_k - seqlen_q: flash_attn's rule) with bottom_right.
// window_left/right bound the keys each query sees around that diagonal (-1: unbounded);
// is_causal sets window_right to 0. max_seqlen 0 means not known (the packed length bounds it).
// attn_mask (torch's: boolean, True takes part, or added to the scores) broadcasts to
// [batch, heads_q, seqlen_q, seqlen_k]; it combines with every other option but cu_seqlens.
// seqused_k (int32 [batch]): how many of each sequence's keys take part, its first ones.
// block_table (int32 [batch, pages a sequence]; the forward only): k and v are a paged cache
// [num_pages, heads_kv, page_size, head_dim], page_size a multiple of 256, and sequence b's key j
// is row j % page_size of page block_table[b][j / page_size]; queries may be packed
// (cu_seqlens_q, without cu_seqlens_k: seqused_k gives the key counts).
// num_splits (the forward's: on CUDA for 16-bit inputs, on the CPU for every dtype; the backward
// ignores it): 1, each row's keys in one CTA (CPU: thread); n > 1, dealt into n CTAs (capped at
// the key blocks) whose partial outputs a combine kernel merges (split-KV, for decoding); 0,
// chosen: split where one query block a sequence leaves SMs idle.
// deterministic (the backward's; the forward always is): True, dq is bitwise reproducible (but
// under the CUFLASH_BWD_DQ=atomic switch; where the fused Hopper kernel is faster than the pair,
// prefers_fused_backward: Hopper, head dims 33-64, 97-128 and 225-256, it adds dq up in a fixed
// order); False, that kernel adds it up with atomics instead, unless torch's deterministic mode
// (torch.use_deterministic_algorithms) is on.
#define CUFLASH_OPTIONS                                                                                       \
  "float? scale=None, bool is_causal=False, bool bottom_right=False, int window_left=-1, "                 \
  "int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, float dropout_p=0.0, "               \
  "Tensor? rng_state=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, SymInt max_seqlen_q=0, " \
  "SymInt max_seqlen_k=0, Tensor? attn_mask=None, bool deterministic=True, Tensor? seqused_k=None, "     \
  "Tensor? block_table=None, int num_splits=1"

TORCH_LIBRARY(cuflash_attn, m) {
  m.def("fwd(Tensor q, Tensor k, Tensor v, " CUFLASH_OPTIONS ") -> (Tensor out, Tensor lse)");
  // dlse is the gradient of the returned lse (None when lse was not used). With attn_mask_grad,
  // dattn_mask is the gradient of the float attn_mask (else an empty tensor).
  m.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse=None, " CUFLASH_OPTIONS
        ", bool attn_mask_grad=False) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dattn_mask)");
  m.def("dropout_mask(Tensor rng_state, float dropout_p, SymInt batch, SymInt heads, SymInt seqlen_q, SymInt seqlen_k) "
        "-> Tensor");
  m.def("fwd_tile_counts(Tensor q, Tensor k, Tensor v, bool is_causal=False, bool bottom_right=False, "
        "int window_left=-1, int window_right=-1, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
        "SymInt max_seqlen_q=0, SymInt max_seqlen_k=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(cuflash_attn, CPU, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
  m.impl("dropout_mask", &dropout_mask);
}

TORCH_LIBRARY_IMPL(cuflash_attn, CUDA, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
  m.impl("dropout_mask", &dropout_mask);
  m.impl("fwd_tile_counts", &fwd_tile_counts);
}

}  // namespace cuflash
