// cuflash_attn's C++ API on raw CUDA memory: fill q, k, v and dO on the device, run the forward
// and the backward, print checksums, and compare one head with a plain CPU loop in double.
// Exit status: 0 when they agree, 1 when not, 77 without a CUDA device (ctest: skipped).
#include <cuflash/flash_attention.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#define CUDA_CHECK(call)                                                                           \
  do {                                                                                             \
    const cudaError_t err_ = (call);                                                               \
    if (err_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      return 1;                                                                                    \
    }                                                                                              \
  } while (0)

#define FLASH_CHECK(call)                                                                                      \
  do {                                                                                                         \
    const cuflash::FlashAttentionError err_ = (call);                                                          \
    if (err_ != cuflash::FlashAttentionError::SUCCESS) {                                                       \
      std::fprintf(stderr, "%s: %s\n", cuflash::get_error_string(err_), cuflash::get_last_error_message()); \
      return 1;                                                                                                \
    }                                                                                                          \
  } while (0)

// A reproducible value in [-1, 1) for element i of tensor `which`, the same on host and device.
__host__ __device__ float pattern(uint32_t which, uint32_t i) {
  uint32_t x = (which * 0x9E3779B9u) ^ (i * 0x85EBCA6Bu + 0x165667B1u);
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  x ^= x >> 12;
  x *= 0x297A2D39u;
  x ^= x >> 15;
  return static_cast<float>(x >> 8) / 8388608.0f - 1.0f;
}

__global__ void fill(half* data, uint32_t n, uint32_t which) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    data[i] = __float2half(pattern(which, i));
}

// One head of attention in double: out, lse and the gradients for dout. [N, D] row-major each.
struct Head {
  std::vector<double> out, lse, dq, dk, dv;
};
Head cpu_head(const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
              const std::vector<double>& dout, int N, int D, double scale, bool causal) {
  Head r{std::vector<double>(N * D), std::vector<double>(N), std::vector<double>(N * D), std::vector<double>(N * D),
         std::vector<double>(N * D)};
  std::vector<double> p(N), dp(N);
  for (int i = 0; i < N; ++i) {
    const int keys = causal ? i + 1 : N;
    double m = -INFINITY, sum = 0, p_dot_dp = 0;
    for (int j = 0; j < keys; ++j) {
      double s = 0;
      for (int d = 0; d < D; ++d) s += q[i * D + d] * k[j * D + d];
      p[j] = s * scale;
      m = std::max(m, p[j]);
    }
    for (int j = 0; j < keys; ++j) sum += (p[j] = std::exp(p[j] - m));
    r.lse[i] = m + std::log(sum);
    for (int j = 0; j < keys; ++j) {
      p[j] /= sum;
      dp[j] = 0;
      for (int d = 0; d < D; ++d) {
        r.out[i * D + d] += p[j] * v[j * D + d];
        dp[j] += dout[i * D + d] * v[j * D + d];
      }
      p_dot_dp += p[j] * dp[j];
    }
    for (int j = 0; j < keys; ++j) {
      const double ds = p[j] * (dp[j] - p_dot_dp);
      for (int d = 0; d < D; ++d) {
        r.dq[i * D + d] += scale * ds * k[j * D + d];
        r.dk[j * D + d] += scale * ds * q[i * D + d];
        r.dv[j * D + d] += p[j] * dout[i * D + d];
      }
    }
  }
  return r;
}

double max_error(const std::vector<double>& ref, const std::vector<double>& got) {
  double e = 0;
  for (size_t i = 0; i < ref.size(); ++i) e = std::max(e, std::abs(ref[i] - got[i]));
  return std::isnan(e) ? INFINITY : e;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing to run\n");
    return 77;
  }
  constexpr int B = 2, H = 4, N = 300, D = 64;  // N is not a multiple of the kernels' 64-row tiles
  constexpr bool causal = true;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  constexpr size_t elems = size_t(B) * H * N * D, rows = size_t(B) * H * N;

  // [B, H, N, D] contiguous half tensors, float32 logsumexp [B, H, N].
  half *q, *k, *v, *o, *dout, *dq, *dk, *dv;
  float* lse;
  for (half** t : {&q, &k, &v, &o, &dout, &dq, &dk, &dv}) CUDA_CHECK(cudaMalloc(t, elems * sizeof(half)));
  CUDA_CHECK(cudaMalloc(&lse, rows * sizeof(float)));
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreate(&stream));
  half* inputs[] = {q, k, v, dout};
  for (uint32_t t = 0; t < 4; ++t) fill<<<256, 256, 0, stream>>>(inputs[t], elems, t);
  CUDA_CHECK(cudaGetLastError());

  FLASH_CHECK(cuflash::flash_attention_forward(q, k, v, o, lse, B, H, N, D, scale, causal, stream));
  FLASH_CHECK(cuflash::flash_attention_backward(q, k, v, o, lse, dout, dq, dk, dv, B, H, N, D, scale, causal, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));

  // Back to the host as double.
  std::vector<half> staging(elems);
  std::vector<double> results[5];  // out, dq, dk, dv, lse
  const half* outputs[] = {o, dq, dk, dv};
  for (int t = 0; t < 4; ++t) {
    CUDA_CHECK(cudaMemcpy(staging.data(), outputs[t], elems * sizeof(half), cudaMemcpyDeviceToHost));
    results[t].assign(elems, 0.0);
    for (size_t i = 0; i < elems; ++i) results[t][i] = __half2float(staging[i]);
  }
  std::vector<float> lse_host(rows);
  CUDA_CHECK(cudaMemcpy(lse_host.data(), lse, rows * sizeof(float), cudaMemcpyDeviceToHost));
  results[4].assign(lse_host.begin(), lse_host.end());
  const char* names[] = {"out", "dq", "dk", "dv", "lse"};
  for (int t = 0; t < 5; ++t) {
    double sum = 0;
    for (double x : results[t]) sum += x;
    std::printf("checksum %-3s % .6f\n", names[t], sum);
  }

  // One head, (b, h) = (1, 2), against the CPU loop on the same half-precision inputs.
  const int b = 1, h = 2;
  const size_t head0 = (size_t(b) * H + h) * N * D;
  std::vector<double> in[4];
  for (uint32_t t = 0; t < 4; ++t)
    for (int i = 0; i < N * D; ++i)
      in[t].push_back(__half2float(__float2half(pattern(t, static_cast<uint32_t>(head0 + i)))));
  const Head ref = cpu_head(in[0], in[1], in[2], in[3], N, D, scale, causal);
  const std::vector<double>* refs[] = {&ref.out, &ref.dq, &ref.dk, &ref.dv, &ref.lse};
  bool ok = true;
  for (int t = 0; t < 5; ++t) {
    const size_t first = t == 4 ? (size_t(b) * H + h) * N : head0, count = refs[t]->size();
    const std::vector<double> got(results[t].begin() + first, results[t].begin() + first + count);
    double largest = 1;
    for (double x : *refs[t]) largest = std::max(largest, std::abs(x));
    const double err = max_error(*refs[t], got), tol = 1e-2 * largest;  // half precision
    std::printf("head (%d, %d) %-3s max |gpu - cpu| %.2e (tolerance %.1e)\n", b, h, names[t], err, tol);
    ok = ok && err <= tol;
  }
  for (half* t : {q, k, v, o, dout, dq, dk, dv}) CUDA_CHECK(cudaFree(t));
  CUDA_CHECK(cudaFree(lse));
  CUDA_CHECK(cudaStreamDestroy(stream));
  std::printf(ok ? "OK\n" : "MISMATCH\n");
  return ok ? 0 : 1;
}
