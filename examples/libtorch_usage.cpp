// cuflash_attn's C++ API on LibTorch tensors: the kernels run on the tensors' data pointers and
// torch's current stream, and are checked against torch's scaled_dot_product_attention
// (TESTING.md's rule: within twice SDPA's own bfloat16 error, three times for the gradients,
// measured against SDPA in float64). Exit status: 0 when they agree, 1 when not, 77 without CUDA.
#include <ATen/cuda/CUDAContext.h>
#include <torch/torch.h>
#include <cuflash/flash_attention.h>

#include <cmath>
#include <cstdio>

namespace {

const __nv_bfloat16* bf16(const at::Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr()); }
__nv_bfloat16* bf16_out(at::Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.data_ptr()); }

double max_error(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

bool check(const char* name, const at::Tensor& ours, const at::Tensor& sdpa, const at::Tensor& ref, double factor) {
  const double err = max_error(ours, ref), sdpa_err = max_error(sdpa, ref);
  const bool ok = err <= factor * sdpa_err + 1e-3;
  std::printf("%-3s max error vs float64: cuflash %.2e, torch sdpa (bf16) %.2e %s\n", name, err, sdpa_err,
              ok ? "" : "<- too large");
  return ok;
}

}  // namespace

int main() {
  if (!torch::cuda::is_available()) {
    std::printf("no CUDA device: nothing to run\n");
    return 77;
  }
  const int64_t B = 2, H = 8, N = 1000, D = 128;
  const bool causal = true;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  torch::manual_seed(0);
  const auto opts = torch::dtype(torch::kBFloat16).device(torch::kCUDA);
  // [B, H, N, D], contiguous: what the simple form takes.
  const at::Tensor q = torch::randn({B, H, N, D}, opts), k = torch::randn({B, H, N, D}, opts),
                   v = torch::randn({B, H, N, D}, opts), dout = torch::randn({B, H, N, D}, opts);
  at::Tensor out = torch::empty_like(q), lse = torch::empty({B, H, N}, opts.dtype(torch::kFloat));
  at::Tensor dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuflash::FlashAttentionError err = cuflash::flash_attention_forward(
      bf16(q), bf16(k), bf16(v), bf16_out(out), lse.data_ptr<float>(), B, H, N, D, scale, causal, stream);
  if (err == cuflash::FlashAttentionError::SUCCESS)
    err = cuflash::flash_attention_backward(bf16(q), bf16(k), bf16(v), bf16(out), lse.data_ptr<float>(), bf16(dout),
                                            bf16_out(dq), bf16_out(dk), bf16_out(dv), B, H, N, D, scale, causal,
                                            stream);
  if (err != cuflash::FlashAttentionError::SUCCESS) {
    std::fprintf(stderr, "%s: %s\n", cuflash::get_error_string(err), cuflash::get_last_error_message());
    return 1;
  }

  // torch's attention, in bfloat16 and in float64, with autograd for the gradients.
  auto sdpa = [&](at::ScalarType dtype) {
    std::vector<at::Tensor> in;
    for (const at::Tensor& t : {q, k, v}) in.push_back(t.to(dtype).detach().requires_grad_());
    const at::Tensor o = at::scaled_dot_product_attention(in[0], in[1], in[2], {}, 0.0, causal, scale);
    const auto grads = torch::autograd::grad({o}, {in[0], in[1], in[2]}, {dout.to(dtype)});
    return std::vector<at::Tensor>{o.detach(), grads[0], grads[1], grads[2]};
  };
  const auto low = sdpa(torch::kBFloat16), ref = sdpa(torch::kDouble);
  const at::Tensor ours[] = {out, dq, dk, dv};
  const char* names[] = {"out", "dq", "dk", "dv"};
  bool ok = true;
  for (int i = 0; i < 4; ++i) ok = check(names[i], ours[i], low[i], ref[i], i == 0 ? 2 : 3) && ok;
  std::printf(ok ? "OK\n" : "MISMATCH\n");
  return ok ? 0 : 1;
}
