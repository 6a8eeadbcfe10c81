// The only thing that crosses from the torch glue into the kernels: plain pointers, int64
// strides (in elements), sizes and flags. Kernels never see a Tensor.
#pragma once
#include <cstdint>

namespace cuflash {

enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Attention inputs are [batch, heads, seqlen, head_dim] with any strides whose last dimension
// is contiguous, so a [batch, seqlen, heads, head_dim] tensor viewed with transpose(1, 2) runs
// without a copy.
struct TensorStrides {
  int64_t batch = 0, head = 0, row = 0;
};

struct AttentionShape {
  int batch = 0, heads_q = 0, heads_kv = 0;
  int seqlen_q = 0, seqlen_k = 0;
  int head_dim = 0;  // what the user passed (the kernels round it up to a compiled bucket)
};

// Causal masking: query i sees key j iff j <= i + causal_offset. Top-left alignment
// (torch's is_causal) is offset 0; bottom-right (flash_attn's) is seqlen_k - seqlen_q.
struct MaskParams {
  bool is_causal = false;
  int causal_offset = 0;
};

struct FlashFwdParams {
  DType dtype = DType::kFloat16;
  AttentionShape shape;
  MaskParams mask;
  double scale = 1.0;  // softmax scale applied to q.k

  const void* q = nullptr;  // [B, Hq, Nq, D]
  const void* k = nullptr;  // [B, Hkv, Nk, D]
  const void* v = nullptr;  // [B, Hkv, Nk, D]
  void* out = nullptr;      // [B, Hq, Nq, D]
  void* lse = nullptr;      // [B, Hq, Nq] contiguous, float32 (float64 for float64 inputs)
  TensorStrides q_strides, k_strides, v_strides, out_strides;
};

struct FlashBwdParams {
  DType dtype = DType::kFloat16;
  AttentionShape shape;
  MaskParams mask;
  double scale = 1.0;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;
  const void* dout = nullptr;
  const void* lse = nullptr;   // [B, Hq, Nq] contiguous, accumulator type
  const void* dlse = nullptr;  // optional [B, Hq, Nq] contiguous, accumulator type: gradient of lse
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  // [B, Hq, Nq] contiguous, accumulator type: rowsum(dout * out) - dlse, filled by the kernels.
  void* delta = nullptr;
  TensorStrides q_strides, k_strides, v_strides, out_strides, dout_strides;
  TensorStrides dq_strides, dk_strides, dv_strides;
};

}  // namespace cuflash
