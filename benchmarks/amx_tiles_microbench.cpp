// The AMX tile unit's costs on this CPU, for the CPU forward's products (csrc/cpu/flash_cpu.cpp's
// scores_amx and add_pv_amx shapes at head dim 128, data in L1): TDPBF16PS alone, TILELOADD alone,
// then one 64-key tile's S^T = K Q^T (2 calls of 2 x 2 C tiles, 4 steps) and its O^T += V^T P^T
// (4 calls, C loaded and stored around 2 steps). benchmarks/NOTES.md, sixty-first session. Then the
// same over a 2048-key head (K and V^T in L2, as the whole-head packing's): S^T for one block, or two
// blocks a key tile; P V from V^T rows ld = keys + 32 apart (AmxHeadTiles' layout), or in 32-key
// chunks [128 dims][32 keys] (sixty-second session).
//   g++ -O2 -mamx-tile -mamx-bf16 -mavx512f -o /tmp/amx_tiles benchmarks/amx_tiles_microbench.cpp && /tmp/amx_tiles
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};
double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
__attribute__((noinline)) void products_alone(long iters) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
  for (long it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
}
__attribute__((noinline)) void loads_alone(const uint16_t* a, const uint32_t* b, long iters) {
  for (long it = 0; it < iters; ++it) {
    _tile_loadd(4, a, 256);
    _tile_loadd(5, a + 2048, 256);
    _tile_loadd(6, b, 128);
    _tile_loadd(7, b + 16, 128);
  }
}
// The kernel's one step: C (tiles 0-3) += A's two 16-row groups (tiles 4, 5) times B's two
// 16-lane halves (tiles 6, 7).
inline void step_2x2(const uint16_t* a0, const uint16_t* a1, int a_bytes, const uint32_t* b, int b_bytes) {
  _tile_loadd(4, a0, a_bytes);
  _tile_loadd(5, a1, a_bytes);
  _tile_loadd(6, b, b_bytes);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(2, 5, 6);
  _tile_loadd(7, b + 16, b_bytes);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(3, 5, 7);
}
// C's tiles 0-3 stored: group g's two halves at c_g and c_g + 16 (rows 128 bytes apart).
inline void store_2x2(float* c0, float* c1) {
  _tile_stored(0, c0, 128);
  _tile_stored(1, c0 + 16, 128);
  _tile_stored(2, c1, 128);
  _tile_stored(3, c1 + 16, 128);
}
// a: K [64 keys][128 dims]; b: Q^T in dim pairs [64][32 rows]; st [64 keys][32 rows].
__attribute__((noinline)) void scores_tile(const uint16_t* a, const uint32_t* b, float* st, long iters) {
  for (long it = 0; it < iters; ++it)
    for (int key = 0; key < 64; key += 32) {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int step = 0; step < 4; ++step)
        step_2x2(a + key * 128 + step * 32, a + (key + 16) * 128 + step * 32, 256, b + step * 16 * 32, 128);
      store_2x2(st + key * 32, st + (key + 16) * 32);
    }
}
// vt: V^T [128 dims][64 keys]; p: P in key pairs [32][32 rows]; o: O^T [128 dims][32 rows].
__attribute__((noinline)) void pv_tile(const uint16_t* vt, const uint32_t* p, float* o, long iters) {
  for (long it = 0; it < iters; ++it)
    for (int d = 0; d < 128; d += 32) {
      _tile_loadd(0, o + d * 32, 128); _tile_loadd(1, o + d * 32 + 16, 128);
      _tile_loadd(2, o + (d + 16) * 32, 128); _tile_loadd(3, o + (d + 16) * 32 + 16, 128);
      for (int step = 0; step < 2; ++step)
        step_2x2(vt + d * 64 + step * 32, vt + (d + 16) * 64 + step * 32, 128, p + step * 16 * 32, 128);
      store_2x2(o + d * 32, o + (d + 16) * 32);
    }
}
constexpr int kHeadKeys = 2048, kHeadLd = kHeadKeys + 32;
// S^T of blocks (1 or 2, Q^T at q[block]) over the head's K [keys][128], a 64-key tile at a time.
__attribute__((noinline)) void scores_head(const uint16_t* k, const uint32_t* const* q, int blocks, float* st) {
  for (int j0 = 0; j0 < kHeadKeys; j0 += 64)
    for (int block = 0; block < blocks; ++block)
      for (int key = j0; key < j0 + 64; key += 32) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int step = 0; step < 4; ++step)
          step_2x2(k + key * 128 + step * 32, k + (key + 16) * 128 + step * 32, 256, q[block] + step * 16 * 32, 128);
        store_2x2(st + (key - j0) * 32, st + (key - j0 + 16) * 32);
      }
}
// O^T += V^T P^T over the head's 64-key tiles: V^T's (dim, key) at vt + dim * kHeadLd + key, or
// (chunked) at vt + key / 32 * 128 * 32 + dim * 32 + key % 32.
__attribute__((noinline)) void pv_head(const uint16_t* vt, bool chunked, const uint32_t* p, float* o) {
  for (int j0 = 0; j0 < kHeadKeys; j0 += 64)
    for (int d = 0; d < 128; d += 32) {
      _tile_loadd(0, o + d * 32, 128); _tile_loadd(1, o + d * 32 + 16, 128);
      _tile_loadd(2, o + (d + 16) * 32, 128); _tile_loadd(3, o + (d + 16) * 32 + 16, 128);
      for (int step = 0; step < 2; ++step) {
        const int key = j0 + step * 32;
        if (chunked)
          step_2x2(vt + key * 128 + d * 32, vt + key * 128 + (d + 16) * 32, 64, p + step * 16 * 32, 128);
        else
          step_2x2(vt + d * kHeadLd + key, vt + (d + 16) * kHeadLd + key, kHeadLd * 2, p + step * 16 * 32, 128);
      }
      store_2x2(o + d * 32, o + (d + 16) * 32);
    }
}
}  // namespace

int main() {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) {
    std::puts("Linux did not grant the AMX tile state");
    return 1;
  }
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
  std::vector<uint16_t> a(64 * 128, 0x3f80);
  std::vector<uint32_t> b(64 * 32);
  std::vector<float> st(64 * 32), o(128 * 32);
  const long n = 500000;
  double t0 = seconds();
  products_alone(4 * n);
  printf("TDPBF16PS alone: %.2f ns each\n", (seconds() - t0) / (16.0 * n) * 1e9);
  t0 = seconds();
  loads_alone(a.data(), b.data(), 4 * n);
  printf("TILELOADD alone (1 KB, L1): %.2f ns each\n", (seconds() - t0) / (16.0 * n) * 1e9);
  t0 = seconds();
  scores_tile(a.data(), b.data(), st.data(), n);
  printf("S^T of a 64-key tile (32 TDPBF16PS): %.0f ns\n", (seconds() - t0) / n * 1e9);
  t0 = seconds();
  pv_tile(a.data(), b.data(), o.data(), n);
  printf("O^T += V^T P^T of a 64-key tile (32 TDPBF16PS): %.0f ns\n", (seconds() - t0) / n * 1e9);
  std::vector<uint16_t> head(kHeadLd * 128, 0x3f80);
  std::vector<uint32_t> b2(b.size());
  const uint32_t* q[2] = {b.data(), b2.data()};
  const int reps = 2000, tiles = kHeadKeys / 64;
  for (int blocks = 1; blocks <= 2; ++blocks) {
    t0 = seconds();
    for (int r = 0; r < reps; ++r) scores_head(head.data(), q, blocks, st.data());
    printf("S^T over a %d-key head, %d block(s) a tile: %.0f ns a block's 64-key tile\n", kHeadKeys, blocks,
           (seconds() - t0) / reps / tiles / blocks * 1e9);
  }
  for (int chunked = 0; chunked <= 1; ++chunked) {
    t0 = seconds();
    for (int r = 0; r < reps; ++r) pv_head(head.data(), chunked, b.data(), o.data());
    printf("O^T += V^T P^T over a %d-key head, V^T %s: %.0f ns a 64-key tile\n", kHeadKeys,
           chunked ? "in 32-key chunks" : "rows keys + 32 apart", (seconds() - t0) / reps / tiles * 1e9);
  }
}
