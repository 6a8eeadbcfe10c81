// Hopper (sm_90a) building blocks for the warpgroup path of issue 9: shared-memory matrix
// descriptors for 128-byte-swizzled tiles, wgmma.mma_async, mbarriers and TMA loads. A warpgroup is 4 warps
// (128 threads) that issue one wgmma together; the accumulator of an m64nN wgmma is spread over
// them as 4 mma.sync-style 16-row C fragments (warp w: rows 16w..16w+15).
// Checked on their own by tests/sm90/wgmma_probe.cu (tests/test_sm90_probe.py).
#pragma once
#include <cstdint>
#include "wgmma_instructions.cuh"  // Wgmma<T, N>::ss / ::rs, generated

namespace cuflash::sm90 {

// 128-byte swizzle (CUTLASS's Swizzle<3,4,3>): in a tile of 128-byte rows whose 8-row atoms
// start on 1024-byte boundaries, the 16-byte chunk c of row r lives at chunk c ^ (r % 8).
// Byte offset of element (row, col) of a K-major tile of kElemBytes-byte elements, 128 bytes per
// row: 64 16-bit elements, or 32 floats (read by TF32 wgmmas, whose k8 step is 32 bytes as a k16
// step of 16-bit elements).
template <int kElemBytes = 2>
__host__ __device__ constexpr uint32_t swizzle128_offset(int row, int col) {
  constexpr uint32_t kPerChunk = 16 / kElemBytes;
  const uint32_t chunk = static_cast<uint32_t>(col) / kPerChunk, within = static_cast<uint32_t>(col) % kPerChunk;
  return static_cast<uint32_t>(row) * 128 + ((chunk ^ (static_cast<uint32_t>(row) % 8)) * 16) + within * kElemBytes;
}
// The same in a tile of kRows rows and any number of 128-byte panels (64 16-bit columns, 32
// floats), stored one after the other (the layout both descriptor kinds below read).
template <int kRows, int kElemBytes = 2>
__host__ __device__ constexpr uint32_t panel_offset(int row, int col) {
  constexpr int kPanelCols = 128 / kElemBytes;
  return static_cast<uint32_t>(col / kPanelCols) * (kRows * 128) + swizzle128_offset<kElemBytes>(row, col % kPanelCols);
}

// x, which every lane of the (whole, converged) warp holds, broadcast from lane 0 (as CUTLASS's
// canonical_warp_group_idx) so that the compiler knows it is the same across the warp and keeps
// what is computed from it in uniform registers, not per-thread ones (which count against the
// thread's budget, and are moved by R2UR before every wgmma that reads them).
__device__ __forceinline__ int warp_uniform(int x) { return __shfl_sync(0xffffffffu, x, 0); }

// This thread's warpgroup (threadIdx.x / 128), uniform (a consumer's wgmma descriptors are computed
// from it): H200, bf16, backward +1-6% (D=128 nondet +3-6%), forward D=64 +1-6%
// (benchmarks/NOTES.md, fourteenth session).
__device__ __forceinline__ int warpgroup_index() { return warp_uniform(static_cast<int>(threadIdx.x) / 128); }

// Dynamic shared memory rounded up to the 1024-byte boundary the swizzle atoms start on (kernels
// ask for 1024 bytes more than they use).
__device__ __forceinline__ unsigned char* align_1024(char* p) {
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(p) + 1023) & ~static_cast<uintptr_t>(1023));
}

// The same for 4-byte elements (float, read by TF32 wgmmas): 32 per 128-byte row, so that a
// k8 step is +32 bytes as a k16 step of 16-bit elements, and panels hold 32 columns.
__host__ __device__ constexpr uint32_t swizzle128_offset_f32(int row, int col) {
  const uint32_t chunk = static_cast<uint32_t>(col) / 4, within = static_cast<uint32_t>(col) % 4;
  return static_cast<uint32_t>(row) * 128 + ((chunk ^ (static_cast<uint32_t>(row) % 8)) * 16) + within * 4;
}
template <int kRows>
__host__ __device__ constexpr uint32_t panel_offset_f32(int row, int col) {
  return static_cast<uint32_t>(col / 32) * (kRows * 128) + swizzle128_offset_f32(row, col % 32);
}

// The wgmma shared-memory descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
// leading-dimension byte offset, stride-dimension byte offset, all >> 4, and the swizzle mode in
// bits 62-63 (1: 128B). Tiles here are panels of 64 16-bit columns (128-byte rows, 8-row atoms
// of 1024 bytes, swizzle128_offset), one panel after the other.
__device__ __forceinline__ uint64_t smem_desc_sw128(const void* tile, uint32_t byte_offset, uint32_t leading_bytes) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(tile)) + byte_offset;
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((addr >> 4) & 0x3FFF);
  desc |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16;
  desc |= static_cast<uint64_t>(1024 >> 4) << 32;  // stride byte offset: 8 rows x 128 bytes
  desc |= static_cast<uint64_t>(1) << 62;          // 128-byte swizzle
  return desc;
}
// K-major operand (rows are M or N, the 16 K elements of one wgmma lie within a row): the next 8
// rows are 1024 bytes on; the leading offset is unused (1 by convention). Stepping K by 16
// elements inside a panel is +32 bytes of start address, to the next panel + rows * 128.
__device__ __forceinline__ uint64_t smem_desc_k_major_sw128(const void* tile, uint32_t byte_offset = 0) {
  return smem_desc_sw128(tile, byte_offset, 16);
}
// MN-major operand (rows are K, N runs along a row: V in P V, transposed by the wgmma): the next
// 8 K-rows are 1024 bytes on, the next 64 N-columns one panel (panel_bytes) on. Stepping K by 16
// rows is +2048 bytes of start address.
__device__ __forceinline__ uint64_t smem_desc_mn_major_sw128(const void* tile, uint32_t byte_offset,
                                                             uint32_t panel_bytes) {
  return smem_desc_sw128(tile, byte_offset, panel_bytes);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Two floats to shared memory at a 32-bit shared address (smem_u32): the compiler then keeps
// 32-bit offsets rather than 64-bit generic pointers live across a loop.
__device__ __forceinline__ void st_shared_f32x2(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t x) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(x) : "memory");
}
// Loads from a 32-bit shared address; volatile, so that they stay after the mbarrier wait that
// makes the data theirs.
__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t addr) {
  uint32_t x;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(x) : "r"(addr));
  return x;
}
__device__ __forceinline__ uint32_t ld_shared_u16(uint32_t addr) {
  unsigned short x;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(x) : "r"(addr));
  return x;
}
__device__ __forceinline__ uint32_t ld_shared_u8(uint32_t addr) {
  uint32_t x;
  asm volatile("ld.shared.u8 %0, [%1];\n" : "=r"(x) : "r"(addr));
  return x;
}
// Generic-proxy writes to shared memory (st.shared) made visible to the async proxy (wgmma, TMA).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// The same between the proxies for global memory: this thread's completed bulk (TMA) writes
// before its later generic release, and its generic acquire before its later bulk operations.
__device__ __forceinline__ void fence_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }
// A counter in global memory shared by CTAs: read with acquire, added to with release (gpu scope).
__device__ __forceinline__ int load_acquire_gpu(const int* counter) {
  int value;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(value) : "l"(counter) : "memory");
  return value;
}
__device__ __forceinline__ void add_release_gpu(int* counter, int value) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(counter), "r"(value) : "memory");
}

// mbarrier (shared memory, 8 bytes) and TMA: a tile load signals the barrier with its bytes
// (complete_tx); waiters spin on the barrier's phase parity.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(arrivals) : "memory");
}
// The initialized barrier made visible to the async proxy (TMA) before it is used.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
// A 2-d box of `tensor_map` at (col, row) (innermost coordinate first) into shared memory, laid
// out (and swizzled) as the map says, completing `bytes` on bar. tensor_map: a __grid_constant__
// kernel parameter.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* tensor_map, uint64_t* bar, int col, int row) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(smem_u32(dst)),
      "l"(tensor_map), "r"(col), "r"(row), "r"(smem_u32(bar))
      : "memory");
}

// A 4-d box of `tensor_map` at (c0, c1, c2, c3) (innermost first): attention's (column, row,
// head, batch).
__device__ __forceinline__ void tma_load_4d(void* dst, const void* tensor_map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_u32(dst)),
      "l"(tensor_map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_u32(bar))
      : "memory");
}
// Adds a box of shared memory src (laid out as the map's box) to `tensor_map`'s tensor at (c0, c1,
// c2, c3), f32 adds done in L2 (TMA reduce); a bulk group of the issuing thread
// (bulk_commit_group, bulk_wait_group_read).
__device__ __forceinline__ void tma_reduce_add_4d(const void* tensor_map, const void* src, int c0, int c1, int c2,
                                                  int c3) {
  asm volatile("cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::
                   "l"(tensor_map),
               "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
// Stores a box of shared memory src (laid out, and swizzled, as the map's box) to `tensor_map`'s
// tensor at (c0, c1, c2, c3); the parts of the box past the tensor's edges are not written. A bulk
// group of the issuing thread, as tma_reduce_add_4d.
__device__ __forceinline__ void tma_store_4d(const void* tensor_map, const void* src, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::
                   "l"(tensor_map),
               "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until this thread's bulk groups have read their shared memory sources (kPending may stay
// in flight).
template <int kPending>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
// Waits until this thread's bulk groups are complete (their writes done), all but the newest
// kPending.
template <int kPending>
__device__ __forceinline__ void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}
__device__ __forceinline__ void bulk_wait_group_all() { bulk_wait_group<0>(); }
// One arrival on a barrier (a consumer releasing a buffer).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// A barrier among kThreads threads (a multiple of 32) of the CTA, id 1-15 (0 is __syncthreads).
template <int kThreads>
__device__ __forceinline__ void named_barrier_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
}
// Arrives at a named barrier without waiting: with named_barrier_sync of other threads on the
// same id, one side signals the other (kThreads counts both sides).
template <int kThreads>
__device__ __forceinline__ void named_barrier_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
}
// Four 8 x 8 matrices of 16-bit elements stored transposed (stmatrix .trans): register i holds
// matrix i in the mma fragment layout (lane l: row l / 4, columns 2 (l % 4) and the next), and
// lane l gives the shared address of row l % 8 of stored matrix l / 8 (16 contiguous bytes): that
// row is column l % 8 of the fragment.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}
// The same for two matrices (lanes 0-15 give the addresses): the odd fifth 8-column tile of a
// 40-column accumulator.
__device__ __forceinline__ void stmatrix_x2_trans(uint32_t addr, const uint32_t (&r)[2]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x2.trans.shared.b16 [%0], {%1, %2};\n" ::"r"(addr), "r"(r[0]), "r"(r[1])
               : "memory");
}
// A warpgroup's 64 x 40 accumulator, packed to 16-bit pairs (f[2j + h]: n8 tile j, rows 8h.. of
// each warp's 16, the mma fragment layout), stored transposed as rows row0..row0 + 39 of a
// 128B-swizzled panel at shared address panel: stored row row0 + 8j + q is accumulator column
// 8j + q, its 8 rows from 16 w + 8 h contiguous (the planned head-dim-256 backward's P^T, dS^T).
__device__ __forceinline__ void stmatrix_acc40_trans(uint32_t panel, int row0, const uint32_t (&f)[10]) {
  const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4;
  auto address = [&](int m) {  // this lane's row of stored fragment m
    return panel + swizzle128_offset(row0 + 8 * (m / 2) + lane % 8, 16 * warp + 8 * (m % 2));
  };
  stmatrix_x4_trans(address(lane / 8), {f[0], f[1], f[2], f[3]});
  stmatrix_x4_trans(address(4 + lane / 8), {f[4], f[5], f[6], f[7]});
  stmatrix_x2_trans(address(8 + (lane / 8) % 2), {f[8], f[9]});
}
// Warp-specialized kernels move registers from the producer warpgroup to the consumers; every
// thread of the warpgroup executes it.
// The pool they share is what the CTA (one per SM, __launch_bounds__(kThreads, 1)) holds at
// launch: 65536 / kThreads per thread, rounded down to a multiple of 8 (what ptxas gives these
// kernels, whose register use exceeds it before the split; a -maxrregcount below it would break
// this). A split asking for more than that makes setmaxnreg.inc wait forever.
template <int kThreads>
constexpr bool fits_launch_registers(int producer_regs, int consumer_regs) {
  constexpr int kLaunchRegs = (65536 / kThreads / 8) * 8 < 248 ? (65536 / kThreads / 8) * 8 : 248;
  return 128 * (producer_regs + (kThreads / 128 - 1) * consumer_regs) <= kThreads * kLaunchRegs;
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// Row and column (within the 64 x N tile) of accumulator element i of thread t.
__host__ __device__ constexpr int wgmma_acc_row(int t, int i) { return 16 * (t / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2); }
__host__ __device__ constexpr int wgmma_acc_col(int t, int i) { return 8 * (i / 4) + 2 * (t % 4) + i % 2; }

}  // namespace cuflash::sm90
