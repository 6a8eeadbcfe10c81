// The forward's host-side choices (flash_launch.h). Split-KV: how many CTAs share a row's keys.
// Splitting pays where a few query blocks cannot fill the GPU (decoding: a few query tokens a
// sequence over a long KV cache), at the price of a float32 partial output per split and a
// combine kernel. The persistent TMA forward's walk: its L2 sections.
#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>
#include "device_attributes.h"
#include "flash_launch.h"
#include "mask.cuh"
#include "sm90/flash_fwd_sm90_tma.cuh"
#include "tile_shapes.h"

namespace cuflash {
namespace {

// FlashAttention-2's rule: the fewest splits whose wave efficiency (CTAs over whole waves of the
// slots) is within 85% of the best, among split counts that change the blocks a split takes.
int splits_for_waves(int64_t ctas, int slots, int key_blocks, int cap) {
  auto blocks_each = [&](int s) { return (key_blocks + s - 1) / s; };
  auto eligible = [&](int s) { return s == 1 || blocks_each(s) != blocks_each(s - 1); };
  std::vector<double> efficiency(cap + 1, 0.0);
  double best = 0.0;
  for (int s = 1; s <= cap; ++s) {
    if (!eligible(s)) continue;
    const double waves = static_cast<double>(ctas * s) / slots;
    efficiency[s] = waves / static_cast<double>(static_cast<int64_t>(waves + 0.999999));
    best = std::max(best, efficiency[s]);
  }
  for (int s = 1; s <= cap; ++s)
    if (eligible(s) && efficiency[s] >= 0.85 * best) return s;
  return 1;
}

// The kernel that runs the splits, as the count sees it: its tile and how many of its CTAs an SM
// holds. The plain narrow TMA forward where CUFLASH_SM90's "splits" part has it run them
// (sm90_paths' tma_splits) holds an SM alone (384 threads of up to 240 registers); the
// sm_80-class split kernel two CTAs an SM (128 threads of up to 255 registers, as
// FlashAttention-2 counts for its split kernel).
struct SplitKernelShape {
  int block_m, block_n, ctas_per_sm;
};
template <int kHeadDim>
SplitKernelShape tma_split_shape() {
  static_assert(sm90::kFwdHeadDim<kHeadDim>, "a head dim the TMA forward is built for (split_kernel_shape's list)");
  using K = sm90::FwdSm90TmaKernel<__nv_bfloat16, kHeadDim, false>;
  return {K::kBlockM, K::kBlockN, 1};
}
SplitKernelShape split_kernel_shape(const FlashFwdParams& p, int bucket) {
  if ((bucket == 64 || bucket == 128 || bucket == 256) && sm90::sm90_paths(p).tma_splits)
    return bucket == 64 ? tma_split_shape<64>() : bucket == 128 ? tma_split_shape<128>() : tma_split_shape<256>();
  return {kFwdSplitBlockM, fwd_split_block_n(bucket), 2};
}

}  // namespace

int fwd_num_splits(const FlashFwdParams& p, int requested) {
  // The split kernels are 16-bit ones; the debug tile counts count unsplit CTAs.
  if (requested == 1 || p.tile_counters != nullptr) return 1;
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return 1;
  const int bucket = cuda_head_dim_bucket(p.dtype, p.shape.head_dim);
  if (bucket == 0) return 1;
  const SplitKernelShape kernel = split_kernel_shape(p, bucket);
  const AttentionShape& sh = p.shape;
  const int key_blocks = (sh.seqlen_k + kernel.block_n - 1) / kernel.block_n;
  // Grid z holds batch x splits (at most 65535).
  const int cap = std::min({kMaxFwdSplits, key_blocks, 65535 / std::max(sh.batch, 1)});
  if (cap <= 1) return 1;
  if (requested > 1) return std::min(requested, cap);
  // Automatic (requested 0): one query block a sequence, and fewer CTAs than 80% of the slots.
  if (sh.seqlen_q > kernel.block_m) return 1;
  const int slots = kernel.ctas_per_sm * std::max(1, device_attribute<cudaDevAttrMultiProcessorCount>(1));
  const int64_t ctas = int64_t{sh.heads_q} * sh.batch;
  if (ctas * 5 >= int64_t{slots} * 4) return 1;
  return splits_for_waves(ctas, slots, key_blocks, std::min(cap, slots));
}

int fwd_walk_section_heads(const FlashFwdParams& p, int block_m, int block_n, int ctas, int64_t kv_bytes_per_pair) {
  // Without a mask every tile sees every key (tiles of one length: a pair a section, as
  // walk_section_heads says), so the common call skips the lock and the lookup below.
  if (sm90::unmasked(p)) return 1;
  const AttentionShape& sh = p.shape;
  const int heads_batches = sh.heads_q * sh.batch;
  using Key = std::tuple<int, int, int, int, bool, int, int, int, int, int, int64_t>;
  const Key key{sh.seqlen_q,        sh.seqlen_k, p.mask.window_left, p.mask.window_right, p.mask.bottom_right,
                p.mask.rows_per_query, block_m,  block_n,            heads_batches,      ctas,
                kv_bytes_per_pair};
  static std::mutex mutex;
  static std::map<Key, int> chosen;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = chosen.find(key);
    if (it != chosen.end()) return it->second;
  }
  // The grid's sequence: the TMA forward takes dense inputs (a KV cache's seqused_k is device
  // memory; its lengths only reorder the walk).
  AttentionParams grid = p;
  grid.varlen = VarlenParams{};
  const Sequence seq = sequence_of(grid, 0);
  std::vector<int> tile_steps;
  for (int m_start = 0; m_start < sh.seqlen_q; m_start += block_m) {
    const Range blocks = key_blocks(p.mask, seq, m_start, std::min(m_start + block_m, sh.seqlen_q), block_n);
    tile_steps.push_back(std::max(0, blocks.end - blocks.begin));
  }
  const int heads = sm90::walk_section_heads(tile_steps, heads_batches, ctas, kv_bytes_per_pair);
  const std::lock_guard<std::mutex> lock(mutex);
  if (chosen.size() >= 4096) chosen.clear();  // bounded: a long run of new shapes starts over
  chosen.emplace(key, heads);
  return heads;
}

}  // namespace cuflash
