// The backward's dQ route (flash_launch.h): the fused warp-specialized Hopper kernel
// (flash_bwd_sm90_tma.cuh at head-dim buckets 64 and 128, flash_bwd_sm90_fused256.cuh at 256;
// plain 16-bit attention, the bwdws part of CUFLASH_SM90, inputs TMA can address) adds dQ up in
// fp32 itself, unordered (atomics, deterministic=False) or in a fixed order (deterministic);
// elsewhere the one-kernel paths are slower than the pair of kernels. Where it measured faster
// than the pair (benchmarks/NOTES.md, H200, bf16): at D=64 every row length, both orders (ordered
// 1.15-1.28x without a mask, causal 0.98-1.01x up to 2048 and 1.07-1.08x from 8192); at D=128
// (persistent since the twenty-first session) from 512 keys seen by the middle query row: ordered
// against the pair 1.04-1.10x causal at 1024 keys (middle row 513) in all five runs; at 512
// without a mask 1.05-1.14x in four runs, 0.87x in one (short rows are noisy: benchmarks/NOTES.md);
// even (0.98-1.01x) causal at 512; at D=256 (its own kernel, twenty-second session; one run at
// 1024, 4096 and 16384 keys) ordered 1.03-1.17x, unordered 1.10-1.16x, causal or not.
// With softcap, ALiBi, attn_mask or dropout (the "bwdfeatures" part) the fused kernels take them
// wherever they run: the other route is the sm_80-class backward, which forward + backward ran at
// 0.30-0.55x of (H100, benchmarks/NOTES.md).
#include "device_attributes.h"
#include "flash_launch.h"
#include "mask.cuh"  // needs_feature_path
#include "run_switches.h"
#include "sm90/flash_bwd_sm90_tma.cuh"
#include "sm90/flash_fwd_sm90_tma.cuh"  // middle_row_keys

namespace cuflash {

bool fused_backward_built_for(DType dtype, int head_dim) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return false;
  const int bucket = cuda_head_dim_bucket(dtype, head_dim);
  return bucket == 64 || bucket == 128 || bucket == 256;
}

bool fused_backward_runs(const FlashBwdParams& p) {
  if (!fused_backward_built_for(p.dtype, p.shape.head_dim)) return false;
  if (p.dscores != nullptr) return false;
  const sm90::Sm90Paths paths = sm90::sm90_paths(p);  // (neither with seqused_k)
  if (!(needs_feature_path(p) ? paths.bwd_features : paths.bwd_ws)) return false;
  // The launch encodes the maps (no second encoding here); dk and dv too, which the persistent
  // kernel stores by TMA. Every fused kernel takes packed sequences.
  return sm90::bwd_tma_addressable(p, /*dkdv_stores=*/true, /*may_pack=*/true);
}

bool prefers_fused_backward(const FlashBwdParams& p) {
  if (!fused_backward_runs(p)) return false;
  return needs_feature_path(p) || cuda_head_dim_bucket(p.dtype, p.shape.head_dim) != 128 ||
         sm90::middle_row_keys(p) >= 512;
}

// The rule: under a mask whose visible keys grow along the queries (causal, or a right edge with
// no left one), the first key blocks' tiles are the longest, group times a plain one's; the
// copies halve them until the walk has four tiles an SM (the model: efficiency 0.61 -> 0.88 at
// D=128, 0.77 -> 0.88 at D=64, N=2048, 8 query heads a K/V head; each copy costs a K/V head's
// read, its dK/dV written and summed, a few per cent). The tile's 128 keys as the walk's
// (head dim 256's kernel takes 80: a rule of thumb there).
int fused_backward_kv_splits(const FlashBwdParams& p) {
  const AttentionShape& sh = p.shape;
  const int group = sh.heads_kv > 0 ? sh.heads_q / sh.heads_kv : 1;
  const int forced = bwd_kv_splits_switch();  // 0: the rule (unset or "auto")
  if (forced == 1 || !fused_backward_runs(p)) return 1;
  int splits = 1;
  if (forced > 1) {
    while (splits * 2 <= forced && group % (splits * 2) == 0) splits *= 2;
    return splits;
  }
  if (!(p.mask.window_left < 0 && p.mask.window_right >= 0)) return 1;
  // Packed sequences: the keys' rows as one sequence's (the tiles a head's sequences take, less
  // at most one a sequence). H100 2026-12-07, packed causal GQA, 2 or 8 copies: 1.05-1.64x
  // (benchmarks/NOTES.md).
  const int64_t tiles_per_head = p.varlen.cu_seqlens_k != nullptr
                                     ? (int64_t{p.varlen.total_k} + 127) / 128
                                     : int64_t{sh.batch} * ((int64_t{sh.seqlen_k} + 127) / 128);
  const int64_t tiles = sh.heads_kv * tiles_per_head;
  const int64_t sms = device_attribute<cudaDevAttrMultiProcessorCount>(132);
  while (group % (splits * 2) == 0 && tiles * splits < 4 * sms) splits *= 2;
  return splits;
}

}  // namespace cuflash
