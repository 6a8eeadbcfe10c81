// float32 as fp16 pairs (fp32_pairs.h): which calls take them, and the pre-pass that splits the
// inputs (the backward's dout too): one memory-bound pass over each, all of them a launch.
#include <cuda_fp16.h>
#include <algorithm>
#include "device_attributes.h"
#include "flash_launch.cuh"  // fp32_wgmma_forward_runs; the kernels' shared memory
#include "fp32_pairs.h"
#include "mma_sm80.cuh"
#include "run_switches.h"

namespace cuflash {
namespace {

constexpr int kPrepassThreads = 256, kPrepassRows = kPrepassThreads / 32;  // a warp a row
constexpr int kMaxPrepassInputs = 4;

// One input: float rows (elements; a row's head_dim floats 16-byte aligned) in; pair rows and
// their scales out, addressed as the kernels read them (PairScratchLayout).
struct PrepassInput {
  const float* x;
  TensorStrides strides;
  Fp32Pair* out;
  TensorStrides out_strides;      // in units
  float* unscale;                  // the rows' 2^-e, as PairRowScales
  TensorStrides unscale_strides;  // in floats
  int batches, rows, heads;       // batches 1 and rows the total for packed inputs
};
struct PrepassInputs {
  PrepassInput in[kMaxPrepassInputs];
  int head_dim, padded_dim;
};

// x 2^e = hi + lo 2^-11 for x and y: split_half2, but an infinite x keeps lo 0 (inf - inf is NaN).
__device__ __forceinline__ void split_input_pair(float x, float y, uint32_t& hi, uint32_t& lo) {
  split_half2(x, y, hi, lo);
  const __half2 h = *reinterpret_cast<const __half2*>(&hi);
  if (__hisinf(__low2half(h)) || __hisinf(__high2half(h))) {
    const float2 back = __half22float2(h);
    const __half2 l = __floats2half2_rn(isinf(back.x) ? 0.f : (x - back.x) * kPairLoScale,
                                        isinf(back.y) ? 0.f : (y - back.y) * kPairLoScale);
    lo = *reinterpret_cast<const uint32_t*>(&l);
  }
}

// A warp a row (grid x: row blocks of each batch; y: heads; z: inputs): the row's largest finite
// |x| (NaN and infinities left out: they stay what they are in the halves), its exponent, the
// halves, padded with zeros to padded_dim, and 2^-e.
__global__ void __launch_bounds__(kPrepassThreads) fp32_pair_split_kernel(const __grid_constant__ PrepassInputs ins) {
  const PrepassInput& in = ins.in[blockIdx.z];
  const int row_blocks = gridDim.x / in.batches;  // the grid's x is row blocks times batches
  const int b = blockIdx.x / row_blocks, h = blockIdx.y, lane = threadIdx.x % 32;
  const int row = (blockIdx.x % row_blocks) * kPrepassRows + threadIdx.x / 32;
  if (h >= in.heads || row >= in.rows) return;  // a whole warp
  static_assert(256 / 4 <= 2 * 32, "two float4 a lane at most");
  const int vecs = ins.head_dim / 4, padded_vecs = ins.padded_dim / 4;
  const float* x = in.x + b * in.strides.batch + h * in.strides.head + row * in.strides.row;
  float4 v[2];
  float top = 0.f;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int c = lane + 32 * i;
    v[i] = c < vecs ? *reinterpret_cast<const float4*>(x + 4 * c) : make_float4(0.f, 0.f, 0.f, 0.f);
    auto take = [&](float e) { top = isfinite(e) ? fmaxf(top, fabsf(e)) : top; };
    take(v[i].x);
    take(v[i].y);
    take(v[i].z);
    take(v[i].w);
  }
  for (int offset = 16; offset > 0; offset /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
  const int e = pair_exponent_for(top);
  const float scale = pow2(e);
  __half* halves = reinterpret_cast<__half*>(in.out + b * in.out_strides.batch + h * in.out_strides.head +
                                             row * in.out_strides.row);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int c = lane + 32 * i;
    if (c >= padded_vecs) continue;
    uint2 hi, lo;
    split_input_pair(v[i].x * scale, v[i].y * scale, hi.x, lo.x);
    split_input_pair(v[i].z * scale, v[i].w * scale, hi.y, lo.y);
    *reinterpret_cast<uint2*>(halves + 4 * c) = hi;
    *reinterpret_cast<uint2*>(halves + ins.padded_dim + 4 * c) = lo;
  }
  if (lane == 0) in.unscale[b * in.unscale_strides.batch + h * in.unscale_strides.head + row] = pow2(-e);
}

// The most shared memory a block of either direction's pair kernels takes at bucket kHeadDim.
template <int kHeadDim>
int pair_smem_bytes(const FlashFwdParams&) {
  return FwdKernel<Fp32Pair, kHeadDim>::kSmemBytes;
}
template <int kHeadDim>
int pair_smem_bytes(const FlashBwdParams&) {
  return std::max(BwdDqKernel<Fp32Pair, kHeadDim>::kSmemBytes, BwdDkvKernel<Fp32Pair, kHeadDim>::kSmemBytes);
}

// The scratch either direction's pair kernels take for p, or 0 where they do not run it: where
// the tensor-core kernels would (fp32_on_tensor_cores, with the pair kernels' shared memory) but
// for CUFLASH_FP32=3xtf32, paged and seqused_k caches.
template <class Params>
int64_t pair_scratch_bytes(const Params& p, bool with_dout) {
  if (p.dtype != DType::kFloat32 || fp32_mma_sync_switch() || p.paged.block_table != nullptr ||
      p.varlen.seqused_k != nullptr || device_attribute<cudaDevAttrComputeCapabilityMajor>(0) < 8)
    return 0;
  const int bucket = cuda_head_dim_bucket(DType::kFloat32, p.shape.head_dim);
  const int smem = bucket == 32    ? pair_smem_bytes<32>(p)
                   : bucket == 64  ? pair_smem_bytes<64>(p)
                   : bucket == 128 ? pair_smem_bytes<128>(p)
                   : bucket == 256 ? pair_smem_bytes<256>(p)
                                   : 0;
  return smem > 0 && fp32_on_tensor_cores(p, smem) ? pair_scratch_layout(p, bucket, with_dout).bytes : 0;
}

}  // namespace

int64_t fp32_pair_scratch_bytes(const FlashFwdParams& p) {
  // Unless CUFLASH_FP32=pairs asks for them there, the forwards Hopper's TF32 wgmmas take stay:
  // 1.11-1.28x the pairs' speed (H100, head dim 64; benchmarks/NOTES.md).
  const bool pairs = fp32_pairs_switch() || !fp32_wgmma_forward_runs(p);
  return p.num_splits == 1 && pairs ? pair_scratch_bytes(p, false) : 0;
}
int64_t fp32_pair_scratch_bytes(const FlashBwdParams& p) {
  // The pair kernels compute dQ themselves (no dq_accum: float32 never adds it up).
  return p.dq_accum == nullptr ? pair_scratch_bytes(p, true) : 0;
}

cudaError_t split_fp32_pairs(AttentionParams& p, int padded_dim, cudaStream_t stream, const void** dout,
                             TensorStrides* dout_strides) {
  const bool packed = p.varlen.cu_seqlens_q != nullptr;
  const PairScratchLayout layout = pair_scratch_layout(p, padded_dim, dout != nullptr);
  char* scratch = static_cast<char*>(p.fp32_pair_scratch);
  const void** data[kMaxPrepassInputs] = {&p.q, &p.k, &p.v, dout};
  TensorStrides* strides[kMaxPrepassInputs] = {&p.q_strides, &p.k_strides, &p.v_strides, dout_strides};
  PairRowScales* scales[kMaxPrepassInputs] = {&p.pair_scales.q, &p.pair_scales.k, &p.pair_scales.v,
                                              &p.pair_scales.dout};
  PrepassInputs ins{};
  ins.head_dim = p.shape.head_dim;
  ins.padded_dim = padded_dim;
  int max_rows = 0, max_heads = 0;
  for (int i = 0; i < layout.inputs; ++i) {
    PrepassInput& in = ins.in[i];
    in.x = static_cast<const float*>(*data[i]);
    in.strides = *strides[i];
    in.batches = layout.batches;
    in.rows = layout.rows[i];
    in.heads = layout.heads[i];
    in.out = reinterpret_cast<Fp32Pair*>(scratch + layout.rows_offset[i]);
    in.out_strides.row = int64_t{in.heads} * padded_dim;
    in.out_strides.head = padded_dim;
    in.out_strides.batch = packed ? 0 : in.out_strides.row * in.rows;
    in.unscale = reinterpret_cast<float*>(scratch + layout.scales_offset[i]);
    in.unscale_strides.row = 1;
    in.unscale_strides.head = in.rows;
    in.unscale_strides.batch = packed ? 0 : int64_t{in.heads} * in.rows;
    max_rows = std::max(max_rows, in.rows);
    max_heads = std::max(max_heads, in.heads);
    // The kernels read the pairs where they read the input, and each row's scale as its rows are
    // addressed (row_offset: packed inputs' batch stride 0).
    *data[i] = in.out;
    *strides[i] = in.out_strides;
    *scales[i] = PairRowScales{in.unscale, in.unscale_strides};
  }
  const int row_blocks = (max_rows + kPrepassRows - 1) / kPrepassRows;
  const dim3 grid(static_cast<unsigned>(row_blocks * int64_t{layout.batches}), max_heads, layout.inputs);
  if (grid.x == 0) return cudaSuccess;
  fp32_pair_split_kernel<<<grid, kPrepassThreads, 0, stream>>>(ins);
  return cudaGetLastError();
}

}  // namespace cuflash
