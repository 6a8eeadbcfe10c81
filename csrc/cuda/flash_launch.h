// The CUDA entry points the torch glue calls: ATen-free, they take the params struct and a
// stream and return the CUDA status of the launches.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "../flash_params.h"

namespace cuflash {

// The compiled head-dim bucket that runs `head_dim` for `dtype`, or 0 if none was built.
int cuda_head_dim_bucket(DType dtype, int head_dim);

cudaError_t run_flash_fwd_cuda(const FlashFwdParams& p, cudaStream_t stream);

// Split-KV (FlashFwdParams::num_splits): the splits p's forward takes, for `requested` (1: none;
// 0: chosen, where a few query blocks would leave SMs idle; n: n, capped at p's key blocks and
// kMaxFwdSplits). Only 16-bit inputs split (the sm_80-class kernel, or on Hopper the TMA forward
// under CUFLASH_SM90's "splits" part): 1 otherwise. The caller
// provides out_partial and lse_partial where it returns more than 1.
constexpr int kMaxFwdSplits = 128;
int fwd_num_splits(const FlashFwdParams& p, int requested);
// The persistent TMA forward's section of (head, batch) pairs for dense p walked by `ctas` CTAs
// on tiles of block_m queries and block_n keys (sm90/tile_walk.h's walk_section_heads; its
// model walks every tile, so each shape's answer is remembered).
int fwd_walk_section_heads(const FlashFwdParams& p, int block_m, int block_n, int ctas, int64_t kv_bytes_per_pair);
cudaError_t run_flash_bwd_cuda(const FlashBwdParams& p, cudaStream_t stream);

// Whether the fused Hopper backward has kernels for dtype and head_dim (16-bit, head-dim buckets
// 64, 128 and 256), whatever the device and the tensors.
bool fused_backward_built_for(DType dtype, int head_dim);
// Whether p's backward, given a dq_accum, runs the fused Hopper kernel (which can also order its
// adds). dk and dv must be TMA-addressable too (the persistent fused kernel stores them by TMA).
bool fused_backward_runs(const FlashBwdParams& p);
// Whether p's backward should run the fused Hopper kernel (give p its scratch through
// set_fused_dq_scratch: dq_accum, dkdv_tile_counter, and dq_semaphores for a deterministic one):
// where it runs and measured faster than the pair.
bool prefers_fused_backward(const FlashBwdParams& p);
// How many copies of each K/V head the fused Hopper backward should see (1: none, and wherever it
// does not run: fused_backward_runs), each copy
// with a share of the head's query heads: a dK/dV tile is a key block of a K/V head over its
// query heads, so with grouped heads under a causal mask the walk ends on a few long tiles (the
// first key blocks'; benchmarks/model_dkdv_walk.py). The caller gives the kernels K and V of
// heads_kv * splits heads (copy s of head h at h * splits + s), dK and dV of that shape, and sums
// each head's copies. CUFLASH_BWD_KV_SPLITS picks a count ("1": none); unset or "auto", the rule.
int fused_backward_kv_splits(const FlashBwdParams& p);

// Packed outputs: the kernels write only their sequences' rows (attention_math.h's
// packed_rows_of: cu_seqlens' rows, clamped to the `total` rows and to `max_rows`, the grid's).
// fill_packed_gaps sets every other row of each fill to its value (0, or -inf for a row that
// sees no key), all fills in one launch: a kernel that reads the batch's offsets, where a memset
// of whole tensors would write them all (the usual batch has no such row).
// A fill: `heads` runs of `width` elements a row of a packed tensor (rows as cu_seqlens, total
// and max_rows say: the queries' or the keys'), strides in elements; elem_bytes 2 (value 0
// only), 4 (float) or 8 (double).
struct GapFill {
  void* data = nullptr;
  int64_t row_stride = 0, head_stride = 0;
  int heads = 0, width = 0, elem_bytes = 0;
  double value = 0.0;
  const int* cu_seqlens = nullptr;
  int total = 0, max_rows = 0;
};
constexpr int kMaxGapFills = 3;  // the backward's dq, dk and dv
cudaError_t fill_packed_gaps(int batch, const GapFill* fills, int num_fills, cudaStream_t stream);

// Writes the dropout keep-mask the kernels use for d, bool [batch, heads, seqlen_q, seqlen_k].
cudaError_t dropout_keep_mask_cuda(const DropoutParams& d, int batch, int heads, int seqlen_q, int seqlen_k,
                                   bool* keep, cudaStream_t stream);

// Whether the tensor-core kernels' 16-byte row copies can address a tensor: a 16-byte aligned
// start and strides (the torch glue lays float32 out so; the C++ API accepts 4-byte alignment).
inline bool rows_of_16_bytes(const void* data, const TensorStrides& s, int elem_bytes) {
  auto aligned = [&](int64_t stride) { return stride * elem_bytes % 16 == 0; };
  return reinterpret_cast<uintptr_t>(data) % 16 == 0 && aligned(s.batch) && aligned(s.head) && aligned(s.row);
}
// The inputs (and head_dim) of either direction; the overloads add the direction's other tensors.
inline bool tensor_core_inputs(const AttentionParams& p, int elem_bytes) {
  return p.shape.head_dim % 8 == 0 && rows_of_16_bytes(p.q, p.q_strides, elem_bytes) &&
         rows_of_16_bytes(p.k, p.k_strides, elem_bytes) && rows_of_16_bytes(p.v, p.v_strides, elem_bytes);
}
inline bool tensor_core_layout(const FlashFwdParams& p, int elem_bytes) {
  return tensor_core_inputs(p, elem_bytes) && rows_of_16_bytes(p.out, p.out_strides, elem_bytes);
}
inline bool tensor_core_layout(const FlashBwdParams& p, int elem_bytes) {
  return tensor_core_inputs(p, elem_bytes) && rows_of_16_bytes(p.dout, p.dout_strides, elem_bytes) &&
         rows_of_16_bytes(p.dq, p.dq_strides, elem_bytes) && rows_of_16_bytes(p.dk, p.dk_strides, elem_bytes) &&
         rows_of_16_bytes(p.dv, p.dv_strides, elem_bytes);
}

// float32 as fp16 pairs (fp32_pairs.h; CUFLASH_FP32 in run_switches.h): the scratch p's forward
// or backward takes for them (AttentionParams::fp32_pair_scratch), or 0 where they do not run p
// (another dtype, CUFLASH_FP32 naming another path, the forwards Hopper's TF32 wgmmas take by
// default, paged or seqused_k caches, tensors the tensor-core kernels cannot address, or a device
// without their shared memory).
int64_t fp32_pair_scratch_bytes(const FlashFwdParams& p);
int64_t fp32_pair_scratch_bytes(const FlashBwdParams& p);

template <typename T, int kHeadDim>
cudaError_t run_flash_fwd(const FlashFwdParams& p, cudaStream_t stream);
template <typename T, int kHeadDim>
cudaError_t run_flash_bwd(const FlashBwdParams& p, cudaStream_t stream);

}  // namespace cuflash
