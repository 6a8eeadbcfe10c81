// Launch templates: one per (dtype, head-dim bucket), explicitly instantiated once per
// generated file in instantiations/. float16/bfloat16 run the tensor-core kernels (the Hopper
// ones where they apply), float32 the sm_80-class tensor-core kernels on fp16 pairs or in 3xTF32
// (fp32_pair_scratch_bytes; on Hopper the TF32 wgmma forward at head dims 33-64; or the exact
// CUDA-core kernels: fp32_on_tensor_cores), float64 the exact CUDA-core kernels.
#pragma once
#include <cxxabi.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include "flash_bwd_kernel.cuh"
#include "flash_fwd_kernel.cuh"
#include "device_attributes.h"
#include "flash_launch.h"
#include "flash_simt_kernel.cuh"
#include "fp32_pairs.h"
#include "run_switches.h"
#include "sm90/flash_bwd_sm90.cuh"
#include "sm90/flash_bwd_sm90_fused256.cuh"
#include "sm90/flash_fwd_sm90.cuh"
#include "sm90/flash_bwd_sm90_tma.cuh"
#include "sm90/flash_fwd_sm90_fp32.cuh"
#include "sm90/flash_fwd_sm90_tma.cuh"

namespace cuflash {

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// CUFLASH_DEBUG=1: the launch on stderr, the kernel by its demangled name (its template
// arguments say which path and tile ran).
inline void print_launch(const void* kernel, dim3 grid, int threads, int smem_bytes) {
  const char* name = nullptr;
  if (cudaFuncGetName(&name, kernel) != cudaSuccess || name == nullptr) name = "(unnamed kernel)";
  int status = -1;
  char* readable = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::fprintf(stderr, "cuflash_attn: %s, grid (%u, %u, %u), %d threads, %d bytes of shared memory\n",
               status == 0 && readable != nullptr ? readable : name, grid.x, grid.y, grid.z, threads, smem_bytes);
  std::free(readable);
}

// A kernel's dynamic shared memory limit raised to smem_bytes on the current device, where it
// is more than the 48 KiB default: once per kernel, device and size, not at every launch (the
// runtime call took 4.5 us of host time a launch, two a forward + backward: benchmarks/NOTES.md,
// "Short causal rows"). (A cudaDeviceReset would drop the attributes behind this record.)
inline cudaError_t reserve_shared_memory(const void* kernel, int smem_bytes) {
  if (smem_bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> reserved;  // (kernel, device) -> bytes
  const std::lock_guard<std::mutex> lock(mutex);
  int& bytes = reserved[{kernel, device}];
  if (bytes >= smem_bytes) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err == cudaSuccess) bytes = smem_bytes;
  return err;
}

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                   const Args&... args) {
  if (grid.x == 0) return cudaSuccess;
  if (debug_switch()) print_launch(reinterpret_cast<const void*>(kernel), grid, threads, smem_bytes);
  if (const cudaError_t err = reserve_shared_memory(reinterpret_cast<const void*>(kernel), smem_bytes);
      err != cudaSuccess)
    return err;
  kernel<<<grid, threads, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}

// float32: the tensor-core kernels (fp16 pairs or 3xTF32) unless CUFLASH_FP32=exact asks for
// the CUDA-core ones, where the tensors are not laid out for them (tensor_core_layout), or where
// the tiles' shared memory (smem_bytes, the most any kernel of the launch takes) exceeds what
// the device grants a block (tile_shapes.h: head dim 256 on an A100, above 64 on sm_86/89).
template <class Params>
bool fp32_on_tensor_cores(const Params& p, int smem_bytes) {
  return !fp32_exact_switch() && tensor_core_layout(p, sizeof(float)) &&
         smem_bytes <= device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024);
}

// Whether float32's forward of p runs on Hopper's TF32 wgmmas (sm90/flash_fwd_sm90_fp32.cuh):
// plain attention at head-dim bucket 64, unsplit, unless CUFLASH_FP32 asks for the mma.sync
// kernels (or for the pairs, which run first where they can: fp32_pair_scratch_bytes).
inline bool fp32_wgmma_forward_runs(const FlashFwdParams& p) {
  return p.dtype == DType::kFloat32 && !fp32_mma_sync_switch() &&
         cuda_head_dim_bucket(DType::kFloat32, p.shape.head_dim) == 64 && p.num_splits == 1 &&
         !needs_feature_path(p) && fp32_on_tensor_cores(p, FwdKernel<float, 64>::kSmemBytes) &&
         sm90::sm90_paths(p).fwd;
}

template <typename T, int kHeadDim>
cudaError_t run_flash_fwd_simt(const FlashFwdParams& p, cudaStream_t stream) {
  const AttentionShape& sh = p.shape;
  const dim3 grid(ceil_div(sh.seqlen_q, simt::kWarps), sh.heads_q, sh.batch);
  return launch(flash_fwd_simt_kernel<T, kHeadDim / 32>, grid, 32 * simt::kWarps, 0, stream, p);
}

// After the delta kernel: dQ, then dK and dV.
template <typename T, int kHeadDim>
cudaError_t run_flash_bwd_simt(const FlashBwdParams& p, cudaStream_t stream) {
  const AttentionShape& sh = p.shape;
  constexpr int kChunks = kHeadDim / 32, kThreads = 32 * simt::kWarps;
  const cudaError_t err = launch(flash_bwd_dq_simt_kernel<T, kChunks>,
                                 dim3(ceil_div(sh.seqlen_q, simt::kWarps), sh.heads_q, sh.batch), kThreads, 0, stream, p);
  if (err != cudaSuccess) return err;
  return launch(flash_bwd_dkdv_simt_kernel<T, kChunks>, dim3(ceil_div(sh.seqlen_k, simt::kWarps), sh.heads_kv, sh.batch),
                kThreads, 0, stream, p);
}

// Calls f(std::bool_constant<kFeatures>) for the kernels' feature path or plain path.
template <class F>
cudaError_t with_feature_path(const AttentionParams& p, F&& f) {
  if (needs_feature_path(p)) return f(std::true_type{});
  return f(std::false_type{});
}

// The TMA forward (plain attention, or the features kernel: with_feature_path): long rows take
// the wide tile (sm90::wide_rows), short rows, and long ones without a mask up to the wide
// tile's length, the persistent kernel where asked for and built (sm90::persistent_rows), at
// head dim 64 on the wide tile where sm90::persistent_wide_pays;
// CUFLASH_FWD_TILE overrides the tile. Packed sequences (cu_seqlens) only under the "varlen"
// part, on the plain kernels (the tiles that take them: kMayPack), as a dense batch of the
// longest sequence's length would be (the grid's lengths, max_seqlen_q and _k, stand in for each
// one's). False (nothing launched) where TMA cannot address p.
template <typename T, int kHeadDim>
bool launch_fwd_tma(const FlashFwdParams& p, const sm90::Sm90Paths& hopper, cudaStream_t stream, cudaError_t* err) {
  const AttentionShape& sh = p.shape;
  const bool packed = p.varlen.cu_seqlens_q != nullptr;
  if (packed && (!hopper.tma_varlen || p.num_splits > 1)) return false;
  auto run = [&](auto wide, auto features, auto persist) {
    constexpr bool kWide = decltype(wide)::value, kFeatures = decltype(features)::value;
    constexpr bool kPersistent = decltype(persist)::value;
    using K = sm90::FwdSm90TmaKernel<T, kHeadDim, kWide, kPersistent>;
    sm90::AttentionTmaMaps maps;
    if (!sm90::encode_fwd_tma_maps<T, kHeadDim, kWide>(p, &maps)) return false;
    const int m_blocks = ceil_div(sh.seqlen_q, K::kBlockM);
    const int64_t tiles = int64_t{m_blocks} * sh.heads_q * sh.batch;
    const int sms = std::max(1, device_attribute<cudaDevAttrMultiProcessorCount>(1));
    const int ctas = static_cast<int>(std::min<int64_t>(tiles, sms));
    const dim3 grid = kPersistent ? dim3(static_cast<unsigned>(ctas)) : dim3(m_blocks, sh.heads_q, sh.batch * p.num_splits);
    const int64_t kv_bytes_per_pair = int64_t{2} * sh.seqlen_k * kHeadDim * int64_t{sizeof(T)};
    const int section_heads = kPersistent ? fwd_walk_section_heads(p, K::kBlockM, K::kBlockN, ctas, kv_bytes_per_pair) : 1;
    const sm90::TileWalk walk = sm90::make_tile_walk(m_blocks, sh.heads_q, sh.heads_kv, sh.batch, section_heads);
    CUtensorMap map_mask{};
    // The staged mask's own kernel (kStagedMask) where the mask's tiles can be staged.
    if constexpr (kFeatures && K::kMayStageMask) {
      constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
      const sm90::MaskStaging staging =
          hopper.tma_mask ? sm90::encode_mask_map<K>(p, kBf16, &map_mask) : sm90::MaskStaging{};
      if (staging.on) {
        *err = launch(sm90::flash_fwd_sm90_tma_kernel<T, kHeadDim, kWide, kFeatures, kPersistent, true>, grid,
                      K::kThreads, K::kSmemBytesStagingMask, stream, p, maps.q, maps.k, maps.v, maps.o, walk, map_mask,
                      staging);
        return true;
      }
    }
    *err = launch(sm90::flash_fwd_sm90_tma_kernel<T, kHeadDim, kWide, kFeatures, kPersistent>, grid, K::kThreads,
                  K::kSmemBytes, stream, p, maps.q, maps.k, maps.v, maps.o, walk, map_mask, sm90::MaskStaging{});
    return true;
  };
  using Plain = sm90::FwdSm90TmaKernel<T, kHeadDim, false>;
  using Wide = sm90::FwdSm90TmaKernel<T, kHeadDim, true>;
  constexpr std::false_type no{};
  constexpr std::true_type yes{};
  // KV caches (CUFLASH_SM90's "kvcache" part) take the narrow tiles only, which handle them: a
  // paged cache's key blocks (128 or 64 keys) then divide every page size (multiples of 256:
  // no block straddles pages), and the wide kernels stay as they were.
  // Split-KV runs on the plain narrow kernel only (one tile a CTA; kMaySplit; sm90_paths keeps
  // the features' splits away).
  const bool kv_cache = p.paged.block_table != nullptr || p.varlen.seqused_k != nullptr;
  const bool split = p.num_splits > 1;
  if (needs_feature_path(p)) {
    // The features take the wide tiles of head dims 64 and 128 too, for dense batches (ptxas
    // spills 52 and 68 bytes there): at 64 where sm90::features_wide_pays, at 128 (192 keys a step, not
    // yet measured with the features) only under CUFLASH_FWD_TILE=wide. Head dim 256's wide tile
    // holds too many scores a thread. Elsewhere the narrow tile. Under the "persistentfeatures"
    // part both walk tiles persistently where sm90::features_persistent_rows says, the wide one
    // (head dim 64's: no room at 128) without a mask, as plain attention's
    // (sm90::persistent_wide_pays).
    const bool walk = Plain::kHasPersistent && hopper.persistent_features && !kv_cache && !split && !packed &&
                      sm90::features_persistent_rows(p, hopper.persistent_window);
    if constexpr (kHeadDim <= 128) {
      const bool pays = kHeadDim == 64 && sm90::features_wide_pays(p);
      if (!kv_cache && !split && !packed && fwd_wide_tile(pays)) {
        if constexpr (kHeadDim == 64)
          if (walk && sm90::unmasked(p)) return run(yes, yes, yes);
        return run(yes, yes, no);
      }
    }
    if constexpr (Plain::kHasPersistent)
      if (walk) return run(no, yes, yes);
    return run(no, yes, no);
  }
  if (!sm90::folds_scale_safely(p)) return false;  // the plain kernels fold it
  const bool wide_tile = fwd_wide_tile(sm90::wide_rows<kHeadDim>(p));
  const bool persistent_walk =
      Plain::kHasPersistent && hopper.persistent && !split &&
      (kv_cache ? !sm90::long_rows(p) : sm90::persistent_rows<kHeadDim>(p, hopper.persistent_window, !wide_tile));
  if (!kv_cache && !split && (!packed || Wide::kMayPack)) {
    if constexpr (kHeadDim == 64)  // the one head dim with a wide persistent kernel (smem)
      if (persistent_walk && fwd_wide_tile(sm90::persistent_wide_pays(p))) return run(yes, no, yes);
    if (wide_tile) return run(yes, no, no);
  }
  if constexpr (Plain::kHasPersistent)
    if (persistent_walk) return run(no, no, yes);
  return run(no, no, no);
}

// The sm_80-class forward's tile for split-KV launches: FwdSplitTile where it differs from
// FwdTile (16-bit up to head dim 128), else FwdTile's own kernel (no second instantiation).
template <typename T, int kHeadDim>
constexpr bool kOwnSplitTile = sizeof(T) == 2 && (FwdSplitTile<kHeadDim>::kBlockM != FwdTile<kHeadDim, 2>::kBlockM ||
                                                  FwdSplitTile<kHeadDim>::kBlockN != FwdTile<kHeadDim, 2>::kBlockN);
template <typename T, int kHeadDim>
using SplitTile =
    std::conditional_t<kOwnSplitTile<T, kHeadDim>, FwdSplitTile<kHeadDim>, FwdTile<kHeadDim, sizeof(T)>>;

// Split-KV's second launch: the combine kernel merging the splits' partial outputs.
template <typename T>
cudaError_t launch_combine(const FlashFwdParams& p, cudaStream_t stream) {
  const AttentionShape& sh = p.shape;
  return launch(flash_fwd_combine_kernel<T>, dim3(sh.seqlen_q, sh.heads_q, sh.batch), kCombineThreads, 0, stream, p);
}

// float32 as fp16 pairs (fp32_pairs.h): the pre-pass, then the sm_80-class forward on its rows.
template <int kHeadDim>
cudaError_t run_flash_fwd_pairs(const FlashFwdParams& p, cudaStream_t stream) {
  FlashFwdParams pairs = p;
  if (const cudaError_t err = split_fp32_pairs(pairs, kHeadDim, stream); err != cudaSuccess) return err;
  using K = FwdKernel<Fp32Pair, kHeadDim>;
  const dim3 grid(ceil_div(p.shape.seqlen_q, K::kBlockM), p.shape.heads_q, p.shape.batch);
  return with_feature_path(pairs, [&](auto features) {
    return launch(flash_fwd_kernel<Fp32Pair, kHeadDim, features()>, grid, K::kThreads, K::kSmemBytes, stream, pairs);
  });
}

template <typename T, int kHeadDim>
cudaError_t run_flash_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  const AttentionShape& sh = p.shape;
  if constexpr (std::is_same_v<T, double>) {
    return run_flash_fwd_simt<T, kHeadDim>(p, stream);
  } else {
    if constexpr (std::is_same_v<T, float>) {
      if (p.fp32_pair_scratch != nullptr) return run_flash_fwd_pairs<kHeadDim>(p, stream);  // fp32_pair_scratch_bytes
      if (!fp32_on_tensor_cores(p, FwdKernel<T, kHeadDim>::kSmemBytes)) return run_flash_fwd_simt<T, kHeadDim>(p, stream);
      if constexpr (kHeadDim == 64)
        if (fp32_wgmma_forward_runs(p)) {
          using K = sm90::FwdSm90Fp32Kernel<kHeadDim>;
          return launch(sm90::flash_fwd_sm90_fp32_kernel<kHeadDim>,
                        dim3(ceil_div(sh.seqlen_q, K::kBlockM), sh.heads_q, sh.batch), K::kThreads, K::kSmemBytes,
                        stream, p);
        }
    } else if constexpr (sm90::kFwdHeadDim<kHeadDim>) {
      // Split-KV (num_splits > 1, 16-bit only) runs on the TMA forward under the "splits" part,
      // else on the sm_80-class kernel below.
      const bool split = p.num_splits > 1;
      const sm90::Sm90Paths hopper = sm90::sm90_paths(p);
      cudaError_t err;
      const bool tma = hopper.tma && (!split || hopper.tma_splits);
      if (tma && launch_fwd_tma<T, kHeadDim>(p, hopper, stream, &err))
        return err != cudaSuccess || !split ? err : launch_combine<T>(p, stream);
      if (hopper.fwd && !split)
        return with_feature_path(p, [&](auto features) {
          using K = sm90::FwdSm90Kernel<T, kHeadDim, features()>;
          return launch(sm90::flash_fwd_sm90_kernel<T, kHeadDim, features()>,
                        dim3(ceil_div(sh.seqlen_q, K::kBlockM), sh.heads_q, sh.batch), K::kThreads, K::kSmemBytes,
                        stream, p);
        });
    }
    // Grid z: sequences x splits; with splits, the combine kernel merges the partial outputs.
    auto run_tile = [&](auto tile) {
      using Tile = decltype(tile);
      using K = FwdKernel<T, kHeadDim, Tile>;
      const dim3 grid(ceil_div(sh.seqlen_q, K::kBlockM), sh.heads_q, sh.batch * p.num_splits);
      return with_feature_path(p, [&](auto features) {
        return launch(flash_fwd_kernel<T, kHeadDim, features(), Tile>, grid, K::kThreads, K::kSmemBytes, stream,
                      p);
      });
    };
    if (p.num_splits == 1) return run_tile(FwdTile<kHeadDim, sizeof(T)>{});
    const cudaError_t err = run_tile(SplitTile<T, kHeadDim>{});
    return err != cudaSuccess ? err : launch_combine<T>(p, stream);
  }
}

// Where the fused head-dim-64 backward's 128-query steps pay (benchmarks/NOTES.md, H200): from
// 1024 keys seen by the middle query row (+1-20% at 2048-16384; at 512 the four-step columns
// lose 6-7% to the longer pipeline fill). Square attention's middle key column sees as many queries.
inline bool fused_wide_steps_pay(const FlashBwdParams& p) { return sm90::middle_row_keys(p) >= 1024; }

// A row kernel (flash_bwd_kernel.cuh) over every query row, kVec elements a lane at a time.
template <int kVec, typename Kernel>
cudaError_t launch_row_kernel(Kernel kernel, const FlashBwdParams& p, cudaStream_t stream) {
  const AttentionShape& sh = p.shape;
  const dim3 grid(ceil_div(sh.seqlen_q, rows_per_row_block(sh.head_dim, kVec)), sh.heads_q, sh.batch);
  return launch(kernel, grid, kRowKernelThreads, 0, stream, p);
}

// f(std::true_type{}) for packed sequences where the warp-specialized backward kernel K takes them
// (its kPacked variant; only where its maps were encoded, which bwd_tma_addressable allows for
// K::kMayPack alone), else f(std::false_type{}).
template <class K, class F>
auto with_bwd_packing(const FlashBwdParams& p, F&& f) {
  if constexpr (K::kMayPack)
    if (p.varlen.cu_seqlens_q != nullptr) return f(std::true_type{});
  return f(std::false_type{});
}

// The fused head-dim-256 Hopper backward (sm90/flash_bwd_sm90_fused256.cuh; its dQ adds in a
// fixed order with p.dq_semaphores; kFeatures: softcap, ALiBi, attn_mask and dropout, the
// "bwdfeatures" part): true with *err its launch's, false (nothing launched) where it cannot run
// (no tile counter, inputs TMA cannot address).
template <typename T, bool kFeatures>
bool launch_bwd_fused256(const FlashBwdParams& p, cudaStream_t stream, cudaError_t* err) {
  if (p.dkdv_tile_counter == nullptr) return false;
  auto go = [&](auto ordered) {
    constexpr bool kOrdered = decltype(ordered)::value;
    using Fused = sm90::BwdFused256Kernel<T, kOrdered>;
    sm90::BackwardTmaMaps maps{};
    if (!sm90::encode_bwd_tma_maps<T, Fused>(p, &maps) ||
        !sm90::encode_dkdv_maps(p, std::is_same_v<T, __nv_bfloat16>, &maps, Fused::kBlockN))
      return false;
    const AttentionShape& sh = p.shape;
    const int64_t num_tiles = int64_t{ceil_div(sh.seqlen_k, Fused::kBlockN)} * sh.heads_kv * sh.batch;
    const int sms = std::max(1, device_attribute<cudaDevAttrMultiProcessorCount>(1));
    *err = with_bwd_packing<Fused>(p, [&](auto packed) {
      return launch(sm90::flash_bwd_fused_sm90_tma_kernel<T, kOrdered, decltype(packed)::value, kFeatures>,
                    dim3(static_cast<unsigned>(std::min<int64_t>(num_tiles, sms))), Fused::kThreads,
                    Fused::kSmemBytes, stream, p, maps.q, maps.dout, maps.k, maps.v, maps.dq_accum, maps.dk, maps.dv);
    });
    return true;
  };
  return p.dq_semaphores != nullptr ? go(std::true_type{}) : go(std::false_type{});
}

// The warp-specialized dK/dV kernel (sm90/flash_bwd_sm90_tma.cuh), where TMA can address the
// inputs: true with *err its launch's, false (nothing launched) otherwise. kAccum: dQ too, added
// by TMA reduce (the fused kernel), in a fixed order with p.dq_semaphores; kWide: 128-query steps
// (head dim 64); kFeatures: softcap, ALiBi, attn_mask and dropout (the fused kernel's, the
// "bwdfeatures" part); stage_mask: the attn_mask's tiles staged by TMA where they can be (the
// "bwdmasktma" part: the kernel's kStagedMask, sm90::encode_mask_map).
template <typename T, int kHeadDim, bool kAccum, bool kWithDk, bool kWithDv, bool kWide, bool kFeatures>
bool launch_dkdv_ws(const FlashBwdParams& p, cudaStream_t stream, cudaError_t* err, bool stage_mask = false) {
  static_assert(!kFeatures || (kAccum && kWithDk && kWithDv), "the features on the fused kernel only");
  const AttentionShape& sh = p.shape;
  sm90::BackwardTmaMaps maps{};
  auto go = [&](auto ordered) {
    constexpr bool kOrdered = decltype(ordered)::value;
    using Ws = sm90::BwdDkvSm90TmaKernel<T, kHeadDim, kAccum, kWithDk, kWithDv, kWide, kOrdered>;
    // Its CTAs take their tiles from dkdv_tile_counter (set_fused_dq_scratch sets it with
    // dq_accum); a caller that gives none gets the other kernels.
    if (Ws::kPersistent && p.dkdv_tile_counter == nullptr) return false;
    if (!sm90::encode_bwd_tma_maps<T, Ws>(p, &maps)) return false;
    if (Ws::kTmaStoreDkv && !sm90::encode_dkdv_maps(p, std::is_same_v<T, __nv_bfloat16>, &maps)) return false;
    const dim3 tiles(ceil_div(sh.seqlen_k, Ws::kBlockN), sh.heads_kv, sh.batch);
    const int64_t num_tiles = int64_t{tiles.x} * tiles.y * tiles.z;
    const int sms = std::max(1, device_attribute<cudaDevAttrMultiProcessorCount>(1));
    const dim3 grid = Ws::kPersistent ? dim3(static_cast<unsigned>(std::min<int64_t>(num_tiles, sms))) : tiles;
    CUtensorMap map_mask{};
    sm90::MaskStaging staging{};
    if constexpr (kFeatures && Ws::kMayStageMask)
      if (stage_mask) staging = sm90::encode_mask_map<Ws>(p, std::is_same_v<T, __nv_bfloat16>, &map_mask);
    *err = with_bwd_packing<Ws>(p, [&](auto packed) {
      constexpr bool kPacked = decltype(packed)::value;
      if constexpr (kFeatures && !kPacked && Ws::kMayStageMask) {  // the staged mask's own kernel
        if (staging.on)
          return launch(sm90::flash_bwd_dkdv_sm90_tma_kernel<T, kHeadDim, kAccum, kWithDk, kWithDv, kWide, kOrdered,
                                                             kPacked, kFeatures, true>,
                        grid, Ws::kThreads, Ws::kSmemBytesStagingMask, stream, p, maps.q, maps.dout, maps.k, maps.v,
                        maps.dq_accum, maps.dk, maps.dv, map_mask, staging);
      }
      return launch(sm90::flash_bwd_dkdv_sm90_tma_kernel<T, kHeadDim, kAccum, kWithDk, kWithDv, kWide, kOrdered,
                                                         kPacked, kFeatures>,
                    grid, Ws::kThreads, Ws::kSmemBytesUnstaged, stream, p, maps.q, maps.dout, maps.k, maps.v,
                    maps.dq_accum, maps.dk, maps.dv, map_mask, staging);
    });
    return true;
  };
  if constexpr (kAccum)
    if (p.dq_semaphores != nullptr) return go(std::true_type{});
  return go(std::false_type{});
}

// The sm_80-class backward after the delta kernel: the dQ kernel (unless dQ is added up in
// p.dq_accum, by the dK/dV kernel), then the dK/dV kernel (at head dim 256 dK's, then dV's).
template <typename T, int kHeadDim>
cudaError_t launch_bwd_sm80(const FlashBwdParams& p, cudaStream_t stream) {
  const AttentionShape& sh = p.shape;
  const bool accum_dq = p.dq_accum != nullptr;
  return with_feature_path(p, [&](auto features) {
    constexpr bool kFeatures = features();
    cudaError_t e = cudaSuccess;
    if (!accum_dq) {
      using Dq = BwdDqKernel<T, kHeadDim>;
      e = launch(flash_bwd_dq_kernel<T, kHeadDim, kFeatures>,
                 dim3(ceil_div(sh.seqlen_q, Dq::kBlockM), sh.heads_q, sh.batch), Dq::kThreads, Dq::kSmemBytes,
                 stream, p);
      if (e != cudaSuccess) return e;
    }
    using Dkv = BwdDkvKernel<T, kHeadDim>;
    const dim3 grid(ceil_div(sh.seqlen_k, Dkv::kBlockN), sh.heads_kv, sh.batch);
    constexpr bool kSplit = Dkv::Tile::kSplitDkDv;  // then dQ comes with dK, which computes dS
    auto launch_dk = [&](auto accum) {
      constexpr bool kAccumDq = decltype(accum)::value;
      return launch(flash_bwd_dkdv_kernel<T, kHeadDim, kFeatures, true, !kSplit, kAccumDq>, grid, Dkv::kThreads,
                    kAccumDq ? Dkv::kSmemBytesAccumDq : Dkv::kSmemBytes, stream, p);
    };
    if constexpr (kIsPair<T>) {  // float32 never adds dQ up (torch_ops.cpp: 16-bit only)
      if (accum_dq) return cudaErrorNotSupported;
      e = launch_dk(std::false_type{});
    } else {
      e = accum_dq ? launch_dk(std::true_type{}) : launch_dk(std::false_type{});
    }
    if constexpr (kSplit) {
      if (e != cudaSuccess) return e;
      return launch(flash_bwd_dkdv_kernel<T, kHeadDim, kFeatures, false, true, false>, grid, Dkv::kThreads,
                    Dkv::kSmemBytes, stream, p);
    }
    return e;
  });
}

// float32 as fp16 pairs (fp32_pairs.h), after the delta kernel (on p's own out and dout): the
// pre-pass of q, k, v and dout, then the sm_80-class kernels on its rows.
template <int kHeadDim>
cudaError_t run_flash_bwd_pairs(const FlashBwdParams& p, cudaStream_t stream) {
  FlashBwdParams pairs = p;
  if (const cudaError_t err = split_fp32_pairs(pairs, kHeadDim, stream, &pairs.dout, &pairs.dout_strides);
      err != cudaSuccess)
    return err;
  return launch_bwd_sm80<Fp32Pair, kHeadDim>(pairs, stream);
}

template <typename T, int kHeadDim>
cudaError_t run_flash_bwd(const FlashBwdParams& p, cudaStream_t stream) {
  const AttentionShape& sh = p.shape;
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  // The row kernels in 16-byte chunks where every row they touch allows.
  constexpr int kVec = 16 / sizeof(T);
  const bool rows_in_chunks = sh.head_dim * sizeof(T) % 16 == 0;
  const bool delta_chunked = rows_in_chunks && rows_of_16_bytes(p.out, p.out_strides, sizeof(T)) &&
                             rows_of_16_bytes(p.dout, p.dout_strides, sizeof(T)) &&
                             (p.dq_accum == nullptr || rows_of_16_bytes(p.dq_accum, p.dq_accum_strides, 4));
  cudaError_t err = delta_chunked ? launch_row_kernel<kVec>(flash_bwd_delta_kernel<T, Acc, kVec>, p, stream)
                                  : launch_row_kernel<1>(flash_bwd_delta_kernel<T, Acc, 1>, p, stream);
  if (err != cudaSuccess) return err;
  if constexpr (std::is_same_v<T, double>) {
    return run_flash_bwd_simt<T, kHeadDim>(p, stream);
  } else {
    if constexpr (std::is_same_v<T, float>) {
      if (p.fp32_pair_scratch != nullptr) return run_flash_bwd_pairs<kHeadDim>(p, stream);  // fp32_pair_scratch_bytes
      const int smem = std::max(BwdDqKernel<T, kHeadDim>::kSmemBytes, BwdDkvKernel<T, kHeadDim>::kSmemBytes);
      if (!fp32_on_tensor_cores(p, smem)) return run_flash_bwd_simt<T, kHeadDim>(p, stream);
    }
    const bool accum_dq = p.dq_accum != nullptr;
    auto convert_dq = [&] {
      const bool chunked = rows_in_chunks && rows_of_16_bytes(p.dq_accum, p.dq_accum_strides, 4) &&
                           rows_of_16_bytes(p.dq, p.dq_strides, sizeof(T));
      return chunked ? launch_row_kernel<kVec>(flash_bwd_dq_convert_kernel<T, kVec>, p, stream)
                     : launch_row_kernel<1>(flash_bwd_dq_convert_kernel<T, 1>, p, stream);
    };
    if constexpr (!std::is_same_v<T, float> && sm90::kBwdHeadDim<kHeadDim>) {
      using K = sm90::BwdSm90Kernel<T, kHeadDim>;
      const sm90::Sm90Paths hopper = sm90::sm90_paths(p);
      // dQ added up at head dim 256: the fused kernel where it runs, else the sm_80-class kernels
      // (the dK/dV kernels below take dQ in 64-row steps, not at 256); with the features too
      // where fused_backward_runs let the caller add dQ up.
      if constexpr (K::kSplitDkDv) {
        if (accum_dq && hopper.bwd_ws && launch_bwd_fused256<T, false>(p, stream, &err))
          return err != cudaSuccess ? err : convert_dq();
        if (accum_dq && hopper.bwd_features && launch_bwd_fused256<T, true>(p, stream, &err))
          return err != cudaSuccess ? err : convert_dq();
      } else {  // the features on the fused kernel (64-query steps), likewise; else the sm_80-class kernels
        if (accum_dq && hopper.bwd_features &&
            launch_dkdv_ws<T, kHeadDim, true, true, true, false, true>(p, stream, &err, hopper.bwd_tma_mask))
          return err != cudaSuccess ? err : convert_dq();
      }
      if (hopper.bwd && !(accum_dq && K::kSplitDkDv)) {
        const dim3 key_grid(ceil_div(sh.seqlen_k, K::kResident), sh.heads_kv, sh.batch);
        constexpr std::true_type yes{};
        constexpr std::false_type no{};
        // The warp-specialized dK/dV kernel where the bwdws part is on (launch_dkdv_ws).
        auto dkdv_ws = [&](auto accum, auto with_dk, auto with_dv, auto wide) {
          return hopper.bwd_ws && launch_dkdv_ws<T, kHeadDim, decltype(accum)::value, decltype(with_dk)::value,
                                                          decltype(with_dv)::value, decltype(wide)::value, false>(
                                      p, stream, &err);
        };
        if constexpr (!K::kSplitDkDv) {
          if (accum_dq) {
            // The fused kernel (at head dim 64 with 128-query steps where they pay), else the
            // cp.async one.
            bool launched = false;
            if constexpr (kHeadDim == 64)
              if (bwd_fused_wide_steps(fused_wide_steps_pay(p))) launched = dkdv_ws(yes, yes, yes, yes);
            if (!launched && !dkdv_ws(yes, yes, yes, no)) {
              if (p.dq_semaphores != nullptr) return cudaErrorNotSupported;  // ordered adds are its alone
              err = launch(sm90::flash_bwd_dkdv_sm90_kernel<T, kHeadDim, true>, key_grid, K::kThreads,
                           K::kSmemBytes + K::kDsBytes, stream, p);
            }
            return err != cudaSuccess ? err : convert_dq();
          }
        }
        auto launch_dq = [&] {
          if (hopper.bwd_ws) {  // the warp-specialized dQ kernel where TMA can address the inputs
            using Ws = sm90::BwdDqSm90TmaKernel<T, kHeadDim>;
            sm90::BackwardTmaMaps maps{};
            if (sm90::encode_bwd_tma_maps<T, Ws>(p, &maps))
              return with_bwd_packing<Ws>(p, [&](auto packed) {
                return launch(sm90::flash_bwd_dq_sm90_tma_kernel<T, kHeadDim, decltype(packed)::value>,
                              dim3(ceil_div(sh.seqlen_q, Ws::kBlockM), sh.heads_q, sh.batch), Ws::kThreads,
                              Ws::kSmemBytes, stream, p, maps.q, maps.dout, maps.k, maps.v);
              });
          }
          return launch(sm90::flash_bwd_dq_sm90_kernel<T, kHeadDim>,
                        dim3(ceil_div(sh.seqlen_q, K::kResident), sh.heads_q, sh.batch), K::kThreads, K::kSmemBytes,
                        stream, p);
        };
        err = launch_dq();
        if (err != cudaSuccess) return err;
        // dK and dV: one launch, or at head dim 256 two (kSplitDkDv: dK, then dV); wide: the
        // warp-specialized kernel's 128-query steps (head dim 64, unless CUFLASH_BWD_TILE=narrow).
        auto launch_dkdv = [&](auto with_dk, auto with_dv, auto wide) {
          if (dkdv_ws(no, with_dk, with_dv, wide)) return err;
          constexpr bool kWithDk = decltype(with_dk)::value, kWithDv = decltype(with_dv)::value;
          return launch(sm90::flash_bwd_dkdv_sm90_kernel<T, kHeadDim, false, kWithDk, kWithDv>, key_grid, K::kThreads,
                        K::kSmemBytes, stream, p);
        };
        if constexpr (K::kSplitDkDv) {
          err = launch_dkdv(yes, no, no);
          if (err != cudaSuccess) return err;
          return launch_dkdv(no, yes, no);
        } else {
          if constexpr (kHeadDim == 64)
            if (bwd_wide_steps(true)) return launch_dkdv(yes, yes, yes);
          return launch_dkdv(yes, yes, no);
        }
      }
    }
    if (p.dq_semaphores != nullptr) return cudaErrorNotSupported;  // ordered adds: the fused Hopper kernel's
    err = launch_bwd_sm80<T, kHeadDim>(p, stream);
    if (err != cudaSuccess || !accum_dq) return err;
    return convert_dq();
  }
}

}  // namespace cuflash
