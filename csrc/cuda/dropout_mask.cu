// The dropout keep-mask, element by element, from the same Philox draws the kernels use (for
// tests and flash_attn's return_attn_probs).
#include "../attention_math.h"
#include "flash_launch.h"

namespace cuflash {
namespace {

__global__ void dropout_keep_mask_kernel(const DropoutParams d, int batch_heads, int heads, int seqlen_q,
                                         int seqlen_k, bool* keep) {
  const DropoutRng rng = make_dropout_rng(d);
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= seqlen_k) return;
  for (int bh = blockIdx.z; bh < batch_heads; bh += gridDim.z)
    for (int i = blockIdx.y; i < seqlen_q; i += gridDim.y)
      keep[(static_cast<int64_t>(bh) * seqlen_q + i) * seqlen_k + j] = rng.keep(bh / heads, bh % heads, heads, i, j);
}

}  // namespace

cudaError_t dropout_keep_mask_cuda(const DropoutParams& d, int batch, int heads, int seqlen_q, int seqlen_k,
                                   bool* keep, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int batch_heads = batch * heads;
  const dim3 grid((seqlen_k + kThreads - 1) / kThreads, seqlen_q < 65535 ? seqlen_q : 65535,
                  batch_heads < 65535 ? batch_heads : 65535);
  dropout_keep_mask_kernel<<<grid, kThreads, 0, stream>>>(d, batch_heads, heads, seqlen_q, seqlen_k, keep);
  return cudaGetLastError();
}

}  // namespace cuflash
