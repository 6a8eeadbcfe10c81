// The one layer that touches ATen: op schemas, argument validation, output allocation,
// and the translation of tensors into the params struct the kernels take.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

#include "cpu/flash_cpu.h"
#include "cuda/flash_launch.h"
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
// g++ 13 against torch 2.11's wheel) the ostream inserters instantiated in this library crash.
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

void check_attention_tensor(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.device().is_cpu() || t.device().is_cuda(),
                   "cuflash_attn: ", name, " must be a CUDA or CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), "cuflash_attn: ", name,
                   " must be a CUDA or CPU tensor of dtype float16, bfloat16, float32 or float64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 4, "cuflash_attn: ", name,
                    " must have 4 dimensions [batch, heads, seqlen, head_dim], got ", num(t.dim()),
                    " (shape ", shape(t.sizes()), ")");
}

void check_same_kind(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "cuflash_attn: ", name,
                   " must have the same dtype as q (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "cuflash_attn: ", name,
                    " must be on the same device as q (", q.device(), "), got ", t.device());
}

AttentionShape check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_attention_tensor(q, "q");
  check_attention_tensor(k, "k");
  check_attention_tensor(v, "v");
  check_same_kind(k, "k", q);
  check_same_kind(v, "v", q);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                    "cuflash_attn: q, k and v must have the same batch size, got ", num(q.size(0)), ", ",
                    num(k.size(0)), " and ", num(v.size(0)));
  TORCH_CHECK_VALUE(k.size(1) == v.size(1), "cuflash_attn: k and v must have the same number of heads, got ",
                    num(k.size(1)), " and ", num(v.size(1)));
  TORCH_CHECK_VALUE(k.size(2) == v.size(2), "cuflash_attn: k and v must have the same seqlen, got ",
                    num(k.size(2)), " and ", num(v.size(2)));
  TORCH_CHECK_VALUE(k.size(3) == q.size(3) && v.size(3) == q.size(3),
                    "cuflash_attn: q, k and v must have the same head_dim, got ", num(q.size(3)), ", ",
                    num(k.size(3)), " and ", num(v.size(3)));
  const int64_t heads_q = q.size(1), heads_kv = k.size(1);
  TORCH_CHECK_VALUE(heads_kv > 0 ? heads_q % heads_kv == 0 : heads_q == 0,
                    "cuflash_attn: the heads of q (", num(heads_q), ") must be a multiple of the heads of k and v (",
                    num(heads_kv), ")");
  TORCH_CHECK_NOT_IMPLEMENTED(heads_q == heads_kv, "cuflash_attn: grouped-query attention (q has ", num(heads_q),
                              " heads, k and v ", num(heads_kv), ") is not supported yet");
  const int64_t head_dim = q.size(3);
  TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= kMaxHeadDim, "cuflash_attn: head_dim must be in [1, ",
                    num(kMaxHeadDim), "], got ", num(head_dim));
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(q.size(2) <= kMaxInt && k.size(2) <= kMaxInt, "cuflash_attn: seqlen must be below 2^31");
  if (q.is_cuda()) {
    // The grid is (query blocks, heads, batch).
    TORCH_CHECK_VALUE(q.size(0) <= 65535 && q.size(1) <= 65535,
                      "cuflash_attn: batch and heads must be at most 65535 on CUDA, got ", num(q.size(0)),
                      " and ", num(q.size(1)));
  }
  AttentionShape sh;
  sh.batch = static_cast<int>(q.size(0));
  sh.heads_q = static_cast<int>(heads_q);
  sh.heads_kv = static_cast<int>(heads_kv);
  sh.seqlen_q = static_cast<int>(q.size(2));
  sh.seqlen_k = static_cast<int>(k.size(2));
  sh.head_dim = static_cast<int>(head_dim);
  return sh;
}

double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  if (!scale) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  TORCH_CHECK_VALUE(std::isfinite(*scale), "cuflash_attn: scale must be a finite number, got ", num(*scale));
  return *scale;
}

MaskParams make_mask(bool is_causal, bool causal_bottom_right, const AttentionShape& sh) {
  MaskParams m;
  m.is_causal = is_causal;
  m.causal_offset = is_causal && causal_bottom_right ? sh.seqlen_k - sh.seqlen_q : 0;
  return m;
}

// Outputs take the input's layout when its last dimension is contiguous (so a
// [batch, seqlen, heads, head_dim] view gives an output of the same layout), else contiguous.
// The fake in cuflash_attn/ops.py applies the same rule.
Tensor empty_like_input(const Tensor& t) {
  return t.stride(-1) == 1 ? at::empty_like(t) : at::empty(t.sizes(), t.options());
}

TensorStrides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Tensors as a kernel family can read or write them. The tensor-core kernels move 16-byte rows,
// so they need 16-byte aligned rows and a head_dim padded to a multiple of 8; the exact CUDA
// kernels and the CPU kernels need a contiguous last dimension. Anything else is copied (and
// CPU float16/bfloat16 is computed in float32).
struct KernelLayout {
  at::ScalarType dtype;
  int64_t head_dim;
  bool tensor_cores;

  bool accepts(const Tensor& t) const {
    if (t.scalar_type() != dtype || t.size(-1) != head_dim || t.stride(-1) != 1) return false;
    if (!tensor_cores) return true;
    const int64_t elem = t.element_size();
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * elem) % 16 == 0 &&
           (t.stride(1) * elem) % 16 == 0 && (t.stride(2) * elem) % 16 == 0;
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
  static void finish(const Tensor& staged, Tensor& dst) {
    if (!staged.is_same(dst)) dst.copy_(staged.narrow(-1, 0, dst.size(-1)));
  }
};

KernelLayout layout_for(const Tensor& q) {
  const at::ScalarType t = q.scalar_type();
  const int64_t d = q.size(3);
  if (!q.is_cuda()) return {t == at::kDouble ? at::kDouble : at::kFloat, d, false};
  const bool tc = t == at::kHalf || t == at::kBFloat16;
  return {t, tc ? (d + 7) / 8 * 8 : d, tc};
}

int padded_head_dim_bucket(const Tensor& q, int64_t padded_head_dim) {
  const int bucket = cuda_head_dim_bucket(to_dtype(q.scalar_type()), static_cast<int>(padded_head_dim));
  TORCH_CHECK_NOT_IMPLEMENTED(bucket > 0, "cuflash_attn: head_dim ", num(q.size(3)), " for ", q.scalar_type(),
                              " was not compiled into this build (see CUFLASH_HEAD_DIMS)");
  return bucket;
}

void check_cuda(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "cuflash_attn: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v, std::optional<double> scale,
                               bool is_causal, bool causal_bottom_right) {
  AttentionShape sh = check_qkv(q, k, v);
  const double softmax_scale = resolve_scale(scale, sh.head_dim);
  Tensor out = empty_like_input(q);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(stats_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  if (sh.seqlen_k == 0) {  // nothing to attend to: output 0, logsumexp of an empty set
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const KernelLayout layout = layout_for(q);
  const Tensor qk = layout.input(q), kk = layout.input(k), vk = layout.input(v);
  Tensor out_k = layout.output(out);

  FlashFwdParams p;
  p.dtype = to_dtype(layout.dtype);
  sh.head_dim = static_cast<int>(layout.head_dim);
  p.shape = sh;
  p.mask = make_mask(is_causal, causal_bottom_right, sh);
  p.scale = softmax_scale;
  p.q = qk.data_ptr();
  p.k = kk.data_ptr();
  p.v = vk.data_ptr();
  p.out = out_k.data_ptr();
  p.lse = lse.data_ptr();
  p.q_strides = strides_of(qk);
  p.k_strides = strides_of(kk);
  p.v_strides = strides_of(vk);
  p.out_strides = strides_of(out_k);

  if (q.is_cuda()) {
    padded_head_dim_bucket(q, layout.head_dim);
    const c10::cuda::CUDAGuard guard(q.device());
    check_cuda(run_flash_fwd_cuda(p, at::cuda::getCurrentCUDAStream()));
  } else {
    at::parallel_for(0, int64_t{sh.batch} * sh.heads_q, 1, [&](int64_t begin, int64_t end) {
      if (layout.dtype == at::kDouble) flash_fwd_cpu<double>(p, begin, end);
      else flash_fwd_cpu<float>(p, begin, end);
    });
  }
  KernelLayout::finish(out_k, out);
  return {out, lse};
}

void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  check_attention_tensor(t, name);
  check_same_kind(t, name, ref);
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "cuflash_attn: ", name, " must have the shape of ", ref_name, " ",
                    shape(ref.sizes()), ", got ", shape(t.sizes()));
}

Tensor check_stats(const Tensor& t, const char* name, const Tensor& q) {
  const at::ScalarType want = stats_dtype(q.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == want, "cuflash_attn: ", name, " must have dtype ", want, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "cuflash_attn: ", name, " must be on the same device as q (",
                    q.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == q.size(2),
                    "cuflash_attn: ", name, " must have shape [batch, heads, seqlen_q] = ",
                    shape(q.sizes().slice(0, 3)), ", got ", shape(t.sizes()));
  return t.contiguous();
}

std::tuple<Tensor, Tensor, Tensor> bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& out, const Tensor& lse, const std::optional<Tensor>& dlse,
                                       std::optional<double> scale, bool is_causal, bool causal_bottom_right) {
  AttentionShape sh = check_qkv(q, k, v);
  check_like(out, "out", q, "q");
  check_like(dout, "dout", q, "q");
  const Tensor lse_c = check_stats(lse, "lse", q);
  const Tensor dlse_c = dlse ? check_stats(*dlse, "dlse", q) : Tensor();
  const double softmax_scale = resolve_scale(scale, sh.head_dim);
  Tensor dq = empty_like_input(q), dk = empty_like_input(k), dv = empty_like_input(v);
  if (sh.batch == 0 || sh.heads_q == 0) return {dq, dk, dv};
  if (sh.seqlen_q == 0 || sh.seqlen_k == 0) {  // no query sees a key: every gradient is 0
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const KernelLayout layout = layout_for(q);
  const Tensor qk = layout.input(q), kk = layout.input(k), vk = layout.input(v);
  const Tensor outk = layout.input(out), doutk = layout.input(dout);
  Tensor dq_k = layout.output(dq), dk_k = layout.output(dk), dv_k = layout.output(dv);
  Tensor delta = at::empty_like(lse_c);

  FlashBwdParams p;
  p.dtype = to_dtype(layout.dtype);
  sh.head_dim = static_cast<int>(layout.head_dim);
  p.shape = sh;
  p.mask = make_mask(is_causal, causal_bottom_right, sh);
  p.scale = softmax_scale;
  p.q = qk.data_ptr();
  p.k = kk.data_ptr();
  p.v = vk.data_ptr();
  p.out = outk.data_ptr();
  p.dout = doutk.data_ptr();
  p.lse = lse_c.data_ptr();
  p.dlse = dlse_c.defined() ? dlse_c.data_ptr() : nullptr;
  p.delta = delta.data_ptr();
  p.dq = dq_k.data_ptr();
  p.dk = dk_k.data_ptr();
  p.dv = dv_k.data_ptr();
  p.q_strides = strides_of(qk);
  p.k_strides = strides_of(kk);
  p.v_strides = strides_of(vk);
  p.out_strides = strides_of(outk);
  p.dout_strides = strides_of(doutk);
  p.dq_strides = strides_of(dq_k);
  p.dk_strides = strides_of(dk_k);
  p.dv_strides = strides_of(dv_k);

  if (q.is_cuda()) {
    padded_head_dim_bucket(q, layout.head_dim);
    const c10::cuda::CUDAGuard guard(q.device());
    check_cuda(run_flash_bwd_cuda(p, at::cuda::getCurrentCUDAStream()));
  } else {
    at::parallel_for(0, int64_t{sh.batch} * sh.heads_q, 1, [&](int64_t begin, int64_t end) {
      if (layout.dtype == at::kDouble) flash_bwd_cpu<double>(p, begin, end);
      else flash_bwd_cpu<float>(p, begin, end);
    });
  }
  KernelLayout::finish(dq_k, dq);
  KernelLayout::finish(dk_k, dk);
  KernelLayout::finish(dv_k, dv);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(cuflash_attn, m) {
  // Inputs are [batch, heads, seqlen, head_dim]; lse is [batch, heads, seqlen_q].
  // causal_bottom_right aligns the causal mask to the last key (flash_attn's rule) instead of
  // the first (torch's is_causal) when seqlen_q != seqlen_k.
  m.def("fwd(Tensor q, Tensor k, Tensor v, float? scale=None, bool is_causal=False, "
        "bool causal_bottom_right=False) -> (Tensor out, Tensor lse)");
  // dlse is the gradient of the returned lse (None when lse was not used).
  m.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse=None, "
        "float? scale=None, bool is_causal=False, bool causal_bottom_right=False) "
        "-> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(cuflash_attn, CPU, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
}

TORCH_LIBRARY_IMPL(cuflash_attn, CUDA, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
}

}  // namespace cuflash
