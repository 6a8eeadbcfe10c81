// Hopper (sm_90a) building blocks for the warpgroup path of issue 9: shared-memory matrix
// descriptors for 128-byte-swizzled K-major tiles, wgmma.mma_async, mbarriers and TMA loads. A warpgroup is 4 warps
// (128 threads) that issue one wgmma together; the accumulator of an m64nN wgmma is spread over
// them as 4 mma.sync-style 16-row C fragments (warp w: rows 16w..16w+15).
// Checked on its own by tests/sm90/wgmma_probe.cu (tests/test_sm90_probe.py), not yet on a GPU.
#pragma once
#include <cstdint>

namespace cuflash::sm90 {

// 128-byte swizzle (CUTLASS's Swizzle<3,4,3>): in a tile of 128-byte rows whose 8-row atoms
// start on 1024-byte boundaries, the 16-byte chunk c of row r lives at chunk c ^ (r % 8).
// Byte offset of element (row, col) of a K-major tile of 16-bit elements, 64 per row.
__host__ __device__ constexpr uint32_t swizzle128_offset(int row, int col) {
  const uint32_t chunk = static_cast<uint32_t>(col) / 8, within = static_cast<uint32_t>(col) % 8;
  return static_cast<uint32_t>(row) * 128 + ((chunk ^ (static_cast<uint32_t>(row) % 8)) * 16) + within * 2;
}

// The wgmma shared-memory descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
// leading-dimension byte offset, stride-dimension byte offset, all >> 4, and the swizzle mode in
// bits 62-63 (1: 128B). For a K-major 128B-swizzled tile the stride between 8-row core-matrix
// groups is 1024 bytes and the leading offset is unused (1 by convention); stepping K by 16
// elements inside the 128-byte row is a +32-byte start address.
__device__ __forceinline__ uint64_t smem_desc_k_major_sw128(const void* tile, uint32_t byte_offset = 0) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(tile)) + byte_offset;
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((addr >> 4) & 0x3FFF);
  desc |= static_cast<uint64_t>(1) << 16;             // leading byte offset (unused for swizzled K-major)
  desc |= static_cast<uint64_t>(1024 >> 4) << 32;     // stride byte offset: 8 rows x 128 bytes
  desc |= static_cast<uint64_t>(1) << 62;             // 128-byte swizzle
  return desc;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Generic-proxy writes to shared memory (st.shared) made visible to the async proxy (wgmma, TMA).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d (64 x 64 fp32, 32 per thread) (+)= A (64 x 16, K-major) * B^T (B: 64 x 16, K-major), bf16.
// accumulate = false overwrites d (scale-d 0).
__device__ __forceinline__ void wgmma_m64n64k16_bf16(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                     bool accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
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

// Row and column (within the 64 x N tile) of accumulator element i of thread t.
__host__ __device__ constexpr int wgmma_acc_row(int t, int i) { return 16 * (t / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2); }
__host__ __device__ constexpr int wgmma_acc_col(int t, int i) { return 8 * (i / 4) + 2 * (t % 4) + i % 2; }

}  // namespace cuflash::sm90
