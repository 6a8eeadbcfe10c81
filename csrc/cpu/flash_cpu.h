// CPU attention: the same tiled online-softmax algorithm as the CUDA kernels, in T = float or
// double (float16/bfloat16 inputs computed in float: the forward reads their rows itself, as
// p.dtype says, the backward takes float copies from the caller), with every feature of
// the params (attention_math.h holds the per-element rules). The callers split the work over
// threads by ranges of independent items: blocks of query rows (forward), parts of (batch, key
// head) pairs (backward).
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

// The backward's work items: each (batch, key/value head) pair bhk = b * heads_kv + hk in `parts`
// parts, item = bhk * parts + part; together they give dq of every query head of the group, and
// dk, dv summed over the group. Parts enough that the threads' shares are even (one where the
// pairs share out evenly; at most one a block of query rows, and within kMaxBwdPartialBytes).
int flash_bwd_cpu_parts(const FlashBwdParams& p, int threads);
// The elements of T of the partial sums' buffer that flash_bwd_cpu takes for `parts` (0 for one).
int64_t flash_bwd_cpu_partial_elems(const FlashBwdParams& p, int parts);
// Handles the items [item_begin, item_end). p.delta is not used. With more than one part, dk holds
// part 0's sum unscaled until flash_bwd_cpu_finish, run over its items once every part is done.
template <typename T>
void flash_bwd_cpu(const FlashBwdParams& p, int parts, T* partials, int64_t item_begin, int64_t item_end);
// Where parts > 1: adds the parts' sums into dk and dv and scales dk, items of 64 keys of a pair.
int64_t flash_bwd_cpu_finish_items(const FlashBwdParams& p);
template <typename T>
void flash_bwd_cpu_finish(const FlashBwdParams& p, int parts, const T* partials, int64_t item_begin,
                          int64_t item_end);

// The dropout keep-mask the kernels use, [batch, heads, seqlen_q, seqlen_k] row-major (for
// tests and return_attn_probs); d.rng_state must be host memory here.
void dropout_keep_mask_cpu(const DropoutParams& d, int batch, int heads, int seqlen_q, int seqlen_k, bool* keep);

}  // namespace cuflash
