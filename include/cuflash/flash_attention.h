// cuflash_attn's C++ API: FlashAttention forward and backward on raw CUDA device pointers,
// for programs that do not use PyTorch. Needs only the CUDA runtime headers; link
// cuflash_attn::cuflash_attn (or cuflash_attn::cuflash_attn_static) from find_package(cuflash_attn).
//
// Every call checks all of its arguments before it touches CUDA and reports the first problem as
// a FlashAttentionError (get_last_error_message() says which argument and why); no exception
// leaves this API. Work is queued on `stream` on the current device and the call returns without
// synchronizing (calls can be captured into CUDA graphs); a fault inside a kernel surfaces at
// the next synchronization, as with any CUDA launch.
//
// Rules shared by every entry point:
//   - A query row that sees no key (seqlen_k = 0, or a causal or window mask that hides every
//     key) gets output 0, logsumexp -inf and zero gradients. Empty problems (batch, heads or
//     seqlen_q = 0) launch nothing.
//   - A pointer may be null only when its tensor has no elements.
//   - Outputs must not overlap the inputs. Distinct outputs may interleave (for example dq, dk
//     and dv packed in one [batch, seqlen, 3, heads, head_dim] buffer) but not share elements.
//   - half and bfloat16 run on tensor cores (sm_80 and later): head_dim a multiple of 8, 16-byte
//     aligned pointers, strides multiples of 8 elements. float takes any head_dim in 1..256, to
//     float32 accuracy (never one TF32 product): by default on tensor cores as fp16 pairs, with
//     scratch of the inputs' size from cudaMallocAsync on `stream` (forward and backward), or
//     where that scratch cannot be had, or the backward is given a workspace, with each product
//     split into three TF32 ones (no scratch); CUFLASH_FP32=exact picks the CUDA-core kernels
//     (README, "Run-time switches").
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#define CUFLASH_API __attribute__((visibility("default")))

namespace cuflash {

enum class FlashAttentionError : int {
  SUCCESS = 0,
  INVALID_DIMENSION,     // a size below 0 (head_dim below 1), batch or heads above 65535, or
                         // num_heads_q not a multiple of num_heads_kv
  NULL_POINTER,          // a tensor with elements has a null pointer
  UNSUPPORTED_HEAD_DIM,  // above 256, not a multiple of 8 for half/bfloat16, or not compiled
                         // into this build (CUFLASH_HEAD_DIMS)
  UNSUPPORTED_DTYPE,     // a DataType value that is not one of its enumerators
  INVALID_ALIGNMENT,     // a pointer not aligned to its element (16 bytes for half/bfloat16), or a
                         // half/bfloat16 stride that is not a multiple of 8 elements
  INVALID_LAYOUT,        // a negative stride, an output whose rows overlap, a tensor spanning
                         // 2^62 elements or more
  INVALID_ARGUMENT,      // scale not finite, window below -1, workspace too small, a pointer that
                         // is not memory the current device can read
  CUDA_ERROR,            // a CUDA call failed (no device, allocation, launch), or a host allocation
};

// A fixed description of the error code ("unknown error code" for values outside the enum).
CUFLASH_API const char* get_error_string(FlashAttentionError error);

// Why the last flash_attention_forward/backward call on this thread failed, naming the argument
// ("" after one that succeeded). Valid until the next such call on this thread.
CUFLASH_API const char* get_last_error_message();

// ---- The simple form ----------------------------------------------------------------------
// Q, K, V, O, dO, dQ, dK, dV: [batch_size, num_heads, seq_len, head_dim], contiguous.
// L: the logsumexp of each query row's scores, float32 [batch_size, num_heads, seq_len]; the
// forward writes it, the backward reads it. scale: the softmax scale (usually 1/sqrt(head_dim)).
// causal: query i sees keys j <= i. The backward writes (does not accumulate) dQ, dK and dV, and
// takes its float32 [batch_size, num_heads, seq_len] scratch from cudaMallocAsync on `stream`
// (the extended form below accepts a workspace instead).

CUFLASH_API FlashAttentionError flash_attention_forward(const float* Q, const float* K, const float* V, float* O,
                                                        float* L, int batch_size, int num_heads, int seq_len,
                                                        int head_dim, float scale, bool causal,
                                                        cudaStream_t stream = nullptr);
CUFLASH_API FlashAttentionError flash_attention_forward(const half* Q, const half* K, const half* V, half* O,
                                                        float* L, int batch_size, int num_heads, int seq_len,
                                                        int head_dim, float scale, bool causal,
                                                        cudaStream_t stream = nullptr);
CUFLASH_API FlashAttentionError flash_attention_forward(const __nv_bfloat16* Q, const __nv_bfloat16* K,
                                                        const __nv_bfloat16* V, __nv_bfloat16* O, float* L,
                                                        int batch_size, int num_heads, int seq_len, int head_dim,
                                                        float scale, bool causal, cudaStream_t stream = nullptr);

CUFLASH_API FlashAttentionError flash_attention_backward(const float* Q, const float* K, const float* V,
                                                         const float* O, const float* L, const float* dO, float* dQ,
                                                         float* dK, float* dV, int batch_size, int num_heads,
                                                         int seq_len, int head_dim, float scale, bool causal,
                                                         cudaStream_t stream = nullptr);
CUFLASH_API FlashAttentionError flash_attention_backward(const half* Q, const half* K, const half* V, const half* O,
                                                         const float* L, const half* dO, half* dQ, half* dK, half* dV,
                                                         int batch_size, int num_heads, int seq_len, int head_dim,
                                                         float scale, bool causal, cudaStream_t stream = nullptr);
CUFLASH_API FlashAttentionError flash_attention_backward(const __nv_bfloat16* Q, const __nv_bfloat16* K,
                                                         const __nv_bfloat16* V, const __nv_bfloat16* O,
                                                         const float* L, const __nv_bfloat16* dO, __nv_bfloat16* dQ,
                                                         __nv_bfloat16* dK, __nv_bfloat16* dV, int batch_size,
                                                         int num_heads, int seq_len, int head_dim, float scale,
                                                         bool causal, cudaStream_t stream = nullptr);

// ---- The extended form ----------------------------------------------------------------------
// Different query and key lengths, grouped-query heads, any strides, causal alignment and
// sliding windows. The simple form is this with seqlen_q = seqlen_k, num_heads_q = num_heads_kv
// and contiguous strides.

enum class DataType : int { FLOAT32, FLOAT16, BFLOAT16 };

// Strides in elements of a [batch, heads, seqlen, head_dim] tensor whose last dimension is
// contiguous. Sizes of 1 make their stride irrelevant.
struct Strides {
  int64_t batch = 0, head = 0, row = 0;
};

// [batch, heads, seqlen, head_dim] contiguous.
constexpr Strides bhsd_strides(int heads, int seqlen, int head_dim) {
  return {int64_t{heads} * seqlen * head_dim, int64_t{seqlen} * head_dim, head_dim};
}
// [batch, seqlen, heads, head_dim] contiguous (the layout of packed projections).
constexpr Strides bshd_strides(int heads, int seqlen, int head_dim) {
  return {int64_t{seqlen} * heads * head_dim, head_dim, int64_t{heads} * head_dim};
}

struct AttentionConfig {
  DataType dtype = DataType::FLOAT16;
  int batch_size = 0;
  int num_heads_q = 0;
  int num_heads_kv = 0;  // divides num_heads_q: query head h reads key/value head h / (num_heads_q / num_heads_kv)
  int seqlen_q = 0;
  int seqlen_k = 0;
  int head_dim = 0;
  float scale = 0.f;  // softmax scale, finite (usually 1/sqrt(head_dim))
  // Query i faces key i + diagonal, with diagonal 0 (top-left: torch's is_causal) or, when
  // causal_bottom_right is set, seqlen_k - seqlen_q (flash_attn's alignment). It sees key j iff
  //   diagonal - window_left <= j - i <= diagonal + window_right,
  // a window of -1 being unbounded on its side. causal sets window_right to 0 (as the torch ops do).
  bool causal = false;
  bool causal_bottom_right = false;  // the diagonal's alignment, for causal masks and windows
  int window_left = -1;
  int window_right = -1;
  // Optional device memory, int32 [batch_size]: how many of each sequence's keys take part, its
  // first ones (clamped to [0, seqlen_k]; the diagonal above aligns to that count), e.g. a KV
  // cache's filled lengths; keys past them get gradient 0. Null: all seqlen_k keys.
  const int* seqused_k = nullptr;
};

struct FlashAttentionForwardArgs : AttentionConfig {
  const void* q = nullptr;  // [batch, num_heads_q, seqlen_q, head_dim] of dtype
  const void* k = nullptr;  // [batch, num_heads_kv, seqlen_k, head_dim]
  const void* v = nullptr;  // [batch, num_heads_kv, seqlen_k, head_dim]
  void* o = nullptr;        // [batch, num_heads_q, seqlen_q, head_dim]
  float* lse = nullptr;     // [batch, num_heads_q, seqlen_q] contiguous
  Strides q_strides, k_strides, v_strides, o_strides;
  // Optional, a paged KV cache (decoding): k and v hold num_pages pages of page_size rows, a page
  // where a batch entry would be ([num_pages, num_heads_kv, page_size, head_dim] through
  // k_strides and v_strides), and sequence b's key j is row j % page_size of page
  // block_table[b * block_table_stride + j / page_size] (device int32; entries outside
  // [0, num_pages) are clamped, not checked). page_size is a multiple of 256, and
  // block_table_stride * page_size at least seqlen_k.
  const int* block_table = nullptr;
  int block_table_stride = 0;
  int page_size = 0;
  int num_pages = 0;
  // Split-KV (float16 and bfloat16; for decoding): 1, each row's keys in one CTA; n > 1, dealt into
  // n CTAs (capped at the key blocks) whose partial outputs a second kernel merges, in scratch
  // allocated stream-ordered (cudaMallocAsync); 0, chosen: split where one query block a sequence
  // would leave SMs idle (and not where that scratch cannot be allocated).
  int num_splits = 1;
};

struct FlashAttentionBackwardArgs : AttentionConfig {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* o = nullptr;      // the forward's output
  const float* lse = nullptr;   // the forward's logsumexp, [batch, num_heads_q, seqlen_q] contiguous
  const void* d_o = nullptr;    // gradient of o, shaped as q
  void* dq = nullptr;           // shaped as q
  void* dk = nullptr;           // shaped as k: summed over the query heads that share a key head
  void* dv = nullptr;           // shaped as v
  Strides q_strides, k_strides, v_strides, o_strides, d_o_strides, dq_strides, dk_strides, dv_strides;
  // Scratch device memory of flash_attention_backward_workspace_size(*this) bytes, 16-byte
  // aligned, used only while the work queued by this call runs. Null: allocated (and freed)
  // stream-ordered with cudaMallocAsync on the call's stream. Given one, a float32 backward
  // allocates nothing: it runs the 3xTF32 kernels (the fp16 pairs' scratch is not in the size).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

CUFLASH_API FlashAttentionError flash_attention_forward(const FlashAttentionForwardArgs& args,
                                                        cudaStream_t stream = nullptr);
CUFLASH_API FlashAttentionError flash_attention_backward(const FlashAttentionBackwardArgs& args,
                                                         cudaStream_t stream = nullptr);

// Bytes of workspace the backward of `config` needs: batch * num_heads_q * seqlen_q floats, and
// for float16 and bfloat16 at head dims 33-64, 97-128 and 225-256 also an fp32 copy of dQ plus
// num_heads_q * batch * ceil(seqlen_q / 64) + 1 int32 counters: on Hopper GPUs the backward
// there adds dQ up in one kernel, in a fixed order (reproducible), where that is faster. (The
// workspace the call allocates itself, with workspace null, holds only what it uses.)
CUFLASH_API size_t flash_attention_backward_workspace_size(const AttentionConfig& config);

// Whether this build has kernels for (dtype, head_dim): head_dim in 1..256 (a multiple of 8 for
// half/bfloat16) whose bucket was compiled (all unless built with CUFLASH_HEAD_DIMS).
CUFLASH_API bool flash_attention_supports(DataType dtype, int head_dim);

}  // namespace cuflash
