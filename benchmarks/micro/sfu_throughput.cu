// Throughput of the special-function and conversion instructions a softcap forward spends per
// score (issue 9's features: the head-dim-64 forward is bound by the MUFU unit once softcap adds a
// tanh to the exp2). Each thread runs kChains independent dependency chains of one operation;
// the result is operations (elements) per clock per SM at the SM clock the run measured.
//   nvcc -O3 -arch=sm_90a benchmarks/micro/sfu_throughput.cu -o /tmp/sfu && /tmp/sfu
#include <cuda_fp16.h>
#include <cstdio>
#include <cstdint>
#include "../../csrc/cuda/mma_sm80.cuh"  // the kernels' own MUFU and packing helpers

constexpr int kChains = 8, kIters = 4096, kThreads = 512;

__device__ __forceinline__ uint32_t tanh_f16x2(uint32_t x) {
  uint32_t y;
  asm volatile("tanh.approx.f16x2 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}
__device__ __forceinline__ uint32_t ex2_f16x2(uint32_t x) {
  uint32_t y;
  asm volatile("ex2.approx.f16x2 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}
__device__ __forceinline__ void unpack_f16x2(uint32_t x, float& lo, float& hi) {
  __half2 h = *reinterpret_cast<__half2*>(&x);
  lo = __low2float(h);
  hi = __high2float(h);
}

// Elements per operation: 1 for the f32 forms, 2 for the packed ones.
template <int kOp>
__global__ void run(float* out, float seed) {
  float x[2 * kChains];
  uint32_t h[kChains];
  for (int c = 0; c < 2 * kChains; ++c) x[c] = seed * (threadIdx.x + c + 1) * 1e-3f;
  for (int c = 0; c < kChains; ++c) h[c] = cuflash::MmaOperand<__half>::pack(x[2 * c], x[2 * c + 1]);
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) {
      if constexpr (kOp == 0) {  // tanh.approx.f32, two elements
        x[2 * c] = cuflash::fast_tanh(x[2 * c]);
        x[2 * c + 1] = cuflash::fast_tanh(x[2 * c + 1]);
      } else if constexpr (kOp == 1) {  // ex2.approx.f32, two elements
        x[2 * c] = cuflash::fast_exp2(x[2 * c]) - 1.f;
        x[2 * c + 1] = cuflash::fast_exp2(x[2 * c + 1]) - 1.f;
      } else if constexpr (kOp == 2) {  // tanh.approx.f16x2 alone
        h[c] = tanh_f16x2(h[c]);
      } else if constexpr (kOp == 3) {  // f32 pair -> f16x2 -> tanh -> f32 pair
        const uint32_t packed = cuflash::MmaOperand<__half>::pack(x[2 * c], x[2 * c + 1]);
        unpack_f16x2(tanh_f16x2(packed), x[2 * c], x[2 * c + 1]);
      } else if constexpr (kOp == 4) {  // cvt.rn.bf16x2.f32 (P's packing), fed back through a shift
        const uint32_t p = cuflash::MmaOperand<__nv_bfloat16>::pack(x[2 * c], x[2 * c + 1]);
        x[2 * c] = __uint_as_float(p << 16);
        x[2 * c + 1] = __uint_as_float(p & 0xffff0000u);
      } else if constexpr (kOp == 5) {  // ex2.approx.f16x2 alone
        h[c] = ex2_f16x2(h[c]);
      }
    }
  }
  float sum = 0.f;
  for (int c = 0; c < 2 * kChains; ++c) sum += x[c];
  for (int c = 0; c < kChains; ++c) sum += __half2float(__low2half(*reinterpret_cast<__half2*>(&h[c])));
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

template <int kOp>
void measure(const char* name, int sms, float* out, double clock_ghz) {
  const int blocks = sms * 4;
  run<kOp><<<blocks, kThreads>>>(out, 1.f);  // warm-up
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a);
  run<kOp><<<blocks, kThreads>>>(out, 1.f);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, a, b);
  const double elements = double(blocks) * kThreads * kIters * kChains * 2;
  const double per_clock_per_sm = elements / (ms * 1e-3) / (clock_ghz * 1e9) / sms;
  std::printf("%-44s %8.3f ms  %7.1f elements / clock / SM\n", name, ms, per_clock_per_sm);
}

int main() {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  int clock_khz = 0;
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0);
  const double ghz = clock_khz * 1e-6;
  std::printf("%s, %d SMs, %.3f GHz (the attribute's clock; the rates below assume it)\n", prop.name,
              prop.multiProcessorCount, ghz);
  float* out;
  cudaMalloc(&out, sizeof(float) * prop.multiProcessorCount * 4 * kThreads);
  measure<1>("ex2.approx.f32", prop.multiProcessorCount, out, ghz);
  measure<0>("tanh.approx.f32", prop.multiProcessorCount, out, ghz);
  measure<2>("tanh.approx.f16x2", prop.multiProcessorCount, out, ghz);
  measure<5>("ex2.approx.f16x2", prop.multiProcessorCount, out, ghz);
  measure<3>("cvt f32->f16x2, tanh.approx.f16x2, cvt back", prop.multiProcessorCount, out, ghz);
  measure<4>("cvt.rn.bf16x2.f32 (P's packing)", prop.multiProcessorCount, out, ghz);
  cudaFree(out);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
