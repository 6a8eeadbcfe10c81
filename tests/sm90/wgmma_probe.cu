// Checks csrc/cuda/sm90/wgmma.cuh on an sm_90 GPU: one warpgroup computes C = A B^T for 64 x 64
// bfloat16 A and B (K = 64: four k16 wgmmas stepping the descriptors' start address) from
// 128-byte-swizzled shared memory, and C is compared with a double-precision product. Twice: with
// the tiles stored by the threads (swizzle128_offset), and loaded by TMA (128B-swizzled tensor
// maps) on an mbarrier, which must lay them out the same way. Then the P V pattern of attention:
// C = A B with A (64 x 64) in registers and B (64 x 128, two 64-column panels) MN-major. Last,
// the attention tensor maps of csrc/cuda/sm90/tma_maps.h (the experimental TMA forward's): a
// box of 64 columns x 128 rows of one head of a [2][3][100][40] tensor stored [B, H, N, D] and
// [B, N, H, D], which must land as a swizzled panel with zeros past row 100 and column 40.
// Then float32 on TF32 wgmmas (m64n64k8, both operands K-major, 32 floats a swizzled row), the
// building block of a Hopper float32 path: C = A B^T in 3xTF32, A in registers split big and
// small (split_tf32, as the sm_80-class kernels) and B stored raw (its big part: the tensor cores
// drop the low 13 bits) and as its small part; the same with A from shared memory (1xTF32, the
// descriptor check); and the accumulator's drift over 1024 k (TF32 products exact, the sums the
// tensor cores' own). Last, the operand patterns of the planned fused head-dim-256 backward
// (benchmarks/NOTES.md's build plan): a 40-key slice of an 80-row K-major tile (m64n40k16), A read
// MN-major (the instruction's trans-a) against a K-major 80-row B (dV^T = dO^T P), and A and B
// both MN-major over 80 K-rows (dQ = dS K, dS stored [key][query]); and a 64 x 40 accumulator
// stored transposed by stmatrix (x4, x4, x2) as rows 40-79 of an 80-row [key][query] panel (P^T).
// Exit status 0: it matches; 1: it does not; 2: no usable GPU. Run by tests/test_sm90_probe.py.
#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes from the runtime)
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "cuda/mma_sm80.cuh"  // split_tf32, tf32_truncated
#include "cuda/sm90/tma_maps.h"
#include "cuda/sm90/wgmma.cuh"

namespace {
constexpr int kM = 64, kN = 64, kK = 64;
constexpr int kN2 = 128;  // columns of B and C in the register-A product

// Inputs [rows][64] bfloat16 row-major, stored as one 128B-swizzled panel (swizzle128_offset, row
// by row); results C [64][n] row-major.
constexpr int kKeys = 80;
template <int kRows>
__device__ void store_panel(unsigned char* tile, const __nv_bfloat16* x) {
  for (int i = threadIdx.x; i < kRows * 64; i += 128)
    *reinterpret_cast<__nv_bfloat16*>(tile + cuflash::sm90::swizzle128_offset(i / 64, i % 64)) = x[i];
}
template <int kN, int kRegs>
__device__ void store_acc(const float (&d)[kRegs], float* c) {
  for (int i = 0; i < kRegs; ++i) c[cuflash::sm90::wgmma_acc_row(threadIdx.x, i) * kN + cuflash::sm90::wgmma_acc_col(threadIdx.x, i)] = d[i];
}
// x and y into their panels, visible to the wgmmas.
template <int kRowsX, int kRowsY>
__device__ void load_panels(unsigned char* sx, const __nv_bfloat16* x, unsigned char* sy, const __nv_bfloat16* y) {
  store_panel<kRowsX>(sx, x);
  store_panel<kRowsY>(sy, y);
  cuflash::sm90::fence_async_shared();
  __syncthreads();
}
// d = the product issue(d) adds up: one wgmma group, waited for.
template <int kRegs, class Issue>
__device__ void wgmma_product(float (&d)[kRegs], Issue issue) {
  for (float& v : d) v = 0.f;
  cuflash::sm90::wgmma_fence();
  issue(d);
  cuflash::sm90::wgmma_commit();
  cuflash::sm90::wgmma_wait<0>();
}
// C = A B^T from the swizzled tiles sa, sb; every thread of the warpgroup stores its share.
__device__ void wgmma_and_store(const unsigned char* sa, const unsigned char* sb, float* c) {
  using namespace cuflash::sm90;
  float d[32];
  wgmma_product(d, [&](float (&acc)[32]) {
#pragma unroll
    for (int k = 0; k < kK / 16; ++k)
      Wgmma<__nv_bfloat16, 64>::ss(acc, smem_desc_k_major_sw128(sa, 32 * k), smem_desc_k_major_sw128(sb, 32 * k), k > 0);
  });
  store_acc<kN>(d, c);
}

__global__ void __launch_bounds__(128) gemm_abt(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
  __shared__ __align__(1024) unsigned char sa[kM * 128], sb[kN * 128];
  load_panels<kM, kN>(sa, a, sb, b);
  wgmma_and_store(sa, sb, c);
}

__global__ void __launch_bounds__(128) gemm_abt_tma(const __grid_constant__ CUtensorMap map_a,
                                                    const __grid_constant__ CUtensorMap map_b, float* c) {
  using namespace cuflash::sm90;
  __shared__ __align__(1024) unsigned char sa[kM * 128], sb[kN * 128];
  __shared__ __align__(8) uint64_t bar;
  if (threadIdx.x == 0) {
    mbarrier_init(&bar, 1);
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(&bar, sizeof(sa) + sizeof(sb));
    tma_load_2d(sa, &map_a, &bar, 0, 0);
    tma_load_2d(sb, &map_b, &bar, 0, 0);
  }
  mbarrier_wait(&bar, 0);
  wgmma_and_store(sa, sb, c);
}

// C = A B, A [64][64] from registers (the mma.m16n8k16 A fragments of each warp's 16 rows), B
// [64][128] row-major stored MN-major: two panels of 64 columns.
__global__ void __launch_bounds__(128) gemm_ab_registers(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
  using namespace cuflash::sm90;
  __shared__ __align__(1024) unsigned char sb[kK * kN2 * 2];
  for (int i = threadIdx.x; i < kK * kN2; i += 128)
    *reinterpret_cast<__nv_bfloat16*>(sb + panel_offset<kK>(i / kN2, i % kN2)) = b[i];
  fence_async_shared();
  __syncthreads();
  const int t = threadIdx.x, lane = t % 32, row = 16 * (t / 32) + lane / 4, col = 2 * (lane % 4);
  auto pair = [&](int r, int k) {  // a[r][k], a[r][k + 1] packed
    __nv_bfloat162 v{a[r * kK + k], a[r * kK + k + 1]};
    return *reinterpret_cast<uint32_t*>(&v);
  };
  float d[64];
  for (float& x : d) x = 0.f;
  uint32_t frag[kK / 16][4];
  for (int k = 0; k < kK / 16; ++k) {
    frag[k][0] = pair(row, 16 * k + col);
    frag[k][1] = pair(row + 8, 16 * k + col);
    frag[k][2] = pair(row, 16 * k + 8 + col);
    frag[k][3] = pair(row + 8, 16 * k + 8 + col);
  }
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < kK / 16; ++k)
    Wgmma<__nv_bfloat16, 128>::rs(d, frag[k], smem_desc_mn_major_sw128(sb, 16 * k * 128, kK * 128), k > 0);
  wgmma_commit();
  wgmma_wait<0>();
  for (int i = 0; i < 64; ++i) c[wgmma_acc_row(t, i) * kN2 + wgmma_acc_col(t, i)] = d[i];
}

// float32 on TF32 wgmmas, 64 x 64 x 64. B [kN][kK] row-major, stored K-major (two 32-float panels)
// raw and as small = b - b with its low 13 bits cleared (exact). c3: A B^T in 3xTF32 with A from
// registers (the mma.m16n8k8 tf32 A fragments of each warp's 16 rows: a0 (g, t), a1 (g + 8, t),
// a2 (g, t + 4), a3 (g + 8, t + 4) of each k8 slice); c1: 1xTF32, A raw from shared memory.
__global__ void __launch_bounds__(128) gemm_abt_tf32(const float* a, const float* b, float* c3, float* c1) {
  using namespace cuflash::sm90;
  __shared__ __align__(1024) unsigned char sa[kM * kK * 4], sb[kN * kK * 4], sb_small[kN * kK * 4];
  for (int i = threadIdx.x; i < kN * kK; i += 128) {
    const float x = b[i];
    const uint32_t at = panel_offset<kN, 4>(i / kK, i % kK);
    *reinterpret_cast<float*>(sb + at) = x;
    *reinterpret_cast<float*>(sb_small + at) = x - cuflash::tf32_truncated(x);  // exact
  }
  for (int i = threadIdx.x; i < kM * kK; i += 128) *reinterpret_cast<float*>(sa + panel_offset<kM, 4>(i / kK, i % kK)) = a[i];
  fence_async_shared();
  __syncthreads();
  const int t = threadIdx.x, lane = t % 32, row = 16 * (t / 32) + lane / 4, col = lane % 4;
  uint32_t big[kK / 8][4], small[kK / 8][4];
  for (int k = 0; k < kK / 8; ++k)
    for (int r = 0; r < 4; ++r) {
      const cuflash::Tf32Split x = cuflash::split_tf32(a[(row + 8 * (r % 2)) * kK + 8 * k + col + 4 * (r / 2)]);
      big[k][r] = x.big;
      small[k][r] = x.small;
    }
  // k8 slice k of a [rows][64] float tile: panel k / 4, +32 bytes a slice within it.
  auto desc = [](const unsigned char* tile, int rows, int k) {
    return smem_desc_k_major_sw128(tile, (k / 4) * rows * 128 + (k % 4) * 32);
  };
  float d3[32], d1[32];
  for (int i = 0; i < 32; ++i) d3[i] = d1[i] = 0.f;
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < kK / 8; ++k) {  // the small products first
    Wgmma<float, 64>::rs(d3, small[k], desc(sb, kN, k), 1);
    Wgmma<float, 64>::rs(d3, big[k], desc(sb_small, kN, k), 1);
    Wgmma<float, 64>::rs(d3, big[k], desc(sb, kN, k), 1);
    Wgmma<float, 64>::ss(d1, desc(sa, kM, k), desc(sb, kN, k), 1);
  }
  wgmma_commit();
  wgmma_wait<0>();
  for (int i = 0; i < 32; ++i) {
    c3[wgmma_acc_row(t, i) * kN + wgmma_acc_col(t, i)] = d3[i];
    c1[wgmma_acc_row(t, i) * kN + wgmma_acc_col(t, i)] = d1[i];
  }
}

// The accumulator over kDriftK = 1024 k: A [kM][kDriftK], B [kN][kDriftK] whose products are
// exact in fp32 (TF32 values), loaded 64 k at a time into shared memory and accumulated by
// 1xTF32 wgmmas, with no fresh sums: what an attention loop's O += P V would see.
constexpr int kDriftK = 1024;
__global__ void __launch_bounds__(128) gemm_abt_tf32_long(const float* a, const float* b, float* c) {
  using namespace cuflash::sm90;
  __shared__ __align__(1024) unsigned char sa[kM * kK * 4], sb[kN * kK * 4];
  float d[32];
  for (float& x : d) x = 0.f;
  for (int k0 = 0; k0 < kDriftK; k0 += kK) {
    for (int i = threadIdx.x; i < kM * kK; i += 128)
      *reinterpret_cast<float*>(sa + panel_offset<kM, 4>(i / kK, i % kK)) = a[(i / kK) * kDriftK + k0 + i % kK];
    for (int i = threadIdx.x; i < kN * kK; i += 128)
      *reinterpret_cast<float*>(sb + panel_offset<kN, 4>(i / kK, i % kK)) = b[(i / kK) * kDriftK + k0 + i % kK];
    fence_async_shared();
    __syncthreads();
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kK / 8; ++k)
      Wgmma<float, 64>::ss(d, smem_desc_k_major_sw128(sa, (k / 4) * kM * 128 + (k % 4) * 32),
                           smem_desc_k_major_sw128(sb, (k / 4) * kN * 128 + (k % 4) * 32), 1);
    wgmma_commit();
    wgmma_wait<0>();
    __syncthreads();  // every warp's wgmmas have read the tiles before they are refilled
  }
  for (int i = 0; i < 32; ++i) c[wgmma_acc_row(threadIdx.x, i) * kN + wgmma_acc_col(threadIdx.x, i)] = d[i];
}

// S's slice: d [64][40] = A B^T, A sa [64][64], B rows 40..79 of sb [80][64] (an 80-row K-major
// tile whose second warpgroup's keys start at row 40: 5 swizzle atoms on).
__device__ void key_slice(const unsigned char* sa, const unsigned char* sb, float (&d)[20]) {
  using namespace cuflash::sm90;
  wgmma_product(d, [&](float (&acc)[20]) {
#pragma unroll
    for (int k = 0; k < kK / 16; ++k)
      Wgmma<__nv_bfloat16, 40>::ss(acc, smem_desc_k_major_sw128(sa, 32 * k), smem_desc_k_major_sw128(sb, 40 * 128 + 32 * k),
                                   k > 0);
  });
}
__global__ void __launch_bounds__(128) gemm_key_slice(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
  __shared__ __align__(1024) unsigned char sa[kM * 128], sb[kKeys * 128];
  load_panels<kM, kKeys>(sa, a, sb, b);
  float d[20];
  key_slice(sa, sb, d);
  store_acc<40>(d, c);
}
// dV^T = dO^T P: C [64][80] = X^T Y^T, x [64 k][64 m] (dO as stored, [query][head dim]) read
// MN-major, y [80 n][64 k] (P^T, [key][query]) K-major; k16 steps of 16 rows (2048 bytes) of x.
__global__ void __launch_bounds__(128) gemm_mn_major_a(const __nv_bfloat16* x, const __nv_bfloat16* y, float* c) {
  using namespace cuflash::sm90;
  __shared__ __align__(1024) unsigned char sx[kK * 128], sy[kKeys * 128];
  load_panels<kK, kKeys>(sx, x, sy, y);
  float d[40];
  wgmma_product(d, [&](float (&acc)[40]) {
#pragma unroll
    for (int k = 0; k < kK / 16; ++k)
      Wgmma<__nv_bfloat16, 80>::ss<0, 1>(acc, smem_desc_mn_major_sw128(sx, 2048 * k, kK * 128),
                                         smem_desc_k_major_sw128(sy, 32 * k), k > 0);
  });
  store_acc<kKeys>(d, c);
}
// dQ = dS K: C [64][64] = X^T Y, x [80 k][64 m] (dS^T, [key][query]) and y [80 k][64 n] (K,
// [key][head dim]) both MN-major; five k16 steps of 2048 bytes.
__global__ void __launch_bounds__(128) gemm_mn_major_ab(const __nv_bfloat16* x, const __nv_bfloat16* y, float* c) {
  using namespace cuflash::sm90;
  __shared__ __align__(1024) unsigned char sx[kKeys * 128], sy[kKeys * 128];
  load_panels<kKeys, kKeys>(sx, x, sy, y);
  float d[32];
  wgmma_product(d, [&](float (&acc)[32]) {
#pragma unroll
    for (int k = 0; k < kKeys / 16; ++k)
      Wgmma<__nv_bfloat16, 64>::ss<1, 1>(acc, smem_desc_mn_major_sw128(sx, 2048 * k, kKeys * 128),
                                         smem_desc_mn_major_sw128(sy, 2048 * k, kKeys * 128), k > 0);
  });
  store_acc<64>(d, c);
}

// P^T's store: gemm_key_slice's 64 x 40 accumulator packed to bfloat16 and stored transposed into
// rows 40-79 of an 80-row [key][query] panel (stmatrix_acc40_trans). out: the panel read back
// row-major [80][64].
__global__ void __launch_bounds__(128) key_rows_by_stmatrix(const __nv_bfloat16* a, const __nv_bfloat16* b,
                                                           __nv_bfloat16* out) {
  using namespace cuflash::sm90;
  __shared__ __align__(1024) unsigned char sa[kM * 128], sb[kKeys * 128], st[kKeys * 128];
  for (int i = threadIdx.x; i < kKeys * 128 / 4; i += 128) reinterpret_cast<uint32_t*>(st)[i] = 0;
  load_panels<kM, kKeys>(sa, a, sb, b);
  float d[20];
  key_slice(sa, sb, d);
  uint32_t f[10];
  for (int m = 0; m < 10; ++m)
    f[m] = cuflash::MmaOperand<__nv_bfloat16>::pack(d[4 * (m / 2) + 2 * (m % 2)], d[4 * (m / 2) + 2 * (m % 2) + 1]);
  stmatrix_acc40_trans(smem_u32(st), 40, f);
  __syncthreads();
  for (int i = threadIdx.x; i < kKeys * 64; i += 128)
    out[i] = *reinterpret_cast<const __nv_bfloat16*>(st + swizzle128_offset(i / 64, i % 64));
}

// One 64 x 128 box of an attention map at (0, 0, head, batch) into a panel, copied out as
// [128][64] (read back through panel_offset).
constexpr int kBoxRows = 128;
__global__ void __launch_bounds__(128) load_attention_box(const __grid_constant__ CUtensorMap map, int head,
                                                          int batch, __nv_bfloat16* out) {
  using namespace cuflash::sm90;
  __shared__ __align__(1024) unsigned char tile[kBoxRows * 128];
  __shared__ __align__(8) uint64_t bar;
  if (threadIdx.x == 0) {
    mbarrier_init(&bar, 1);
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(&bar, sizeof(tile));
    tma_load_4d(tile, &map, &bar, 0, 0, head, batch);
  }
  mbarrier_wait(&bar, 0);
  for (int i = threadIdx.x; i < kBoxRows * 64; i += 128)
    out[i] = *reinterpret_cast<const __nv_bfloat16*>(tile + panel_offset<kBoxRows>(i / 64, i % 64));
}

// The box of head 2, batch 1 of x[b][h][n][d], small integers (exact in bf16) that differ from
// one neighbour to the next along every dimension, stored [B, H, N, D] or [B, N, H, D].
bool check_attention_map(bool bnhd) {
  constexpr int kB = 2, kH = 3, kN = 100, kD = 40;
  std::vector<__nv_bfloat16> x(kB * kH * kN * kD);
  cuflash::TensorStrides st;
  st.batch = kH * kN * kD;
  st.head = bnhd ? kD : kN * kD;
  st.row = bnhd ? kH * kD : kD;
  auto value = [](int b, int h, int n, int d) { return static_cast<float>((b * 7 + h * 13 + n * 3 + d * 5) % 251 - 125); };
  for (int b = 0; b < kB; ++b)
    for (int h = 0; h < kH; ++h)
      for (int n = 0; n < kN; ++n)
        for (int d = 0; d < kD; ++d) x[b * st.batch + h * st.head + n * st.row + d] = __float2bfloat16(value(b, h, n, d));
  __nv_bfloat16 *x_dev, *out_dev;
  cudaMalloc(&x_dev, x.size() * sizeof(x[0]));
  cudaMalloc(&out_dev, kBoxRows * 64 * sizeof(x[0]));
  cudaMemcpy(x_dev, x.data(), x.size() * sizeof(x[0]), cudaMemcpyHostToDevice);
  cudaMemset(out_dev, 0xFF, kBoxRows * 64 * sizeof(x[0]));
  const char* how = bnhd ? "[B, N, H, D]" : "[B, H, N, D]";
  CUtensorMap map;
  if (!cuflash::sm90::encode_attention_map(&map, x_dev, true, st, kB, kH, kN, kD, kBoxRows)) {
    // Not an error: the TMA kernel then falls back to the cp.async one. The line says so.
    std::printf("wgmma_probe (attention map %s): encode_attention_map refused it (TMA kernel falls back)\n", how);
    return true;
  }
  load_attention_box<<<1, 128>>>(map, 2, 1, out_dev);
  std::vector<__nv_bfloat16> out(kBoxRows * 64);
  const cudaError_t err = cudaDeviceSynchronize();
  cudaMemcpy(out.data(), out_dev, out.size() * sizeof(out[0]), cudaMemcpyDeviceToHost);
  int bad = 0;
  for (int n = 0; n < kBoxRows; ++n)
    for (int d = 0; d < 64; ++d) {
      const float want = n < kN && d < kD ? value(1, 2, n, d) : 0.f;
      if (__bfloat162float(out[n * 64 + d]) != want) ++bad;
    }
  const bool ok = err == cudaSuccess && bad == 0;
  std::printf("wgmma_probe (attention map %s): 64 x 128 box of a [2][3][100][40] tensor, %d wrong%s: %s\n", how, bad,
              err == cudaSuccess ? "" : " (kernel failed)", ok ? "ok" : "MISMATCH");
  return ok;
}

// A [rows, 64] bfloat16 row-major matrix as one 64 x rows box, 128B-swizzled.
bool make_map(CUtensorMap* map, void* data, int rows) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found;
  if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
          cudaSuccess ||
      found != cudaDriverEntryPointSuccess)
    return false;
  const cuuint64_t dims[2] = {kK, static_cast<cuuint64_t>(rows)}, strides[1] = {kK * sizeof(__nv_bfloat16)};
  const cuuint32_t box[2] = {kK, static_cast<cuuint32_t>(rows)}, elem_strides[2] = {1, 1};
  return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)(
             map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, data, dims, strides, box, elem_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Compares C with the double product; prints one line.
// b_transposed: C = A B^T with B [n][kK], else C = A B with B [kK][n].
bool check(const char* how, const std::vector<__nv_bfloat16>& a, const std::vector<__nv_bfloat16>& b, float* c_dev,
           int n = kN, bool b_transposed = true) {
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    std::printf("wgmma_probe (%s): kernel failed: %s\n", how, cudaGetErrorString(err));
    return false;
  }
  std::vector<float> c(kM * n);
  cudaMemcpy(c.data(), c_dev, c.size() * sizeof(float), cudaMemcpyDeviceToHost);
  double worst = 0;
  int bad_row = -1, bad_col = -1;
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < n; ++j) {
      double ref = 0;
      for (int k = 0; k < kK; ++k)
        ref += double(__bfloat162float(a[i * kK + k])) * double(__bfloat162float(b_transposed ? b[j * kK + k] : b[k * n + j]));
      const double err_ij = std::isnan(c[i * n + j]) ? INFINITY : std::abs(c[i * n + j] - ref);
      if (err_ij > worst) worst = err_ij, bad_row = i, bad_col = j;
    }
  // Exact bfloat16 products summed in fp32: 64 terms of |x| < ~20 stay far below 1e-3.
  const bool ok = worst <= 1e-3;
  std::printf("wgmma_probe (%s): C = A B%s 64x%dx64 bf16, max error %.3g (at %d, %d): %s\n", how,
              b_transposed ? "^T" : "", n, worst, bad_row, bad_col, ok ? "ok" : "MISMATCH");
  return ok;
}
// C [64][n] against the double product sum_k a(m, k) b(k, n); prints one line.
bool check_product(const char* how, int n, int k, const std::function<float(int, int)>& a,
                   const std::function<float(int, int)>& b, float* c_dev) {
  const cudaError_t err = cudaDeviceSynchronize();
  std::vector<float> c(kM * n);
  cudaMemcpy(c.data(), c_dev, c.size() * sizeof(float), cudaMemcpyDeviceToHost);
  double worst = 0;
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < n; ++j) {
      double ref = 0;
      for (int x = 0; x < k; ++x) ref += double(a(i, x)) * double(b(x, j));
      worst = std::max(worst, std::isnan(c[i * n + j]) ? INFINITY : std::abs(c[i * n + j] - ref));
    }
  const bool ok = err == cudaSuccess && worst <= 1e-3;  // exact bf16 products, fp32 sums of <= 80
  std::printf("wgmma_probe (%s): 64x%dx%d bf16, max error %.3g%s: %s\n", how, n, k, worst,
              err == cudaSuccess ? "" : " (kernel failed)", ok ? "ok" : "MISMATCH");
  return ok;
}

// The head-dim-256 backward's three patterns on random inputs.
bool check_hdim256_patterns() {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  auto random_bf16 = [&](int count) {
    std::vector<__nv_bfloat16> v(count);
    for (auto& x : v) x = __float2bfloat16(normal(rng));
    return v;
  };
  const std::vector<__nv_bfloat16> x = random_bf16(kKeys * 64), y = random_bf16(kKeys * 64);
  auto at = [](const std::vector<__nv_bfloat16>& v, int row, int col) { return __bfloat162float(v[row * 64 + col]); };
  __nv_bfloat16 *x_dev, *y_dev;
  float* c_dev;
  cudaMalloc(&x_dev, x.size() * sizeof(x[0]));
  cudaMalloc(&y_dev, y.size() * sizeof(y[0]));
  cudaMalloc(&c_dev, kM * kKeys * sizeof(float));
  cudaMemcpy(x_dev, x.data(), x.size() * sizeof(x[0]), cudaMemcpyHostToDevice);
  cudaMemcpy(y_dev, y.data(), y.size() * sizeof(y[0]), cudaMemcpyHostToDevice);
  cudaMemset(c_dev, 0xFF, kM * kKeys * sizeof(float));
  gemm_key_slice<<<1, 128>>>(x_dev, y_dev, c_dev);
  bool ok = check_product("m64n40k16, B rows 40-79 of an 80-row tile", 40, kK,
                          [&](int m, int k) { return at(x, m, k); }, [&](int k, int n) { return at(y, 40 + n, k); },
                          c_dev);
  cudaMemset(c_dev, 0xFF, kM * kKeys * sizeof(float));
  gemm_mn_major_a<<<1, 128>>>(x_dev, y_dev, c_dev);
  ok = check_product("A MN-major (trans-a), B K-major 80 rows: dO^T P", kKeys, kK,
                     [&](int m, int k) { return at(x, k, m); }, [&](int k, int n) { return at(y, n, k); }, c_dev) && ok;
  cudaMemset(c_dev, 0xFF, kM * kKeys * sizeof(float));
  gemm_mn_major_ab<<<1, 128>>>(x_dev, y_dev, c_dev);
  ok = check_product("A and B MN-major over 80 K-rows: dS K", 64, kKeys,
                     [&](int m, int k) { return at(x, k, m); }, [&](int k, int n) { return at(y, k, n); }, c_dev) && ok;
  // P^T by stmatrix: rows 40-79 the slice's product transposed (one bfloat16 rounding), 0-39 zero.
  __nv_bfloat16* out_dev;
  cudaMalloc(&out_dev, kKeys * 64 * sizeof(__nv_bfloat16));
  cudaMemset(out_dev, 0xFF, kKeys * 64 * sizeof(__nv_bfloat16));
  key_rows_by_stmatrix<<<1, 128>>>(x_dev, y_dev, out_dev);
  const cudaError_t err = cudaDeviceSynchronize();
  std::vector<__nv_bfloat16> out(kKeys * 64);
  cudaMemcpy(out.data(), out_dev, out.size() * sizeof(out[0]), cudaMemcpyDeviceToHost);
  int bad = 0;
  for (int key = 0; key < kKeys; ++key)
    for (int q = 0; q < 64; ++q) {
      double ref = 0;
      for (int k = 0; key >= 40 && k < kK; ++k) ref += double(at(x, q, k)) * double(at(y, key, k));
      const double got = __bfloat162float(out[key * 64 + q]);
      if (!(std::abs(got - ref) <= std::abs(ref) / 128 + 1e-3)) ++bad;  // bfloat16: 8 bits
    }
  const bool stored = err == cudaSuccess && bad == 0;
  std::printf("wgmma_probe (stmatrix .trans x4, x4, x2: a 64x40 accumulator as rows 40-79 of [key][query]): "
              "%d wrong%s: %s\n", bad, err == cudaSuccess ? "" : " (kernel failed)", stored ? "ok" : "MISMATCH");
  cudaFree(out_dev);
  cudaFree(x_dev);
  cudaFree(y_dev);
  cudaFree(c_dev);
  return ok && stored;
}

// max |c - ref| / max |ref| of a 64 x kN float result against the double product of a [kM][k]
// and b [kN][k] (row-major), and the host's own float sum (rounded to nearest each add) likewise.
struct Tf32Errors {
  double device, host_float;
};
Tf32Errors tf32_errors(const std::vector<float>& a, const std::vector<float>& b, const std::vector<float>& c, int k) {
  double worst = 0, worst_host = 0, scale = 0;
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < kN; ++j) {
      double ref = 0;
      float host = 0.f;
      for (int x = 0; x < k; ++x) {
        ref += double(a[i * k + x]) * double(b[j * k + x]);
        host += a[i * k + x] * b[j * k + x];
      }
      scale = std::max(scale, std::abs(ref));
      worst = std::max(worst, std::isnan(c[i * kN + j]) ? INFINITY : std::abs(c[i * kN + j] - ref));
      worst_host = std::max(worst_host, std::abs(double(host) - ref));
    }
  return {worst / scale, worst_host / scale};
}

bool check_tf32() {
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  std::vector<float> a(kM * kK), b(kN * kK);
  for (auto& x : a) x = normal(rng);
  for (auto& x : b) x = normal(rng);
  float *a_dev, *b_dev, *c_dev;
  cudaMalloc(&a_dev, kM * kDriftK * sizeof(float));
  cudaMalloc(&b_dev, kN * kDriftK * sizeof(float));
  cudaMalloc(&c_dev, 2 * kM * kN * sizeof(float));
  cudaMemcpy(a_dev, a.data(), a.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(b_dev, b.data(), b.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemset(c_dev, 0xFF, 2 * kM * kN * sizeof(float));
  gemm_abt_tf32<<<1, 128>>>(a_dev, b_dev, c_dev, c_dev + kM * kN);
  cudaError_t err = cudaDeviceSynchronize();
  std::vector<float> c(2 * kM * kN);
  cudaMemcpy(c.data(), c_dev, c.size() * sizeof(float), cudaMemcpyDeviceToHost);
  const Tf32Errors three = tf32_errors(a, b, std::vector<float>(c.begin(), c.begin() + kM * kN), kK);
  const Tf32Errors one = tf32_errors(a, b, std::vector<float>(c.begin() + kM * kN, c.end()), kK);
  // shared/TESTING.md's float32 rule (1e-5 of max |ref|) for 3xTF32; 1xTF32 keeps 11 bits of
  // each operand (~1e-3), so a 3xTF32 result no better than it means the small parts went astray.
  bool ok = err == cudaSuccess && three.device <= 1e-5 && one.device <= 3e-3 && three.device * 10 < one.device;
  std::printf("wgmma_probe (TF32): C = A B^T 64x64x64 float, 3xTF32 (A in registers) max error %.3g of max |C|, "
              "1xTF32 (A in shared memory) %.3g, float on the host %.3g%s: %s\n",
              three.device, one.device, three.host_float, err == cudaSuccess ? "" : " (kernel failed)",
              ok ? "ok" : "MISMATCH");
  // The drift: TF32-exact inputs (their products exact in fp32), 1024 k in the accumulator.
  std::vector<float> la(kM * kDriftK), lb(kN * kDriftK);
  auto tf32 = [](float x) { uint32_t u; std::memcpy(&u, &x, 4); u &= 0xffffe000u; std::memcpy(&x, &u, 4); return x; };
  for (auto& x : la) x = tf32(normal(rng));
  for (auto& x : lb) x = tf32(normal(rng));
  cudaMemcpy(a_dev, la.data(), la.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(b_dev, lb.data(), lb.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemset(c_dev, 0xFF, kM * kN * sizeof(float));
  gemm_abt_tf32_long<<<1, 128>>>(a_dev, b_dev, c_dev);
  err = cudaDeviceSynchronize();
  cudaMemcpy(c.data(), c_dev, kM * kN * sizeof(float), cudaMemcpyDeviceToHost);
  const Tf32Errors drift = tf32_errors(la, lb, std::vector<float>(c.begin(), c.begin() + kM * kN), kDriftK);
  // Reported, not judged beyond a loose bound: how far the tensor cores' own sums drift decides
  // whether a float32 kernel needs fresh sums a step (as the sm_80-class 3xTF32 kernels do).
  const bool drift_ok = err == cudaSuccess && drift.device <= 1e-4;
  std::printf("wgmma_probe (TF32 accumulator): 1024 exact products summed by wgmma, max error %.3g of max |C| "
              "(float on the host, rounded each add: %.3g)%s: %s\n",
              drift.device, drift.host_float, err == cudaSuccess ? "" : " (kernel failed)", drift_ok ? "ok" : "MISMATCH");
  cudaFree(a_dev);
  cudaFree(b_dev);
  cudaFree(c_dev);
  return ok && drift_ok;
}
}  // namespace

int main() {
  int device = 0;
  cudaDeviceProp prop;
  if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess ||
      prop.major != 9) {
    std::printf("wgmma_probe: needs a compute capability 9.x GPU\n");
    return 2;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<__nv_bfloat16> a(kM * kK), b(kN2 * kK);  // the first kN x kK of b for A B^T
  for (auto& x : a) x = __float2bfloat16(normal(rng));
  for (auto& x : b) x = __float2bfloat16(normal(rng));
  __nv_bfloat16 *a_dev, *b_dev;
  float* c_dev;
  cudaMalloc(&a_dev, a.size() * sizeof(a[0]));
  cudaMalloc(&b_dev, b.size() * sizeof(b[0]));
  cudaMalloc(&c_dev, kM * kN2 * sizeof(float));
  cudaMemcpy(a_dev, a.data(), a.size() * sizeof(a[0]), cudaMemcpyHostToDevice);
  cudaMemcpy(b_dev, b.data(), b.size() * sizeof(b[0]), cudaMemcpyHostToDevice);
  cudaMemset(c_dev, 0xFF, kM * kN * sizeof(float));  // NaN: an element never written fails
  gemm_abt<<<1, 128>>>(a_dev, b_dev, c_dev);
  bool ok = check("thread stores", a, b, c_dev);
  CUtensorMap map_a, map_b;
  if (!make_map(&map_a, a_dev, kM) || !make_map(&map_b, b_dev, kN)) {
    std::printf("wgmma_probe: cuTensorMapEncodeTiled failed\n");
    return 1;
  }
  cudaMemset(c_dev, 0xFF, kM * kN * sizeof(float));
  gemm_abt_tma<<<1, 128>>>(map_a, map_b, c_dev);
  ok = check("TMA", a, b, c_dev) && ok;
  cudaMemset(c_dev, 0xFF, kM * kN2 * sizeof(float));
  gemm_ab_registers<<<1, 128>>>(a_dev, b_dev, c_dev);
  ok = check("A in registers, B MN-major", a, b, c_dev, kN2, false) && ok;
  ok = check_attention_map(false) && ok;
  ok = check_attention_map(true) && ok;
  ok = check_tf32() && ok;
  ok = check_hdim256_patterns() && ok;
  return ok ? 0 : 1;
}
