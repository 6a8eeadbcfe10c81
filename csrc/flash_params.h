// The only thing that crosses from the torch glue (or the C++ API) into the kernels: plain
// pointers, int64 strides (in elements), sizes and flags. Kernels never see a Tensor.
#pragma once
#include <cstdint>

namespace cuflash {

enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Attention inputs are [batch, heads, seqlen, head_dim] with any strides whose last dimension
// is contiguous, so a [batch, seqlen, heads, head_dim] tensor viewed with transpose(1, 2) runs
// without a copy. Variable-length (packed) inputs are [total_tokens, heads, head_dim]: batch
// stride 0, and sequence b starts at row cu_seqlens[b].
struct TensorStrides {
  int64_t batch = 0, head = 0, row = 0;
};

// The row statistics (lse, and the backward's delta) have unit row stride: [batch, heads,
// seqlen_q] (batch = heads * seqlen_q, head = seqlen_q), or [heads, total_q] for packed inputs
// (batch = 0, head = total_q).
struct StatsStrides {
  int64_t batch = 0, head = 0;
};

struct AttentionShape {
  int batch = 0, heads_q = 0, heads_kv = 0;  // heads_q is a multiple of heads_kv (GQA/MQA)
  // The sequence lengths; with cu_seqlens, the largest (or a bound on it: the grid size).
  int seqlen_q = 0, seqlen_k = 0;
  int head_dim = 0;  // what the user passed (the kernels round it up to a compiled bucket)
};

// Which keys a query sees. Query i of a sequence faces key i + diagonal, where diagonal is 0
// (top-left alignment, torch's is_causal) or seqlen_k - seqlen_q of that sequence (bottom-right,
// flash_attn's rule). Key j is visible iff
//   diagonal - window_left <= j - i <= diagonal + window_right
// with a negative window meaning unbounded on that side. Causal is window_right = 0.
// rows_per_query (the forward only; torch_ops.cpp's grouped heads packed as rows): row r of q is
// query r / rows_per_query (seqlen_q counts rows), the G query heads of a KV head interleaved.
struct MaskParams {
  bool bottom_right = false;
  int window_left = -1;
  int window_right = -1;
  int rows_per_query = 1;
};

// MaskParams for a mask as the APIs spell it (causal sets the right edge to 0). A window edge at
// least seqlen_q + seqlen_k wide hides no key and is stored as -1 (unbounded): that keeps the
// kernels' int arithmetic on key indices (i + diagonal + window) from overflowing, which made
// windows near 2^31 hide every key.
inline MaskParams make_mask_params(bool bottom_right, bool causal, int64_t window_left, int64_t window_right,
                                   int64_t seqlen_q, int64_t seqlen_k) {
  const int64_t unbounded_from = seqlen_q + seqlen_k < INT32_MAX ? seqlen_q + seqlen_k : INT32_MAX;
  auto stored = [&](int64_t w) { return w < 0 || w >= unbounded_from ? -1 : static_cast<int>(w); };
  MaskParams m;
  m.bottom_right = bottom_right;
  m.window_left = stored(window_left);
  m.window_right = causal ? 0 : stored(window_right);
  return m;
}

// torch's attn_mask, read element by element through strides that broadcast it to
// [batch, heads_q, seqlen_q, seqlen_k] (0 along a broadcast dimension: never expanded in memory).
// A boolean mask hides the keys where it is false; a float mask, whose elements have the
// kernel's element type, is added to the scores.
struct AttnMaskParams {
  const void* data = nullptr;  // null: no mask
  bool is_bool = false;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0, col_stride = 0;
};

// Changes to the scores s = scale * q.k before the softmax, in this order:
//   softcap > 0:  s = softcap * tanh(s / softcap)
//   alibi_slopes: s -= slope[batch, head] * |i + diagonal - j|
//   attn_mask:    s += mask[b, h, i, j]  (-inf where a boolean mask is false)
struct ScoreParams {
  double softcap = 0.0;
  const float* alibi_slopes = nullptr;  // fp32, [heads_q] or [batch, heads_q]
  int64_t alibi_batch_stride = 0;       // 0 for [heads_q]
  AttnMaskParams attn_mask;
};

// Dropout on the attention probabilities: element (b, h, i, j) is kept iff its 16-bit counter-based
// Philox draw is at least round(p 2^16) (attention_math.h's DropoutRng); kept ones are scaled by
// the keep rate's inverse, 2^16 / (2^16 - round(p 2^16)). The seed and offset are read on the
// device (so a CUDA graph replays with new values).
struct DropoutParams {
  double p = 0.0;
  const int64_t* rng_state = nullptr;  // [seed, offset], on the kernels' device
};

// Packed variable-length batches: sequence b holds rows [cu_seqlens[b], cu_seqlens[b + 1]),
// clamped to the packed tensors' rows and to the grid (shape.seqlen_q/k), so offsets that are
// out of range (unchecked on CUDA: that would need a synchronization) never reach past memory.
struct VarlenParams {
  const int* cu_seqlens_q = nullptr;  // int32 [batch + 1], or null for padded batches
  const int* cu_seqlens_k = nullptr;
  int total_q = 0, total_k = 0;  // rows of the packed tensors
  // Optional, int32 [batch]: how many of sequence b's keys take part (its first ones; clamped to
  // [0, its length]), for padded and packed batches alike: a KV cache's filled length.
  const int* seqused_k = nullptr;
};

// A paged KV cache (the forward only): k and v hold num_pages pages of page_size rows (their
// batch stride is a page's), and sequence b's key j lies in row j % page_size of page
// block_table[b * table_stride + j / page_size]. page_size is a multiple of kPageSizeMultiple
// (flash_attn 2's rule), so a key tile of any kernel lies in one page. Entries out of
// [0, num_pages) are clamped (unchecked on CUDA: that would need a synchronization), so they
// never reach past memory.
constexpr int kPageSizeMultiple = 256;
struct PagedKvParams {
  const int* block_table = nullptr;  // int32 [batch, pages a sequence], or null: no paging
  int64_t table_stride = 0;
  int page_size = 0, num_pages = 0;
};

// float32 on the 16-bit tensor cores as fp16 pairs (cuda/fp32_pairs.h): a 4-byte unit of the
// pre-pass's rows, each padded_dim units long (the kernel's head-dim bucket): the hi halves of
// the row's elements, then their lo halves (the rest, times 2^11), both of the row times its own
// power of two.
struct Fp32Pair {
  uint32_t bits;
};
// 2^-e of every row of an input as the pre-pass of float32 pairs split it (cuda/fp32_pairs.h):
// [batch, or 1 if packed][heads][rows] floats, strides in floats (row 1), addressed as the
// input's rows are (row_offset).
struct PairRowScales {
  const float* unscale = nullptr;
  TensorStrides strides;
};
struct PairScales {
  PairRowScales q, k, v, dout;  // dout: the backward's
};

// What the forward and the backward share.
struct AttentionParams {
  DType dtype = DType::kFloat16;
  AttentionShape shape;
  MaskParams mask;
  ScoreParams score;
  DropoutParams dropout;
  VarlenParams varlen;
  PagedKvParams paged;
  double scale = 1.0;  // softmax scale applied to q.k

  const void* q = nullptr;  // [B, Hq, Nq, D]
  const void* k = nullptr;  // [B, Hkv, Nk, D]
  const void* v = nullptr;  // [B, Hkv, Nk, D]
  TensorStrides q_strides, k_strides, v_strides;
  StatsStrides stats_strides;  // of lse (and delta)

  // float32 as fp16 pairs (fp32_pairs.h): scratch of fp32_pair_scratch_bytes(p) bytes, 16-byte
  // aligned, or null (the 3xTF32 or CUDA-core kernels run). The CUDA layer sets pair_scales on
  // the copy of p its pair kernels take, whose q, k, v (and dout) point at the pre-pass's rows.
  void* fp32_pair_scratch = nullptr;
  PairScales pair_scales;
};

struct FlashFwdParams : AttentionParams {
  void* out = nullptr;  // [B, Hq, Nq, D]
  void* lse = nullptr;  // float32 (float64 for float64 inputs), stats_strides
  TensorStrides out_strides;
  // Debug: when set (int64 [4], zeroed), the tensor-core forward adds the key tiles it computed
  // and the ones it skipped as wholly masked, over all its CTAs, and stores its block_m, block_n.
  unsigned long long* tile_counters = nullptr;
  // Split-KV (decoding: too few query blocks to fill the GPU; the sm_80-class tensor-core kernel,
  // or the TMA forward under CUFLASH_SM90's "splits" part):
  // the key blocks of each (query block, head, sequence) are dealt into num_splits ranges, one
  // CTA each, which write their partial output (normalized over their keys) and its logsumexp,
  // rows [splits, batch, heads_q, shape.seqlen_q] (packed: [splits, heads_q, total_q]) of
  // out_partial (head_dim floats a row) and lse_partial; a combine kernel merges them.
  int num_splits = 1;
  float* out_partial = nullptr;
  float* lse_partial = nullptr;
};

struct FlashBwdParams : AttentionParams {
  const void* out = nullptr;
  const void* dout = nullptr;
  const void* lse = nullptr;   // accumulator type, stats_strides
  const void* dlse = nullptr;  // optional, accumulator type, stats_strides: gradient of lse
  void* dq = nullptr;
  void* dk = nullptr;  // [B, Hkv, Nk, D]: summed over the heads of each group
  void* dv = nullptr;
  // Accumulator type, stats_strides: rowsum(dout * out) - dlse, filled by the kernels.
  void* delta = nullptr;
  // Optional, accumulator type, contiguous [B, Hq, Nq, Nk], zeroed: receives the gradient of
  // every score the kernels visit (the gradient of a float attn_mask, before its broadcast sum).
  void* dscores = nullptr;
  // Optional, float32, zeroed, laid out like dq (dq_accum_strides): the tensor-core backward then
  // runs one kernel, the dK/dV one, which also adds each key block's share of dQ / scale here
  // with atomics (not bitwise reproducible: the order of the adds varies, unless dq_semaphores),
  // and a small kernel writes dq from it. Null: a separate dQ kernel, deterministic. Not with dscores.
  void* dq_accum = nullptr;
  // Optional with dq_accum, int32, zeroed, dq_semaphore_count(shape) of them (attention_math.h):
  // the fused Hopper kernel then adds each query block's dQ shares in a fixed order (key blocks
  // from the last down, FlashAttention-3's deterministic mode), so dq is bitwise reproducible.
  // One counter per (batch, query head, 64-row query block), then dkdv_tile_counter.
  int* dq_semaphores = nullptr;
  // Optional with dq_accum, int32, zeroed: hands the fused Hopper kernel's CTAs their tiles in the
  // order they ask (ordered adds: a CTA waits only for CTAs that started before it; persistent
  // CTAs: a dynamic walk). With dq_semaphores, their last.
  int* dkdv_tile_counter = nullptr;
  TensorStrides out_strides, dout_strides, dq_strides, dk_strides, dv_strides, dq_accum_strides;
};

}  // namespace cuflash
