// Host side of the TMA loads: tensor maps of the attention inputs, encoded with the driver's
// cuTensorMapEncodeTiled, reached through the runtime (cudaGetDriverEntryPointByVersion) so that
// nothing links libcuda. tests/sm90/wgmma_probe.cu checks that a 128B-swizzled box lands as
// wgmma.cuh's panels.
#pragma once
#include <cuda.h>  // CUtensorMap and its enums (types only)
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <cstdint>
#include "../../flash_params.h"
#include "staged_mask.h"

namespace cuflash::sm90 {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encoder;
}

// Whether TMA can address a [batch][heads][rows][cols] tensor of elem_bytes-byte elements
// (strides in elements, the last dimension contiguous): the encoder is there, the base and the
// rows are 16-byte aligned, no stride is zero. Its byte strides (row, head, batch) go to
// *byte_strides.
inline bool tma_can_address(const void* base, int elem_bytes, const TensorStrides& strides, int batch, int heads,
                            int rows, int cols, cuuint64_t (*byte_strides)[3] = nullptr) {
  if (tensor_map_encoder() == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0 || (cols * elem_bytes) % 16 != 0)
    return false;
  const int64_t sizes[3] = {rows, heads, batch};
  const int64_t element_strides[3] = {strides.row, strides.head, strides.batch};
  for (int i = 0; i < 3; ++i) {
    int64_t bytes = element_strides[i] * elem_bytes;
    if (sizes[i] == 1 && bytes <= 0) bytes = 16;  // never stepped along: any valid stride
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= (int64_t{1} << 40)) return false;
    if (byte_strides != nullptr) (*byte_strides)[i] = static_cast<cuuint64_t>(bytes);
  }
  return true;
}

// Such a tensor as a 4-d map (column, row, head, batch) whose box is one swizzled panel: by
// default 128 bytes of columns (128B-swizzled) x box_rows rows of one head; box_cols columns and
// another swizzle where given (the box's row then as wide as the swizzle's span, or one row
// unswizzled). Boxes past the rows or columns read zeros (and reductions into them are dropped).
// False where TMA cannot address the tensor: the caller goes another way.
inline bool encode_rows_map(CUtensorMap* map, const void* base, CUtensorMapDataType type, int elem_bytes,
                            const TensorStrides& strides, int batch, int heads, int rows, int cols, int box_rows,
                            int box_cols = 0, CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_128B) {
  cuuint64_t byte_strides[3];
  if (!tma_can_address(base, elem_bytes, strides, batch, heads, rows, cols, &byte_strides)) return false;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box_cols > 0 ? box_cols : 128 / elem_bytes),
                             static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t steps[4] = {1, 1, 1, 1};
  return encode(map, type, 4, const_cast<void*>(base), dims, byte_strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The map's type of the kernel's 16-bit elements.
inline CUtensorMapDataType sixteen_bit_type(bool bf16) {
  return bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// q, k, v, out and their gradients: 16-bit, boxes of 64 columns (head_dim a multiple of 8).
inline bool encode_attention_map(CUtensorMap* map, const void* base, bool bf16, const TensorStrides& strides,
                                 int batch, int heads, int rows, int head_dim, int box_rows) {
  return encode_rows_map(map, base, sixteen_bit_type(bf16), 2, strides, batch, heads, rows, head_dim, box_rows);
}

// The extents of q (and out, dout, dq_accum) and of k (and v, dk, dv) as the maps address them: a
// padded batch's; packed sequences' one batch of all their rows (total_q, total_k); a paged
// cache's pages as its batch, a page's rows as its rows (the forward only).
struct MapRows {
  int q_batch, q_rows, kv_batch, kv_rows;
};
inline MapRows attention_map_rows(const AttentionParams& p) {
  const AttentionShape& sh = p.shape;
  const bool packed_q = p.varlen.cu_seqlens_q != nullptr, packed_k = p.varlen.cu_seqlens_k != nullptr;
  if (p.paged.block_table != nullptr)
    return {packed_q ? 1 : sh.batch, packed_q ? p.varlen.total_q : sh.seqlen_q, p.paged.num_pages, p.paged.page_size};
  return {packed_q ? 1 : sh.batch, packed_q ? p.varlen.total_q : sh.seqlen_q, packed_k ? 1 : sh.batch,
          packed_k ? p.varlen.total_k : sh.seqlen_k};
}

// The map and staging of dense p's attn_mask for kernel K's tiles (the "masktma" and "bwdmasktma"
// parts; K: the TMA forward's FwdSm90TmaKernel or the fused backward's BwdDkvSm90TmaKernel, their
// kBlockM rows a box, kBlockN keys a stage, kMayStageMask): off
// (nothing staged) where K has no room for it, or the mask's keys are not contiguous, or TMA
// cannot address its rows (a 16-byte-aligned base and row stride), or the sequences are packed.
// A dimension the mask broadcasts (stride 0) is one of size 1 in the map; a float mask has the
// kernel's 16-bit type (bf16 or fp16).
template <class K>
MaskStaging encode_mask_map(const AttentionParams& p, bool bf16, CUtensorMap* map) {
  MaskStaging m;
  const AttnMaskParams& mask = p.score.attn_mask;
  const AttentionShape& sh = p.shape;
  if (!K::kMayStageMask || mask.data == nullptr || mask.col_stride != 1 || p.varlen.cu_seqlens_q != nullptr ||
      p.varlen.cu_seqlens_k != nullptr)
    return m;
  m.is_bool = mask.is_bool;
  m.one_row = mask.row_stride == 0 || sh.seqlen_q == 1;
  m.per_head = mask.head_stride != 0 && sh.heads_q > 1;
  m.per_batch = mask.batch_stride != 0 && sh.batch > 1;
  const int box_rows = m.one_row ? 1 : K::kBlockM;
  const TensorStrides strides{m.per_batch ? mask.batch_stride : 0, m.per_head ? mask.head_stride : 0,
                              m.one_row ? 0 : mask.row_stride};
  const CUtensorMapDataType type = m.is_bool ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : sixteen_bit_type(bf16);
  // One row needs no swizzle (its XOR is 0), and its box need not start on a swizzle atom.
  const CUtensorMapSwizzle swizzle = m.one_row  ? CU_TENSOR_MAP_SWIZZLE_NONE
                                     : m.is_bool ? CU_TENSOR_MAP_SWIZZLE_64B
                                                 : CU_TENSOR_MAP_SWIZZLE_128B;
  if (!encode_rows_map(map, mask.data, type, m.elem_bytes(), strides, m.per_batch ? sh.batch : 1,
                       m.per_head ? sh.heads_q : 1, m.one_row ? 1 : sh.seqlen_q, sh.seqlen_k, box_rows, 64, swizzle))
    return m;
  const int box_bytes = box_rows * m.row_bytes();
  m.box_slot_bytes = (box_bytes + 1023) / 1024 * 1024;  // swizzle atoms start on 1024-byte boundaries
  m.stage_tx_bytes = K::kBlockN / 64 * box_bytes;
  m.on = true;
  return m;
}

}  // namespace cuflash::sm90
