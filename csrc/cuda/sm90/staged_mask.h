// The attn_mask tiles the TMA forward and the fused TMA backward stage in shared memory
// (CUFLASH_SM90's "masktma" and "bwdmasktma" parts; flash_fwd_sm90_tma.cuh, flash_bwd_sm90_tma.cuh):
// what the producer loads and where each consumer thread reads its scores' elements. Host and
// device: tests/cpp/test_mask_tiles.cu checks the addresses against TMA's swizzle rule.
#pragma once
#include <cstdint>
#include "../../attention_math.h"  // CUFLASH_HD

namespace cuflash::sm90 {

// The producer's thread loads each key block's mask tile (the tile's query rows, or the one row of
// a mask that broadcasts along the queries) into shared memory with K (the backward: each query
// step's, with Q and dO), one box of 64 keys at a time. Float masks (16-bit, the kernel's type)
// lie in 128-byte rows with the 128-byte swizzle, bool ones in 64-byte rows with the 64-byte
// swizzle: a quad reads 16 bytes of a row, the warp's 8 rows 8 different bank groups. One row is
// left unswizzled (its XOR is 0).
struct MaskStaging {
  bool on = false;
  bool is_bool = false;
  bool one_row = false;                      // the mask broadcasts along the queries
  bool per_head = false, per_batch = false;  // else it broadcasts along them: coordinate 0
  int box_slot_bytes = 0;                    // between a stage's 64-key boxes (1024-byte aligned)
  int stage_tx_bytes = 0;                    // the bytes a stage's boxes bring (TMA counts boxes whole)

  // A thread of a warp tile (16 rows from warp_row, a multiple of 16, of the CTA's tile; the
  // accumulator layout of mma_sm80.cuh's WarpAcc) reads the pair of keys 8j + 2 (lane % 4), + 1 of
  // its rows row and row + 8 (row = warp_row + lane / 4) at
  //   thread_offset(warp_row, lane) + tile_offset(j, chunk_xor(lane)) + half * next_rows()
  // bytes into the stage (half 1: row + 8).
  CUFLASH_HD uint32_t elem_bytes() const { return is_bool ? 1 : 2; }
  CUFLASH_HD uint32_t row_bytes() const { return 64 * elem_bytes(); }
  CUFLASH_HD uint32_t thread_offset(int warp_row, int lane) const {
    const uint32_t row = one_row ? 0 : warp_row + (lane >> 2);
    return row * row_bytes() + 2 * (lane & 3) * elem_bytes();
  }
  // The swizzle's XOR of the 16-byte chunks of the thread's rows (128-byte: row % 8; 64-byte:
  // (row / 2) % 4), the same for row and row + 8.
  CUFLASH_HD uint32_t chunk_xor(int lane) const {
    return one_row ? 0 : is_bool ? (lane >> 3) & 3 : (lane >> 2) & 7;
  }
  CUFLASH_HD uint32_t next_rows() const { return one_row ? 0 : 8 * row_bytes(); }
  // Keys 8j..: box j / 8; in a 64-key row, bytes 8 (j % 8) x elem_bytes: chunk (j % 8) x
  // elem_bytes / 2, and 8 bytes into it for odd j of a bool row.
  CUFLASH_HD uint32_t tile_offset(int j, uint32_t chunk_xor) const {
    const uint32_t box = (j / 8) * box_slot_bytes;
    if (is_bool) return box + ((((j % 8) >> 1) ^ chunk_xor) << 4) + (j & 1) * 8;
    return box + (((j % 8) ^ chunk_xor) << 4);
  }

  // The backward's transposed warp tiles: keys the rows (16 from warp_key, a multiple of 16, of
  // the CTA's key block), queries the columns (8j + 2 (lane % 4), + 1 from the step's first).
  //  - One row: keys warp_key + lane / 4 and + 8, at one_row_offset(warp_key, lane) + half * 8
  //    elements, for every query.
  //  - 16-bit, by ldmatrix.x4.trans (each 8 x 8 matrix's rows 8 queries of 8 keys, 16 bytes):
  //    for query tiles 2jj and 2jj + 1, the lane gives the address
  //    transposed_ldsm_offset(warp_key, lane) + jj * 2048 of row lane % 8 of matrix lane / 8 (tile
  //    2jj + lane / 16, keys + 8 for odd lane / 8); matrix m = 2 (j % 2) + half then holds, for the
  //    lane, the pair of queries of its elements (j, 2 half), (j, 2 half + 1).
  //  - bool, a byte at a time: element (j, 2 half + e) at bool_offset(warp_key, lane) +
  //    (8j + e) * 64 + 8 half (the 64-byte swizzle's XOR, (query / 2) % 4, is lane % 4 for all).
  CUFLASH_HD uint32_t one_row_offset(int warp_key, int lane) const {
    return (warp_key / 64) * box_slot_bytes + (warp_key % 64 + (lane >> 2)) * elem_bytes();
  }
  CUFLASH_HD uint32_t transposed_ldsm_offset(int warp_key, int lane) const {
    const uint32_t row = lane & 7, chunk = (warp_key % 64) / 8 + ((lane >> 3) & 1);
    return (warp_key / 64) * box_slot_bytes + (lane >> 4) * 1024 + row * 128 + ((chunk ^ row) << 4);
  }
  CUFLASH_HD uint32_t bool_offset(int warp_key, int lane) const {
    const uint32_t quad = lane & 3, chunk = (warp_key % 64) / 16;
    return (warp_key / 64) * box_slot_bytes + 2 * quad * 64 + ((chunk ^ quad) << 4) + (lane >> 2);
  }
};

}  // namespace cuflash::sm90
