// Tile shapes of the tensor-core (sm_80-class) kernels per head-dim bucket, with the reason.
// 4 warps per CTA; every warp owns 16-row tiles of its CTA's resident tile.
#pragma once

namespace cuflash {

template <int kHeadDim>
struct FwdTile {
  static constexpr int kWarps = 4;
  // 16-row tiles per warp: two share every K and V fragment read from shared memory (half the
  // shared-memory traffic per flop), as long as their O accumulators (kHeadDim / 2 floats per
  // thread each) fit in registers.
  static constexpr int kMTiles = kHeadDim <= 128 ? 2 : 1;
  static constexpr int kBlockM = 16 * kMTiles * kWarps;  // query rows per CTA
  // Keys per iteration: the S accumulators (kBlockN / 2 floats per thread per row tile) must
  // fit beside the O accumulators (at 128 two of 64 keys spill).
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;
};

template <int kHeadDim>
struct BwdTile {
  static constexpr int kWarps = 4;
  // dQ kernel: queries resident (16 per warp), keys streamed.
  static constexpr int kDqBlockM = 16 * kWarps;
  static constexpr int kDqBlockN = kHeadDim <= 128 ? 64 : 32;
  // dK/dV kernel: keys resident (16 per warp), queries streamed. Above 128, dK and dV
  // accumulators together would spill, so dK and dV are computed by two launches.
  static constexpr int kDkvBlockN = 16 * kWarps;
  static constexpr int kDkvBlockM = kHeadDim <= 64 ? 64 : 32;
  static constexpr bool kSplitDkDv = kHeadDim > 128;
};

}  // namespace cuflash
