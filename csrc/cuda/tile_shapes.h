// Tile shapes of the tensor-core (sm_80-class) kernels per head-dim bucket and element size
// (2: float16/bfloat16; 4: float32, whose tiles take twice the shared memory), with the reason.
// 4 warps per CTA; every warp owns 16-row tiles of its CTA's resident tile.
#pragma once

namespace cuflash {

template <int kHeadDim, int kElemBytes>
struct FwdTile {
  static constexpr int kWarps = 4;
  // 16-row tiles per warp: two share every K and V fragment read from shared memory (half the
  // shared-memory traffic per flop), as long as their O accumulators (kHeadDim / 2 floats per
  // thread each) fit in registers.
  // float32: one (its 3xTF32 operands and per-step sums take the registers of the second).
  static constexpr int kMTiles = kElemBytes == 2 && kHeadDim <= 128 ? 2 : 1;
  static constexpr int kBlockM = 16 * kMTiles * kWarps;  // query rows per CTA
  // Keys per iteration: the S accumulators (kBlockN / 2 floats per thread per row tile) must
  // fit beside the O accumulators (at 128 two of 64 keys spill); float32 at 256: 16, so that
  // Q and two K/V buffers fit an A100's 163 KiB.
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : kElemBytes == 4 && kHeadDim > 128 ? 16 : 32;
};

template <int kHeadDim, int kElemBytes>
struct BwdTile {
  static constexpr int kWarps = 4;
  // float32 streams half the rows of 16-bit types above head dim 32: at 64 for registers (64
  // streamed rows spill 200-300 bytes), above for shared memory (two resident and four streamed
  // tiles at twice the bytes: 139 KiB at 128, 203 KiB at 256, an H100's; elsewhere that head
  // dim runs the CUDA-core kernels).
  static constexpr int kStreamDivisor = kElemBytes == 4 && kHeadDim > 32 ? 2 : 1;
  // dQ kernel: queries resident (16 per warp), keys streamed.
  static constexpr int kDqBlockM = 16 * kWarps;
  static constexpr int kDqBlockN = (kHeadDim <= 128 ? 64 : 32) / kStreamDivisor;
  // dK/dV kernel: keys resident (16 per warp), queries streamed. Above 128, dK and dV
  // accumulators together would spill, so dK and dV are computed by two launches.
  static constexpr int kDkvBlockN = 16 * kWarps;
  static constexpr int kDkvBlockM = (kHeadDim <= 64 ? 64 : 32) / kStreamDivisor;
  static constexpr bool kSplitDkDv = kHeadDim > 128;
};

}  // namespace cuflash
