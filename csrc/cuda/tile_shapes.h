// Tile shapes of the tensor-core (sm_80-class) kernels per head-dim bucket, with the reason.
// Every warp owns 16 rows of its CTA's resident tile; 4 warps per CTA.
#pragma once

namespace cuflash {

template <int kHeadDim>
struct FwdTile {
  static constexpr int kWarps = 4;
  static constexpr int kBlockM = 16 * kWarps;  // query rows per CTA
  // Keys per iteration: the S accumulator (kBlockN / 2 floats per thread) plus the O
  // accumulator (kHeadDim / 2) must stay in registers.
  static constexpr int kBlockN = kHeadDim <= 64 ? 128 : kHeadDim <= 128 ? 64 : 32;
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
