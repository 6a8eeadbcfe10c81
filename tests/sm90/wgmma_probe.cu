// Checks csrc/cuda/sm90/wgmma.cuh on an sm_90 GPU: one warpgroup computes C = A B^T for 64 x 64
// bfloat16 A and B (K = 64: four k16 wgmmas stepping the descriptors' start address) from
// 128-byte-swizzled shared memory, and C is compared with a double-precision product. Twice: with
// the tiles stored by the threads (swizzle128_offset), and loaded by TMA (128B-swizzled tensor
// maps) on an mbarrier, which must lay them out the same way. Then the P V pattern of attention:
// C = A B with A (64 x 64) in registers and B (64 x 128, two 64-column panels) MN-major. Last,
// the attention tensor maps of csrc/cuda/sm90/tma_maps.h (the experimental TMA forward's): a
// box of 64 columns x 128 rows of one head of a [2][3][100][40] tensor stored [B, H, N, D] and
// [B, N, H, D], which must land as a swizzled panel with zeros past row 100 and column 40.
// Exit status 0: it matches; 1: it does not; 2: no usable GPU. Run by tests/test_sm90_probe.py.
#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes from the runtime)
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/sm90/tma_maps.h"
#include "cuda/sm90/wgmma.cuh"

namespace {
constexpr int kM = 64, kN = 64, kK = 64;
constexpr int kN2 = 128;  // columns of B and C in the register-A product

// C = A B^T from the swizzled tiles sa, sb; every thread of the warpgroup stores its share.
__device__ void wgmma_and_store(const unsigned char* sa, const unsigned char* sb, float* c) {
  using namespace cuflash::sm90;
  const int t = threadIdx.x;
  float d[32];
  for (float& x : d) x = 0.f;
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < kK / 16; ++k)
    Wgmma<__nv_bfloat16, 64>::ss(d, smem_desc_k_major_sw128(sa, 32 * k), smem_desc_k_major_sw128(sb, 32 * k), k > 0);
  wgmma_commit();
  wgmma_wait<0>();
  for (int i = 0; i < 32; ++i) c[wgmma_acc_row(t, i) * kN + wgmma_acc_col(t, i)] = d[i];
}

__global__ void __launch_bounds__(128) gemm_abt(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
  using namespace cuflash::sm90;
  __shared__ __align__(1024) unsigned char sa[kM * 128], sb[kN * 128];
  for (int i = threadIdx.x; i < kM * kK; i += 128)
    *reinterpret_cast<__nv_bfloat16*>(sa + swizzle128_offset(i / kK, i % kK)) = a[i];
  for (int i = threadIdx.x; i < kN * kK; i += 128)
    *reinterpret_cast<__nv_bfloat16*>(sb + swizzle128_offset(i / kK, i % kK)) = b[i];
  fence_async_shared();
  __syncthreads();
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
  return ok ? 0 : 1;
}
