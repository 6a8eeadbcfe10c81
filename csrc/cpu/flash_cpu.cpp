#include "flash_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

// x86-64 GCC builds: an instantiation a vector width, each under its target attribute (below;
// GCC 12 for the x86-64-v3/v4 levels in __builtin_cpu_supports; older ones build SSE2 alone).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define CUFLASH_CPU_WIDE_ISAS 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#include "../attention_math.h"
#include "../cuda/run_switches.h"

// The vector types below never cross a call that is not inlined (CUFLASH_CPU_INLINE), so GCC's
// note that passing them changes with the target's ABI does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace cuflash {
namespace {

// Speed (benchmarks/NOTES.md, thirty-first session): the CUDA kernels' tiling, with vector lanes
// where they have threads. A block of kBlockRows query rows meets a tile of kKeys keys as scores
// S^T[key][row]: the block's rows are the lanes (Q^T packed once per block), so that a key's
// scores are a few multiply-adds a head dim and the online softmax, its exponentials included
// (softmax_exp), runs on whole vectors; P V and dQ accumulate transposed too, in lanes
// (add_lanes_times_rows), dV and dK a vector of head dims at a time (add_rows_times_lanes). A pair
// (row, key) that the masks hide adds 0 there, which is what the CUDA kernels' masks give but for
// a NaN or Inf in the row multiplied: then the pairs are taken one by one (add_visible_*), so that
// a masked key's NaN never reaches another row. The vectors are the CPU's widest
// (AVX-512, AVX2 or the baseline's SSE2: an instantiation each, chosen at every call, cpu_isa):
// GCC turns a vector wider than the target's into element-by-element code.
constexpr int kKeys = kCpuKeyTile;
constexpr int kBlockRows = kCpuBlockRows;  // query rows a block: a forward work item (flash_fwd_cpu_items)
constexpr int kLaneRows = 8;               // blocks of fewer rows go a row at a time (fwd_rows)
// The row path's rows that go through dot_rows_grouped and add_weighted_rows_grouped together at
// most (four grouped query heads: dot_rows_grouped's eight sums, add_weighted's sixteen).
constexpr int kRowGroup = 4;
// The bytes of the partial results of split work at most (the backward's parts' dK and dV,
// split-KV's rows; counted in double): as much as the math path's attention matrix of one head
// over 16k keys in float32.
constexpr int64_t kMaxPartialBytes = int64_t{1} << 30;
// Split-KV's splits hold this many key tiles at least (flash_fwd_cpu_splits' own choice): a
// block's setup and the combine's pass spread over as many keys.
constexpr int kMinSplitTiles = 4;

#define CUFLASH_CPU_INLINE inline __attribute__((always_inline))
// For a lambda that handles vectors: inlined into its caller, so that it compiles under the caller's
// target (out of line, it took the file's baseline target: 64-byte vectors as SSE2 pieces).
#define CUFLASH_CPU_LAMBDA_INLINE __attribute__((always_inline))

// AMX's shapes (the AMX forward below; the scratch buffers are padded for it on every build).
constexpr int kAmxDims = 32;      // head dims a tile of K rows holds (bfloat16)
constexpr int kAmxKeys = 32;      // keys a tile of V^T rows holds
constexpr int kAmxTileRows = 16;  // S^T's keys, O^T's head dims, the lanes' rows of a tile
constexpr int amx_padded(int n, int to) { return (n + to - 1) / to * to; }
// The head dims of the buffers the tiles read: D up to a multiple of 32 (zero past D).
constexpr int amx_dims(int D) { return amx_padded(D, kAmxDims); }
// At most this many bytes a thread for a (batch, key head)'s buffers of each kind: the packed rows
// (AmxHeadTiles; past it, a key tile at a time), the backward's dK and dV sums (past it, in float).
constexpr int64_t kAmxHeadBytes = int64_t{64} << 20;
// The AMX backward's blocks whose dV and dK products wait for one another (add_keys_amx): each C tile
// of the sums then takes that many steps a load and store.
constexpr int kAmxPendingBlocks = 2;
// The AMX forward's key tiles that every row of the block sees in whole, where no attn_mask skips
// tiles: each C tile of O^T is then loaded and stored once for four steps of P V, not two
// (benchmarks/amx_tiles_microbench.cpp: a 64-key tile's P V at D=128 took 550-750 ns, twice its S,
// and 128 keys' 830-870).
constexpr int kAmxForwardKeys = 2 * kCpuKeyTile;


// kBytes-byte vectors of T (GCC's vector extensions: one register of the target's widest), and
// the kRows rows of a block that the lanes hold (the buffers keep kBlockRows a key: a block of at
// most half of them computes on half the vectors, HalfRows).
template <typename T, int kBytes, int kRows = kBlockRows, bool kBf16Dot = false, bool kAmxTiles = false>
struct Simd {
  using Scalar = T;
  using Int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef T V __attribute__((vector_size(kBytes)));
  typedef Int I __attribute__((vector_size(kBytes)));
  typedef std::make_unsigned_t<Int> U __attribute__((vector_size(kBytes)));
  typedef uint16_t Narrow16 __attribute__((vector_size(kBytes / 2)));  // a vector's lanes of 16-bit rows (load_row)
  static constexpr int kLanes = kBytes / sizeof(T);
  static constexpr int kRowVecs = kRows / kLanes;
  static_assert(kRowVecs >= 1 && kRowVecs * kLanes == kRows, "whole vectors of rows");
  static constexpr bool kAllRows = kRows == kBlockRows;
  // The scores of bfloat16 rows by AVX512-BF16's pair dot products (row_lanes_dot_bf16).
  static constexpr bool kDotBf16 = kBf16Dot && std::is_same_v<T, float> && kBytes == 64;
  // bfloat16's matrix products on AMX's tiles (scores_amx, add_pv_amx; the backward's add_keys_amx).
  static constexpr bool kAmx = kAmxTiles && kDotBf16;
  using HalfRows = Simd<T, kBytes, kRows / 2, kBf16Dot, kAmxTiles>;
};
template <class S>
CUFLASH_CPU_INLINE typename S::V load(const typename S::Scalar* from) {
  typename S::V v;
  std::memcpy(&v, from, sizeof(v));
  return v;
}
template <class S>
CUFLASH_CPU_INLINE void store(typename S::Scalar* to, const typename S::V& v) {
  std::memcpy(to, &v, sizeof(v));
}
template <class S>
CUFLASH_CPU_INLINE typename S::V broadcast(typename S::Scalar x) {
  return typename S::V{} + x;
}

template <typename T>
struct ExpTraits;
template <>
struct ExpTraits<float> {
  static constexpr int kMantissa = 23, kBias = 127, kMinExponent = -126, kTerms = 8;
  // kShift = 1.5 * 2^23: x + kShift rounds x to an integer held in the low mantissa bits.
  static constexpr float kLowest = -104.f, kShift = 12582912.f, kLog2e = 1.44269504088896340736f;
  static constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723212e-6f;  // k * kLn2Hi exact
};
template <>
struct ExpTraits<double> {
  static constexpr int kMantissa = 52, kBias = 1023, kMinExponent = -1022, kTerms = 13;
  static constexpr double kLowest = -746.0, kShift = 6755399441055744.0, kLog2e = 1.44269504088896340736;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
};

// 1 / n!, for the Taylor series of e^r.
template <typename T>
constexpr T inverse_factorial(int n) {
  T f = T(1);
  for (int i = 2; i <= n; ++i) f *= T(i);
  return T(1) / f;
}

// e^x lane by lane for the softmax's arguments (x <= 0, -inf or NaN): x = k ln 2 + r with |r| <=
// ln 2 / 2, e^r by its Taylor series (truncated below half an ulp of T; Horner's rule, a
// multiply-add a term), 2^k put in the exponent's bits; 0 below T's normal range (such a
// probability, next to the row's largest, 1, changes no sum), NaN kept.
template <class S>
CUFLASH_CPU_INLINE typename S::V softmax_exp(const typename S::V& x) {
  using T = typename S::Scalar;
  using V = typename S::V;
  using E = ExpTraits<T>;
  const V lowest = broadcast<S>(E::kLowest);
  const V clamped = x < lowest ? lowest : x;  // NaN stays NaN
  const V shifted = clamped * E::kLog2e + E::kShift;
  const V k = shifted - E::kShift;
  const V r = clamped - k * E::kLn2Hi - k * E::kLn2Lo;
  V poly = broadcast<S>(inverse_factorial<T>(E::kTerms));
#pragma GCC unroll 16
  for (int n = E::kTerms - 1; n >= 0; --n) poly = poly * r + inverse_factorial<T>(n);
  const V shift = broadcast<S>(E::kShift);
  typename S::U shifted_bits, shift_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(V));
  std::memcpy(&shift_bits, &shift, sizeof(V));
  const typename S::I ki = (typename S::I)(shifted_bits - shift_bits);  // k as an integer
  const typename S::U scale_bits = (typename S::U)(ki + E::kBias) << E::kMantissa;
  V scale;
  std::memcpy(&scale, &scale_bits, sizeof(V));
  const V value = ki < E::kMinExponent ? V{} : poly * scale;
  return x != x ? x : value;
}

#ifdef CUFLASH_CPU_WIDE_ISAS
// softmax_exp for the AMX forward, whose probabilities go to bfloat16: six terms (the truncation
// below 2e-7, relative), 2^k by VSCALEFPS; as softmax_exp, 0 below float's normal range, NaN kept.
__attribute__((target("arch=x86-64-v4"), always_inline)) inline __m512 softmax_exp_amx(__m512 x) {
  using E = ExpTraits<float>;
  const __m512 clamped = _mm512_max_ps(_mm512_set1_ps(E::kLowest), x);  // (a NaN x is kept: MAXPS's second operand)
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(E::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(E::kLn2Hi), clamped);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(E::kLn2Lo), r);
  constexpr float kCoefficients[] = {inverse_factorial<float>(0), inverse_factorial<float>(1),
                                     inverse_factorial<float>(2), inverse_factorial<float>(3),
                                     inverse_factorial<float>(4), inverse_factorial<float>(5),
                                     inverse_factorial<float>(6)};  // six terms
  __m512 poly = _mm512_set1_ps(kCoefficients[6]);
#pragma GCC unroll 8
  for (int n = 5; n >= 0; --n) poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(kCoefficients[n]));
  const __mmask16 subnormal = _mm512_cmp_ps_mask(k, _mm512_set1_ps(float(E::kMinExponent)), _CMP_LT_OQ);
  return _mm512_mask_mov_ps(_mm512_scalef_ps(poly, k), subnormal, _mm512_setzero_ps());
}

// The AMX forward's probabilities of 16 rows over count keys, x[jj * kBlockRows] = e^(x - base) in
// place; their sums. (A function under its target: the kernels' templates inline no intrinsics.)
__attribute__((target("arch=x86-64-v4"), noinline)) __m512 probs_amx(float* __restrict x, int count, __m512 base) {
  __m512 sum = _mm512_setzero_ps();
  for (int jj = 0; jj < count; ++jj) {
    const __m512 prob = softmax_exp_amx(_mm512_sub_ps(_mm512_loadu_ps(x + jj * kBlockRows), base));
    _mm512_storeu_ps(x + jj * kBlockRows, prob);
    sum = _mm512_add_ps(sum, prob);
  }
  return sum;
}
#endif

// out[jj * kBlockRows + r] = (row r of the block) . keys[jj] for jj < count, from xt, the block's
// rows transposed ([d][r], rows past the block 0): kAtOnce keys at a time, so that eight
// accumulators are in flight (a multiply-add's latency is about four of its issue slots). The
// keys past count read `zeros`.
template <class S, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void row_lanes_dot(const T* __restrict xt, const T* const* keys, int count, int D, const T* zeros,
                                      T* __restrict out) {
  using V = typename S::V;
  constexpr int R = S::kRowVecs, kAtOnce = R >= 8 ? 1 : 8 / R;
  for (int jj = 0; jj < count; jj += kAtOnce) {
    const T* k[kAtOnce];
#pragma GCC unroll 8
    for (int a = 0; a < kAtOnce; ++a) k[a] = jj + a < count ? keys[jj + a] : zeros;
    V acc[kAtOnce][R] = {};
    for (int d = 0; d < D; ++d) {
#pragma GCC unroll 8
      for (int v = 0; v < R; ++v) {
        const V x = load<S>(xt + d * kBlockRows + v * S::kLanes);
#pragma GCC unroll 8
        for (int a = 0; a < kAtOnce; ++a) acc[a][v] += x * k[a][d];
      }
    }
#pragma GCC unroll 8
    for (int a = 0; a < kAtOnce; ++a)
      if (jj + a < count)
#pragma GCC unroll 8
        for (int v = 0; v < R; ++v) store<S>(out + (jj + a) * kBlockRows + v * S::kLanes, acc[a][v]);
  }
}

// out[r] = (row r of xt's block) . (row r of yt's block), both transposed as row_lanes_dot's xt:
// the same arithmetic in the same order as row_lanes_dot's, so that where row r of yt is key jj's
// row the two agree bitwise (the backward's delta = dO . O against dP = dO . V: a row that sees one
// key, whose O is V, gets dS = 0 exactly, as the math says).
template <class S, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void row_lanes_diagonal(const T* __restrict xt, const T* __restrict yt, int D, T* __restrict out) {
  using V = typename S::V;
  constexpr int R = S::kRowVecs;
  V acc[R] = {};
  for (int d = 0; d < D; ++d) {
#pragma GCC unroll 8
    for (int v = 0; v < R; ++v)
      acc[v] += load<S>(xt + d * kBlockRows + v * S::kLanes) * load<S>(yt + d * kBlockRows + v * S::kLanes);
  }
#pragma GCC unroll 8
  for (int v = 0; v < R; ++v) store<S>(out + v * S::kLanes, acc[v]);
}

// rows[0, count), a block's rows, transposed into xt[d * kBlockRows + r]; the rows past count 0.
template <typename T>
CUFLASH_CPU_INLINE void pack_block(const T* const* rows, int count, int D, T* __restrict xt) {
  for (int r = 0; r < kBlockRows; ++r)
    for (int d = 0; d < D; ++d) xt[d * kBlockRows + r] = r < count ? rows[r][d] : T(0);
}

#ifdef CUFLASH_CPU_WIDE_ISAS
// A bfloat16 row's head dims d, d + 1 as 32 bits (the low half d's), the second 0 past the row.
CUFLASH_CPU_INLINE uint32_t bf16_pair(const uint16_t* row, int d, int D) {
  return row[d] | (d + 1 < D ? static_cast<uint32_t>(row[d + 1]) << 16 : 0u);
}

// The block's bfloat16 rows transposed in pairs of head dims: xt2[d / 2 * kBlockRows + r] =
// bf16_pair(rows[r], d) (rows past count 0), row_lanes_dot_bf16's operand.
CUFLASH_CPU_INLINE void pack_block_bf16(const uint16_t* const* rows, int count, int D, uint32_t* __restrict xt2) {
  for (int r = 0; r < kBlockRows; ++r)
    for (int d = 0; d < D; d += 2) xt2[d / 2 * kBlockRows + r] = r < count ? bf16_pair(rows[r], d, D) : 0u;
}

// row_lanes_dot over bfloat16 rows (S::kDotBf16), for a block of R vectors of 16 rows: each
// VDPBF16PS adds two head dims' exact products of every row in a vector with a key's pair, summed
// in float as the float path sums the converted values (the order of the additions aside; inputs
// and sums below float's normal range taken as 0); a pair past an odd D is 0 on both sides. Half
// the float path's instructions, and the keys' rows read as they are. A function of its own under
// its target, called a tile at a time: an intrinsic cannot be inlined into the kernels' templates,
// which take their target only where the entry point inlines them.
template <int R>
__attribute__((target("arch=x86-64-v4,avx512bf16"), noinline)) void row_lanes_dot_bf16(const uint32_t* __restrict xt2,
                                                                                       const uint16_t* const* keys,
                                                                                       int count, int D,
                                                                                       float* __restrict out) {
  // Sixteen accumulators in flight (the pair dot product's latency is about eight of its issue
  // slots), from eight keys at most (a pointer register each).
  constexpr int kAtOnce = 16 / R < 8 ? 16 / R : 8, kLanes = 16;
  for (int jj = 0; jj < count; jj += kAtOnce) {
    const uint16_t* k[kAtOnce];
#pragma GCC unroll 16
    for (int a = 0; a < kAtOnce; ++a) k[a] = keys[jj + a < count ? jj + a : jj];  // past count: not stored
    __m512 acc[kAtOnce][R];
#pragma GCC unroll 16
    for (int a = 0; a < kAtOnce; ++a)
#pragma GCC unroll 8
      for (int v = 0; v < R; ++v) acc[a][v] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 2) {
      const bool pair = d + 1 < D;  // else an odd D's last head dim, paired with 0
#pragma GCC unroll 8
      for (int v = 0; v < R; ++v) {
        const __m512i x = _mm512_loadu_si512(xt2 + d / 2 * kBlockRows + v * kLanes);
#pragma GCC unroll 16
        for (int a = 0; a < kAtOnce; ++a) {
          uint32_t two = k[a][d];
          if (pair) std::memcpy(&two, k[a] + d, sizeof(two));
          acc[a][v] = _mm512_dpbf16_ps(acc[a][v], (__m512bh)x, (__m512bh)_mm512_set1_epi32(static_cast<int>(two)));
        }
      }
    }
#pragma GCC unroll 16
    for (int a = 0; a < kAtOnce; ++a)
      if (jj + a < count)
#pragma GCC unroll 8
        for (int v = 0; v < R; ++v) _mm512_storeu_ps(out + (jj + a) * kBlockRows + v * kLanes, acc[a][v]);
  }
}

// row_lanes_diagonal over bfloat16 rows paired as pack_block_bf16's: row_lanes_dot_bf16's arithmetic
// in its order, so that the backward's delta = dO . O agrees bitwise with its dP = dO . V where O is V.
template <int R>
__attribute__((target("arch=x86-64-v4,avx512bf16"), noinline)) void row_lanes_diagonal_bf16(
    const uint32_t* __restrict xt2, const uint32_t* __restrict yt2, int D, float* __restrict out) {
  constexpr int kLanes = 16;
  __m512 acc[R];
#pragma GCC unroll 8
  for (int v = 0; v < R; ++v) acc[v] = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 2)
#pragma GCC unroll 8
    for (int v = 0; v < R; ++v)
      acc[v] = _mm512_dpbf16_ps(acc[v], (__m512bh)_mm512_loadu_si512(xt2 + d / 2 * kBlockRows + v * kLanes),
                                (__m512bh)_mm512_loadu_si512(yt2 + d / 2 * kBlockRows + v * kLanes));
#pragma GCC unroll 8
  for (int v = 0; v < R; ++v) _mm512_storeu_ps(out + v * kLanes, acc[v]);
}
// AMX (Sapphire Rapids and later): bfloat16's matrix products on tile registers, a TDPBF16PS
// adding 16 x 16 float sums of 32 exact bfloat16 products each (inputs and sums below float's
// normal range taken as 0, as VDPBF16PS). Every tile here is 16 rows of 64 bytes.

// Whether the CPU has AMX-BF16 and the OS enables its tile state (XCR0).
bool amx_in_cpu() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tiles = (edx >> 24) & 1u, bf16 = (edx >> 22) & 1u;
  if (!tiles || !bf16) return false;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !((ecx >> 27) & 1u)) return false;  // OSXSAVE
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  return (xcr0_lo & (3u << 17)) == (3u << 17);  // XTILECFG, XTILEDATA
}

// Whether this process may use the tile registers: Linux grants them on request (arch_prctl's
// ARCH_REQ_XCOMP_PERM; torch's oneDNN asks the same). The grant is process-wide and enlarges signal
// frames, so it is asked once, at the first bfloat16 call that would take the tiles (not by calls
// of other dtypes, nor under CUFLASH_CPU_ISA=avx512bf16 or below).
bool amx_permitted() {
#if defined(__linux__)
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

// LDTILECFG's 64 bytes: palette 1, every tile 16 rows of 64 bytes.
struct AmxTileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};
static_assert(sizeof(AmxTileConfig) == 64, "LDTILECFG reads 64 bytes");

constexpr AmxTileConfig amx_tile_config() {
  AmxTileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = kAmxTileRows;
  return config;
}
// A constant, not a local: GCC 12 does not count LDTILECFG as reading its operand, and drops the
// stores into a local one.
constexpr AmxTileConfig kAmxTileConfig = amx_tile_config();

// Tiles configured for a block, and the thread's earlier configuration put back after it: torch's
// oneDNN kernels may keep theirs configured across calls on the same thread. Both out of line: GCC 12
// models STTILECFG as writing its operand's first byte only (and LDTILECFG as reading nothing), so
// `saved` must be memory that the compiler cannot see through.
struct AmxTiles {
  AmxTileConfig saved;
  __attribute__((target("amx-tile"), noinline)) AmxTiles() {
    _tile_storeconfig(&saved);
    _tile_loadconfig(&kAmxTileConfig);
  }
  __attribute__((target("amx-tile"), noinline)) ~AmxTiles() {
    if (saved.palette != 0)
      _tile_loadconfig(&saved);
    else
      _tile_release();
  }
};

// The tiles' one product: C_g (+)= sum over `steps` of A_g B for two groups g of 16 rows of A
// (a_g + step * a_step, a_bytes apart) and R halves of 16 lanes of B (b + step * b_step, the halves
// 16 dwords apart, rows b_bytes apart); C_g 16 rows of R x 16 floats at c_g (rows c_bytes apart),
// zeroed first or (accumulate) loaded. Four sums in flight (a TDPBF16PS takes several times its
// issue interval): tiles 0-3 C (group, half), 4 and 5 A's groups, 6 and 7 B's halves.
template <int R>
__attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16"), always_inline)) inline void amx_two_groups(
    const uint16_t* a0, const uint16_t* a1, int a_bytes, int a_step, const uint32_t* b, int b_bytes, int b_step,
    int steps, float* c0, float* c1, int c_bytes, bool accumulate) {
  if (accumulate) {
    _tile_loadd(0, c0, c_bytes);
    _tile_loadd(2, c1, c_bytes);
    if constexpr (R == 2) {
      _tile_loadd(1, c0 + 16, c_bytes);
      _tile_loadd(3, c1 + 16, c_bytes);
    }
  } else {
    _tile_zero(0);
    _tile_zero(2);
    if constexpr (R == 2) {
      _tile_zero(1);
      _tile_zero(3);
    }
  }
  for (int step = 0; step < steps; ++step) {
    _tile_loadd(4, a0 + step * a_step, a_bytes);
    _tile_loadd(5, a1 + step * a_step, a_bytes);
    _tile_loadd(6, b + step * b_step, b_bytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (R == 2) {
      _tile_loadd(7, b + step * b_step + 16, b_bytes);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c0, c_bytes);
  _tile_stored(2, c1, c_bytes);
  if constexpr (R == 2) {
    _tile_stored(1, c0 + 16, c_bytes);
    _tile_stored(3, c1 + 16, c_bytes);
  }
}

// st[jj * kBlockRows + r] = (row r of the block) . keys[jj] for the key tile's groups of 32 keys that
// hold count (rows of st past count: whatever kt holds there), R row halves of 16 lanes: S^T = K Q^T
// from kt (the tile's K rows [keys][dims], zero past D) and qt2 (pack_block_bf16's Q^T in head dim
// pairs, zero past D up to dims), 32 head dims a step.
template <int R>
__attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16"), noinline)) void scores_amx(
    const uint32_t* __restrict qt2, const uint16_t* __restrict kt, int dims, int count, float* __restrict st) {
  for (int key = 0; key < count; key += 2 * kAmxTileRows)
    amx_two_groups<R>(kt + key * dims, kt + (key + kAmxTileRows) * dims, dims * 2, kAmxDims, qt2, kBlockRows * 4,
                      kAmxDims / 2 * kBlockRows, dims / kAmxDims, st + key * kBlockRows,
                      st + (key + kAmxTileRows) * kBlockRows, kBlockRows * 4, false);
}

// out_t[d][r] += sum over jj of V[jj][d] P[jj][r] for the tile's count keys, rounded P: O^T += V^T P^T
// from vt (the tile's V^T as pack_values_amx's, zero past D, finite past count) and pt2 (key pairs'
// bfloat16 probabilities a row [keys / 2][kBlockRows], zero past count), 32 keys a step; out_t
// [dims][kBlockRows].
template <int R>
__attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16"), noinline)) void add_pv_amx(
    float* __restrict out_t, int dims, const uint16_t* __restrict vt, const uint32_t* __restrict pt2, int count) {
  for (int d = 0; d < dims; d += 2 * kAmxTileRows)
    amx_two_groups<R>(vt + d * kAmxKeys, vt + (d + kAmxTileRows) * kAmxKeys, kAmxKeys * 2, kAmxKeys * dims, pt2,
                      kBlockRows * 4, kAmxKeys / 2 * kBlockRows, amx_padded(count, kAmxKeys) / kAmxKeys,
                      out_t + d * kBlockRows, out_t + (d + kAmxTileRows) * kBlockRows, kBlockRows * 4, true);
}

// pt2 from the tile's probabilities st [kKeys][kBlockRows] (R halves of 16 rows): key pairs
// rounded to bfloat16 and interleaved a row, keys past count 0 (to a multiple of kAmxKeys).
template <int R>
__attribute__((target("arch=x86-64-v4,avx512bf16"), noinline)) void pack_probs_amx(const float* __restrict st,
                                                                                   int count,
                                                                                   uint32_t* __restrict pt2) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const int padded = amx_padded(count, kAmxKeys);
  for (int key = 0; key < padded; key += 2)
    for (int v = 0; v < R; ++v) {
      const __m512 even = key < count ? _mm512_loadu_ps(st + key * kBlockRows + v * 16) : _mm512_setzero_ps();
      const __m512 odd = key + 1 < count ? _mm512_loadu_ps(st + (key + 1) * kBlockRows + v * 16) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);  // even's 16 rows, then odd's
      _mm512_storeu_si512(pt2 + key / 2 * kBlockRows + v * 16, _mm512_permutexvar_epi16(interleave, both));
    }
}

// The first n of 32 16-bit lanes (none for n <= 0): a row's head dims from d on, n = D - d.
__attribute__((target("arch=x86-64-v4"), always_inline)) inline __mmask32 first_lanes(int n) {
  return n <= 0 ? 0 : n >= 32 ? ~__mmask32{0} : (__mmask32{1} << n) - 1;
}
// The lanes of 32 bfloat16 values that are finite (exponent not all ones).
__attribute__((target("arch=x86-64-v4"), always_inline)) inline __mmask32 bf16_finite_lanes(__m512i x) {
  const __m512i exponent = _mm512_set1_epi16(0x7f80);
  return _mm512_cmpneq_epi16_mask(_mm512_and_si512(x, exponent), exponent);
}

// The key tile's bfloat16 K rows for scores_amx: kt [count][dims], zero past D (and past count up to
// a multiple of 32 keys).
__attribute__((target("arch=x86-64-v4"), noinline)) void pack_keys_amx(const uint16_t* const* k_raw, int count, int D,
                                                                      int dims, uint16_t* __restrict kt) {
  for (int jj = 0; jj < amx_padded(count, 2 * kAmxTileRows); ++jj)
    for (int d = 0; d < dims; d += 32) {  // 32 head dims a vector, the ones past D (or count) zero
      const __mmask32 in_row = jj >= count ? 0 : first_lanes(D - d);
      _mm512_storeu_si512(kt + jj * dims + d, _mm512_maskz_loadu_epi16(in_row, k_raw[jj < count ? jj : 0] + d));
    }
}
// 16 x 16 dwords transposed in registers: r[i] holds row i, then column i (unpacks within 128-bit
// lanes, then the lanes' shuffles).
__attribute__((target("arch=x86-64-v4"), always_inline)) inline void transpose_16x16_dwords(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Its V rows transposed for add_pv_amx in chunks of 32 keys, [keys / 32][dims][32]: key j of head dim d
// at vt[j / 32 * 32 * dims + d * 32 + j % 32] (a tile's 16 rows 64 bytes apart, not a head's keys
// apart: over a 2048-key head in L2, P V 0.82x the time, benchmarks/amx_tiles_microbench.cpp); zero
// past D and past count up to a multiple of kAmxKeys. A tile row of vt holds 32 keys of a head dim,
// their pairs as dwords: each 16 head dims x 32 keys is a 16 x 16 transpose of the key pairs'
// interleaved rows.
__attribute__((target("arch=x86-64-v4"), noinline)) void pack_values_amx(const uint16_t* const* v_raw, int count,
                                                                        int D, int dims, uint16_t* __restrict vt) {
  for (int key = 0; key < count; key += kAmxKeys)
    for (int d = 0; d < D; d += 16) {
      const __mmask16 in_row = D - d >= 16 ? 0xffff : static_cast<__mmask16>((1u << (D - d)) - 1);
      __m512i pairs[16];
      for (int j = 0; j < 16; ++j) {
        const int even = key + 2 * j, odd = even + 1;
        const __m256i lo = even < count ? _mm256_maskz_loadu_epi16(in_row, v_raw[even] + d) : _mm256_setzero_si256();
        const __m256i hi = odd < count ? _mm256_maskz_loadu_epi16(in_row, v_raw[odd] + d) : _mm256_setzero_si256();
        pairs[j] = _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      }
      transpose_16x16_dwords(pairs);
      for (int i = 0; i < 16; ++i)
        _mm512_storeu_si512(vt + static_cast<int64_t>(key) * dims + (d + i) * kAmxKeys, pairs[i]);
    }
}

// The backward's dV and dK on the tiles: acc[jj][d] += sum over blocks b and rows r of at_b[jj][r]
// b2_b[r][d] for count keys (in 32-key groups: at_b's keys past count are 0): dV += P^T dO and dK
// += dS^T Q from at_b (pack_lanes_amx's bfloat16 P^T or dS^T, a key a row of kBlockRows lanes) and
// b2_b (pack_row_pairs_amx's dO or Q [kBlockRows / 2][dims]), blocks b < steps at_step and b2_step
// apart, a block's 32 rows one step; acc [keys][dims] floats, rows past count loaded and stored
// unchanged.
__attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16"), noinline)) void add_keys_amx(
    float* __restrict acc, int dims, const uint16_t* __restrict at, int at_step, const uint32_t* __restrict b2,
    int b2_step, int steps, int count) {
  static_assert(kBlockRows == 2 * kAmxTileRows, "a block's rows are one step of the tiles' sums");
  for (int key = 0; key < count; key += 2 * kAmxTileRows)
    for (int d = 0; d < dims; d += 2 * kAmxTileRows)
      amx_two_groups<2>(at + key * kBlockRows, at + (key + kAmxTileRows) * kBlockRows, kBlockRows * 2, at_step,
                        b2 + d, dims * 4, b2_step, steps, acc + static_cast<int64_t>(key) * dims + d,
                        acc + static_cast<int64_t>(key + kAmxTileRows) * dims + d, dims * 4, true);
}

// at for add_keys_amx from the tile's lanes x [kKeys][kBlockRows] (P^T or dS^T): rounded to
// bfloat16, the lanes past rows and the keys past count (to a multiple of 32) 0.
__attribute__((target("arch=x86-64-v4,avx512bf16"), noinline)) void pack_lanes_amx(const float* __restrict x,
                                                                                   int count, int rows,
                                                                                   uint16_t* __restrict at) {
  static_assert(kBlockRows == 32, "a key's lanes are two vectors");
  const __mmask32 in_block = first_lanes(rows);
  const __mmask16 low = static_cast<__mmask16>(in_block), high = static_cast<__mmask16>(in_block >> 16);
  for (int key = 0; key < amx_padded(count, kAmxKeys); ++key) {
    const bool in_tile = key < count;
    const __m512 lo = _mm512_maskz_loadu_ps(in_tile ? low : 0, x + key * kBlockRows);
    const __m512 hi = _mm512_maskz_loadu_ps(in_tile ? high : 0, x + key * kBlockRows + 16);
    _mm512_storeu_si512(at + key * kBlockRows, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// b2 for add_keys_amx from the block's bfloat16 rows (Q or dO, as they are): row pairs'
// elements interleaved, b2[r / 2][d] = (rows[r][d], rows[r + 1][d]) for even r, 0 past the block's
// rows and past D (up to dims), and 0 for an Inf or NaN (bwd_head_impl adds those one by one).
__attribute__((target("arch=x86-64-v4"), noinline)) void pack_row_pairs_amx(const uint16_t* const* raw, int rows,
                                                                           int D, int dims, uint32_t* __restrict b2) {
  __m512i first_half, second_half;  // permutex2var's indices: (even[i], odd[i]) for i < 16, then for 16 <= i < 32
  {
    alignas(64) uint16_t lo[32], hi[32];
    for (int w = 0; w < 32; ++w) lo[w] = static_cast<uint16_t>(w / 2 + (w % 2) * 32), hi[w] = lo[w] + 16;
    first_half = _mm512_load_si512(lo);
    second_half = _mm512_load_si512(hi);
  }
  for (int pair = 0; pair < kBlockRows / 2; ++pair)
    for (int d = 0; d < dims; d += 32) {
      __m512i xy[2];
      for (int half = 0; half < 2; ++half) {
        const int r = 2 * pair + half;
        const __m512i x = r < rows ? _mm512_maskz_loadu_epi16(first_lanes(D - d), raw[r] + d) : _mm512_setzero_si512();
        xy[half] = _mm512_maskz_mov_epi16(bf16_finite_lanes(x), x);
      }
      _mm512_storeu_si512(b2 + pair * dims + d, _mm512_permutex2var_epi16(xy[0], first_half, xy[1]));
      _mm512_storeu_si512(b2 + pair * dims + d + 16, _mm512_permutex2var_epi16(xy[0], second_half, xy[1]));
    }
}

CUFLASH_CPU_INLINE bool bf16_finite(uint16_t x) { return (x & 0x7f80u) != 0x7f80u; }  // exponent not all ones
// Whether bfloat16 rows[0, n) hold only finite values (exponents not all ones), 32 a compare.
__attribute__((target("arch=x86-64-v4"), noinline)) bool bf16_rows_finite(const uint16_t* const* rows, int n,
                                                                          int D) {
  __mmask32 non_finite = 0;
  for (int jj = 0; jj < n; ++jj)
    for (int d = 0; d < D; d += 32) {
      const __mmask32 in_row = first_lanes(D - d);
      non_finite |= in_row & ~bf16_finite_lanes(_mm512_maskz_loadu_epi16(in_row, rows[jj] + d));
    }
  return non_finite == 0;
}

// The AMX backward's blocks whose dV and dK products wait (kAmxPendingBlocks of them), so that each
// C tile of the sums takes a step for each: block b's P^T and dS^T over keys [lo[b], hi[b])
// (pack_lanes_amx's, at their keys' rows of lanes(b, 0) and lanes(b, 1)), its dO and Q in row pairs
// (pairs(b, 0) and pairs(b, 1)). The thread's CpuScratch holds the buffers.
struct AmxPendingBlocks {
  uint16_t* lanes_base;
  uint32_t* pairs_base;
  int64_t key_rows;  // rows of a block's lanes
  int dims, count = 0, lo[kAmxPendingBlocks], hi[kAmxPendingBlocks];
  uint16_t* lanes(int block, int which) const {
    return lanes_base + (int64_t{block} * 2 + which) * key_rows * kBlockRows;
  }
  uint32_t* pairs(int block, int which) const {
    return pairs_base + (int64_t{block} * 2 + which) * (kBlockRows / 2) * dims;
  }
  // The next block's P^T (which 0) or dS^T (1) from key j0 on.
  uint16_t* block_lanes(int which, int j0) const { return lanes(count, which) + int64_t{j0} * kBlockRows; }
  // Its keys [j0, j0 + keys) add nothing (0 lanes). Returns the end of their 32-key groups.
  int hide(int j0, int keys) const {
    for (int which = 0; which < 2; ++which)
      std::fill_n(block_lanes(which, j0), amx_padded(keys, kAmxKeys) * kBlockRows, uint16_t{0});
    return j0 + amx_padded(keys, kAmxKeys);
  }
  // Block `count` takes keys [begin, end); the sums take the pending products once all blocks wait.
  void add(int begin, int end, float* dv_sums, float* dk_sums) {
    lo[count] = begin, hi[count] = end;
    if (++count == kAmxPendingBlocks) add_to(dv_sums, dk_sums);
  }
  // dV and dK of the pending blocks into the sums: over the keys any of them sees, each block's
  // lanes 0 outside its own (to the 32-key group's end).
  void add_to(float* dv_sums, float* dk_sums) {
    if (count == 0) return;
    int first = lo[0], last = hi[0];
    for (int b = 1; b < count; ++b) first = std::min(first, lo[b]), last = std::max(last, hi[b]);
    const int end = first + amx_padded(last - first, kAmxKeys);
    for (int b = 0; b < count; ++b)
      for (int which = 0; which < 2; ++which) {
        uint16_t* x = lanes(b, which);
        std::fill(x + int64_t{first} * kBlockRows, x + int64_t{lo[b]} * kBlockRows, uint16_t{0});
        std::fill(x + int64_t{hi[b]} * kBlockRows, x + int64_t{end} * kBlockRows, uint16_t{0});
      }
    const int lanes_step = static_cast<int>(2 * key_rows * kBlockRows), pairs_step = 2 * (kBlockRows / 2) * dims;
    const int64_t at = int64_t{first} * kBlockRows;
    add_keys_amx(dv_sums + int64_t{first} * dims, dims, lanes(0, 0) + at, lanes_step, pairs(0, 0), pairs_step, count,
                 last - first);
    add_keys_amx(dk_sums + int64_t{first} * dims, dims, lanes(0, 1) + at, lanes_step, pairs(0, 1), pairs_step, count,
                 last - first);
    count = 0;
  }
};

// One (batch, key head)'s rows packed for the tiles once, for every block of queries that a thread
// takes of it (the forward's consecutive items; the backward's units), instead of a key tile at a
// time for each block, zero past the keys (a tile at any key reads 32-key groups):
// - the forward: K [keys + 32][dims] as pack_keys_amx's (S), V^T as pack_values_amx's (P V);
// - the backward: K and V as pack_keys_amx's (S and dP), K^T as pack_values_amx's (dQ).
// Only where the transposed rows are finite (transposed_finite): a tile's product reads the keys
// past its count, whose P (or dS) is 0.
struct AmxHeadTiles {
  int b = -1, hk = -1;
  bool forward = false, transposed_finite = false;
  std::vector<uint16_t> k, v, transposed;  // (v: the backward's)
  static bool fits(int seqlen_k, int D) {
    return int64_t{3} * (seqlen_k + 2 * kAmxKeys) * amx_dims(D) * int64_t{sizeof(uint16_t)} <= kAmxHeadBytes;
  }
  template <class Params>
  void prepare(const Params& p, const Sequence& s, int batch, int key_head, bool for_forward) {
    if (b == batch && hk == key_head && forward == for_forward) return;
    b = batch, hk = key_head, forward = for_forward;
    const int D = p.shape.head_dim, dims = amx_dims(D), keys = s.seqlen_k;
    const int padded_keys = amx_padded(keys, kAmxKeys) + kAmxKeys;
    k.assign(static_cast<size_t>(padded_keys) * dims, 0);
    v.assign(forward ? 0 : static_cast<size_t>(padded_keys) * dims, 0);
    transposed.assign(static_cast<size_t>(dims) * padded_keys, 0);
    transposed_finite = true;
    const uint16_t* k_raw[kKeys];
    const uint16_t* v_raw[kKeys];
    for (int j0 = 0; j0 < keys; j0 += kKeys) {
      const int count = std::min(kKeys, keys - j0);
      for (int jj = 0; jj < count; ++jj) {
        k_raw[jj] = key_row_at<const uint16_t>(p, p.k, p.k_strides, s, b, hk, j0 + jj);
        v_raw[jj] = key_row_at<const uint16_t>(p, p.v, p.v_strides, s, b, hk, j0 + jj);
      }
      pack_keys_amx(k_raw, count, D, dims, k.data() + static_cast<size_t>(j0) * dims);
      if (!forward) pack_keys_amx(v_raw, count, D, dims, v.data() + static_cast<size_t>(j0) * dims);
      const uint16_t* const* t_raw = forward ? v_raw : k_raw;
      pack_values_amx(t_raw, count, D, dims, transposed.data() + static_cast<size_t>(j0) * dims);
      transposed_finite = transposed_finite && bf16_rows_finite(t_raw, count, D);
    }
  }
};
#endif

// 16-bit rows (the kernels read float16 and bfloat16 themselves; torch_ops.cpp's layout_for).
CUFLASH_CPU_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
CUFLASH_CPU_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
CUFLASH_CPU_INLINE float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }
// float16 bits u (each in its 32 bits' low half) as float bits, without branches, so that a row's
// conversion vectorizes: the exponent rebiased (15 -> 127), Inf and NaN to exponent 255, 0 and
// subnormals renormalized by a float subtraction (exact). Bits: uint32_t, or a vector of them
// (load_row) with F the float vector of as many lanes.
template <typename F, typename Bits>
CUFLASH_CPU_INLINE Bits half_to_float_bits(Bits u) {
  const Bits shifted = (u & 0x7fffu) << 13, exponent = shifted & 0x0f800000u;
  const Bits biased = shifted + (112u << 23);
  const Bits special = exponent == 0x0f800000u ? biased + (112u << 23) : biased;
  const Bits renormalized = biased + (1u << 23);
  F small;
  std::memcpy(&small, &renormalized, sizeof(small));
  small -= 0x1p-14f;
  Bits small_bits;
  std::memcpy(&small_bits, &small, sizeof(small_bits));
  return (exponent == 0 ? small_bits : special) | ((u & 0x8000u) << 16);
}
CUFLASH_CPU_INLINE float half_to_float(uint16_t h) { return bits_float(half_to_float_bits<float>(uint32_t{h})); }
// Rounded to nearest, ties to even, as torch's conversions.
CUFLASH_CPU_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
CUFLASH_CPU_INLINE uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // 65520 and up round to Inf
  if (a < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, rounded (x + 2^23 - 2^23: to nearest even)
    const float units = bits_float(a) * 0x1p24f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>((units + 0x1p23f) - 0x1p23f));
  }
  return static_cast<uint16_t>(sign | (((a + 0xfffu + ((a >> 13) & 1u)) - (112u << 23)) >> 13));
}

// A 16-bit row's element read as it is (fwd_rows widens such rows in registers, not into a copy).
struct Bf16Bits {
  uint16_t bits;
};
struct HalfBits {
  uint16_t bits;
};
template <typename T>
CUFLASH_CPU_INLINE T value_of(T x) {
  return x;
}
CUFLASH_CPU_INLINE float value_of(Bf16Bits x) { return bf16_to_float(x.bits); }
CUFLASH_CPU_INLINE float value_of(HalfBits x) { return half_to_float(x.bits); }

// A vector of S's lanes from row: float and double rows loaded, 16-bit ones widened exactly
// (bf16_to_float's shift, half_to_float_bits), lane by lane.
template <class S, class R>
CUFLASH_CPU_INLINE typename S::V load_row(const R* row) {
  using V = typename S::V;
  if constexpr (std::is_same_v<R, typename S::Scalar>) {
    return load<S>(row);
  } else {
    static_assert(std::is_same_v<typename S::Scalar, float>, "16-bit rows widen to float");
    using Bits = typename S::U;
    typename S::Narrow16 narrow;
    std::memcpy(&narrow, row, sizeof(narrow));
    const Bits u = __builtin_convertvector(narrow, Bits);
    Bits bits;
    if constexpr (std::is_same_v<R, Bf16Bits>)
      bits = u << 16;
    else
      bits = half_to_float_bits<V>(u);
    V v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
}

// Lanes 2l (even) and 2l + 1 (odd) of two vectors' worth of a row (2 L elements), as two vectors:
// the order in which dot_rows_grouped adds head dims, and add_weighted_rows_grouped's unit of a
// 16-bit row. A 16-bit row is one load, each 32-bit lane's two halves widened exactly (bfloat16:
// a shift and a mask; a whole-vector widening took six instructions a vector); float and double
// rows are two loads, split by shuffles (so that q . k adds up in the same order for every row
// type: the backward recomputes scores from float copies of 16-bit rows).
#if defined(__clang__)
template <class V, size_t... l>
CUFLASH_CPU_INLINE void split_lanes_of(const V& a, const V& b, V& even, V& odd, std::index_sequence<l...>) {
  even = __builtin_shufflevector(a, b, (2 * l)...);
  odd = __builtin_shufflevector(a, b, (2 * l + 1)...);
}
template <class V, size_t... l>
CUFLASH_CPU_INLINE void join_lanes_of(const V& even, const V& odd, V& low, V& high, std::index_sequence<l...>) {
  constexpr size_t L = sizeof...(l);
  low = __builtin_shufflevector(even, odd, (l / 2 + (l % 2) * L)...);
  high = __builtin_shufflevector(even, odd, ((L + l) / 2 + (l % 2) * L)...);
}
#endif
template <class S>
CUFLASH_CPU_INLINE void split_lanes(const typename S::V& a, const typename S::V& b, typename S::V& even,
                                    typename S::V& odd) {
  constexpr int L = S::kLanes;
#if defined(__clang__)
  split_lanes_of(a, b, even, odd, std::make_index_sequence<L>{});
#else
  using I = typename S::I;
  if constexpr (L == 8 && sizeof(typename S::Scalar) == 4) {
    // AVX2's floats: within each 128-bit half (vshufps), then the 64-bit quarters in order
    // (vpermd): four shuffles for the two, where the one-step permutations took four and two blends.
    const I half_even = {0, 2, 8, 10, 4, 6, 12, 14}, half_odd = {1, 3, 9, 11, 5, 7, 13, 15};
    const I quarters = {0, 1, 4, 5, 2, 3, 6, 7};
    even = __builtin_shuffle(__builtin_shuffle(a, b, half_even), quarters);
    odd = __builtin_shuffle(__builtin_shuffle(a, b, half_odd), quarters);
  } else {
    I even_ix, odd_ix;  // (constants once inlined: two-source permutes)
    for (int l = 0; l < L; ++l) even_ix[l] = 2 * l, odd_ix[l] = 2 * l + 1;
    even = __builtin_shuffle(a, b, even_ix);
    odd = __builtin_shuffle(a, b, odd_ix);
  }
#endif
}
template <class S, class R>
CUFLASH_CPU_INLINE void load_pair(const R* row, typename S::V& even, typename S::V& odd) {
  using V = typename S::V;
  if constexpr (std::is_same_v<R, typename S::Scalar>) {
    split_lanes<S>(load<S>(row), load<S>(row + S::kLanes), even, odd);
  } else {
    static_assert(std::is_same_v<typename S::Scalar, float>, "16-bit rows widen to float");
    static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "element 2l in the low half of lane l");
    using Bits = typename S::U;
    Bits u, even_bits, odd_bits;
    std::memcpy(&u, row, sizeof(u));  // 2 L 16-bit elements: L 32-bit lanes
    if constexpr (std::is_same_v<R, Bf16Bits>) {
      even_bits = u << 16;
      odd_bits = u & 0xffff0000u;
    } else {
      even_bits = half_to_float_bits<V>(u);  // (it reads the low half alone)
      odd_bits = half_to_float_bits<V>(u >> 16);
    }
    std::memcpy(&even, &even_bits, sizeof(even));
    std::memcpy(&odd, &odd_bits, sizeof(odd));
  }
}
// load_pair's inverse for float rows: to[2l] = even[l], to[2l + 1] = odd[l].
template <class S>
CUFLASH_CPU_INLINE void store_pair(typename S::Scalar* to, const typename S::V& even, const typename S::V& odd) {
  using V = typename S::V;
  constexpr int L = S::kLanes;  // (even: every instantiation's)
  V low, high;
#if defined(__clang__)
  join_lanes_of(even, odd, low, high, std::make_index_sequence<L>{});
#else
  typename S::I low_ix, high_ix;
  for (int l = 0; l < L; ++l) low_ix[l] = l / 2 + (l % 2) * L, high_ix[l] = (L + l) / 2 + (l % 2) * L;
  low = __builtin_shuffle(even, odd, low_ix);
  high = __builtin_shuffle(even, odd, high_ix);
#endif
  store<S>(to, low);
  store<S>(to + L, high);
}

// The rows as the kernels read them: T's own, or (float kernels over float16 or bfloat16 inputs)
// each row converted into `scratch` as it is fetched, and (the forward's) output rounded back, so
// that nothing is converted whole (a KV cache at every decoding step; the backward's five inputs).
// The row path (fwd_rows) reads K and V's 16-bit rows as they are instead (load_row).
template <typename T, class Params = FlashFwdParams>
struct KernelRows {
  const Params& p;
  bool sixteen_bit, bf16;
  explicit KernelRows(const Params& params)
      : p(params),
        sixteen_bit(std::is_same_v<T, float> && (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16)),
        bf16(p.dtype == DType::kBFloat16) {}
  const T* converted(const uint16_t* row, T* scratch) const {
    for (int d = 0; d < p.shape.head_dim; ++d) scratch[d] = bf16 ? bf16_to_float(row[d]) : half_to_float(row[d]);
    return scratch;
  }
  // Row i of a query-side tensor (q; the backward's out and dout).
  const T* query_side(const void* base, const TensorStrides& strides, const Sequence& s, int b, int h, int i,
                      T* scratch) const {
    if (!sixteen_bit) return row_at<const T>(base, strides, s, true, b, h, i);
    return converted(row_at<const uint16_t>(base, strides, s, true, b, h, i), scratch);
  }
  const T* q(const Sequence& s, int b, int h, int i, T* scratch) const {
    return query_side(p.q, p.q_strides, s, b, h, i, scratch);
  }
#ifdef CUFLASH_CPU_WIDE_ISAS
  // Rows [i0, i0 + rows) of a bfloat16 query-side tensor, read as they are, packed for the pair
  // dot products (pack_block_bf16).
  void pack_bf16(const void* base, const TensorStrides& strides, const Sequence& s, int b, int h, int i0, int rows,
                 uint32_t* xt2) const {
    const uint16_t* raw[kBlockRows];
    for (int r = 0; r < rows; ++r) raw[r] = row_at<const uint16_t>(base, strides, s, true, b, h, i0 + r);
    pack_block_bf16(raw, rows, p.shape.head_dim, xt2);
  }
#endif
  const T* key(const void* base, const TensorStrides& strides, const Sequence& s, int b, int hk, int j,
               T* scratch) const {
    if (!sixteen_bit) return key_row_at<const T>(p, base, strides, s, b, hk, j);
    return converted(key_row_at<const uint16_t>(p, base, strides, s, b, hk, j), scratch);
  }
  // Output row i: value(d) for each head dim d.
  template <class F>
  void store(const Sequence& s, int b, int h, int i, F value) const {
    const int D = p.shape.head_dim;
    if (!sixteen_bit) {
      T* out = row_at<T>(p.out, p.out_strides, s, true, b, h, i);
      for (int d = 0; d < D; ++d) out[d] = value(d);
      return;
    }
    uint16_t* out = row_at<uint16_t>(p.out, p.out_strides, s, true, b, h, i);
    for (int d = 0; d < D; ++d) {
      const float x = static_cast<float>(value(d));
      out[d] = bf16 ? float_to_bf16(x) : float_to_half(x);
    }
  }
};

// The per-thread buffers of a range of work items.
template <typename T>
struct CpuScratch {
  std::vector<T> qt, dot, ot, scores, dp, capped, acc, zeros, q16, do16, o16, k16, v16;  // q16 ...: KernelRows'
  std::vector<T> q_pairs;  // the row path's query rows, split once a block (split_row_pairs)
  std::vector<const T*> k_rows, v_rows, q_rows, do_rows, o_rows;
  std::vector<T*> dk_rows, dv_rows;
  std::vector<T> kv16;                        // the backward's pair's K and V rows, from 16-bit inputs
  std::vector<uint32_t> qt2, dot2, ot2;       // pack_block_bf16's (q's; the backward's dO's and O's)
  std::vector<const uint16_t*> k_raw, v_raw;  // bfloat16 keys' rows as they are (row_lanes_dot_bf16)
  std::vector<uint16_t> kt16, vt16;           // the AMX forward's K and V^T tiles (the backward's K and K^T)
  std::vector<uint32_t> pt2;                  // its bfloat16 P (pack_probs_amx; the backward's dS)
  // The AMX backward's: V's tile as kt16 (dP); for each pending block (kAmxPendingBlocks) its P^T
  // and dS^T over the keys (pack_lanes_amx, [2][seqlen_k + kKeys][kBlockRows]) and its dO and Q in
  // row pairs (pack_row_pairs_amx, [2][kBlockRows / 2][dims]); the (batch, key head)'s sums of dK
  // and dV [seqlen_k + kKeys][dims].
  std::vector<uint16_t> vk16, pending_lanes;
  std::vector<uint32_t> pending_pairs;
  std::vector<T> dk_sums, dv_sums;
#ifdef CUFLASH_CPU_WIDE_ISAS
  AmxHeadTiles amx_head;                      // a (batch, key head)'s, where whole heads are packed
#endif
  bool amx_whole_heads = false;               // whether to (flash_fwd_cpu: one split, 2+ blocks of it)
  explicit CpuScratch(int D)
      : qt(static_cast<size_t>(D) * kBlockRows),
        dot(qt.size()),
        ot(qt.size()),
        scores(kAmxForwardKeys * kBlockRows),  // (the AMX forward's tiles reach kAmxForwardKeys keys)
        dp(kKeys * kBlockRows),
        capped(dp.size()),
        acc(static_cast<size_t>(kBlockRows) * amx_dims(D)),  // O^T, padded for the AMX forward
        zeros(D),
        q16(static_cast<size_t>(kBlockRows) * D),
        do16(q16.size()),
        o16(q16.size()),
        k16(static_cast<size_t>(kKeys) * D),
        v16(static_cast<size_t>(kKeys) * D),
        q_pairs(static_cast<size_t>(kLaneRows) * D),
        k_rows(kKeys),
        v_rows(kKeys),
        q_rows(kBlockRows),
        do_rows(kBlockRows),
        o_rows(kBlockRows),
        dk_rows(kKeys),
        dv_rows(kKeys),
        qt2(static_cast<size_t>(amx_dims(D)) / 2 * kBlockRows),  // zero past D, for the AMX forward
        dot2(qt2.size()),
        ot2(qt2.size()),
        k_raw(kAmxForwardKeys),
        v_raw(kAmxForwardKeys),
        kt16(static_cast<size_t>(kAmxForwardKeys) * amx_dims(D)),
        vt16(static_cast<size_t>(amx_dims(D)) * kAmxForwardKeys),
        pt2(kAmxForwardKeys / 2 * kBlockRows) {}
  // The AMX backward's buffers (bwd_head_impl), for keys' rows of lanes a block and head dim.
  void reserve_amx_backward(int D, int64_t key_rows) {
    vk16.resize(kt16.size());
    pending_lanes.resize(static_cast<size_t>(kAmxPendingBlocks) * 2 * key_rows * kBlockRows);
    pending_pairs.resize(static_cast<size_t>(kAmxPendingBlocks) * 2 * (kBlockRows / 2) * amx_dims(D));
  }
};

// attn_mask's elements of row i from key j0 on (AttnMaskSlice::bias's layout; col_stride apart).
template <typename E>
CUFLASH_CPU_INLINE const E* mask_row(const AttnMaskSlice& m, int i, int j0) {
  return static_cast<const E*>(m.data) + m.base + int64_t{i} * m.row_stride + int64_t{j0} * m.col_stride;
}

// The scores' rules of (b, h) (ExactScore; plain: scale alone) and dropout's.
template <typename T>
struct RowRules {
  ExactScore<T> score;
  bool plain, mask_only, dropout;  // mask_only: attn_mask the one rule beyond the scale
  DropoutRng rng;
  T keep_scale;
  RowRules(const AttentionParams& p, int b, int h)
      : score(p, b, h),
        plain(!(score.softcap > T(0)) && !score.alibi && !score.mask.data),
        mask_only(!(score.softcap > T(0)) && !score.alibi && score.mask.data),
        dropout(p.dropout.p > 0.0),
        rng(dropout ? make_dropout_rng(p.dropout) : DropoutRng{}),
        keep_scale(static_cast<T>(dropout_keep_scale(p.dropout.p))) {}
  // Dropout's factor of (row i, key j) of (b, h): 0 or dropout_keep_scale.
  T keep(int b, int h, int heads, int i, int j) const { return rng.keep(b, h, heads, i, j) ? keep_scale : T(0); }
  // The scores of rows [i0, i0 + rows) and keys [j0, j0 + count) of sequence s from their q.k in
  // place, x[jj * key_stride + r] (capped likewise, the backward's softcap factors; may be null):
  // scaled alone, or scaled and masked a mask row at a time, its kind tested once (a padding or
  // causal mask as a tensor), or by ExactScore pair by pair (softcap, ALiBi).
  void scores(const Sequence& s, int i0, int rows, int j0, int count, int key_stride, T* x, T* capped) const {
    const T scale = score.scale;
    if (plain) {
      for (int jj = 0; jj < count; ++jj)
        for (int r = 0; r < rows; ++r) x[jj * key_stride + r] *= scale;
    } else if (mask_only) {
      const AttnMaskSlice& m = score.mask;
      const T inf = std::numeric_limits<T>::infinity();
      for (int r = 0; r < rows; ++r) {
        T* out = x + r;
        if (m.is_bool) {
          const bool* shows = mask_row<bool>(m, i0 + r, j0);
          for (int jj = 0; jj < count; ++jj)
            out[jj * key_stride] = out[jj * key_stride] * scale + (shows[jj * m.col_stride] ? T(0) : -inf);
        } else {
          const T* bias = mask_row<T>(m, i0 + r, j0);
          for (int jj = 0; jj < count; ++jj)
            out[jj * key_stride] = out[jj * key_stride] * scale + bias[jj * m.col_stride];
        }
      }
    } else {
      T unused;
      for (int jj = 0; jj < count; ++jj)
        for (int r = 0; r < rows; ++r) {
          const int at = jj * key_stride + r;
          x[at] = score(s, x[at], i0 + r, j0 + jj, capped ? &capped[at] : &unused);
        }
    }
  }
};

// A block's rows' visible keys [lo[r], hi[r]) (rows past the block: none) and their union.
struct BlockKeys {
  int lo[kBlockRows], hi[kBlockRows], begin, end;
  explicit BlockKeys(int seqlen_k) : begin(seqlen_k), end(0) {}
  void set(int r, Range k) {
    lo[r] = k.begin, hi[r] = k.end;
    if (k.begin < k.end) begin = std::min(begin, k.begin), end = std::max(end, k.end);
  }
  bool sees(int r, int j) const { return lo[r] <= j && j < hi[r]; }
  // Whether every row of the block sees every key of [j0, j0 + count).
  bool sees_all(int rows, int j0, int count) const {
    for (int r = 0; r < rows; ++r)
      if (lo[r] > j0 || hi[r] < j0 + count) return false;
    return true;
  }
};

// Lanes of S^T (or P^T) that the masks hide set to `hidden`: (row r, key j0 + jj) outside r's keys.
template <typename T>
CUFLASH_CPU_INLINE void hide_lanes(const BlockKeys& keys, int j0, int count, T hidden, T* scores) {
  for (int jj = 0; jj < count; ++jj)
    for (int r = 0; r < kBlockRows; ++r) {
      scores[jj * kBlockRows + r] = keys.sees(r, j0 + jj) ? scores[jj * kBlockRows + r] : hidden;
    }
}

// acc_t[d][r] += sum over jj < count of rows[jj][d] * wt[jj][r], the block's rows as lanes
// (acc_t and wt [.][kBlockRows]): kDims head dims at a time, eight accumulators in flight. Every
// row takes every key's term: only where that is what the masks say (a hidden pair's weight is 0,
// and 0 x a finite row is 0: add_visible_lanes_times_rows).
template <class S, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void add_lanes_times_rows(T* __restrict acc_t, int D, int count, const T* __restrict wt,
                                             const T* const* rows) {
  using V = typename S::V;
  constexpr int R = S::kRowVecs, L = S::kLanes, kDims = R >= 8 ? 1 : 8 / R;
  auto dims = [&](int d0, auto width) CUFLASH_CPU_LAMBDA_INLINE {
    constexpr int W = decltype(width)::value;
    V acc[W][R];
#pragma GCC unroll 8
    for (int a = 0; a < W; ++a)
#pragma GCC unroll 8
      for (int v = 0; v < R; ++v) acc[a][v] = load<S>(acc_t + (d0 + a) * kBlockRows + v * L);
    for (int jj = 0; jj < count; ++jj) {
      V w[R];
#pragma GCC unroll 8
      for (int v = 0; v < R; ++v) w[v] = load<S>(wt + jj * kBlockRows + v * L);
#pragma GCC unroll 8
      for (int a = 0; a < W; ++a) {
        const T x = rows[jj][d0 + a];
#pragma GCC unroll 8
        for (int v = 0; v < R; ++v) acc[a][v] += w[v] * x;
      }
    }
#pragma GCC unroll 8
    for (int a = 0; a < W; ++a)
#pragma GCC unroll 8
      for (int v = 0; v < R; ++v) store<S>(acc_t + (d0 + a) * kBlockRows + v * L, acc[a][v]);
  };
  int d = 0;
  for (; d + kDims <= D; d += kDims) dims(d, std::integral_constant<int, kDims>{});
  for (; d < D; ++d) dims(d, std::integral_constant<int, 1>{});
}

// outs[jj][0, D) += sum over r < rows of wt[jj][r] * rows[r][0, D) for jj < count (wt [.][kBlockRows]):
// kAtOnce keys by two vectors of head dims at a time, eight accumulators in flight. As
// add_lanes_times_rows, every key takes every row's term (add_visible_rows_times_lanes).
template <class S, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void add_rows_times_lanes(T* const* outs, int D, int count, const T* __restrict wt, int rows,
                                             const T* const* row_ptrs) {
  using V = typename S::V;
  constexpr int L = S::kLanes, kAtOnce = 4, kVecs = 2;
  for (int jj0 = 0; jj0 < count; jj0 += kAtOnce) {
    const int keys = std::min(kAtOnce, count - jj0);
    auto chunk = [&](int d, auto vectors) CUFLASH_CPU_LAMBDA_INLINE {
      constexpr int C = decltype(vectors)::value;
      V acc[kAtOnce][C] = {};
      for (int r = 0; r < rows; ++r) {
        V x[C];
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) x[c] = load<S>(row_ptrs[r] + d + c * L);
#pragma GCC unroll 8
        for (int a = 0; a < kAtOnce; ++a) {
          const T w = wt[(jj0 + a) * kBlockRows + r];  // past count: a row of the buffer, unused
#pragma GCC unroll 8
          for (int c = 0; c < C; ++c) acc[a][c] += x[c] * w;
        }
      }
      for (int a = 0; a < keys; ++a)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) store<S>(outs[jj0 + a] + d + c * L, load<S>(outs[jj0 + a] + d + c * L) + acc[a][c]);
    };
    int d = 0;
    for (; d + kVecs * L <= D; d += kVecs * L) chunk(d, std::integral_constant<int, kVecs>{});
    for (; d + L <= D; d += L) chunk(d, std::integral_constant<int, 1>{});
    for (; d < D; ++d)
      for (int a = 0; a < keys; ++a) {
        T sum = T(0);
        for (int r = 0; r < rows; ++r) sum += wt[(jj0 + a) * kBlockRows + r] * row_ptrs[r][d];
        outs[jj0 + a][d] += sum;
      }
  }
}

// Whether rows[0, n) hold only finite values (x - x is 0 for them, NaN for an Inf or a NaN).
template <class S, class R, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE bool rows_finite(const R* const* rows, int n, int D) {
  using V = typename S::V;
  constexpr int L = S::kLanes;
  V acc{};
  T tail = T(0);
  for (int t = 0; t < n; ++t) {
    int d = 0;
    for (; d + L <= D; d += L) {
      const V x = load_row<S>(rows[t] + d);
      acc += x - x;
    }
    for (; d < D; ++d) tail += value_of(rows[t][d]) - value_of(rows[t][d]);
  }
  T sum = tail;
  for (int l = 0; l < L; ++l) sum += acc[l];
  return sum == T(0);
}

// Whether attn_mask hides every pair of rows [i0, i0 + rows) and keys [j0, j0 + count) (False, or
// -inf). Such a tile adds nothing and is skipped (a causal or padding mask passed as a tensor:
// half the tiles of a causal one) where q's rows and the tile's K and V rows are finite (tile_adds
// _nothing): with a NaN or Inf it is computed, the mask's -inf added to a NaN score being NaN, as
// in torch's SDPA.
template <typename T>
CUFLASH_CPU_INLINE bool mask_hides(const AttnMaskSlice& mask, int i0, int rows, int j0, int count) {
  if (!mask.data) return false;
  for (int i = i0; i < i0 + rows; ++i) {
    bool shows = false;
    if (mask.is_bool) {
      const bool* row = mask_row<bool>(mask, i, j0);
      for (int jj = 0; jj < count; ++jj) shows |= row[jj * mask.col_stride];
    } else {
      const T* row = mask_row<T>(mask, i, j0);
      for (int jj = 0; jj < count; ++jj) shows |= row[jj * mask.col_stride] != -std::numeric_limits<T>::infinity();
    }
    if (shows) return false;
  }
  return true;
}
// mask_hides, with the inputs' rows finite (q_finite: the query side's; the tile's K and V here).
template <class S, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE bool tile_adds_nothing(const AttnMaskSlice& mask, int i0, int rows, int j0, int count, bool q_finite,
                                          const T* const* k_rows, const T* const* v_rows, int D) {
  return q_finite && mask_hides<T>(mask, i0, rows, j0, count) && rows_finite<S>(k_rows, count, D) &&
         rows_finite<S>(v_rows, count, D);
}

// The tile's products over the pairs (row, key) of the block that the masks show. The lane
// products take every pair, the hidden ones with weight 0, which adds 0 where the rows
// multiplied are finite (finite_rows) or where every row of the block sees every key of the
// tile; otherwise (a NaN or Inf where some row does not look) the visible pairs one at a time, so
// that a masked key's NaN never reaches another row.
// acc_t[d][r] += wt[jj][r] * rows[jj][d] over the visible pairs (the forward's O^T, the dQ^T).
template <class S, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void add_visible_lanes_times_rows(T* acc_t, int D, int count, const T* wt, const T* const* rows,
                                                     const BlockKeys& keys, int block_rows, int j0, bool sees_all) {
  if (sees_all || rows_finite<S>(rows, count, D)) return add_lanes_times_rows<S>(acc_t, D, count, wt, rows);
  for (int r = 0; r < block_rows; ++r)
    for (int j = std::max(keys.lo[r], j0); j < std::min(keys.hi[r], j0 + count); ++j)
      for (int d = 0; d < D; ++d) acc_t[d * kBlockRows + r] += wt[(j - j0) * kBlockRows + r] * rows[j - j0][d];
}
// outs[jj][d] += wt[jj][r] * row_ptrs[r][d] over the visible pairs (dV, dK); finite_rows: whether
// row_ptrs[0, block_rows) are.
template <class S, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void add_visible_rows_times_lanes(T* const* outs, int D, int count, const T* wt, int block_rows,
                                                     const T* const* row_ptrs, bool finite_rows, const BlockKeys& keys,
                                                     int j0, bool sees_all) {
  if (sees_all || finite_rows) return add_rows_times_lanes<S>(outs, D, count, wt, block_rows, row_ptrs);
  for (int jj = 0; jj < count; ++jj)
    for (int r = 0; r < block_rows; ++r)
      if (keys.sees(r, j0 + jj))
        for (int d = 0; d < D; ++d) outs[jj][d] += wt[jj * kBlockRows + r] * row_ptrs[r][d];
}

// The sum of a vector's lanes by halves: log2(lanes) dependent additions, not one a lane (the row
// path's dot_rows sums a vector for every key). The halves by memcpy: GCC has
// __builtin_shufflevector only from 12, and the baseline build takes older ones.
template <typename Vec>
CUFLASH_CPU_INLINE auto lane_sum(const Vec& v) {
  using E = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  if constexpr (sizeof(Vec) == 2 * sizeof(E)) {
    return v[0] + v[1];
  } else {
    typedef E Half __attribute__((vector_size(sizeof(Vec) / 2)));
    Half low, high;
    std::memcpy(&low, &v, sizeof(low));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(low), sizeof(high));
    return lane_sum(low + high);
  }
}

// A row's head dims with each whole pair of vectors in load_pair's order, the rest as they are:
// the row path's query rows, split once a block for dot_rows_grouped.
template <class S, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void split_row_pairs(const T* x, int D, T* to) {
  using V = typename S::V;
  constexpr int L = S::kLanes;
  int d = 0;
  for (; d + 2 * L <= D; d += 2 * L) {
    V even, odd;
    load_pair<S>(x + d, even, odd);
    store<S>(to + d, even);
    store<S>(to + d + L, odd);
  }
  for (; d < D; ++d) to[d] = x[d];
}

// out[g][jj] = x[g] . rows[jj] for jj < count and G rows x[g] (the row path's rows that see the same
// keys: a decoding step's query heads of one key head; x split by split_row_pairs): head dims by
// pairs of vectors in load_pair's order, then one vector, then one at a time; each key's vectors
// read once for the G rows, the lanes summed last (lane_sum). A row's arithmetic depends on neither
// G nor the rows' type (the backward recomputes the row path's scores by dot_rows, from float
// copies of 16-bit rows).
template <class S, int G, class R, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void dot_rows_grouped(const T* const* x, const R* const* rows, int count, int D, T* const* out) {
  using V = typename S::V;
  constexpr int L = S::kLanes;
  const int paired = D / (2 * L) * (2 * L);
  for (int jj = 0; jj < count; ++jj) {
    const R* y = rows[jj];
    V even[G] = {}, odd[G] = {};
    for (int d = 0; d < paired; d += 2 * L) {
      V y_even, y_odd;
      load_pair<S>(y + d, y_even, y_odd);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        even[g] += load<S>(x[g] + d) * y_even;
        odd[g] += load<S>(x[g] + d + L) * y_odd;
      }
    }
    int d = paired;
    if (d + L <= D) {
      const V y_vector = load_row<S>(y + d);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) even[g] += load<S>(x[g] + d) * y_vector;
      d += L;
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      T sum = lane_sum(even[g] + odd[g]);
      for (int e = d; e < D; ++e) sum += x[g][e] * value_of(y[e]);
      out[g][jj] = sum;
    }
  }
}
template <class S, class R, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void dot_rows(const T* x, const R* const* rows, int count, int D, T* out) {
  dot_rows_grouped<S, 1>(&x, rows, count, D, &out);
}

// y[g][0, D) += sum over t < n of weights[g][t] * rows[t][0, D) for G rows (dot_rows_grouped's):
// head dims in chunks of units, a unit a pair of vectors for 16-bit rows (load_pair; y's split and
// put back by store_pair) or one vector (float rows, and a 16-bit row's last vector), as many
// units as keep sixteen sums (eight where vectors are narrower) or one, then one at a time; each
// element's rows in two interleaved sums (even and odd t, added last), the same order whatever
// the unit; each key's vectors read once for the G rows.
template <class S, int G, class R, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void add_weighted_rows_grouped(T* const* y, int D, int n, const T* const* weights,
                                                  const R* const* rows) {
  using V = typename S::V;
  constexpr int L = S::kLanes, kSums = sizeof(V) == 64 ? 16 : 8;
  constexpr int kWidth = std::is_same_v<R, T> ? 1 : 2;  // vectors a unit
  constexpr int kUnits = 2 * kWidth * G >= kSums ? 1 : kSums / (2 * kWidth * G);
  int d = 0;
  auto chunk = [&](auto units, auto width) CUFLASH_CPU_LAMBDA_INLINE {
    constexpr int U = decltype(units)::value, W = decltype(width)::value;
    auto load_unit = [](const auto* from, V* to) CUFLASH_CPU_LAMBDA_INLINE {
      if constexpr (W == 2)
        load_pair<S>(from, to[0], to[1]);
      else
        to[0] = load_row<S>(from);
    };
    V sums_t_even[G][U * W], sums_t_odd[G][U * W];  // [u * W + w]: unit u's vector w
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        load_unit(y[g] + d + u * W * L, &sums_t_even[g][u * W]);
#pragma GCC unroll 2
        for (int w = 0; w < W; ++w) sums_t_odd[g][u * W + w] = V{};
      }
    auto add_row = [&](V (*sums)[U * W], const R* row, int t) CUFLASH_CPU_LAMBDA_INLINE {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        V row_unit[W];
        load_unit(row + d + u * W * L, row_unit);
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g)
#pragma GCC unroll 2
          for (int w = 0; w < W; ++w) sums[g][u * W + w] += row_unit[w] * weights[g][t];
      }
    };
    int t = 0;
    for (; t + 1 < n; t += 2) {
      add_row(sums_t_even, rows[t], t);
      add_row(sums_t_odd, rows[t + 1], t + 1);
    }
    if (t < n) add_row(sums_t_even, rows[t], t);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        V* even = &sums_t_even[g][u * W];
        const V* odd = &sums_t_odd[g][u * W];
        if constexpr (W == 2)
          store_pair<S>(y[g] + d + u * W * L, even[0] + odd[0], even[1] + odd[1]);
        else
          store<S>(y[g] + d + u * W * L, even[0] + odd[0]);
      }
  };
  using One = std::integral_constant<int, 1>;
  using Width = std::integral_constant<int, kWidth>;
  for (; d + kUnits * kWidth * L <= D; d += kUnits * kWidth * L) chunk(std::integral_constant<int, kUnits>{}, Width{});
  if constexpr (kUnits > 1)
    for (; d + kWidth * L <= D; d += kWidth * L) chunk(One{}, Width{});
  if constexpr (kWidth == 2)
    if (d + L <= D) chunk(One{}, One{}), d += L;
  for (; d < D; ++d)
    for (int g = 0; g < G; ++g) {
      T a = y[g][d];
      for (int t = 0; t < n; ++t) a += weights[g][t] * value_of(rows[t][d]);
      y[g][d] = a;
    }
}

// Split-KV: a forward work item's share of its block's keys (split `index` of `count`: a range of
// the key tiles the block's rows see), and where its rows go: out and lse (one split), or this
// split's partial rows of (b, h) (split_rows: out normalized over the split's keys, [row][D], and
// lse theirs, [row]), which flash_fwd_cpu_combine merges.
template <typename T>
struct FwdSplit {
  int index, count;
  T *out, *lse;  // null: p.out, p.lse
  // The block's rows' keys within this split's tiles.
  BlockKeys keys_of(const BlockKeys& all, int rows) const {
    if (count == 1 || all.begin >= all.end) return all;
    const int64_t tiles = (all.end - all.begin + kKeys - 1) / kKeys;  // (64 bits: index x tiles may pass 2^31)
    const int lo = all.begin + static_cast<int>(index * tiles / count) * kKeys;
    const int hi = static_cast<int>(std::min<int64_t>(all.end, all.begin + (index + 1) * tiles / count * kKeys));
    BlockKeys mine(all.end);
    for (int r = 0; r < kBlockRows; ++r)
      mine.set(r, r < rows ? Range{std::max(all.lo[r], lo), std::min(all.hi[r], hi)} : Range{0, 0});
    return mine;
  }
  // Row i's output, value(d) for each head dim d, and its logsumexp.
  template <class F>
  void write(const KernelRows<T>& io, const Sequence& s, int b, int h, int i, T* lse, T lse_i, F value) const {
    if (!out) {
      io.store(s, b, h, i, value);
      lse[i] = lse_i;
      return;
    }
    const int D = io.p.shape.head_dim;
    for (int d = 0; d < D; ++d) out[int64_t{i} * D + d] = value(d);
    this->lse[i] = lse_i;
  }
};

// f(std::integral_constant<int, size>) for a size in [1, kRowGroup].
template <class F>
CUFLASH_CPU_INLINE void with_group_size(int size, F&& f) {
  switch (size) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, kRowGroup>{});
  }
}

// The block's rows (fewer than kLaneRows: decoding steps, whose rows would leave most of the
// block's lanes idle) a row at a time, each row's visible keys as the lanes: for each tile of the
// keys any row sees, each row's online softmax step over its keys in it, rows that see the same
// keys of the tile in groups of up to kRowGroup (each K and V vector read once a group), out and
// lse written last. K and V's rows of element type R, read as they are (16-bit ones widened in
// registers: a decoding step reads the whole cache once, and a converted copy of each row doubled
// the bytes moved; benchmarks/NOTES.md).
template <class S, class R, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void fwd_rows_of(const FlashFwdParams& p, const KernelRows<T>& io, const Sequence& s, int b, int h,
                                    int hk, int i0, int rows, const BlockKeys& keys, const RowRules<T>& rules,
                                    const FwdSplit<T>& split, CpuScratch<T>& w, T* lse) {
  constexpr int L = S::kLanes;
  const int D = p.shape.head_dim;
  const T inf = std::numeric_limits<T>::infinity();
  std::fill(w.acc.begin(), w.acc.end(), T(0));  // the rows' outputs, [row][D]
  T row_max[kLaneRows], row_sum[kLaneRows];
  bool q_finite[kLaneRows];
  for (int r = 0; r < rows; ++r) {
    row_max[r] = -inf, row_sum[r] = T(0), q_finite[r] = rules.score.mask.data && rows_finite<S>(&w.q_rows[r], 1, D);
    split_row_pairs<S>(w.q_rows[r], D, w.q_pairs.data() + static_cast<size_t>(r) * D);
  }
  T* scores = w.scores.data();
  const R *k_rows[kKeys], *v_rows[kKeys];
  for (int j0 = keys.begin; j0 < keys.end; j0 += kKeys) {
    const int count = std::min(kKeys, keys.end - j0);
    for (int jj = 0; jj < count; ++jj) {
      k_rows[jj] = key_row_at<const R>(p, p.k, p.k_strides, s, b, hk, j0 + jj);
      v_rows[jj] = key_row_at<const R>(p, p.v, p.v_strides, s, b, hk, j0 + jj);
    }
    // Row r's online softmax step over its n keys from lo in this tile, their scores in x.
    auto softmax_step = [&](int r, int lo, int n, T* x) CUFLASH_CPU_LAMBDA_INLINE {
      const int i = i0 + r;
      rules.scores(s, i, 1, j0 + lo, n, 1, x, nullptr);
      T tile_max = row_max[r];
      for (int t = 0; t < n; ++t) tile_max = x[t] > tile_max ? x[t] : tile_max;  // a NaN score is not one: the sum's
      const T base = tile_max == -inf ? T(0) : tile_max;
      const int padded = (n + L - 1) / L * L;  // the lanes past n: -inf, probability 0
      for (int t = n; t < padded; ++t) x[t] = -inf;
      T alpha[L];
      store<S>(alpha, softmax_exp<S>(broadcast<S>(row_max[r] - base)));
      for (int t = 0; t < padded; t += L) store<S>(x + t, softmax_exp<S>(load<S>(x + t) - base));
      T sum = T(0);
      for (int t = 0; t < n; ++t) sum += x[t];  // the dropped probabilities count too
      T* acc = w.acc.data() + static_cast<size_t>(r) * D;
      if (alpha[0] != T(1))
        for (int d = 0; d < D; ++d) acc[d] *= alpha[0];
      row_sum[r] = row_sum[r] * alpha[0] + sum;
      row_max[r] = tile_max;
      if (rules.dropout)
        for (int t = 0; t < n; ++t) x[t] *= rules.keep(b, h, p.shape.heads_q, i, j0 + lo + t);
    };
    // The rows that see this tile's keys, in groups of up to kRowGroup that see the same ones (a
    // decoding step's query heads of this key head): each key's K and V vectors read once a group.
    int group[kRowGroup], size = 0, group_lo = 0, group_n = 0;
    auto run_group = [&]() CUFLASH_CPU_LAMBDA_INLINE {
      const T* q[kRowGroup];
      T *x[kRowGroup], *acc[kRowGroup];
      for (int g = 0; g < size; ++g)
        q[g] = w.q_pairs.data() + static_cast<size_t>(group[g]) * D, x[g] = scores + g * kKeys,
        acc[g] = w.acc.data() + static_cast<size_t>(group[g]) * D;
      with_group_size(size, [&](auto kG) CUFLASH_CPU_LAMBDA_INLINE {
        dot_rows_grouped<S, kG()>(q, k_rows + group_lo, group_n, D, x);
      });
      for (int g = 0; g < size; ++g) softmax_step(group[g], group_lo, group_n, x[g]);
      with_group_size(size, [&](auto kG) CUFLASH_CPU_LAMBDA_INLINE {
        add_weighted_rows_grouped<S, kG()>(acc, D, group_n, x, v_rows + group_lo);
      });
      size = 0;
    };
    int kv_finite = -1;  // the tile's K and V rows finite (tile_adds_nothing's check, once a tile); -1: not asked
    for (int r = 0; r < rows; ++r) {
      const int i = i0 + r, lo = std::max(keys.lo[r], j0) - j0, n = std::min(keys.hi[r], j0 + count) - j0 - lo;
      if (n <= 0) continue;
      if (q_finite[r] && mask_hides<T>(rules.score.mask, i, 1, j0 + lo, n)) {
        if (kv_finite < 0) kv_finite = rows_finite<S>(k_rows, count, D) && rows_finite<S>(v_rows, count, D);
        if (kv_finite) continue;
      }
      if (size > 0 && (lo != group_lo || n != group_n || size == kRowGroup)) run_group();
      if (size == 0) group_lo = lo, group_n = n;
      group[size++] = r;
    }
    if (size > 0) run_group();
  }
  for (int r = 0; r < rows; ++r) {
    const bool seen = row_sum[r] != T(0);  // NaN scores give a NaN sum: it propagates
    const T inv = seen ? T(1) / row_sum[r] : T(0);
    const T* acc = w.acc.data() + static_cast<size_t>(r) * D;
    split.write(io, s, b, h, i0 + r, lse, seen ? row_max[r] + std::log(row_sum[r]) : -inf,
                [&](int d) { return acc[d] * inv; });
  }
}
template <class S, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void fwd_rows(const FlashFwdParams& p, const KernelRows<T>& io, const Sequence& s, int b, int h,
                                 int hk, int i0, int rows, const BlockKeys& keys, const RowRules<T>& rules,
                                 const FwdSplit<T>& split, CpuScratch<T>& w, T* lse) {
  if constexpr (std::is_same_v<T, float>)
    if (io.sixteen_bit)
      return io.bf16 ? fwd_rows_of<S, Bf16Bits>(p, io, s, b, h, hk, i0, rows, keys, rules, split, w, lse)
                     : fwd_rows_of<S, HalfBits>(p, io, s, b, h, hk, i0, rows, keys, rules, split, w, lse);
  fwd_rows_of<S, T>(p, io, s, b, h, hk, i0, rows, keys, rules, split, w, lse);
}

// The lanes' maximum of start and x[jj * kBlockRows] over jj < count, a NaN skipped (it reaches the
// sums): four maxima in flight. kScale: each x multiplied by scale in place first (the plain scores'
// one rule, as RowRules::scores applies it), in the same pass.
template <class S, bool kScale = false>
CUFLASH_CPU_INLINE typename S::V tile_maximum(typename S::Scalar* x, int count, const typename S::V& start,
                                              typename S::Scalar scale = 1) {
  using V = typename S::V;
  auto score = [&](int jj) CUFLASH_CPU_LAMBDA_INLINE {
    V y = load<S>(x + jj * kBlockRows);
    if constexpr (kScale) store<S>(x + jj * kBlockRows, y = y * scale);
    return y;
  };
  V m[4] = {start, start, start, start};
  int jj = 0;
  for (; jj + 4 <= count; jj += 4)
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {
      const V y = score(jj + a);
      m[a] = y > m[a] ? y : m[a];
    }
  for (; jj < count; ++jj) {
    const V y = score(jj);
    m[0] = y > m[0] ? y : m[0];
  }
  for (int a = 1; a < 4; ++a) m[0] = m[a] > m[0] ? m[a] : m[0];
  return m[0];
}

// Whether every lane of x is 1.
template <class S>
CUFLASH_CPU_INLINE bool all_ones(const typename S::V& x) {
  typename S::Scalar lanes[S::kLanes];
  store<S>(lanes, x);
  bool ones = true;
  for (int l = 0; l < S::kLanes; ++l) ones &= lanes[l] == typename S::Scalar(1);
  return ones;
}

#ifndef CUFLASH_CPU_WIDE_ISAS
struct AmxTiles {};  // (no AMX kernels: S::kAmx is false)
#endif
#ifdef CUFLASH_CPU_WIDE_ISAS
// A key tile's rows (the forward's V, the backward's K) with an Inf or NaN that some rows do not
// see (add_visible_lanes_times_rows' case): the tiles take it as 0 in t (pack_values_amx's), which
// is what those rows add (0 x a row, bitwise as without it), then add_non_finite_products adds its
// products over the rows that see it.
inline void zero_non_finite(uint16_t* t, int dims, int count, int D) {
  for (int d = 0; d < D; ++d)
    for (int jj = 0; jj < count; ++jj) {
      uint16_t& x = t[jj / kAmxKeys * kAmxKeys * dims + d * kAmxKeys + jj % kAmxKeys];
      if (!bf16_finite(x)) x = 0;
    }
}
// acc_t[d][r] += bfloat16(lanes[jj][r]) x rows[jj][d] for each Inf or NaN of rows[jj] (the lanes
// rounded as the tiles' products take them), r one of the block's rows that sees key j0 + jj.
inline void add_non_finite_products(float* acc_t, const uint16_t* const* rows, int count, int D, const float* lanes,
                                    const BlockKeys& keys, int block_rows, int j0) {
  for (int jj = 0; jj < count; ++jj)
    for (int d = 0; d < D; ++d)
      if (!bf16_finite(rows[jj][d]))
        for (int r = 0; r < block_rows; ++r)
          if (keys.sees(r, j0 + jj))
            acc_t[d * kBlockRows + r] +=
                bf16_to_float(float_to_bf16(lanes[jj * kBlockRows + r])) * bf16_to_float(rows[jj][d]);
}
#endif

// Where S takes AMX and the rows are bfloat16: the tiles configured for the caller's scope (tiles'
// lifetime); whether they are.
template <class S>
CUFLASH_CPU_INLINE bool configure_amx(bool bf16_rows, std::optional<AmxTiles>& tiles) {
  if constexpr (S::kAmx)
    if (bf16_rows) {
      tiles.emplace();
      return true;
    }
  return false;
}

// Query rows [block * kBlockRows, ...) of (b, h): the online softmax of the block's rows over
// the key tiles their visible keys fall in, the rows as lanes, O^T accumulated in w.acc.
template <class S, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void fwd_block_impl(const FlashFwdParams& p, int b, int h, int block, const FwdSplit<T>& split,
                                       CpuScratch<T>& w) {
  using V = typename S::V;
  constexpr int R = S::kRowVecs, L = S::kLanes;
  const AttentionShape& sh = p.shape;
  const int D = sh.head_dim, hk = h / (sh.heads_q / sh.heads_kv);
  const Sequence s = sequence_of(p, b);
  const int i0 = block * kBlockRows, rows = std::min(kBlockRows, s.seqlen_q - i0);
  if (rows <= 0) return;
  if constexpr (S::kAllRows)  // half the rows or fewer (a short sequence, a few query tokens): half the lanes
    if (rows <= kBlockRows / 2) return fwd_block_impl<typename S::HalfRows>(p, b, h, block, split, w);
  const T inf = std::numeric_limits<T>::infinity();
  const RowRules<T> rules(p, b, h);
  const KernelRows<T> io(p);
  BlockKeys visible(s.seqlen_k);
  for (int r = 0; r < kBlockRows; ++r) {
    visible.set(r, r < rows ? visible_keys(p.mask, s, i0 + r, i0 + r + 1) : Range{0, 0});
    if (r < rows) w.q_rows[r] = io.q(s, b, h, i0 + r, w.q16.data() + r * D);
  }
  const BlockKeys keys = split.keys_of(visible, rows);
  T* lse = static_cast<T*>(p.lse) + stats_offset(p.stats_strides, s, b, h);
  if (rows < kLaneRows) return fwd_rows<S>(p, io, s, b, h, hk, i0, rows, keys, rules, split, w, lse);
  // bfloat16 scores by pair dot products where the CPU has them: q's and the keys' rows as they are.
  bool dot_bf16 = false;
#ifdef CUFLASH_CPU_WIDE_ISAS
  if constexpr (S::kDotBf16) {
    dot_bf16 = io.sixteen_bit && io.bf16;
    if (dot_bf16) io.pack_bf16(p.q, p.q_strides, s, b, h, i0, rows, w.qt2.data());
  }
#endif
  if (!dot_bf16) pack_block(w.q_rows.data(), rows, D, w.qt.data());
  // S and P V on AMX's tiles: K and V^T packed for the whole head where they may be (AmxHeadTiles),
  // else a tile at a time; P rounded to bfloat16 (as the CUDA kernels').
  std::optional<AmxTiles> tiles;
  const bool amx = configure_amx<S>(dot_bf16, tiles);
  [[maybe_unused]] const int dims = amx_dims(D);
  [[maybe_unused]] const uint16_t *head_k = nullptr, *head_vt = nullptr;
#ifdef CUFLASH_CPU_WIDE_ISAS
  if constexpr (S::kAmx)
    if (amx && w.amx_whole_heads && AmxHeadTiles::fits(s.seqlen_k, D)) {
      w.amx_head.prepare(p, s, b, hk, true);
      if (w.amx_head.transposed_finite)
        head_k = w.amx_head.k.data(), head_vt = w.amx_head.transposed.data();
    }
#endif
  T* out_t = w.acc.data();  // O^T [D][kBlockRows]
  std::fill(w.acc.begin(), w.acc.end(), T(0));
  V row_max[R], row_sum[R];
  for (int v = 0; v < R; ++v) row_max[v] = broadcast<S>(-inf), row_sum[v] = V{};
  T* st = w.scores.data();
  const bool q_finite = rules.score.mask.data && rows_finite<S>(w.q_rows.data(), rows, D);
  // kAmxForwardKeys a tile past head dim 64 (at 64, forward 0.94x at 2,16,512,64 and 1.04x at 1,4,4096,64).
  const bool wide_tiles = amx && !rules.score.mask.data && D > 64;
  for (int j0 = keys.begin, count; j0 < keys.end; j0 += count) {
    const int wide = std::min(kAmxForwardKeys, keys.end - j0);
    const bool wide_seen = wide_tiles && wide > kKeys && keys.sees_all(rows, j0, wide);
    count = wide_seen ? wide : std::min(kKeys, keys.end - j0);
    // The head's V^T where the tile starts a chunk of it (pack_values_amx's; a window's tiles may
    // not), else the tile's.
    const bool head_values = head_vt && j0 % kAmxKeys == 0;
    for (int jj = 0; jj < count; ++jj) {
      if (dot_bf16 && !head_k) w.k_raw[jj] = key_row_at<const uint16_t>(p, p.k, p.k_strides, s, b, hk, j0 + jj);
      if (amx && !head_values) w.v_raw[jj] = key_row_at<const uint16_t>(p, p.v, p.v_strides, s, b, hk, j0 + jj);
      if (!dot_bf16 || rules.score.mask.data)  // (tile_adds_nothing's finiteness check reads them)
        w.k_rows[jj] = io.key(p.k, p.k_strides, s, b, hk, j0 + jj, w.k16.data() + jj * D);
      if (!amx || rules.score.mask.data)
        w.v_rows[jj] = io.key(p.v, p.v_strides, s, b, hk, j0 + jj, w.v16.data() + jj * D);
    }
    if (tile_adds_nothing<S>(rules.score.mask, i0, rows, j0, count, q_finite, w.k_rows.data(), w.v_rows.data(), D))
      continue;
#ifdef CUFLASH_CPU_WIDE_ISAS
    if constexpr (S::kAmx)
      if (amx) {
        if (!head_k) pack_keys_amx(w.k_raw.data(), count, D, dims, w.kt16.data());
        if (!head_values) pack_values_amx(w.v_raw.data(), count, D, dims, w.vt16.data());
        scores_amx<S::kRowVecs>(w.qt2.data(), head_k ? head_k + static_cast<size_t>(j0) * dims : w.kt16.data(), dims,
                                count, st);
      }
    if constexpr (S::kDotBf16)
      if (dot_bf16 && !amx) row_lanes_dot_bf16<S::kRowVecs>(w.qt2.data(), w.k_raw.data(), count, D, st);
#endif
    if (!dot_bf16) row_lanes_dot<S>(w.qt.data(), w.k_rows.data(), count, D, w.zeros.data(), st);
    const bool sees_all = wide_seen || keys.sees_all(rows, j0, count);
    const bool scale_with_max = rules.plain && sees_all;  // (else the scale comes before the hidden lanes' -inf)
    if (!scale_with_max) rules.scores(s, i0, rows, j0, count, kBlockRows, st, nullptr);
    if (!sees_all) hide_lanes(keys, j0, count, -inf, st);
    // The online softmax, a lane a row: the tile's maximum (a NaN score is not one: it reaches
    // the sum), O^T and the sums rescaled, the tile's probabilities in place of its scores. Where
    // the maximum did not move alpha is 1: exactly e^0, and for rows that have seen no key yet
    // (-inf; a partial block's lanes past its rows) their zeros need no rescale either. (The
    // maximum is the exponents' base, so that the largest probability is 1, exact in bfloat16: a
    // base moved only where a maximum passes it by more than ln 256 made the AMX forward 1.03-1.05x
    // faster but bfloat16's error against float64 13% larger rms, 30% at its largest.)
    for (int v = 0; v < R; ++v) {
      const V tile_max = scale_with_max ? tile_maximum<S, true>(st + v * L, count, row_max[v], rules.score.scale)
                                        : tile_maximum<S>(st + v * L, count, row_max[v]);
      const V base = tile_max == -inf ? V{} : tile_max;
      const V alpha = tile_max == row_max[v] ? broadcast<S>(T(1)) : softmax_exp<S>(row_max[v] - base);
      row_max[v] = tile_max;
      V sum{};  // (the softmax's denominator counts dropped probabilities too)
#ifdef CUFLASH_CPU_WIDE_ISAS
      if constexpr (S::kAmx) sum = (V)probs_amx(st + v * L, count, (__m512)base);
#endif
      if constexpr (!S::kAmx)
        for (int jj = 0; jj < count; ++jj) {
          const V prob = softmax_exp<S>(load<S>(st + jj * kBlockRows + v * L) - base);
          store<S>(st + jj * kBlockRows + v * L, prob);
          sum += prob;
        }
      row_sum[v] = row_sum[v] * alpha + sum;
      if (!all_ones<S>(alpha))  // (the rows' maxima moved: mostly in the first tiles)
        for (int d = 0; d < D; ++d)
          store<S>(out_t + d * kBlockRows + v * L, load<S>(out_t + d * kBlockRows + v * L) * alpha);
    }
    if (rules.dropout)  // after the sums: the dropped probabilities count there
      for (int r = 0; r < rows; ++r)
        for (int j = std::max(keys.lo[r], j0); j < std::min(keys.hi[r], j0 + count); ++j)
          st[(j - j0) * kBlockRows + r] *= rules.keep(b, h, sh.heads_q, i0 + r, j);
#ifdef CUFLASH_CPU_WIDE_ISAS
    if constexpr (S::kAmx)
      if (amx) {
        // The whole head's V^T (finite), or the tile's (zero_non_finite where some rows do not see
        // its Inf or NaN).
        const bool finite = head_k || sees_all || bf16_rows_finite(w.v_raw.data(), count, D);
        if (!finite) zero_non_finite(w.vt16.data(), dims, count, D);
        pack_probs_amx<S::kRowVecs>(st, count, w.pt2.data());
        add_pv_amx<S::kRowVecs>(out_t, dims, head_values ? head_vt + static_cast<size_t>(j0) * dims : w.vt16.data(),
                                w.pt2.data(), count);
        if (!finite) add_non_finite_products(out_t, w.v_raw.data(), count, D, st, keys, rows, j0);
        continue;
      }
#endif
    add_visible_lanes_times_rows<S>(out_t, D, count, st, w.v_rows.data(), keys, rows, j0, sees_all);
  }
  T maxes[kBlockRows], sums[kBlockRows];
  for (int v = 0; v < R; ++v) store<S>(maxes + v * L, row_max[v]), store<S>(sums + v * L, row_sum[v]);
  for (int r = 0; r < rows; ++r) {
    const bool seen = sums[r] != T(0);  // NaN scores give a NaN sum: it propagates
    const T inv = seen ? T(1) / sums[r] : T(0);
    split.write(io, s, b, h, i0 + r, lse, seen ? maxes[r] + std::log(sums[r]) : -inf,
                [&](int d) { return out_t[d * kBlockRows + r] * inv; });
  }
}

// Which units (query head of the group, block of rows) of a (batch, key head) a backward work item
// takes, and where its sums of dK and dV go: units index, index + count, ... (interleaved, so that
// under a causal mask the parts do alike work); part 0 (or the only one) into dk and dv, part
// c > 0 into its own buffers [seqlen_k][D] in flash_bwd_cpu's partials, which flash_bwd_cpu_finish
// adds in.
template <typename T>
struct BwdPart {
  int index, count;
  T *dk, *dv;  // null: p.dk, p.dv
};

// The backward of the units `part` takes of key head hk of batch b: for each, the tiles of the keys
// the block's rows see: P and dS a lane a row, then dV and dK of each key summed over the rows
// that see it (in place; dK scaled last where there is one part), dQ^T of the block over its keys.
template <class S, typename T = typename S::Scalar>
CUFLASH_CPU_INLINE void bwd_head_impl(const FlashBwdParams& p, int b, int hk, const BwdPart<T>& part,
                                      CpuScratch<T>& w) {
  constexpr int R = S::kRowVecs, L = S::kLanes;
  const AttentionShape& sh = p.shape;
  const int D = sh.head_dim, group = sh.heads_q / sh.heads_kv;
  const T scale = static_cast<T>(p.scale), inf = std::numeric_limits<T>::infinity();
  const Sequence s = sequence_of(p, b);
  const KernelRows<T, FlashBwdParams> io(p);  // (dq, dk and dv are T's even for 16-bit inputs)
  bool dot_bf16 = false;
  if constexpr (S::kDotBf16) dot_bf16 = io.sixteen_bit && io.bf16;
  // The scores on AMX's tiles where the forward's were (the same sums, so that P is exact), and
  // the other products there too (products_amx, below).
  std::optional<AmxTiles> tiles;
  [[maybe_unused]] const bool amx = configure_amx<S>(dot_bf16, tiles);
  // Its K rows packed once for its units (AmxHeadTiles), where they may be and it takes two or more
  // blocks of at least kLaneRows rows (fewer: those blocks' scores go a row at a time).
  [[maybe_unused]] bool whole_head = false;
#ifdef CUFLASH_CPU_WIDE_ISAS
  if constexpr (S::kAmx) {
    const int units = group * ((s.seqlen_q + kBlockRows - 1) / kBlockRows);
    if (amx && s.seqlen_q >= kLaneRows && (units - part.index + part.count - 1) / part.count >= 2 &&
        AmxHeadTiles::fits(s.seqlen_k, D)) {
      w.amx_head.prepare(p, s, b, hk, false);
      whole_head = true;
    }
  }
#endif
  // Its blocks of kLaneRows rows and more take every product on the tiles (products_amx, below): P
  // and dS rounded to bfloat16 for dV, dK and dQ, as in FlashAttention's GPU kernels; dK and dV
  // summed into the pair's buffers (w.dk_sums, w.dv_sums), kAmxPendingBlocks blocks at a time
  // (AmxPendingBlocks), added into dk and dv last; the sums and the pending blocks' P^T and dS^T at
  // most kAmxHeadBytes a thread (else the products stay in float: past ~52k keys at D=128).
  [[maybe_unused]] const int dims = amx_dims(D);
  const int64_t sums_rows = int64_t{s.seqlen_k} + kKeys;
  const int64_t amx_row_bytes = 2 * dims * int64_t{sizeof(T)} + 2 * kAmxPendingBlocks * kBlockRows * 2;
  const bool tiles_products = amx && sums_rows * amx_row_bytes <= kAmxHeadBytes;
  if (tiles_products) {
    w.reserve_amx_backward(D, sums_rows);
    w.dk_sums.assign(static_cast<size_t>(sums_rows) * dims, T(0));
    w.dv_sums.assign(w.dk_sums.size(), T(0));
  }
#ifdef CUFLASH_CPU_WIDE_ISAS
  AmxPendingBlocks pending{w.pending_lanes.data(), w.pending_pairs.data(), sums_rows, dims};
#endif
  // 16-bit inputs: the pair's K and V rows converted once into the thread's buffer (every block of
  // queries reads them all), the query-side rows a block at a time.
  if (io.sixteen_bit) {
    w.kv16.resize(static_cast<size_t>(2) * s.seqlen_k * D);
    for (int j = 0; j < s.seqlen_k; ++j) {
      io.key(p.k, p.k_strides, s, b, hk, j, w.kv16.data() + static_cast<size_t>(2 * j) * D);
      io.key(p.v, p.v_strides, s, b, hk, j, w.kv16.data() + static_cast<size_t>(2 * j + 1) * D);
    }
  }
  auto key_rows = [&](int j, int which) {
    return io.sixteen_bit ? w.kv16.data() + static_cast<size_t>(2 * j + which) * D
                          : key_row_at<const T>(p, which ? p.v : p.k, which ? p.v_strides : p.k_strides, s, b, hk, j);
  };
  auto dk_row = [&](int j) {
    return part.dk ? part.dk + int64_t{j} * D : row_at<T>(p.dk, p.dk_strides, s, false, b, hk, j);
  };
  auto dv_row = [&](int j) {
    return part.dv ? part.dv + int64_t{j} * D : row_at<T>(p.dv, p.dv_strides, s, false, b, hk, j);
  };
  for (int j = 0; j < s.seqlen_k; ++j) {
    std::fill_n(dk_row(j), D, T(0));
    std::fill_n(dv_row(j), D, T(0));
  }
  T* st = w.scores.data();
  T* dpt = w.dp.data();
  T* capped = w.capped.data();
  T* dq_t = w.acc.data();  // dQ^T of a block [D][kBlockRows]
  const int blocks = (s.seqlen_q + kBlockRows - 1) / kBlockRows;
  for (int unit = part.index; unit < group * blocks; unit += part.count) {
    const int h = hk * group + unit / blocks, i0 = unit % blocks * kBlockRows;
    const RowRules<T> rules(p, b, h);
    const int64_t stats = stats_offset(p.stats_strides, s, b, h);
    const T* lse = static_cast<const T*>(p.lse) + stats;
    const T* dlse = p.dlse ? static_cast<const T*>(p.dlse) + stats : nullptr;
    const int rows = std::min(kBlockRows, s.seqlen_q - i0);
    BlockKeys keys(s.seqlen_k);
    T row_lse[kBlockRows], row_delta[kBlockRows];
    [[maybe_unused]] const uint16_t *q_raw[kBlockRows], *do_raw[kBlockRows];  // (the AMX products')
    for (int r = 0; r < kBlockRows; ++r) {
      row_lse[r] = T(0);
      keys.set(r, Range{0, 0});
      if (r >= rows) continue;
      const int i = i0 + r;
      w.q_rows[r] = io.query_side(p.q, p.q_strides, s, b, h, i, w.q16.data() + r * D);
      w.do_rows[r] = io.query_side(p.dout, p.dout_strides, s, b, h, i, w.do16.data() + r * D);
      if (!dot_bf16) w.o_rows[r] = io.query_side(p.out, p.out_strides, s, b, h, i, w.o16.data() + r * D);
      // A row that saw no key (lse -inf) has output 0 and contributes nothing.
      if (lse[i] == -inf) continue;
      row_lse[r] = lse[i];
      keys.set(r, visible_keys(p.mask, s, i, i + 1));
    }
    std::fill(w.acc.begin(), w.acc.end(), T(0));
    if (keys.begin < keys.end) {
      // bfloat16's S and dP by pair dot products where the CPU has them (the forward's scores, in
      // the same order): Q's and dO's rows, and the keys' K and V rows, as they are.
#ifdef CUFLASH_CPU_WIDE_ISAS
      if constexpr (S::kDotBf16)
        if (dot_bf16) {
          io.pack_bf16(p.q, p.q_strides, s, b, h, i0, rows, w.qt2.data());
          io.pack_bf16(p.dout, p.dout_strides, s, b, h, i0, rows, w.dot2.data());
          bool delta_done = false;
          if constexpr (S::kAmx)
            if (tiles_products && rows >= kLaneRows) {
              const uint16_t* o_raw[kBlockRows];
              for (int r = 0; r < rows; ++r) {
                q_raw[r] = row_at<const uint16_t>(p.q, p.q_strides, s, true, b, h, i0 + r);
                do_raw[r] = row_at<const uint16_t>(p.dout, p.dout_strides, s, true, b, h, i0 + r);
                o_raw[r] = row_at<const uint16_t>(p.out, p.out_strides, s, true, b, h, i0 + r);
              }
              pack_row_pairs_amx(do_raw, rows, D, dims, pending.pairs(pending.count, 0));
              pack_row_pairs_amx(q_raw, rows, D, dims, pending.pairs(pending.count, 1));
              // delta = dO . O by the tiles' sums as dP's (O's rows as keys, the diagonal of dO O^T):
              // where a row sees one key, O is its V row and dS = P (dP - delta) exactly 0.
              pack_keys_amx(o_raw, rows, D, dims, w.kt16.data());
              scores_amx<R>(w.dot2.data(), w.kt16.data(), dims, rows, st);
              for (int r = 0; r < kBlockRows; ++r) row_delta[r] = r < rows ? st[r * kBlockRows + r] : T(0);
              delta_done = true;
            }
          if (!delta_done) {
            io.pack_bf16(p.out, p.out_strides, s, b, h, i0, rows, w.ot2.data());
            row_lanes_diagonal_bf16<R>(w.dot2.data(), w.ot2.data(), D, row_delta);  // delta = dO . O - dlse
          }
        }
#endif
      if (!dot_bf16) {
        pack_block(w.q_rows.data(), rows, D, w.qt.data());
        pack_block(w.do_rows.data(), rows, D, w.dot.data());
        pack_block(w.o_rows.data(), rows, D, w.ot.data());
        row_lanes_diagonal<S>(w.dot.data(), w.ot.data(), D, row_delta);  // delta = dO . O - dlse
      }
      if (dlse)
        for (int r = 0; r < rows; ++r) row_delta[r] -= dlse[i0 + r];
    }
    const bool q_finite = rows_finite<S>(w.q_rows.data(), rows, D);
    const bool do_finite = rows_finite<S>(w.do_rows.data(), rows, D);
    bool delta_finite = true;  // (dS = P (dP - delta): a NaN delta reaches even P = 0's pairs)
    for (int r = 0; r < rows; ++r) delta_finite = delta_finite && std::isfinite(row_delta[r]);
    if (rows < kLaneRows)  // the forward's row path's scores (dot_rows, below)
      for (int r = 0; r < rows; ++r)
        split_row_pairs<S>(w.q_rows[r], D, w.q_pairs.data() + static_cast<size_t>(r) * D);
    // The forward took a block of fewer than kLaneRows rows one at a time (fwd_rows), their scores
    // by dot_rows, whose head dims add up in another order: the same here, so that P comes from
    // the very scores lse summed (else, where scores are large, |s| ~ 1e4 and up, they differ by
    // ulps of |s|: P off by as much, and above 1). A forward that packed grouped heads as rows
    // (group_packing) had other blocks: for it the cap below bounds what is left.
    const bool rows_alone = rows < kLaneRows, products_amx = tiles_products && !rows_alone;
    [[maybe_unused]] int lanes_end = keys.begin;  // the keys whose P^T and dS^T wait (AmxPendingBlocks)
    for (int j0 = keys.begin; j0 < keys.end; j0 += kKeys) {
      const int count = std::min(kKeys, keys.end - j0);
      for (int jj = 0; jj < count; ++jj) {
        w.k_rows[jj] = key_rows(j0 + jj, 0);
        w.v_rows[jj] = key_rows(j0 + jj, 1);
        w.dk_rows[jj] = dk_row(j0 + jj);
        w.dv_rows[jj] = dv_row(j0 + jj);
      }
      if (tile_adds_nothing<S>(rules.score.mask, i0, rows, j0, count, q_finite && do_finite && delta_finite,
                               w.k_rows.data(), w.v_rows.data(), D)) {
#ifdef CUFLASH_CPU_WIDE_ISAS
        if (products_amx) lanes_end = pending.hide(j0, count);
#endif
        continue;
      }
#ifdef CUFLASH_CPU_WIDE_ISAS
      if constexpr (S::kDotBf16)
        if (dot_bf16) {
          for (int jj = 0; jj < count; ++jj) {
            w.k_raw[jj] = key_row_at<const uint16_t>(p, p.k, p.k_strides, s, b, hk, j0 + jj);
            w.v_raw[jj] = key_row_at<const uint16_t>(p, p.v, p.v_strides, s, b, hk, j0 + jj);
          }
          if constexpr (S::kAmx)
            if (products_amx) {  // S^T = K Q^T, dP^T = V dO^T
              const uint16_t *kt = w.kt16.data(), *vk = w.vk16.data();
              if (whole_head) {
                kt = w.amx_head.k.data() + static_cast<size_t>(j0) * dims;
                vk = w.amx_head.v.data() + static_cast<size_t>(j0) * dims;
              } else {
                pack_keys_amx(w.k_raw.data(), count, D, dims, w.kt16.data());
                pack_keys_amx(w.v_raw.data(), count, D, dims, w.vk16.data());
              }
              scores_amx<R>(w.qt2.data(), kt, dims, count, st);
              scores_amx<R>(w.dot2.data(), vk, dims, count, dpt);
            }
          if (!products_amx) {
            if (!rows_alone) row_lanes_dot_bf16<R>(w.qt2.data(), w.k_raw.data(), count, D, st);
            row_lanes_dot_bf16<R>(w.dot2.data(), w.v_raw.data(), count, D, dpt);
          }
        }
#endif
      if (!dot_bf16) {
        if (!rows_alone) row_lanes_dot<S>(w.qt.data(), w.k_rows.data(), count, D, w.zeros.data(), st);
        row_lanes_dot<S>(w.dot.data(), w.v_rows.data(), count, D, w.zeros.data(), dpt);
      }
      if (rows_alone) {
        for (int r = 0; r < rows; ++r) {
          T row_scores[kKeys];
          dot_rows<S>(w.q_pairs.data() + static_cast<size_t>(r) * D, w.k_rows.data(), count, D, row_scores);
          for (int jj = 0; jj < count; ++jj) st[jj * kBlockRows + r] = row_scores[jj];
        }
        for (int jj = 0; jj < count; ++jj) std::fill(st + jj * kBlockRows + rows, st + jj * kBlockRows + R * L, T(0));
      }
      // P^T from the scores and the rows' lse, in place of the scores; at most 1.
      rules.scores(s, i0, rows, j0, count, kBlockRows, st, capped);
      const typename S::V zero{};
      for (int jj = 0; jj < count; ++jj)
        for (int v = 0; v < R; ++v) {
          T* x = st + jj * kBlockRows + v * L;
          const typename S::V exponent = load<S>(x) - load<S>(row_lse + v * L);
          store<S>(x, softmax_exp<S>(exponent > zero ? zero : exponent));  // (NaN stays NaN)
        }
      const bool sees_all = keys.sees_all(rows, j0, count);
      if (!sees_all) hide_lanes(keys, j0, count, T(0), st);
      // dS^T = P (z dP - delta) in place of dP, where z = 0 or keep_scale with dropout (out = sum_j
      // P z v: dV takes P z, and the gradient reaching P is z (dO . v)); P z in place of P.
      if (!rules.dropout) {
        for (int jj = 0; jj < count; ++jj)
          for (int r = 0; r < kBlockRows; ++r)
            dpt[jj * kBlockRows + r] = st[jj * kBlockRows + r] * (dpt[jj * kBlockRows + r] - row_delta[r]);
      } else {
        for (int jj = 0; jj < count; ++jj)
          for (int r = 0; r < kBlockRows; ++r) {
            const int at = jj * kBlockRows + r;
            const T z = r < rows ? rules.keep(b, h, sh.heads_q, i0 + r, j0 + jj) : T(0);
            dpt[at] = st[at] * (z * dpt[at] - row_delta[r]);
            st[at] *= z;
          }
      }
      if (!sees_all) hide_lanes(keys, j0, count, T(0), dpt);  // 0 x a hidden key's NaN
      if (p.dscores)
        for (int r = 0; r < rows; ++r) {
          T* dscores = static_cast<T*>(p.dscores) + dscores_offset(sh, b, h, i0 + r);
          const int lo = std::max(keys.lo[r], j0), hi = std::min(keys.hi[r], j0 + count);
          for (int j = lo; j < hi; ++j) dscores[j] = dpt[(j - j0) * kBlockRows + r];
        }
      if (!rules.plain && rules.score.softcap > T(0))
        for (int i = 0; i < count * kBlockRows; ++i) dpt[i] *= T(1) - capped[i] * capped[i];
      // dV and dK of each key over the block's rows; dQ^T of the rows over the tile's keys.
#ifdef CUFLASH_CPU_WIDE_ISAS
      if constexpr (S::kAmx)
        if (products_amx) {
          // On the tiles, an Inf or NaN of Q, dO or K taken as 0 there (a hidden pair's P and dS are
          // 0, and 0 x NaN would reach keys or rows that do not see it), then its products added
          // over the pairs that see it: as add_visible_*, and bitwise what the other rows get
          // without it.
          float* dv_sums = w.dv_sums.data() + static_cast<size_t>(j0) * dims;
          float* dk_sums = w.dk_sums.data() + static_cast<size_t>(j0) * dims;
          pack_lanes_amx(st, count, rows, pending.block_lanes(0, j0));
          pack_lanes_amx(dpt, count, rows, pending.block_lanes(1, j0));
          lanes_end = j0 + amx_padded(count, kAmxKeys);
          // K^T: the pair's where all its K is finite (a tile reads its keys past count too) and the
          // tile starts a chunk of it (pack_values_amx's), else the tile's.
          const bool head_finite = whole_head && w.amx_head.transposed_finite;
          const bool head_kt = head_finite && j0 % kAmxKeys == 0;
          const bool k_finite = head_finite || bf16_rows_finite(w.k_raw.data(), count, D);
          if (!head_kt) pack_values_amx(w.k_raw.data(), count, D, dims, w.vt16.data());
          if (!k_finite) zero_non_finite(w.vt16.data(), dims, count, D);
          pack_probs_amx<R>(dpt, count, w.pt2.data());
          add_pv_amx<R>(dq_t, dims, head_kt ? w.amx_head.transposed.data() + static_cast<size_t>(j0) * dims
                                          : w.vt16.data(), w.pt2.data(), count);
          // The non-finite elements' products, over the pairs that see them.
          auto rows_seen = [&](const uint16_t* const* raw, const T* lanes, float* sums) {
            for (int r = 0; r < rows; ++r)
              for (int d = 0; d < D; ++d)
                if (!bf16_finite(raw[r][d]))
                  for (int j = std::max(keys.lo[r], j0); j < std::min(keys.hi[r], j0 + count); ++j)
                    sums[(j - j0) * dims + d] += lanes[(j - j0) * kBlockRows + r] * bf16_to_float(raw[r][d]);
          };
          if (!do_finite) rows_seen(do_raw, st, dv_sums);
          if (!q_finite) rows_seen(q_raw, dpt, dk_sums);
          if (!k_finite) add_non_finite_products(dq_t, w.k_raw.data(), count, D, dpt, keys, rows, j0);
        }
#endif
      if (!products_amx) {
        add_visible_rows_times_lanes<S>(w.dv_rows.data(), D, count, st, rows, w.do_rows.data(), do_finite, keys, j0,
                                        sees_all);
        add_visible_rows_times_lanes<S>(w.dk_rows.data(), D, count, dpt, rows, w.q_rows.data(), q_finite, keys, j0,
                                        sees_all);
        add_visible_lanes_times_rows<S>(dq_t, D, count, dpt, w.k_rows.data(), keys, rows, j0, sees_all);
      }
    }
#ifdef CUFLASH_CPU_WIDE_ISAS
    if constexpr (S::kAmx)
      if (lanes_end > keys.begin) pending.add(keys.begin, lanes_end, w.dv_sums.data(), w.dk_sums.data());
#endif
    for (int r = 0; r < rows; ++r) {
      T* dq = row_at<T>(p.dq, p.dq_strides, s, true, b, h, i0 + r);
      for (int d = 0; d < D; ++d) dq[d] = dq_t[d * kBlockRows + r] * scale;
    }
  }
#ifdef CUFLASH_CPU_WIDE_ISAS
  if constexpr (S::kAmx) pending.add_to(w.dv_sums.data(), w.dk_sums.data());
#endif
  if (tiles_products)
    for (int j = 0; j < s.seqlen_k; ++j) {
      T *dk = dk_row(j), *dv = dv_row(j);
      const size_t at = static_cast<size_t>(j) * dims;
      for (int d = 0; d < D; ++d) dk[d] += w.dk_sums[at + d], dv[d] += w.dv_sums[at + d];
    }
  if (part.count > 1) return;  // flash_bwd_cpu_finish scales the sum
  for (int j = 0; j < s.seqlen_k; ++j) {
    T* dk = dk_row(j);
    for (int d = 0; d < D; ++d) dk[d] *= scale;
  }
}

// The entry points, one a vector width, and the widest the CPU has (and CUFLASH_CPU_ISA allows).
// Each width is an instantiation of its own under its target attribute: the vector types are
// the target's registers, and nothing compiled for a wider target runs on a CPU without it.
#ifdef CUFLASH_CPU_WIDE_ISAS
template <typename T>
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void fwd_block_avx512bf16(const FlashFwdParams& p, int b, int h,
                                                                               int block, const FwdSplit<T>& split,
                                                                               CpuScratch<T>& w) {
  fwd_block_impl<Simd<T, 64, kBlockRows, true>>(p, b, h, block, split, w);
}
template <typename T>
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void fwd_block_amx(const FlashFwdParams& p, int b, int h,
                                                                        int block, const FwdSplit<T>& split,
                                                                        CpuScratch<T>& w) {
  fwd_block_impl<Simd<T, 64, kBlockRows, true, true>>(p, b, h, block, split, w);
}
template <typename T>
__attribute__((target("arch=x86-64-v4"))) void fwd_block_avx512(const FlashFwdParams& p, int b, int h, int block,
                                                                const FwdSplit<T>& split, CpuScratch<T>& w) {
  fwd_block_impl<Simd<T, 64>>(p, b, h, block, split, w);
}
template <typename T>
__attribute__((target("arch=x86-64-v3"))) void fwd_block_avx2(const FlashFwdParams& p, int b, int h, int block,
                                                              const FwdSplit<T>& split, CpuScratch<T>& w) {
  fwd_block_impl<Simd<T, 32>>(p, b, h, block, split, w);
}
template <typename T>
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void bwd_head_avx512bf16(const FlashBwdParams& p, int b, int hk,
                                                                              const BwdPart<T>& part,
                                                                              CpuScratch<T>& w) {
  bwd_head_impl<Simd<T, 64, kBlockRows, true>>(p, b, hk, part, w);
}
template <typename T>
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void bwd_head_amx(const FlashBwdParams& p, int b, int hk,
                                                                       const BwdPart<T>& part, CpuScratch<T>& w) {
  bwd_head_impl<Simd<T, 64, kBlockRows, true, true>>(p, b, hk, part, w);
}
template <typename T>
__attribute__((target("arch=x86-64-v4"))) void bwd_head_avx512(const FlashBwdParams& p, int b, int hk,
                                                               const BwdPart<T>& part, CpuScratch<T>& w) {
  bwd_head_impl<Simd<T, 64>>(p, b, hk, part, w);
}
template <typename T>
__attribute__((target("arch=x86-64-v3"))) void bwd_head_avx2(const FlashBwdParams& p, int b, int hk,
                                                             const BwdPart<T>& part, CpuScratch<T>& w) {
  bwd_head_impl<Simd<T, 32>>(p, b, hk, part, w);
}
#endif

CpuIsa cpu_isa() {
#ifdef CUFLASH_CPU_WIDE_ISAS
  static const CpuIsa best = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("x86-64-v4"))
      return __builtin_cpu_supports("x86-64-v3") ? CpuIsa::kAvx2 : CpuIsa::kBase;
    if (!__builtin_cpu_supports("avx512bf16")) return CpuIsa::kAvx512;
    return amx_in_cpu() ? CpuIsa::kAmxBf16 : CpuIsa::kAvx512Bf16;  // (the OS's grant: amx_permitted)
  }();
  return std::min(best, cpu_isa_switch());
#else
  return CpuIsa::kBase;
#endif
}

template <typename T>
void fwd_block(CpuIsa isa, const FlashFwdParams& p, int b, int h, int block, const FwdSplit<T>& split,
               CpuScratch<T>& w) {
#ifdef CUFLASH_CPU_WIDE_ISAS
  // The pair dot products are bfloat16 scores' (T = float): others' blocks as AVX-512's.
  if constexpr (std::is_same_v<T, float>)
    if (isa >= CpuIsa::kAvx512Bf16 && p.dtype == DType::kBFloat16)
      return isa == CpuIsa::kAmxBf16 && amx_permitted() ? fwd_block_amx(p, b, h, block, split, w)
                                                        : fwd_block_avx512bf16(p, b, h, block, split, w);
  if (isa >= CpuIsa::kAvx512) return fwd_block_avx512<T>(p, b, h, block, split, w);
  if (isa == CpuIsa::kAvx2) return fwd_block_avx2<T>(p, b, h, block, split, w);
#endif
  (void)isa;
  fwd_block_impl<Simd<T, 16>>(p, b, h, block, split, w);
}
template <typename T>
void bwd_head(CpuIsa isa, const FlashBwdParams& p, int b, int hk, const BwdPart<T>& part, CpuScratch<T>& w) {
#ifdef CUFLASH_CPU_WIDE_ISAS
  if constexpr (std::is_same_v<T, float>)
    if (isa >= CpuIsa::kAvx512Bf16 && p.dtype == DType::kBFloat16)
      return isa == CpuIsa::kAmxBf16 && amx_permitted() ? bwd_head_amx(p, b, hk, part, w)
                                                        : bwd_head_avx512bf16(p, b, hk, part, w);
  if (isa >= CpuIsa::kAvx512) return bwd_head_avx512<T>(p, b, hk, part, w);
  if (isa == CpuIsa::kAvx2) return bwd_head_avx2<T>(p, b, hk, part, w);
#endif
  (void)isa;
  bwd_head_impl<Simd<T, 16>>(p, b, hk, part, w);
}

int fwd_query_blocks(const FlashFwdParams& p) { return (p.shape.seqlen_q + kBlockRows - 1) / kBlockRows; }

// `count` items of alike work, each cut in parts of alike work, go to `threads` threads in rounds:
// the fewest parts (at most `most`) that leave at most a tenth of the threads' time idle.
int fewest_even_parts(int64_t count, int threads, int64_t most) {
  int64_t parts = 1;
  for (; parts < most; ++parts) {
    const int64_t items = count * parts, rounds = (items + threads - 1) / threads;
    if (rounds * threads * 10 <= items * 11) break;
  }
  return static_cast<int>(parts);
}

// The query rows of one split's partial results: every (batch, query head)'s seqlen_q, or packed
// sequences' rows as they lie (heads x total_q, as CUDA's split-KV buffers).
int64_t split_rows_count(const FlashFwdParams& p) {
  const AttentionShape& sh = p.shape;
  return p.varlen.cu_seqlens_q ? int64_t{sh.heads_q} * p.varlen.total_q : int64_t{sh.batch} * sh.heads_q * sh.seqlen_q;
}

// Split c's partial rows of (b, h) within flash_fwd_cpu's partials: the outputs [rows][D] of
// every split (split_rows_count rows each), then the logsumexps [rows].
template <typename T>
FwdSplit<T> split_rows(const FlashFwdParams& p, int splits, T* partials, int b, int h, int c) {
  if (splits == 1) return FwdSplit<T>{0, 1, nullptr, nullptr};
  const AttentionShape& sh = p.shape;
  const int64_t rows = split_rows_count(p);
  const int64_t first = p.varlen.cu_seqlens_q ? int64_t{h} * p.varlen.total_q + sequence_of(p, b).q_row0
                                              : (int64_t{b} * sh.heads_q + h) * sh.seqlen_q;
  const int64_t at = c * rows + first;
  return FwdSplit<T>{c, splits, partials + at * sh.head_dim, partials + splits * rows * sh.head_dim + at};
}

// Part c > 0 of pair bhk's dK (0) or dV (1) sums: [seqlen_k][D] within flash_bwd_cpu's partials.
template <typename T>
T* partial_sums(const FlashBwdParams& p, int parts, T* partials, int64_t bhk, int c, int which) {
  return partials + ((bhk * (parts - 1) + c - 1) * 2 + which) * p.shape.seqlen_k * p.shape.head_dim;
}

}  // namespace

double flash_fwd_cpu_block_cost(int rows) {
  if (rows < kLaneRows) return 0.37 + 0.63 * rows;  // 1 row 0.12 ms, 2 rows 0.19, 4 rows 0.35
  return rows <= kBlockRows / 2 ? 4.1 : 6.0;        // 8-16 rows 0.47-0.51 ms; 32 rows 0.72
}

int flash_fwd_cpu_split_count(int64_t blocks, int64_t key_tiles, int threads, int64_t requested) {
  if (requested > 0) return static_cast<int>(std::clamp<int64_t>(requested, 1, std::max<int64_t>(key_tiles, 1)));
  return fewest_even_parts(blocks, threads, std::min<int64_t>(threads, key_tiles / kMinSplitTiles));
}

int flash_fwd_cpu_splits(const FlashFwdParams& p, int threads, int64_t requested) {
  const AttentionShape& sh = p.shape;
  const int64_t blocks = int64_t{sh.batch} * sh.heads_q * fwd_query_blocks(p);
  const int splits = flash_fwd_cpu_split_count(blocks, (sh.seqlen_k + kKeys - 1) / kKeys, threads, requested);
  const int64_t split_bytes = split_rows_count(p) * (sh.head_dim + 1) * int64_t{sizeof(double)};
  return static_cast<int>(
      std::min<int64_t>(splits, std::max<int64_t>(1, kMaxPartialBytes / std::max<int64_t>(split_bytes, 1))));
}

int64_t flash_fwd_cpu_partial_elems(const FlashFwdParams& p, int splits) {
  if (splits == 1) return 0;
  return int64_t{splits} * split_rows_count(p) * (p.shape.head_dim + 1);
}

int64_t flash_fwd_cpu_items(const FlashFwdParams& p, int splits) {
  return int64_t{p.shape.batch} * p.shape.heads_q * fwd_query_blocks(p) * splits;
}

template <typename T>
void flash_fwd_cpu(const FlashFwdParams& p, int splits, T* partials, int64_t item_begin, int64_t item_end) {
  CpuScratch<T> w(p.shape.head_dim);
  const CpuIsa isa = cpu_isa();
  const int blocks = fwd_query_blocks(p);
  const int group = p.shape.heads_q / p.shape.heads_kv;
  // The (batch, key head) of an item: the AMX forward packs its whole K and V once where this
  // thread takes two or more of its blocks (one split: a split would pack the others' keys too).
  auto key_head_of = [&](int64_t item) { return item / splits / blocks / group; };
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t bhk = key_head_of(item);
    w.amx_whole_heads = splits == 1 && ((item > item_begin && key_head_of(item - 1) == bhk) ||
                                        (item + 1 < item_end && key_head_of(item + 1) == bhk));
    const int64_t block_item = item / splits, bh = block_item / blocks;
    // A head's blocks in the order 0, last, 1, last - 1, ...: the threads take contiguous ranges of
    // items, and under a causal mask a block's work grows with its index.
    const int slot = static_cast<int>(block_item % blocks), block = slot % 2 ? blocks - 1 - slot / 2 : slot / 2;
    const int b = static_cast<int>(bh / p.shape.heads_q), h = static_cast<int>(bh % p.shape.heads_q);
    fwd_block(isa, p, b, h, block, split_rows(p, splits, partials, b, h, static_cast<int>(item % splits)), w);
  }
}

int64_t flash_fwd_cpu_combine_items(const FlashFwdParams& p) { return flash_fwd_cpu_items(p, 1); }

template <typename T>
void flash_fwd_cpu_combine(const FlashFwdParams& p, int splits, T* partials, int64_t item_begin, int64_t item_end) {
  const AttentionShape& sh = p.shape;
  const int D = sh.head_dim, blocks = fwd_query_blocks(p);
  const T inf = std::numeric_limits<T>::infinity();
  const KernelRows<T> io(p);
  std::vector<T> weights(splits);
  std::vector<FwdSplit<T>> parts(splits);
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t bh = item / blocks;
    const int b = static_cast<int>(bh / sh.heads_q), h = static_cast<int>(bh % sh.heads_q);
    const Sequence s = sequence_of(p, b);
    T* lse = static_cast<T*>(p.lse) + stats_offset(p.stats_strides, s, b, h);
    for (int c = 0; c < splits; ++c) parts[c] = split_rows(p, splits, partials, b, h, c);
    const int i0 = static_cast<int>(item % blocks) * kBlockRows;
    for (int i = i0; i < std::min(i0 + kBlockRows, s.seqlen_q); ++i) {
      // lse = log sum_c exp(lse_c), out = sum_c exp(lse_c - lse) out_c; a NaN lse_c is no maximum and
      // reaches both (as a NaN score does unsplit); no key in any split: out 0, lse -inf.
      T top = -inf;
      bool seen = false;
      for (int c = 0; c < splits; ++c) {
        const T x = parts[c].lse[i];
        top = x > top ? x : top;
        seen = seen || x != -inf;
      }
      const T base = top == -inf ? T(0) : top;
      T sum = T(0);
      for (int c = 0; c < splits; ++c) sum += weights[c] = std::exp(parts[c].lse[i] - base);
      const T inv = seen ? T(1) / sum : T(0);
      io.store(s, b, h, i, [&](int d) {
        T x = T(0);
        for (int c = 0; c < splits; ++c) x += weights[c] * parts[c].out[int64_t{i} * D + d];
        return x * inv;
      });
      lse[i] = seen ? base + std::log(sum) : -inf;
    }
  }
}

int flash_bwd_cpu_parts(const FlashBwdParams& p, int threads) {
  const AttentionShape& sh = p.shape;
  const int64_t pairs = int64_t{sh.batch} * sh.heads_kv;
  const int64_t units = int64_t{sh.heads_q / sh.heads_kv} * ((sh.seqlen_q + kBlockRows - 1) / kBlockRows);
  const int64_t part_bytes = pairs * 2 * sh.seqlen_k * sh.head_dim * int64_t{sizeof(double)};
  return fewest_even_parts(
      pairs, threads, std::min({int64_t{threads}, units, 1 + kMaxPartialBytes / std::max<int64_t>(part_bytes, 1)}));
}

int64_t flash_bwd_cpu_items(const FlashBwdParams& p, int parts) {
  return int64_t{p.shape.batch} * p.shape.heads_kv * parts;
}

int64_t flash_bwd_cpu_partial_elems(const FlashBwdParams& p, int parts) {
  return int64_t{p.shape.batch} * p.shape.heads_kv * (parts - 1) * 2 * p.shape.seqlen_k * p.shape.head_dim;
}

template <typename T>
void flash_bwd_cpu(const FlashBwdParams& p, int parts, T* partials, int64_t item_begin, int64_t item_end) {
  CpuScratch<T> w(p.shape.head_dim);
  const CpuIsa isa = cpu_isa();
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t bhk = item / parts;
    const int c = static_cast<int>(item % parts);
    const BwdPart<T> part{c, parts, c ? partial_sums(p, parts, partials, bhk, c, 0) : nullptr,
                          c ? partial_sums(p, parts, partials, bhk, c, 1) : nullptr};
    bwd_head(isa, p, static_cast<int>(bhk / p.shape.heads_kv), static_cast<int>(bhk % p.shape.heads_kv), part, w);
  }
}

int64_t flash_bwd_cpu_finish_items(const FlashBwdParams& p) {
  return int64_t{p.shape.batch} * p.shape.heads_kv * ((p.shape.seqlen_k + kKeys - 1) / kKeys);
}

template <typename T>
void flash_bwd_cpu_finish(const FlashBwdParams& p, int parts, const T* partials, int64_t item_begin, int64_t item_end) {
  const AttentionShape& sh = p.shape;
  const int D = sh.head_dim, tiles = (sh.seqlen_k + kKeys - 1) / kKeys;
  const T scale = static_cast<T>(p.scale);
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t bhk = item / tiles;
    const int b = static_cast<int>(bhk / sh.heads_kv), hk = static_cast<int>(bhk % sh.heads_kv);
    const Sequence s = sequence_of(p, b);
    const int j0 = static_cast<int>(item % tiles) * kKeys;
    for (int j = j0; j < std::min(j0 + kKeys, s.seqlen_k); ++j) {
      T* dk = row_at<T>(p.dk, p.dk_strides, s, false, b, hk, j);
      T* dv = row_at<T>(p.dv, p.dv_strides, s, false, b, hk, j);
      for (int c = 1; c < parts; ++c) {
        const T* dk_c = partial_sums(p, parts, partials, bhk, c, 0) + int64_t{j} * D;
        const T* dv_c = partial_sums(p, parts, partials, bhk, c, 1) + int64_t{j} * D;
        for (int d = 0; d < D; ++d) dk[d] += dk_c[d], dv[d] += dv_c[d];
      }
      for (int d = 0; d < D; ++d) dk[d] *= scale;
    }
  }
}

void dropout_keep_mask_cpu(const DropoutParams& d, int batch, int heads, int seqlen_q, int seqlen_k, bool* keep) {
  const DropoutRng rng = make_dropout_rng(d);
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < seqlen_q; ++i)
        for (int j = 0; j < seqlen_k; ++j) *keep++ = rng.keep(b, h, heads, i, j);
}

template void flash_fwd_cpu<float>(const FlashFwdParams&, int, float*, int64_t, int64_t);
template void flash_fwd_cpu<double>(const FlashFwdParams&, int, double*, int64_t, int64_t);
template void flash_fwd_cpu_combine<float>(const FlashFwdParams&, int, float*, int64_t, int64_t);
template void flash_fwd_cpu_combine<double>(const FlashFwdParams&, int, double*, int64_t, int64_t);
template void flash_bwd_cpu<float>(const FlashBwdParams&, int, float*, int64_t, int64_t);
template void flash_bwd_cpu<double>(const FlashBwdParams&, int, double*, int64_t, int64_t);
template void flash_bwd_cpu_finish<float>(const FlashBwdParams&, int, const float*, int64_t, int64_t);
template void flash_bwd_cpu_finish<double>(const FlashBwdParams&, int, const double*, int64_t, int64_t);

}  // namespace cuflash
