// Warp-level tensor-core primitives for sm_80 and later: cp.async, ldmatrix and
// mma.sync.m16n8k16 with fp32 accumulation. Fragment layouts follow the PTX ISA
// ("Matrix fragments for mma.m16n8k16"): g = lane / 4 is a row, t = lane % 4 a column pair.
// float operands run mma.sync.m16n8k8.tf32 three times per product (3xTF32: x = big + small,
// both TF32, and a b ~ big_a big_b + big_a small_b + small_a big_b), fp32's accuracy within a
// few ulp per product at a third of TF32's rate; Fp32Pair operands (float32 split by a pre-pass
// into scaled fp16 halves, fp32_pairs.h) run mma.sync.m16n8k16.f16 three times, at a third of
// fp16's rate, twice 3xTF32's; the kernels see the same k16 steps for every T.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>
#include "../flash_params.h"
#include "fp32_pairs.h"

namespace cuflash {

// Fp32Pair (flash_params.h): the kernels' element type for float32 run as fp16 pairs
// (fp32_pairs.h); it only addresses the pre-pass's rows.
template <class T>
inline constexpr bool kIsPair = std::is_same_v<T, Fp32Pair>;
// The element type of the user's tensors a kernel on T writes (and reads attn_mask in).
template <class T>
using UserType = std::conditional_t<kIsPair<T>, float, T>;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; zero-fills the destination when !valid (the source
// address must still be a valid pointer, so callers pass a safe one).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i (a generic pointer
// into shared memory, or its 32-bit shared address); _trans: transposed.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ldmatrix_x4(r, smem_addr(smem)); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  ldmatrix_x4_trans(r, smem_addr(smem));
}

// MmaOperand<T>: AFrag, a 16 x 16 A fragment (one k16 step); BFrag, the B fragments of two
// n-tiles over the same k16 step; mma_pair(d0, d1, a, b): d0 += A B(n-tile 0), d1 += A B(n-tile 1).
template <typename T>
struct MmaOperand;
template <typename T>
struct MmaOperand16 {  // __half and __nv_bfloat16: b[0..1] n-tile 0, b[2..3] n-tile 1
  using AFrag = uint32_t[4];
  using BFrag = uint32_t[4];
  __device__ __forceinline__ static void mma_pair(float (&d0)[4], float (&d1)[4], const AFrag& a, const BFrag& b) {
    MmaOperand<T>::mma(d0, a, b[0], b[1]);
    MmaOperand<T>::mma(d1, a, b[2], b[3]);
  }
};
template <>
struct MmaOperand<__half> : MmaOperand16<__half> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // D = A * B + (kAccumulate ? D : 0) for a 16x16 A (row-major fragment) and a 16x8 B
  // (column-major fragment).
  template <bool kAccumulate = true>
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    if constexpr (kAccumulate)
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
          "{%8, %9}, {%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
          "{%8, %9}, {%10, %10, %10, %10};\n"
          : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
  }
};
template <>
struct MmaOperand<__nv_bfloat16> : MmaOperand16<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// float: each k16 step is two k8 halves. Within a k8 slice, logical column c of A (row of B) is
// physical column 2c (c < 4) or 2(c - 4) + 1: thread t's A elements are then columns 2t and
// 2t + 1, adjacent in shared memory (one 8-byte load) and exactly the two columns an fp32
// accumulator's C fragment gives thread t, so P turns into an A fragment with no shuffle. B's
// rows follow the same order; the product sums over the same k either way.
// The split in three instructions (cvt.rna.tf32.f32 is a dozen, which made the kernels
// ALU-bound): big is x plus half a TF32 ulp, its low 13 bits left for the tensor cores to drop
// (x rounded half away from zero); small = x - big exactly (|small| <= 2^-11 |x|), left for them
// to truncate (2^-10 of small). Each product is then within about 2^-20 of a b; a NaN x makes
// small NaN. An infinite x (unsupported input) or one within 2^-12 of FLT_MAX gives big = inf and
// small NaN. CUTLASS's 3xTF32 (round_half_ulp_truncate) passes the same unmasked operands.
struct Tf32Split {
  uint32_t big, small;
};
// x with its low 13 bits cleared: the TF32 value the tensor cores read of it.
__device__ __forceinline__ float tf32_truncated(float x) { return __uint_as_float(__float_as_uint(x) & 0xffffe000u); }
__device__ __forceinline__ Tf32Split split_tf32(float x) {
  const uint32_t big = __float_as_uint(x) + 0x1000u;
  return {big, __float_as_uint(x - tf32_truncated(__uint_as_float(big)))};
}
template <>
struct MmaOperand<float> {
  struct AFrag {
    Tf32Split a[2][4];  // [k8 half][PTX a0..a3]: (g, 2t), (g + 8, 2t), (g, 2t + 1), (g + 8, 2t + 1)
  };
  struct BFrag {
    Tf32Split b[2][2][2];  // [n-tile][k8 half][PTX b0, b1]: rows 2t and 2t + 1, column g
  };
  // d = A B + (kAccumulate ? d : 0).
  template <bool kAccumulate = true>
  __device__ __forceinline__ static void mma_k8(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (kAccumulate)
      asm volatile(
          "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
          "{%8, %9}, {%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
      asm volatile(
          "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
          "{%8, %9}, {%10, %10, %10, %10};\n"
          : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
  }
  // The tensor cores round each mma's sum toward zero: d would drift by up to an ulp per mma,
  // all in one direction (about 200 of them for a 500-key dQ: 1e-5 relative). So each k16
  // step's six products (the small ones first) go into a fresh sum t, added to d rounded to
  // nearest: d drifts by t's truncations, which are |t| / |d| smaller.
  __device__ __forceinline__ static void mma(float (&d)[4], const AFrag& a, const BFrag& b, int n) {
    float t[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const Tf32Split(&x)[4] = a.a[h];
      const Tf32Split(&y)[2] = b.b[n][h];
      const uint32_t big[4] = {x[0].big, x[1].big, x[2].big, x[3].big};
      const uint32_t small[4] = {x[0].small, x[1].small, x[2].small, x[3].small};
      if (h == 0) mma_k8<false>(t, small, y[0].big, y[1].big);
      else mma_k8(t, small, y[0].big, y[1].big);
      mma_k8(t, big, y[0].small, y[1].small);
      mma_k8(t, big, y[0].big, y[1].big);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] += t[i];
  }
  __device__ __forceinline__ static void mma_pair(float (&d0)[4], float (&d1)[4], const AFrag& a, const BFrag& b) {
    mma(d0, a, b, 0);
    mma(d1, a, b, 1);
  }
};

// Fp32Pair: each row's x 2^e = hi + lo 2^-11, both fp16, e a power of two of the row's
// (fp32_pairs.h), so that a b 2^(ea + eb) ~ hi_a hi_b + (hi_a lo_b + lo_a hi_b) 2^-11 (lo lo, 2^-22
// of it, left out), each product exact in the tensor cores' fp32. lo is the rest times 2^11 (Ootomo
// and Yokota's split): it keeps its bits 11 binades further down than the rest itself would, so a
// product keeps 1e-5 of its own size down to ~2^-32 of its operand row's (or tile's) largest
// (~2^-30 where both operands are that small), not ~2^-23. As MmaOperand<float>, each k16 step's
// products (the small ones first, their sum then times 2^-11) go into a fresh sum t, added to d
// rounded to nearest; an A fragment split in registers (WarpAcc::to_a) scales t back by its 2^-e
// (factor; 1 from shared memory, whose rows' scales the kernel applies to the finished tile): one
// FFMA where the others add, and an FMUL. (The small and big products in two fresh sums spilled
// 160-360 bytes more, ptxas sm_90a.)
// lo's scale in a pair (split_half2: the rest times 2^11) and its inverse, which the products
// take back.
constexpr float kPairLoScale = 2048.f, kPairLoUnscale = 1.f / 2048.f;
template <>
struct MmaOperand<Fp32Pair> {
  struct AFrag {
    uint32_t hi[4], lo[4];  // as the 16-bit AFrag
    float factor;
  };
  struct BFrag {
    uint32_t hi[4], lo[4];  // as the 16-bit BFrag: [0..1] n-tile 0, [2..3] n-tile 1
  };
  __device__ __forceinline__ static void mma(float (&d)[4], const AFrag& a, uint32_t hi0, uint32_t hi1, uint32_t lo0,
                                             uint32_t lo1) {
    using Half = MmaOperand<__half>;
    float t[4];
    Half::mma<false>(t, a.lo, hi0, hi1);
    Half::mma(t, a.hi, lo0, lo1);
#pragma unroll
    for (int i = 0; i < 4; ++i) t[i] *= kPairLoUnscale;  // exact: a power of two
    Half::mma(t, a.hi, hi0, hi1);
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = __fmaf_rn(t[i], a.factor, d[i]);
  }
  __device__ __forceinline__ static void mma_pair(float (&d0)[4], float (&d1)[4], const AFrag& a, const BFrag& b) {
    mma(d0, a, b.hi[0], b.hi[1], b.lo[0], b.lo[1]);
    mma(d1, a, b.hi[2], b.hi[3], b.lo[2], b.lo[3]);
  }
};

// x0 and x1 (already scaled into fp16's range) as fp16 pairs: hi, rounded to nearest, and lo =
// the rest times 2^11, rounded (MmaOperand<Fp32Pair>): x ~ hi + lo 2^-11 to 2^-22 relative where
// x >= 2^-14, and |lo| <= 2^14 (the rest is at most half an ulp of hi).
__device__ __forceinline__ void split_half2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(x0, x1);
  const float2 back = __half22float2(h);
  const __half2 l = __floats2half2_rn((x0 - back.x) * kPairLoScale, (x1 - back.y) * kPairLoScale);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// An element of type T from an fp32 value (round to nearest).
template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
// tanh by the special function unit (sm_75 on): one instruction where tanhf costs an exp, a
// reciprocal and a polynomial; relative error 2^-11, that of the 16-bit operands' rounding.
__device__ __forceinline__ float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Reductions over the 4 lanes (t = 0..3) that share a fragment row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// A row-major tile in shared memory, rows padded by 8 elements so that the 8 row addresses of
// an ldmatrix (and the 16-byte cp.async writes) fall in distinct banks; with float, rows 8 words
// apart mod 32, so that the 8-byte A and [n][k] B loads of a half-warp (4 rows) do too. (kPad:
// PairTile's views of its rows.)
template <typename T, int kRows, int kCols, int kPad = 8>
struct SmemTile {
  static constexpr int kStride = kCols + kPad;
  static constexpr int kElems = kRows * kStride;
  static constexpr int kChunk = 16 / sizeof(T);  // elements per 16-byte copy
  static constexpr bool kTf32 = std::is_same_v<T, float>;
  using AFrag = typename MmaOperand<T>::AFrag;
  using BFrag = typename MmaOperand<T>::BFrag;
  T* ptr;
  __device__ __forceinline__ T* at(int row, int col) const { return ptr + row * kStride + col; }

  // Rows [0, rows_valid) and columns [0, cols_valid) come from gmem (row stride in elements);
  // the rest is zero-filled. cols_valid is a multiple of 8, gmem rows are 16-byte aligned.
  template <int kThreads>
  __device__ __forceinline__ void load_async(const T* gmem, int64_t row_stride, int rows_valid,
                                             int cols_valid, int tid) const {
    constexpr int kChunksPerRow = kCols / kChunk;
    for (int c = tid; c < kRows * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * kChunk;
      const bool valid = r < rows_valid && col < cols_valid;
      cp_async_16(at(r, col), valid ? gmem + r * row_stride + col : gmem, valid);
    }
  }

  // float: elements (row, col) and (row, col + 1), split; one 8-byte load.
  __device__ __forceinline__ void split_pair(int row, int col, Tf32Split& first, Tf32Split& second) const {
    const float2 x = *reinterpret_cast<const float2*>(at(row, col));
    first = split_tf32(x.x);
    second = split_tf32(x.y);
  }
  // A fragment (16x16, rows r0.., cols c0..) of this row-major tile.
  __device__ __forceinline__ void load_a(AFrag& a, int r0, int c0, int lane) const {
    if constexpr (kTf32) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          split_pair(r0 + (lane >> 2) + 8 * r, c0 + 8 * h + 2 * (lane & 3), a.a[h][r], a.a[h][r + 2]);
    } else {
      ldmatrix_x4(a, at(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, c0 + (lane >> 4) * 8));
    }
  }
  // B fragments for two n-tiles (n0.., n0+8..) over k = c0..c0+15 when this tile is [n][k]
  // (B = tile^T): b[0..1] for n-tile n0, b[2..3] for n-tile n0 + 8.
  __device__ __forceinline__ void load_b_nk(BFrag& b, int n0, int c0, int lane) const {
    if constexpr (kTf32) {
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          split_pair(n0 + 8 * n + (lane >> 2), c0 + 8 * h + 2 * (lane & 3), b.b[n][h][0], b.b[n][h][1]);
    } else {
      ldmatrix_x4(b, at(n0 + (lane & 7) + (lane >> 4) * 8, c0 + ((lane >> 3) & 1) * 8));
    }
  }
  // The same when this tile is [k][n] (B = tile): k = r0..r0+15, n-tiles n0 and n0 + 8.
  __device__ __forceinline__ void load_b_kn(BFrag& b, int r0, int n0, int lane) const {
    if constexpr (kTf32) {
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            b.b[n][h][e] = split_tf32(*at(r0 + 8 * h + 2 * (lane & 3) + e, n0 + 8 * n + (lane >> 2)));
    } else {
      ldmatrix_x4_trans(b, at(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, n0 + (lane >> 4) * 8));
    }
  }
};

// A tile of Fp32Pair rows (the pre-pass's, kHeadDim units: kHeadDim hi halves, then kHeadDim
// lo halves) as SmemTile's interface: a row is one row of 2 kHeadDim halves padded by 8 (16
// bytes: rows 16 bytes apart mod 128, so ldmatrix's 8 row addresses fall in distinct banks), whose
// hi and lo fragments are two ldmatrix each. The pre-pass pads every row to kHeadDim, so whole
// rows are copied (cols_valid unused). A float view of the same rows stages the float32 output.
template <int kRows, int kHeadDim>
struct PairTile {
  using Halves = SmemTile<__half, kRows, 2 * kHeadDim>;
  using Floats = SmemTile<float, kRows, kHeadDim, 4>;  // the same bytes a row
  static_assert(Halves::kStride * 2 == Floats::kStride * 4, "the float view's rows are the tile's");
  static constexpr int kStride = Halves::kStride / 2, kElems = kRows * kStride;
  using AFrag = MmaOperand<Fp32Pair>::AFrag;
  using BFrag = MmaOperand<Fp32Pair>::BFrag;
  Fp32Pair* ptr;
  __device__ __forceinline__ Halves halves() const { return Halves{reinterpret_cast<__half*>(ptr)}; }
  __device__ __forceinline__ Floats floats() const { return Floats{reinterpret_cast<float*>(ptr)}; }

  template <int kThreads>
  __device__ __forceinline__ void load_async(const Fp32Pair* gmem, int64_t row_stride, int rows_valid,
                                             int /*cols_valid*/, int tid) const {
    halves().template load_async<kThreads>(reinterpret_cast<const __half*>(gmem), 2 * row_stride, rows_valid,
                                           2 * kHeadDim, tid);
  }
  __device__ __forceinline__ void load_a(AFrag& a, int r0, int c0, int lane) const {
    halves().load_a(a.hi, r0, c0, lane);
    halves().load_a(a.lo, r0, kHeadDim + c0, lane);
    a.factor = 1.f;
  }
  __device__ __forceinline__ void load_b_nk(BFrag& b, int n0, int c0, int lane) const {
    halves().load_b_nk(b.hi, n0, c0, lane);
    halves().load_b_nk(b.lo, n0, kHeadDim + c0, lane);
  }
  __device__ __forceinline__ void load_b_kn(BFrag& b, int r0, int n0, int lane) const {
    halves().load_b_kn(b.hi, r0, n0, lane);
    halves().load_b_kn(b.lo, r0, kHeadDim + n0, lane);
  }
};
// The tile a kernel on T keeps rows of its inputs in, and the one its output is staged through.
template <typename T, int kRows, int kCols>
using SmemTileOf = std::conditional_t<kIsPair<T>, PairTile<kRows, kCols>, SmemTile<T, kRows, kCols>>;
template <class Tile>
__device__ __forceinline__ auto staging_of(const Tile& tile) {
  if constexpr (std::is_same_v<decltype(tile.ptr), Fp32Pair*>) return tile.floats();
  else return tile;
}

// WarpAcc::to_a's column factors where there are none (every type but Fp32Pair ignores them).
struct UnitColumns {
  __device__ __forceinline__ float2 operator()(int) const { return make_float2(1.f, 1.f); }
};
// How WarpAcc::to_a splits an Fp32Pair register operand: each value times its column's factor
// (cols(j): this lane's two columns of 8-column tile j; the scales of the rows the product sums
// over), at the power of two the warp tile's largest |value * factor| takes (fp16's range, as the
// pre-pass's rows: fp32_pairs.h), undone by the fragment's factor. One a warp, not a row:
// warp-uniform, it stays out of the registers the kernels are short of (a row's spilled 340-820
// bytes in the dK/dV kernel at head dim 128 and every kernel at 256, ptxas sm_90a). The cost: a
// row's products keep 1e-5 of their own size only down to ~2^-32 of its tile's largest value (lo
// scaled by 2^11; without that, 2^-23: a review modelled dq rows beside a dout row 1e10 larger at
// 4e-2 of their own size, a rarely attended key's dv at 1e-2); below, its error is that value's
// rounding, within the rule's 1e-5 of the tensor's largest but not of its own
// (benchmarks/NOTES.md).
template <class Cols>
struct PairSplit {
  Cols cols;
  float scale, unscale;
};

// An fp32 accumulator tile of 16 rows x kCols per warp, in mma C-fragment layout:
// acc[j][0..1] is row g, columns 8j + 2t + {0,1}; acc[j][2..3] is row g + 8.
template <int kCols>
struct WarpAcc {
  static constexpr int kColumns = kCols, kTiles = kCols / 8;
  float v[kTiles][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) v[j][e] = 0.f;
  }
  // this += other, by FADD (rounded to nearest: a fresh tensor-core sum folded in).
  __device__ __forceinline__ void add(const WarpAcc& other) {
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) v[j][e] += other.v[j][e];
  }
  // The A fragment for k-step kk (columns 16kk..16kk+15) of this accumulator, rounded to T:
  // the C layout of two adjacent n-tiles is the A layout of one k-step (float: of two k8 halves,
  // in the column order of MmaOperand<float>). Fp32Pair: of the values times their columns'
  // factors, split at the warp's scale (split: a PairSplit, pair_split_of's), which the
  // fragment's factor undoes; the other types take UnitColumns and ignore it.
  template <typename T, class Split = UnitColumns>
  __device__ __forceinline__ void to_a(typename MmaOperand<T>::AFrag& a, int kk, const Split& split = {}) const {
    if constexpr (kIsPair<T>) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // register i: tile 2 kk + i / 2, row lane / 4 (i even) or + 8
        const int j = 2 * kk + i / 2, e = 2 * (i % 2);
        const float2 f = split.cols(j);
        // (value * factor) * scale: at most 2^15 by the scale's choice, where factor * scale
        // alone can overflow (a zero tile's scale is 2^126) and turn a 0 into NaN.
        split_half2(v[j][e] * f.x * split.scale, v[j][e + 1] * f.y * split.scale, a.hi[i], a.lo[i]);
      }
      a.factor = split.unscale;
    } else if constexpr (std::is_same_v<T, float>) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float(&c)[4] = v[2 * kk + h];
        a.a[h][0] = split_tf32(c[0]);
        a.a[h][1] = split_tf32(c[2]);
        a.a[h][2] = split_tf32(c[1]);
        a.a[h][3] = split_tf32(c[3]);
      }
    } else {
      a[0] = MmaOperand<T>::pack(v[2 * kk][0], v[2 * kk][1]);
      a[1] = MmaOperand<T>::pack(v[2 * kk][2], v[2 * kk][3]);
      a[2] = MmaOperand<T>::pack(v[2 * kk + 1][0], v[2 * kk + 1][1]);
      a[3] = MmaOperand<T>::pack(v[2 * kk + 1][2], v[2 * kk + 1][3]);
    }
  }
  // The rows at or past `rows` set to 0, row0 being this tile's first (a sequence's end: the rows
  // after it are padding, or another packed sequence's). Selects, not a branch, so that wgmmas in
  // flight beside it stay unserialized (ptxas C7520).
  __device__ __forceinline__ void zero_rows_past(int row0, int rows, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool past = row0 + row_of(2 * r, lane) >= rows;
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        v[j][2 * r] = past ? 0.f : v[j][2 * r];
        v[j][2 * r + 1] = past ? 0.f : v[j][2 * r + 1];
      }
    }
  }
  // Row (0..15) and column of element e of tile j for this lane (host too: tests/cpp checks the
  // masks' use of them).
  __host__ __device__ __forceinline__ static int row_of(int e, int lane) { return (lane >> 2) + 8 * (e >> 1); }
  __host__ __device__ __forceinline__ static int col_of(int j, int e, int lane) {
    return 8 * j + 2 * (lane & 3) + (e & 1);
  }
};

// The split of a warp's acc for WarpAcc::to_a (PairSplit), its columns' factors cols (NaN left
// out of the maximum, as fmaxf does; it stays NaN in the halves).
template <int kCols, class Cols>
__device__ __forceinline__ PairSplit<Cols> pair_split_of(const WarpAcc<kCols>& acc, const Cols& cols) {
  float top = 0.f;
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j) {
    const float2 f = cols(j);
#pragma unroll
    for (int e = 0; e < 4; ++e) top = fmaxf(top, fabsf(acc.v[j][e] * ((e & 1) ? f.y : f.x)));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
  const int e = pair_exponent_for(top);
  return PairSplit<Cols>{cols, pow2(e), pow2(-e)};
}

// acc[m] (16 x kN each) += A (rows a_row0 + 16 m.. of a row-major [.][kK] smem tile) * B, with
// load_b(b, kk, nn) giving B's fragments for k-step kk and n-tiles 2nn, 2nn + 1. Each B fragment
// is loaded from shared memory once for all kM row tiles of the warp. (Fp32Pair: the product of
// the scaled rows; the kernel scales the finished tile back, fp32_pair_tiles.cuh's scale_tile.)
template <typename T, int kK, int kN, int kM, class TileA, class LoadB>
__device__ __forceinline__ void warp_gemm_smem_a(WarpAcc<kN> (&acc)[kM], const TileA& a_tile, int a_row0,
                                                 LoadB&& load_b, int lane) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    typename MmaOperand<T>::AFrag a[kM];
#pragma unroll
    for (int m = 0; m < kM; ++m) a_tile.load_a(a[m], a_row0 + 16 * m, kk * 16, lane);
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      typename MmaOperand<T>::BFrag b;
      load_b(b, kk, nn);
#pragma unroll
      for (int m = 0; m < kM; ++m) MmaOperand<T>::mma_pair(acc[m].v[2 * nn], acc[m].v[2 * nn + 1], a[m], b);
    }
  }
}

// ... * B^T, where B is a [kN][kK] smem tile (rows b_row0..): the Q K^T pattern.
template <typename T, int kK, int kN, int kM, class TileA, class TileB>
__device__ __forceinline__ void warp_gemm_abt(WarpAcc<kN> (&acc)[kM], const TileA& a_tile, int a_row0,
                                              const TileB& b_tile, int b_row0, int lane) {
  warp_gemm_smem_a<T, kK, kN, kM>(
      acc, a_tile, a_row0,
      [&](auto& b, int kk, int nn) { b_tile.load_b_nk(b, b_row0 + nn * 16, kk * 16, lane); }, lane);
}
template <typename T, int kK, int kN, class TileA, class TileB>
__device__ __forceinline__ void warp_gemm_abt(WarpAcc<kN>& acc, const TileA& a_tile, int a_row0,
                                              const TileB& b_tile, int b_row0, int lane) {
  warp_gemm_abt<T, kK, kN, 1>(*reinterpret_cast<WarpAcc<kN>(*)[1]>(&acc), a_tile, a_row0, b_tile, b_row0, lane);
}

// acc[m] (16 x kN each) += P[m] (16 x kK, register accumulators rounded to T) * B where B is a
// [kK][kN] smem tile starting at row b_row0: the P V pattern, B loaded once for all kM.
// col_factors: Fp32Pair's scales of B's rows, as P's column factors (WarpAcc::to_a).
template <typename T, int kK, int kN, int kM, class TileB, class ColFactors = UnitColumns>
__device__ __forceinline__ void warp_gemm_rb(WarpAcc<kN> (&acc)[kM], const WarpAcc<kK> (&p)[kM],
                                             const TileB& b_tile, int b_row0, int lane,
                                             const ColFactors& col_factors = {}) {
  using Split = std::conditional_t<kIsPair<T>, PairSplit<ColFactors>, UnitColumns>;
  Split splits[kM];
  if constexpr (kIsPair<T>)
#pragma unroll
    for (int m = 0; m < kM; ++m) splits[m] = pair_split_of(p[m], col_factors);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    typename MmaOperand<T>::AFrag a[kM];
#pragma unroll
    for (int m = 0; m < kM; ++m) p[m].template to_a<T>(a[m], kk, splits[m]);
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      typename MmaOperand<T>::BFrag b;
      b_tile.load_b_kn(b, b_row0 + kk * 16, nn * 16, lane);
#pragma unroll
      for (int m = 0; m < kM; ++m) MmaOperand<T>::mma_pair(acc[m].v[2 * nn], acc[m].v[2 * nn + 1], a[m], b);
    }
  }
}
template <typename T, int kK, int kN, class TileB, class ColFactors = UnitColumns>
__device__ __forceinline__ void warp_gemm_rb(WarpAcc<kN>& acc, const WarpAcc<kK>& p, const TileB& b_tile,
                                             int b_row0, int lane, const ColFactors& col_factors = {}) {
  warp_gemm_rb<T, kK, kN, 1>(*reinterpret_cast<WarpAcc<kN>(*)[1]>(&acc),
                             *reinterpret_cast<const WarpAcc<kK>(*)[1]>(&p), b_tile, b_row0, lane, col_factors);
}

// ... * B, where B is a [kK][.] smem tile read from column b_col0: the dS K pattern with dS
// staged in smem.
template <typename T, int kK, int kN, int kM, class TileA, class TileB>
__device__ __forceinline__ void warp_gemm_ab(WarpAcc<kN> (&acc)[kM], const TileA& a_tile, int a_row0,
                                             const TileB& b_tile, int b_col0, int lane) {
  warp_gemm_smem_a<T, kK, kN, kM>(
      acc, a_tile, a_row0,
      [&](auto& b, int kk, int nn) { b_tile.load_b_kn(b, kk * 16, b_col0 + nn * 16, lane); }, lane);
}

// Stores a warp's 16 x kCols accumulator (scaled per row) into its rows of an smem tile,
// then copies those rows to global memory with 16-byte stores.
template <typename T, int kCols, class Tile>
__device__ __forceinline__ void warp_store_rows(const WarpAcc<kCols>& acc, const float (&row_scale)[2],
                                                const Tile& tile, int tile_row0, T* gmem,
                                                int64_t row_stride, int rows_valid, int cols_valid,
                                                int lane) {
  __syncwarp();  // the warp's last reads of these rows (ldmatrix) precede every lane's writes
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float lo = acc.v[j][2 * h] * row_scale[h], hi = acc.v[j][2 * h + 1] * row_scale[h];
      T* at = tile.at(tile_row0 + (lane >> 2) + 8 * h, 8 * j + 2 * (lane & 3));
      if constexpr (std::is_same_v<T, float>) *reinterpret_cast<float2*>(at) = make_float2(lo, hi);
      else *reinterpret_cast<uint32_t*>(at) = MmaOperand<T>::pack(lo, hi);
    }
  __syncwarp();
  constexpr int kChunksPerRow = kCols / Tile::kChunk;
  for (int c = lane; c < 16 * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * Tile::kChunk;
    if (r < rows_valid && col < cols_valid)
      *reinterpret_cast<uint4*>(gmem + r * row_stride + col) =
          *reinterpret_cast<const uint4*>(tile.at(tile_row0 + r, col));
  }
}

}  // namespace cuflash
