// Tile shapes of the tensor-core (sm_80-class) kernels per head-dim bucket and element size
// (2: float16/bfloat16; 4: float32, whose tiles take twice the shared memory), with the reason;
// kPairs: float32 as fp16 pairs (fp32_pairs.h: 4 bytes an element too, but 16-bit fragments).
// 4 warps per CTA; every warp owns 16-row tiles of its CTA's resident tile.
#pragma once
#include <type_traits>
#include "../flash_params.h"

namespace cuflash {

template <int kHeadDim, int kElemBytes, bool kPairs = false>
struct FwdTile {
  static constexpr int kWarps = 4;
  // 16-row tiles per warp: two share every K and V fragment read from shared memory (half the
  // shared-memory traffic per flop), as long as their O accumulators (kHeadDim / 2 floats per
  // thread each) fit in registers.
  // float32: one (its 3xTF32 operands and per-step sums take the registers of the second; as
  // fp16 pairs, two at head dim 64 took 255 registers and spilled, ptxas sm_80 and sm_90a).
  static constexpr int kMTiles = kElemBytes == 2 && kHeadDim <= 128 ? 2 : 1;
  static constexpr int kBlockM = 16 * kMTiles * kWarps;  // query rows per CTA
  // Keys per iteration: the S accumulators (kBlockN / 2 floats per thread per row tile) must
  // fit beside the O accumulators (at 128 two of 64 keys spill). float32: 32 up to head dim 64,
  // 16 above, so that three CTAs fit an SM's shared memory (kMinBlocks; 55-70 KiB each). As fp16
  // pairs (16-bit fragments, the registers of the 16-bit kernels, 4 bytes an element): the
  // 16-bit kernels' keys up to 128 (46-100 KiB with the rows' scales: at 128 just over sm_86/89's
  // 99 KiB a block, where float32 then runs 3xTF32), 16 at 256 (131 KiB). H100: 1.17-1.54x the
  // 3xTF32 kernels' forward (benchmarks/NOTES.md); no other tile measured.
  static constexpr int kBlockN = kPairs ? (kHeadDim <= 64 ? 64 : kHeadDim <= 128 ? 32 : 16)
                                 : kElemBytes == 4 ? (kHeadDim <= 64 ? 32 : 16)
                                 : kHeadDim <= 64 ? 64 : 32;
  // float32 (3xTF32) up to head dim 128: three CTAs an SM (the tiles' shared memory allows it),
  // registers capped to fit (168; 12-44 bytes spill in the plain kernels).
  static constexpr int kMinBlocks = kElemBytes == 4 && kHeadDim <= 128 && !kPairs ? 3 : 1;
};

// Split-KV's forward (16-bit; decoding: a few query rows a sequence over a long cache, the K/V
// stream the whole cost): one 16-row tile a warp, as a decoding step fills a few rows, so O's
// registers leave room for more keys a block: 32 KiB of K and V a block at head dims 64, 128
// and 256, twice FwdTile's bytes in flight a CTA up to 128 (FlashAttention-2's split kernel takes
// 64 rows too). Above 128 it is FwdTile's.
// (The same rows at every head dim; forward_choice.cu reads the keys a block at run time.)
constexpr int kFwdSplitBlockM = 64;
constexpr int fwd_split_block_n(int head_dim) { return head_dim <= 64 ? 128 : head_dim <= 128 ? 64 : 32; }
template <int kHeadDim>
struct FwdSplitTile {
  static constexpr int kWarps = 4;
  static constexpr int kMTiles = kFwdSplitBlockM / (16 * kWarps);
  static constexpr int kBlockM = kFwdSplitBlockM;
  static constexpr int kBlockN = fwd_split_block_n(kHeadDim);
  static constexpr int kMinBlocks = 1;
};


template <int kHeadDim, int kElemBytes, bool kPairs = false>
struct BwdTile {
  static constexpr int kWarps = 4;
  // float32 streams 32 rows a step up to head dim 64, 16 above (twice the bytes per element, and
  // the 3xTF32 operands' registers: 64 rows spill 200-300 bytes in the dK/dV kernel at 64, 32
  // spill 400 at 128, and the dQ kernel's 139 KiB at 128 would leave one CTA an SM). The backward
  // takes 104 KiB at 128 and 203 KiB at 256 (the forward 135 at 256): where a GPU grants a block
  // less (A100 163, sm_86/89 99), float32 runs the CUDA-core kernels there. As fp16 pairs (16-bit
  // fragments, 4 bytes an element): the dQ kernel 32 keys a step up to 128, 16 at 256 (69, 133,
  // 196 KiB at 64, 128, 256); the dK/dV kernel 32 queries at 64, 16 above (70, 100, 196 KiB: at 128
  // 32 spilled 332 bytes, ptxas sm_80; sm_90a 432). H100: 1.17-1.63x the 3xTF32 backward; no
  // other tile measured.
  static constexpr bool kFloat32 = kElemBytes == 4;
  static constexpr int kFloat32Rows = kPairs ? (kHeadDim <= 128 ? 32 : 16) : kHeadDim <= 64 ? 32 : 16;
  // dQ kernel: queries resident (16 per warp), keys streamed.
  static constexpr int kDqBlockM = 16 * kWarps;
  static constexpr int kDqBlockN = kFloat32 ? kFloat32Rows : kHeadDim <= 128 ? 64 : 32;
  // dK/dV kernel: keys resident (16 per warp), queries streamed. Above 128, dK and dV
  // accumulators together would spill, so dK and dV are computed by two launches.
  static constexpr int kDkvBlockN = 16 * kWarps;
  static constexpr int kDkvBlockM = kPairs && kHeadDim > 64 ? 16 : kFloat32 ? kFloat32Rows : kHeadDim <= 64 ? 64 : 32;
  static constexpr bool kSplitDkDv = kHeadDim > 128;
};

// The tiles for element type T.
template <typename T, int kHeadDim>
using FwdTileOf = FwdTile<kHeadDim, sizeof(T), std::is_same_v<T, Fp32Pair>>;
template <typename T, int kHeadDim>
using BwdTileOf = BwdTile<kHeadDim, sizeof(T), std::is_same_v<T, Fp32Pair>>;

}  // namespace cuflash
