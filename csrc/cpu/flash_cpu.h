// CPU attention: the same tiled online-softmax algorithm as the CUDA kernels, in T = float or
// double (float16/bfloat16 inputs computed in float: the kernels read their rows themselves, as
// p.dtype says; the backward's dq, dk and dv are T's whatever the inputs), with every feature of
// the params (attention_math.h holds the per-element rules). The callers split the work over
// threads by ranges of independent items: blocks of query rows over ranges of keys (forward),
// parts of (batch, key head) pairs (backward).
#pragma once
#include <cstdint>
#include "../flash_params.h"

namespace cuflash {

// The forward's independent work items: blocks of kCpuBlockRows query rows of each (batch, query
// head), the rows of a block the kernels' vector lanes, each block's keys in `splits` ranges of
// key tiles (split-KV: decoding steps, whose blocks are fewer than the threads).
constexpr int kCpuBlockRows = 32;
constexpr int kCpuKeyTile = 64;  // keys a tile (split-KV deals out whole tiles)
// A block of `rows` query rows' time over some keys, relative to one row's: rows < 8 go a row at a
// time (K and V tiles read once for them), 8-16 on half the vector lanes, up to 32 on all (fitted
// to a 2-core AVX-512 machine's forward at 8192 keys, head dim 128; benchmarks/NOTES.md,
// thirty-second session): for group packing's choice.
double flash_fwd_cpu_block_cost(int rows);
// Split-KV's count for `blocks` blocks of query rows over `key_tiles` key tiles on `threads`
// threads; requested: the caller's num_splits (0: chosen here, the fewest that share the items out
// evenly over the threads, each split 4 key tiles at least; else as many, up to the key tiles).
int flash_fwd_cpu_split_count(int64_t blocks, int64_t key_tiles, int threads, int64_t requested);
// flash_fwd_cpu_split_count for p, as many as the partial rows' budget (1 GiB) holds.
int flash_fwd_cpu_splits(const FlashFwdParams& p, int threads, int64_t requested);
// The elements of T of the splits' partial rows that flash_fwd_cpu takes (0 for one split).
int64_t flash_fwd_cpu_partial_elems(const FlashFwdParams& p, int splits);
int64_t flash_fwd_cpu_items(const FlashFwdParams& p, int splits);
// Handles the work items [item_begin, item_end) of flash_fwd_cpu_items(p, splits). With more than
// one split, out and lse are written by flash_fwd_cpu_combine, over its items (a block of rows
// each) once every split is done.
template <typename T>
void flash_fwd_cpu(const FlashFwdParams& p, int splits, T* partials, int64_t item_begin, int64_t item_end);
int64_t flash_fwd_cpu_combine_items(const FlashFwdParams& p);
template <typename T>
void flash_fwd_cpu_combine(const FlashFwdParams& p, int splits, T* partials, int64_t item_begin, int64_t item_end);

// The backward's work items: each (batch, key/value head) pair bhk = b * heads_kv + hk in `parts`
// parts, item = bhk * parts + part; together they give dq of every query head of the group, and
// dk, dv summed over the group. Parts enough that the threads' shares are even (one where the
// pairs share out evenly; at most one a block of query rows, and 1 GiB of partial sums).
int flash_bwd_cpu_parts(const FlashBwdParams& p, int threads);
int64_t flash_bwd_cpu_items(const FlashBwdParams& p, int parts);
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
