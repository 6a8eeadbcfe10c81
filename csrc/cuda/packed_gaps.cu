// The rows of packed outputs that no sequence covers (fill_packed_gaps, flash_launch.h).
#include <cstdint>
#include "../attention_math.h"
#include "flash_launch.h"

namespace cuflash {
namespace {

struct GapFills {
  GapFill fill[kMaxGapFills];
  int count;
};

// Gap g of a fill's rows lies between sequence g - 1's last covered row and sequence g's first
// (gap 0 from row 0, gap `batch` to row `total`). Every row no sequence covers lies in a gap that
// runs forward: walking 0 -> s_0 -> e_0 -> s_1 -> ... -> total (s_b, e_b: sequence b's covered
// rows), the step that first passes a row is a sequence (the row is covered) or a forward gap.
// With offsets that decrease, a gap may also hold covered rows: the attention kernels, later on
// the stream, write those again.
__global__ void fill_packed_gaps_kernel(int batch, const GapFills fills) {
  for (int gap = blockIdx.y; gap <= batch; gap += gridDim.y) {
    for (int f = 0; f < fills.count; ++f) {
      const GapFill& t = fills.fill[f];
      int64_t lo = 0, hi = t.total, row0;
      int count;
      if (gap > 0) {
        packed_rows_of(t.cu_seqlens, gap - 1, t.total, t.max_rows, row0, count);
        lo = row0 + count;
      }
      if (gap < batch) {
        packed_rows_of(t.cu_seqlens, gap, t.total, t.max_rows, row0, count);
        hi = row0;
      }
      const int64_t items = lo < hi ? (hi - lo) * t.heads * t.width : 0;
      const int64_t stride = int64_t{gridDim.x} * blockDim.x;
      for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < items; i += stride) {
        const int64_t column = i % t.width, row_head = i / t.width;
        const int64_t at = (lo + row_head / t.heads) * t.row_stride + (row_head % t.heads) * t.head_stride + column;
        if (t.elem_bytes == 2) static_cast<uint16_t*>(t.data)[at] = 0;  // 0 only (fill_packed_gaps)
        else if (t.elem_bytes == 4) static_cast<float*>(t.data)[at] = static_cast<float>(t.value);
        else static_cast<double*>(t.data)[at] = t.value;
      }
    }
  }
}

}  // namespace

cudaError_t fill_packed_gaps(int batch, const GapFill* fills, int num_fills, cudaStream_t stream) {
  if (num_fills < 1 || num_fills > kMaxGapFills) return cudaErrorInvalidValue;
  GapFills f{};
  for (int i = 0; i < num_fills; ++i) {
    const GapFill& t = fills[i];
    const bool sized = t.elem_bytes == 4 || t.elem_bytes == 8 || (t.elem_bytes == 2 && t.value == 0.0);
    if (!sized || t.heads < 1 || t.width < 1 || t.cu_seqlens == nullptr) return cudaErrorInvalidValue;
    f.fill[i] = t;
  }
  f.count = num_fills;
  // A few CTAs a gap: in the usual batch (offsets from 0 to the packed length, every sequence
  // within max_rows) no gap holds a row and each CTA reads two offsets a fill and ends; a large
  // gap (a tensor with spare rows past the last sequence) still spreads over several SMs.
  constexpr int kThreads = 256, kCtasPerGap = 8;
  const dim3 grid(kCtasPerGap, batch + 1 < 65535 ? batch + 1 : 65535);
  fill_packed_gaps_kernel<<<grid, kThreads, 0, stream>>>(batch, f);
  return cudaGetLastError();
}

}  // namespace cuflash
