// float32 as fp16 pairs (fp32_pairs.h): which calls take them, and the pre-pass that splits the
// inputs (the backward's dout too). Two memory-bound passes over each input (its largest |x| a (batch, head), then its
// halves), as many inputs a launch as the call has.
#include <cuda_fp16.h>
#include <algorithm>
#include "flash_bwd_kernel.cuh"
#include "flash_fwd_kernel.cuh"
#include "device_attributes.h"
#include "flash_launch.h"
#include "fp32_pairs.h"
#include "mma_sm80.cuh"
#include "run_switches.h"

namespace cuflash {
namespace {

constexpr int kPrepassThreads = 256, kPrepassRows = 32;  // a CTA's rows of one (batch, head)
constexpr int kMaxPrepassInputs = 4;

// One input: float rows (elements; a row's head_dim floats 16-byte aligned) in, pair rows out.
struct PrepassInput {
  const float* x;
  TensorStrides strides;
  Fp32Pair* out;
  TensorStrides out_strides;  // in units
  uint32_t* amax;             // [batches][heads]
  int batches, rows, heads;   // batches 1 and rows the total for packed inputs
};
struct PrepassInputs {
  PrepassInput in[kMaxPrepassInputs];
  int count, head_dim, padded_dim;
};

// The CTA's input (grid z) and (batch, head, first row) (grid x: row blocks of each batch; y:
// heads), or null where the grid's box is past that input.
__device__ const PrepassInput* prepass_block(const PrepassInputs& ins, int& b, int& h, int& row0) {
  const PrepassInput* in = &ins.in[blockIdx.z];
  const int row_blocks = gridDim.x / in->batches;  // the grid's x is row blocks times batches
  b = blockIdx.x / row_blocks;
  h = blockIdx.y;
  row0 = (blockIdx.x % row_blocks) * kPrepassRows;
  return h < in->heads && row0 < in->rows ? in : nullptr;
}

// The largest |x| of each (batch, head), as float bits (non-negative floats order as their bits;
// fmaxf drops NaN, which the halves keep).
__global__ void __launch_bounds__(kPrepassThreads) fp32_pair_amax_kernel(const __grid_constant__ PrepassInputs ins) {
  int b, h, row0;
  const PrepassInput* in = prepass_block(ins, b, h, row0);
  if (in == nullptr) return;
  const int vecs = ins.head_dim / 4;
  const float* base = in->x + b * in->strides.batch + h * in->strides.head;
  float top = 0.f;
  for (int i = threadIdx.x; i < kPrepassRows * vecs; i += kPrepassThreads) {
    const int row = row0 + i / vecs;
    if (row >= in->rows) break;
    const float4 x = *reinterpret_cast<const float4*>(base + row * in->strides.row + 4 * (i % vecs));
    top = fmaxf(top, fmaxf(fmaxf(fabsf(x.x), fabsf(x.y)), fmaxf(fabsf(x.z), fabsf(x.w))));
  }
  for (int offset = 16; offset > 0; offset /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
  __shared__ float warp_top[kPrepassThreads / 32];
  if (threadIdx.x % 32 == 0) warp_top[threadIdx.x / 32] = top;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kPrepassThreads / 32; ++w) top = fmaxf(top, warp_top[w]);
  atomicMax(in->amax + b * in->heads + h, __float_as_uint(top));
}

// x 2^e as hi and lo halves, the rows padded with zeros to padded_dim.
__global__ void __launch_bounds__(kPrepassThreads) fp32_pair_split_kernel(const __grid_constant__ PrepassInputs ins) {
  int b, h, row0;
  const PrepassInput* in = prepass_block(ins, b, h, row0);
  if (in == nullptr) return;
  const float scale = pow2(pair_exponent(in->amax[b * in->heads + h]));
  const int vecs = ins.head_dim / 4, padded_vecs = ins.padded_dim / 4;
  const float* base = in->x + b * in->strides.batch + h * in->strides.head;
  Fp32Pair* out = in->out + b * in->out_strides.batch + h * in->out_strides.head;
  for (int i = threadIdx.x; i < kPrepassRows * padded_vecs; i += kPrepassThreads) {
    const int row = row0 + i / padded_vecs, c = i % padded_vecs;
    if (row >= in->rows) break;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (c < vecs) x = *reinterpret_cast<const float4*>(base + row * in->strides.row + 4 * c);
    uint2 hi, lo;
    split_half2(x.x * scale, x.y * scale, hi.x, lo.x);
    split_half2(x.z * scale, x.w * scale, hi.y, lo.y);
    __half* halves = reinterpret_cast<__half*>(out + row * in->out_strides.row);
    *reinterpret_cast<uint2*>(halves + 4 * c) = hi;
    *reinterpret_cast<uint2*>(halves + ins.padded_dim + 4 * c) = lo;
  }
}

// Whether the pair kernels of the direction (Params) at head-dim bucket kHeadDim fit the
// device's shared memory per block.
template <int kHeadDim>
bool pair_kernels_fit(const FlashFwdParams&) {
  return FwdKernel<Fp32Pair, kHeadDim>::kSmemBytes <=
         device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024);
}
template <int kHeadDim>
bool pair_kernels_fit(const FlashBwdParams&) {
  return std::max(BwdDqKernel<Fp32Pair, kHeadDim>::kSmemBytes, BwdDkvKernel<Fp32Pair, kHeadDim>::kSmemBytes) <=
         device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024);
}

// The scratch either direction's pair kernels take for p, or 0 where they do not run it.
template <class Params>
int64_t pair_scratch_bytes(const Params& p, bool with_dout) {
  if (p.dtype != DType::kFloat32 || !fp32_pairs_switch() || p.paged.block_table != nullptr ||
      p.varlen.seqused_k != nullptr || !tensor_core_layout(p, sizeof(float)) ||
      device_attribute<cudaDevAttrComputeCapabilityMajor>(0) < 8)
    return 0;
  const int bucket = cuda_head_dim_bucket(DType::kFloat32, p.shape.head_dim);
  const bool fits = bucket == 32    ? pair_kernels_fit<32>(p)
                    : bucket == 64  ? pair_kernels_fit<64>(p)
                    : bucket == 128 ? pair_kernels_fit<128>(p)
                    : bucket == 256 ? pair_kernels_fit<256>(p)
                                    : false;
  return fits ? pair_scratch_layout(p, bucket, with_dout).bytes : 0;
}

}  // namespace

int64_t fp32_pair_scratch_bytes(const FlashFwdParams& p) {
  return p.num_splits == 1 ? pair_scratch_bytes(p, false) : 0;
}
int64_t fp32_pair_scratch_bytes(const FlashBwdParams& p) {
  // The pair kernels compute dQ themselves (no dq_accum: float32 never adds it up).
  return p.dq_accum == nullptr ? pair_scratch_bytes(p, true) : 0;
}

cudaError_t split_fp32_pairs(AttentionParams& p, int padded_dim, cudaStream_t stream, const void** dout,
                             TensorStrides* dout_strides) {
  const AttentionShape& sh = p.shape;
  const bool packed = p.varlen.cu_seqlens_q != nullptr;
  const PairScratchLayout layout = pair_scratch_layout(p, padded_dim, dout != nullptr);
  char* scratch = static_cast<char*>(p.fp32_pair_scratch);
  const void** data[kMaxPrepassInputs] = {&p.q, &p.k, &p.v, dout};
  TensorStrides* strides[kMaxPrepassInputs] = {&p.q_strides, &p.k_strides, &p.v_strides, dout_strides};
  const uint32_t** amax[kMaxPrepassInputs] = {&p.pair_amax.q, &p.pair_amax.k, &p.pair_amax.v, &p.pair_amax.dout};
  const int heads[kMaxPrepassInputs] = {sh.heads_q, sh.heads_kv, sh.heads_kv, sh.heads_q};
  const int rows[kMaxPrepassInputs] = {packed ? p.varlen.total_q : sh.seqlen_q, packed ? p.varlen.total_k : sh.seqlen_k,
                                       packed ? p.varlen.total_k : sh.seqlen_k, packed ? p.varlen.total_q : sh.seqlen_q};
  PrepassInputs ins{};
  ins.count = dout != nullptr ? 4 : 3;
  ins.head_dim = sh.head_dim;
  ins.padded_dim = padded_dim;
  int max_rows = 0, max_heads = 0;
  for (int i = 0; i < ins.count; ++i) {
    PrepassInput& in = ins.in[i];
    in.x = static_cast<const float*>(*data[i]);
    in.strides = *strides[i];
    in.out = reinterpret_cast<Fp32Pair*>(scratch + layout.rows_offset[i]);
    in.out_strides.row = int64_t{heads[i]} * padded_dim;
    in.out_strides.head = padded_dim;
    in.out_strides.batch = packed ? 0 : in.out_strides.row * rows[i];
    in.amax = reinterpret_cast<uint32_t*>(scratch + layout.amax_offset[i]);
    in.batches = packed ? 1 : sh.batch;
    in.rows = rows[i];
    in.heads = heads[i];
    max_rows = std::max(max_rows, in.rows);
    max_heads = std::max(max_heads, in.heads);
    // The kernels read the pairs where they read the input.
    *data[i] = in.out;
    *strides[i] = in.out_strides;
    *amax[i] = in.amax;
  }
  if (const cudaError_t err = cudaMemsetAsync(scratch, 0, static_cast<size_t>(layout.rows_offset[0]), stream);
      err != cudaSuccess)
    return err;
  const int row_blocks = (max_rows + kPrepassRows - 1) / kPrepassRows;
  const dim3 grid(static_cast<unsigned>(row_blocks * int64_t{packed ? 1 : sh.batch}), max_heads, ins.count);
  if (grid.x == 0) return cudaSuccess;
  fp32_pair_amax_kernel<<<grid, kPrepassThreads, 0, stream>>>(ins);
  fp32_pair_split_kernel<<<grid, kPrepassThreads, 0, stream>>>(ins);
  return cudaGetLastError();
}

}  // namespace cuflash
