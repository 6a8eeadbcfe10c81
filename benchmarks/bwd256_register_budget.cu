// A register-budget model of the planned fused head-dim-256 Hopper backward (benchmarks/NOTES.md,
// "Head dim 256 backward: a build plan"): not a kernel of the library and never run. It holds
// the consumer warpgroups' step as planned, with its 58 wgmmas (S and dP 64 x 40 a warpgroup,
// dV^T and dK^T 128 head dims x 80 keys in two slices, dQ 64 x 128 in two slices), P^T and dS^T
// stored by stmatrix .trans, the named-barrier hand-offs and the dQ slices' stores, so that ptxas
// says whether that step fits 240 registers without spilling or serializing the wgmmas, the
// plan's largest risk, before the kernel is written. The producer is reduced to its barrier
// arrivals (no TMA); the tile walk is a grid-stride loop over 80-key tiles and the mask, where
// kCausal, a top-left causal one on P (the kernel's also has windows, bottom-right offsets and
// sequence ends: a few registers more).
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -cubin -Xptxas -v -I csrc \
//     -o /tmp/budget.cubin benchmarks/bwd256_register_budget.cu
// then cuobjdump -sass: STL/LDL after the consumers' USETMAXREG, and whether each HGMMA waits.
#include <cuda_bf16.h>

#include "cuda/mma_sm80.cuh"  // MmaOperand<T>::pack
#include "cuda/sm90/wgmma.cuh"
#include "cuda/sm90/wgmma_instructions.cuh"

namespace {
using namespace cuflash::sm90;
using T = __nv_bfloat16;
constexpr int kBlockM = 64, kBlockN = 80, kHeadDim = 256, kPanels = kHeadDim / 64;
constexpr int kTileBytes = kBlockN * 128;            // one 64-column panel of K or V (80 rows)
constexpr int kQPanelBytes = kBlockM * 128;           // one panel of Q or dO (64 rows)
constexpr int kKVBytes = kPanels * kTileBytes, kQBytes = kPanels * kQPanelBytes;
constexpr int kPdsBytes = kBlockN * 128;              // P^T or dS^T: [key][query], one panel
constexpr int kDqBoxBytes = 64 * 32 * 4;              // a dQ box: 64 queries x 32 fp32 columns
constexpr int kSmemBytes = 2 * kKVBytes + 2 * kQBytes + kQBytes + 2 * kPdsBytes + 2 * kDqBoxBytes + 1024 + 128 + 1024;
static_assert(kSmemBytes <= 227 * 1024, "the plan's layout A");
static_assert(fits_launch_registers<384>(24, 240), "setmaxnreg's split");
// Named barriers: P^T in (2 + c), dS^T in (4 + c), the warpgroup done with a step (6 + c), a dQ
// box free (8 + c) and full (10 + c; the drain warp's side).
enum : int { kPready = 2, kDsReady = 4, kDone = 6, kDqEmpty = 8, kDqFull = 10 };

using cuflash::MmaOperand;
// One dQ slice (64 queries x 64 columns) out as two boxes of 32 columns, each handed to the drain.
__device__ __forceinline__ void store_dq_slice(uint32_t box, int c, const float (&dq)[32]) {
  const int lane = threadIdx.x % 32, row = 16 * ((threadIdx.x / 32) % 4) + lane / 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    named_barrier_sync<160>(kDqEmpty + c);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float* v = &dq[4 * (4 * half + j) + 2 * r];
        st_shared_f32x2(box + swizzle128_offset_f32(row + 8 * r, 8 * j + 2 * (lane % 4)), v[0], v[1]);
      }
    fence_async_shared();
    named_barrier_arrive<160>(kDqFull + c);
  }
}
}  // namespace

template <bool kCausal>
__global__ void __launch_bounds__(384, 1)
    bwd256_budget(const float* lse2_g, const float* delta_g, float* dk_out, float* dv_out, int num_tiles, int steps,
                  float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  unsigned char* sK = smem;
  unsigned char* sV = sK + kKVBytes;
  unsigned char* sQ = sV + kKVBytes;  // [2 stages]
  unsigned char* sdO = sQ + 2 * kQBytes;
  unsigned char* sPt = sdO + kQBytes;
  unsigned char* sdSt = sPt + kPdsBytes;
  unsigned char* sdQ = sdSt + kPdsBytes;  // [consumer] one box each
  float* sStats = reinterpret_cast<float*>(sdQ + 2 * kDqBoxBytes);  // lse2, delta [2 stages][64]
  uint64_t* q_full = reinterpret_cast<uint64_t*>(sStats + 256);      // [2]
  uint64_t* q_empty = q_full + 2;                                    // [2]
  uint64_t* do_full = q_empty + 2;
  uint64_t* do_empty = do_full + 1;
  const int warpgroup = warpgroup_index();
  // This CTA's steps over all its tiles (global step g: the rings run on across tiles).
  const int total = (num_tiles > static_cast<int>(blockIdx.x) ? (num_tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0) * steps;
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) mbarrier_init(&q_full[i], 1), mbarrier_init(&q_empty[i], 256);
    mbarrier_init(do_full, 1);
    mbarrier_init(do_empty, 256);
    fence_barrier_init();
  }
  __syncthreads();
  if (warpgroup == 0) {
    setmaxnreg_dec<24>();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (warp == 0 && lane == 0) {  // the loads' barrier protocol, without the loads
      for (int g = 0; g < total; ++g) {
        if (g >= 2) mbarrier_wait(&q_empty[g % 2], ((g / 2) - 1) & 1);
        for (int i = threadIdx.x; i < 128; i += 32)
          sStats[(g % 2) * 128 + i] = i < 64 ? lse2_g[(g % steps) * 64 + i] : delta_g[(g % steps) * 64 + i - 64];
        mbarrier_arrive(&q_full[g % 2]);
        if (g >= 1) mbarrier_wait(do_empty, (g - 1) & 1);
        mbarrier_arrive(do_full);
      }
    } else if (warp == 2) {  // the drain: takes each box (a TMA reduce-add in the kernel)
      for (int c = 0; c < 2; ++c) named_barrier_arrive<160>(kDqEmpty + c);
      for (int g = 0; g < total; ++g)
        for (int box = 0; box < 4; ++box)
          for (int c = 0; c < 2; ++c) {
            named_barrier_sync<160>(kDqFull + c);
            named_barrier_arrive<160>(kDqEmpty + c);
          }
    }
    return;
  }
  setmaxnreg_inc<240>();
  const int c = warpgroup - 1, tid = threadIdx.x % 128, lane = tid % 32, warp_row = 16 * (tid / 32) + lane / 4;
  const uint32_t pt = smem_u32(sPt), dst = smem_u32(sdSt), dq_box = smem_u32(sdQ + c * kDqBoxBytes);
  // Descriptors as a base and byte offsets (>> 4 in the start-address field), as the D=64/128
  // kernels build them: one 64-bit base each, the offsets immediates or the stage's.
  // This warpgroup's rows (S, dP: keys 40c..) and panels (dK^T, dV^T, dQ: head dims 128c..) in the bases.
  const uint64_t k_kmaj = smem_desc_k_major_sw128(sK, 40 * c * 128), v_kmaj = smem_desc_k_major_sw128(sV, 40 * c * 128);
  const uint64_t q_kmaj = smem_desc_k_major_sw128(sQ), do_kmaj = smem_desc_k_major_sw128(sdO);
  const uint64_t q_mn = smem_desc_mn_major_sw128(sQ, 2 * c * kQPanelBytes, kQPanelBytes);
  const uint64_t do_mn = smem_desc_mn_major_sw128(sdO, 2 * c * kQPanelBytes, kQPanelBytes);
  const uint64_t k_mn = smem_desc_mn_major_sw128(sK, 2 * c * kTileBytes, kTileBytes), pt_kmaj = smem_desc_k_major_sw128(sPt);
  const uint64_t ds_kmaj = smem_desc_k_major_sw128(sdSt), ds_mn = smem_desc_mn_major_sw128(sdSt, 0, kPdsBytes);
  auto at = [](uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); };
  int g = 0;
  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
  const int n_start = tile * kBlockN;
  float dkt[2][40], dvt[2][40];  // dK^T and dV^T: head dims 128c + 64s.., 80 keys
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int i = 0; i < 40; ++i) dkt[s][i] = dvt[s][i] = 0.f;
  for (int step = 0; step < steps; ++step, ++g) {
    const int stage = g % 2, m0 = step * kBlockM;
    const uint32_t q_stage = stage * kQBytes;
    float s[20], dp[20];
    // Both waited for before either matmul goes out: a spin loop between two wgmma groups makes
    // ptxas inject a warpgroup.arrive (C7519).
    mbarrier_wait(&q_full[stage], (g / 2) & 1);
    mbarrier_wait(do_full, g & 1);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk)
      Wgmma<T, 40>::ss(s, at(q_kmaj, q_stage + (kk / 4) * kQPanelBytes + (kk % 4) * 32),
                       at(k_kmaj, (kk / 4) * kTileBytes + (kk % 4) * 32), kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk)
      Wgmma<T, 40>::ss(dp, at(do_kmaj, (kk / 4) * kQPanelBytes + (kk % 4) * 32),
                       at(v_kmaj, (kk / 4) * kTileBytes + (kk % 4) * 32), kk > 0);
    wgmma_commit();
    const float* stats = sStats + stage * 128;
    const float lse_lo = stats[warp_row], lse_hi = stats[warp_row + 8];
    const float delta_lo = stats[64 + warp_row], delta_hi = stats[64 + warp_row + 8];
    wgmma_wait<1>();
#pragma unroll
    for (int i = 0; i < 20; ++i) {
      s[i] = exp2f(s[i] * scale_log2 - ((i / 2) % 2 ? lse_hi : lse_lo));
      if (kCausal && n_start + 40 * c + wgmma_acc_col(tid, i) > m0 + wgmma_acc_row(tid, i)) s[i] = 0.f;
    }
    wgmma_wait<0>();
    uint32_t p_packed[10], ds_packed[10];
#pragma unroll
    for (int m = 0; m < 10; ++m) {
      const int i = 4 * (m / 2) + 2 * (m % 2);
      const float delta = m % 2 ? delta_hi : delta_lo;
      p_packed[m] = MmaOperand<T>::pack(s[i], s[i + 1]);
      ds_packed[m] = MmaOperand<T>::pack(s[i] * (dp[i] - delta), s[i + 1] * (dp[i + 1] - delta));
    }
    if (g > 0) named_barrier_sync<256>(kDone + (1 - c));  // the other warpgroup read step g - 1's P^T, dS^T
    stmatrix_acc40_trans(pt, 40 * c, p_packed);
    fence_async_shared();
    named_barrier_arrive<256>(kPready + c);
    stmatrix_acc40_trans(dst, 40 * c, ds_packed);
    fence_async_shared();
    named_barrier_arrive<256>(kDsReady + c);
    named_barrier_sync<256>(kPready + (1 - c));
    wgmma_fence();
#pragma unroll
    for (int sl = 0; sl < 2; ++sl)
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk)
        Wgmma<T, 80>::ss<0, 1>(dvt[sl], at(do_mn, sl * kQPanelBytes + kk * 2048), at(pt_kmaj, kk * 32), 1);
    wgmma_commit();
    named_barrier_sync<256>(kDsReady + (1 - c));
    float dq[32];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      Wgmma<T, 64>::ss<1, 1>(dq, at(ds_mn, kk * 2048), at(k_mn, kk * 2048), kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
      Wgmma<T, 80>::ss<0, 1>(dkt[0], at(q_mn, q_stage + kk * 2048), at(ds_kmaj, kk * 32), 1);
    wgmma_commit();
    wgmma_wait<1>();  // dV^T and dQ's first slice
    mbarrier_arrive(do_empty);
    store_dq_slice(dq_box, c, dq);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      Wgmma<T, 64>::ss<1, 1>(dq, at(ds_mn, kk * 2048), at(k_mn, kTileBytes + kk * 2048), kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
      Wgmma<T, 80>::ss<0, 1>(dkt[1], at(q_mn, q_stage + kQPanelBytes + kk * 2048), at(ds_kmaj, kk * 32), 1);
    wgmma_commit();
    wgmma_wait<1>();  // dK^T's first slice and dQ's second
    store_dq_slice(dq_box, c, dq);
    wgmma_wait<0>();
    mbarrier_arrive(&q_empty[stage]);
    if (g + 1 < total) named_barrier_arrive<256>(kDone + c);
  }
  // The epilogue, reduced to plain stores (the kernel: transposed into K's and V's buffers, TMA).
#pragma unroll
  for (int sl = 0; sl < 2; ++sl)
#pragma unroll
    for (int i = 0; i < 40; ++i) {
      const int hd = 128 * c + 64 * sl + wgmma_acc_row(tid, i), key = wgmma_acc_col(tid, i);
      dk_out[(n_start + key) * kHeadDim + hd] = dkt[sl][i];
      dv_out[(n_start + key) * kHeadDim + hd] = dvt[sl][i];
    }
  }
#endif
}
template __global__ void bwd256_budget<false>(const float*, const float*, float*, float*, int, int, float);
template __global__ void bwd256_budget<true>(const float*, const float*, float*, float*, int, int, float);
