// Checks csrc/cuda/sm90/wgmma.cuh on an sm_90 GPU: one warpgroup computes C = A B^T for 64 x 64
// bfloat16 A and B (K = 64: four k16 wgmmas stepping the descriptors' start address) from
// 128-byte-swizzled shared memory, and C is compared with a double-precision product.
// Exit status 0: it matches; 1: it does not; 2: no usable GPU. Run by tests/test_sm90_probe.py.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/sm90/wgmma.cuh"

namespace {
constexpr int kM = 64, kN = 64, kK = 64;

__global__ void __launch_bounds__(128) gemm_abt(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
  using namespace cuflash::sm90;
  __shared__ __align__(1024) unsigned char sa[kM * 128], sb[kN * 128];
  const int t = threadIdx.x;
  for (int i = t; i < kM * kK; i += 128)
    *reinterpret_cast<__nv_bfloat16*>(sa + swizzle128_offset(i / kK, i % kK)) = a[i];
  for (int i = t; i < kN * kK; i += 128)
    *reinterpret_cast<__nv_bfloat16*>(sb + swizzle128_offset(i / kK, i % kK)) = b[i];
  fence_async_shared();
  __syncthreads();
  float d[32];
  for (float& x : d) x = 0.f;
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < kK / 16; ++k)
    wgmma_m64n64k16_bf16(d, smem_desc_k_major_sw128(sa, 32 * k), smem_desc_k_major_sw128(sb, 32 * k), k > 0);
  wgmma_commit();
  wgmma_wait<0>();
  for (int i = 0; i < 32; ++i) c[wgmma_acc_row(t, i) * kN + wgmma_acc_col(t, i)] = d[i];
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
  std::vector<__nv_bfloat16> a(kM * kK), b(kN * kK);
  for (auto& x : a) x = __float2bfloat16(normal(rng));
  for (auto& x : b) x = __float2bfloat16(normal(rng));
  __nv_bfloat16 *a_dev, *b_dev;
  float* c_dev;
  cudaMalloc(&a_dev, a.size() * sizeof(a[0]));
  cudaMalloc(&b_dev, b.size() * sizeof(b[0]));
  cudaMalloc(&c_dev, kM * kN * sizeof(float));
  cudaMemcpy(a_dev, a.data(), a.size() * sizeof(a[0]), cudaMemcpyHostToDevice);
  cudaMemcpy(b_dev, b.data(), b.size() * sizeof(b[0]), cudaMemcpyHostToDevice);
  cudaMemset(c_dev, 0xFF, kM * kN * sizeof(float));  // NaN: an element never written fails
  gemm_abt<<<1, 128>>>(a_dev, b_dev, c_dev);
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    std::printf("wgmma_probe: kernel failed: %s\n", cudaGetErrorString(err));
    return 1;
  }
  std::vector<float> c(kM * kN);
  cudaMemcpy(c.data(), c_dev, c.size() * sizeof(float), cudaMemcpyDeviceToHost);
  double worst = 0;
  int bad_row = -1, bad_col = -1;
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < kN; ++j) {
      double ref = 0;
      for (int k = 0; k < kK; ++k)
        ref += double(__bfloat162float(a[i * kK + k])) * double(__bfloat162float(b[j * kK + k]));
      const double err_ij = std::isnan(c[i * kN + j]) ? INFINITY : std::abs(c[i * kN + j] - ref);
      if (err_ij > worst) worst = err_ij, bad_row = i, bad_col = j;
    }
  // Exact bfloat16 products summed in fp32: 64 terms of |x| < ~20 stay far below 1e-3.
  const bool ok = worst <= 1e-3;
  std::printf("wgmma_probe: C = A B^T 64x64x64 bf16, max error %.3g (at %d, %d): %s\n", worst, bad_row, bad_col,
              ok ? "ok" : "MISMATCH");
  return ok ? 0 : 1;
}
