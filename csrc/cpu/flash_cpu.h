// CPU attention: the same tiled online-softmax algorithm as the CUDA kernels, in T = float or
// double (float16/bfloat16 inputs computed in float: the forward reads their rows itself, as
// p.dtype says, the backward takes float copies from the caller), with every feature of
// the params (attention_math.h holds the per-element rules). The callers split the work over
// threads by ranges of independent items: blocks of query rows (forward), (batch, key head)
// pairs (backward).
#pragma once
#include <cstdint>
#include "../flash_params.h"

namespace cuflash {

// The forward's independent work items: blocks of kCpuBlockRows query rows of each (batch, query
// head); the rows of a block are the kernels' vector lanes.
constexpr int kCpuBlockRows = 32;
int64_t flash_fwd_cpu_items(const FlashFwdParams& p);
// Handles the work items [item_begin, item_end) of flash_fwd_cpu_items(p).
template <typename T>
void flash_fwd_cpu(const FlashFwdParams& p, int64_t item_begin, int64_t item_end);

// Handles the (batch, key/value head) pairs [bhk_begin, bhk_end), bhk = b * heads_kv + hk: dq
// of every query head of the group, and dk, dv summed over the group. p.delta is not used.
template <typename T>
void flash_bwd_cpu(const FlashBwdParams& p, int64_t bhk_begin, int64_t bhk_end);

// The dropout keep-mask the kernels use, [batch, heads, seqlen_q, seqlen_k] row-major (for
// tests and return_attn_probs); d.rng_state must be host memory here.
void dropout_keep_mask_cpu(const DropoutParams& d, int batch, int heads, int seqlen_q, int seqlen_k, bool* keep);

}  // namespace cuflash
