// The run-time switches: environment variables read at every call, so that tests and benchmarks
// compare kernels within one process. Plain C++: the kernel launchers read them, and both API
// layers (torch_ops.cpp, api/flash_attention.cpp) refuse a value that names nothing.
//
//   CUFLASH_SM90    which Hopper kernels run (sm_90a builds on a compute capability 9.0 GPU):
//     unset or ""   the default parts,
//                   "tma,bwd,bwdws,features,persistent,kvcache,varlen,bwdvarlen,bwdfeatures,masktma,
//                   bwdmasktma,persistentfeatures,persistentwindow"
//     "0"           none: the sm_80-class kernels
//     a comma list  exactly the parts named; the cp.async Hopper forward runs plain attention
//                   wherever "tma" is not named or TMA cannot address the input:
//       cpasync     no other part
//       tma         the warp-specialized TMA forward, plain attention (flash_fwd_sm90_tma.cuh)
//       bwd         the wgmma backward, plain attention (flash_bwd_sm90.cuh)
//       persistent  with tma: the persistent TMA forward (one CTA per SM walking tiles) for
//                   plain attention on short rows (the middle query row sees fewer than 2048
//                   keys), and without a mask on longer ones up to the wide tile's length
//                   (at any length under CUFLASH_FWD_TILE=narrow; sm90::persistent_rows), head
//                   dims up to 128
//       bwdws       with bwd: the warp-specialized TMA dQ and dK/dV kernels
//                   (flash_bwd_sm90_tma.cuh) where TMA can address the inputs; with dQ by
//                   atomics the fused one (dQ added by TMA reduce; head dim 256's own,
//                   flash_bwd_sm90_fused256.cuh)
//       features    softcap, ALiBi, attn_mask and dropout in the Hopper forwards (the TMA one
//                   where "tma" is listed too); without it those take the sm_80-class forward
//       persistentfeatures  with tma, features and persistent: softcap, ALiBi and
//                   dropout (an attn_mask keeps its staged kernel) on the persistent TMA forward
//                   at head dims up to 128 (at 64 on the wide tile too, without a mask), on rows
//                   plain attention walks persistently (sm90::features_persistent_rows), where
//                   otherwise the one-tile-a-CTA grid runs them (H100: the features' forward
//                   0.96-1.22x the grid's, D=64 and 128, 512-8192 keys)
//       persistentwindow  with tma and persistent: long rows under a window bounded
//                   on both sides (sm90::banded: tiles of about one length, as without a mask)
//                   on the persistent narrow TMA forward at head dim 128 below the wide tile's
//                   length (and with persistentfeatures the features' at 64 and 128), where
//                   otherwise the one-tile-a-CTA grid runs them (H100: 1.00-1.07x the grid's,
//                   D=128, 8192 and 16384 keys)
//       kvcache     with tma: the TMA forward for KV caches too, seqused_k (the rows past a
//                   sequence's keys zeroed in shared memory) and paged ones (the narrow tiles:
//                   a key block within a page), where otherwise the cp.async forward runs
//       splits      with tma, not a default: split-KV without the features on the plain narrow
//                   TMA kernel, where otherwise the sm_80-class one runs (H200, one token at
//                   batch 1: 9% faster over 16384 keys, slower up to 4096; benchmarks/NOTES.md)
//       masktma     with tma and features: the TMA forward's attn_mask tiles staged in shared
//                   memory by the producer's TMA loads (beside K's), where otherwise the
//                   consumers read them from global memory; a mask whose keys are contiguous
//                   and whose rows and base TMA can address (sm90::encode_mask_map), on the
//                   features kernels whose shared memory has room (FwdSm90TmaKernel::
//                   kMayStageMask; H100: the masked forward 1.62-2.24x the global reads)
//       bwdmasktma  with bwdfeatures: the fused TMA backward's attn_mask tiles staged in shared
//                   memory by its TMA thread with each step's Q and dO, where otherwise its
//                   consumers read them from global memory; as masktma's masks, on 64-query
//                   steps at head dims 33-64 and 97-128 (BwdDkvSm90TmaKernel::kMayStageMask;
//                   H100: the masked forward + backward 1.06-1.69x the global reads)
//       varlen      with tma: packed sequences (cu_seqlens) without the features on the
//                   plain narrow TMA kernels (persistent with "persistent" where a dense batch
//                   of the longest sequence would be), where otherwise the cp.async forward runs
//       bwdvarlen   with bwdws: packed sequences on the warp-specialized TMA backward at head
//                   dims 33-64 and 97-128 (the dQ and dK/dV kernels and the fused one) and on the
//                   fused one at 225-256 (flash_bwd_sm90_fused256.cuh), where otherwise the
//                   cp.async one runs (H200: 1.17-1.87x it, 0.95-1.01x dense; H100 at 256,
//                   forward + backward: 1.27-1.54x, 0.93-0.97x dense)
//       bwdfeatures with bwdws and features: softcap, ALiBi, attn_mask (without its gradient)
//                   and dropout on the fused warp-specialized backward (dQ by TMA reduce,
//                   either order) at head dims 33-64, 97-128 and 225-256, where otherwise the
//                   sm_80-class backward runs (H100: forward + backward 1.82-3.31x the
//                   sm_80-class backward's, benchmarks/NOTES.md)
//   CUFLASH_BWD_DQ  unset or "": dQ by its own kernel, unless the fused Hopper kernel is faster
//                   (prefers_fused_backward), with atomics where the op's deterministic=False;
//                   "atomic": added by the dK/dV kernel with fp32 atomics wherever it can be (not
//                   with the attn_mask gradient); "ordered": added by the fused Hopper kernel in a
//                   fixed order (reproducible) wherever that runs (fused_backward_runs), whatever
//                   deterministic says; "separate": its own kernel everywhere (tests and benchmarks)
//   CUFLASH_BWD_KV_SPLITS  the torch op's fused Hopper backward's copies of each K/V head, each
//                   with a share of its query heads (fused_backward_kv_splits in
//                   backward_choice.cu; each copy's dK and dV rounded to the input dtype, then
//                   summed in float32): unset, "" or "auto": the rule (GQA under a causal mask,
//                   doubled while a walk has fewer than four tiles an SM; measured in the
//                   fifty-ninth session, benchmarks/NOTES.md); "1": none; "2", "4" or "8": the
//                   largest power of two up to it that divides the group (tests and
//                   benchmarks). The C API validates it and splits nothing
//   CUFLASH_FWD_TILE  the TMA forward's tile for plain attention: unset or "", the wide one on
//                   long rows (sm90::wide_rows in flash_fwd_sm90_tma.cuh) and in the persistent
//                   kernel at head dim 64 without a mask past 128 query rows
//                   (sm90::persistent_wide_pays);
//                   "wide" or "narrow": that one at every length (tests and benchmarks; at
//                   head dim 128 without a mask, "narrow" on the persistent kernel, which
//                   compares it with the wide tile on long rows);
//                   and the features kernel's at head dims 64 and 128 (unset: at 64 wide for
//                   dense batches past 128 query rows of 1024 keys without dropout,
//                   sm90::features_wide_pays; at 128 narrow)
//   CUFLASH_BWD_TILE  the warp-specialized dK/dV kernel's streamed queries a step at head dim 64
//                   (flash_bwd_sm90_tma.cuh): unset, "" or "wide": 128; "narrow": 64 (tests and
//                   benchmarks)
//   CUFLASH_BWD_FUSED_TILE  the fused warp-specialized backward's (dQ by TMA reduce)
//                   streamed queries a step at head dim 64: unset or "",
//                   128 on long columns (fused_wide_steps_pay in flash_launch.cuh), else 64;
//                   "wide" or "narrow": 128 or 64 at every length (tests and benchmarks)
//   CUFLASH_FP32    float32 on CUDA: unset, "" or "wgmma": the sm_80-class tensor-core kernels on
//                   the inputs split into scaled fp16 pairs (fp32_pairs.h: three fp16 products
//                   for 3xTF32's six TF32 ones; scratch of the inputs' size) where they run
//                   (fp32_pair_scratch_bytes), but on Hopper the forward of plain attention at head
//                   dims 33-64 on TF32 wgmmas in 3xTF32 (sm90/flash_fwd_sm90_fp32.cuh;
//                   fp32_wgmma_forward_runs; 1.11-1.28x the pairs' speed there), and elsewhere
//                   the tensor-core kernels with each product split into three TF32 ones
//                   (mma_sm80.cuh) where their shared memory fits the device (H100: the pairs
//                   1.21-1.53x their forward at head dim 128, 1.17-1.52x their backward);
//                   "3xtf32": those mma.sync kernels everywhere they fit (no scratch);
//                   "pairs": the pairs wherever they run, the Hopper forward's too; "exact": the
//                   CUDA-core kernels (flash_simt_kernel.cuh)
//   CUFLASH_DEBUG   "1": one line on stderr per kernel launch, naming the kernel (so a fallback
//                   to the sm_80-class kernels is visible), its grid and shared memory; unset,
//                   "" or "0": quiet
//   CUFLASH_PACK_GQA  the forward's grouped query heads as rows of their KV head (torch_ops.cpp's
//                   group_packing; each KV head read once): unset or "", on CUDA where a
//                   head's queries would leave its query tiles mostly empty (decoding steps of
//                   a few tokens), on the CPU where they fill less than a 32-row block (and,
//                   without split-KV, where the packed blocks' rounds over the threads cost no
//                   more); "1": always; "0": never (tests and benchmarks)
//   CUFLASH_CPU_ISA the CPU kernels' vector instructions (cpu/flash_cpu.cpp, x86-64 GCC builds):
//                   unset or "", the widest the CPU has; "amxbf16" (AMX tiles for the bfloat16
//                   forward's S and P V), "avx512bf16" (AVX-512 with bfloat16 pair dot products
//                   for bfloat16 scores), "avx512", "avx2" or "base" (SSE2): at most that one
//                   (tests run each on one machine; benchmarks)
#pragma once
#include <cstdlib>
#include <cstring>
#include <string>

namespace cuflash {

struct Sm90Switch {
  bool on = true, tma = true, bwd = true, features = true, persistent = true, bwd_ws = true;
  bool tma_kv_cache = true;
  bool tma_splits = false;  // not a default part: faster than the sm_80-class split kernel on long caches only
  bool persistent_features = true;
  bool persistent_window = true;
  bool tma_mask = true;
  bool bwd_tma_mask = true;
  bool tma_varlen = true;
  bool bwd_varlen = true;
  bool bwd_features = true;
};

// value (null: unset) -> *out; false if value names something else.
inline bool parse_sm90_switch(const char* value, Sm90Switch* out) {
  Sm90Switch s;
  if (value != nullptr && *value != '\0') {
    s.tma = s.bwd = s.features = s.persistent = s.bwd_ws = s.tma_kv_cache = s.tma_varlen = s.bwd_varlen =
        s.bwd_features = s.tma_mask = s.bwd_tma_mask = s.persistent_features = s.persistent_window = false;
    if (std::strcmp(value, "0") == 0) {
      s.on = false;
    } else {
      for (const char* at = value;;) {
        const char* end = std::strchr(at, ',');
        const size_t n = end ? static_cast<size_t>(end - at) : std::strlen(at);
        auto is = [&](const char* name) { return std::strlen(name) == n && std::strncmp(at, name, n) == 0; };
        if (is("tma")) s.tma = true;
        else if (is("bwd")) s.bwd = true;
        else if (is("features")) s.features = true;
        else if (is("persistent")) s.persistent = true;
        else if (is("bwdws")) s.bwd_ws = true;
        else if (is("kvcache")) s.tma_kv_cache = true;
        else if (is("splits")) s.tma_splits = true;
        else if (is("persistentfeatures")) s.persistent_features = true;
        else if (is("persistentwindow")) s.persistent_window = true;
        else if (is("masktma")) s.tma_mask = true;
        else if (is("bwdmasktma")) s.bwd_tma_mask = true;
        else if (is("varlen")) s.tma_varlen = true;
        else if (is("bwdvarlen")) s.bwd_varlen = true;
        else if (is("bwdfeatures")) s.bwd_features = true;
        else if (!is("cpasync")) return false;
        if (!end) break;
        at = end + 1;
      }
    }
  }
  *out = s;
  return true;
}

inline Sm90Switch sm90_switch() {
  Sm90Switch s;
  if (!parse_sm90_switch(std::getenv("CUFLASH_SM90"), &s)) s.on = false;  // the API layers refused it
  return s;
}

// Whether environment variable name is set to exactly value.
inline bool env_is(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::strcmp(set, value) == 0;
}

enum class DqSwitch { kAuto, kAtomic, kOrdered, kSeparate };
inline DqSwitch dq_switch() {
  return env_is("CUFLASH_BWD_DQ", "atomic")     ? DqSwitch::kAtomic
         : env_is("CUFLASH_BWD_DQ", "ordered")  ? DqSwitch::kOrdered
         : env_is("CUFLASH_BWD_DQ", "separate") ? DqSwitch::kSeparate
                                                : DqSwitch::kAuto;
}
// CUFLASH_BWD_KV_SPLITS's count: 0 (the rule's) where unset, empty or "auto".
inline int bwd_kv_splits_switch() {
  const char* set = std::getenv("CUFLASH_BWD_KV_SPLITS");
  if (set == nullptr || *set == '\0' || std::strcmp(set, "auto") == 0) return 0;
  return std::atoi(set);
}
inline bool fp32_exact_switch() { return env_is("CUFLASH_FP32", "exact"); }
inline bool fp32_mma_sync_switch() { return env_is("CUFLASH_FP32", "3xtf32"); }
inline bool fp32_pairs_switch() { return env_is("CUFLASH_FP32", "pairs"); }
// The tile switches: "wide" or "narrow" pick that tile at every shape; unset or "" leave it to
// `pays`, the shape's choice.
inline bool wide_tile_switch(const char* name, bool pays) {
  return env_is(name, "wide") || (!env_is(name, "narrow") && pays);
}
inline bool fwd_wide_tile(bool pays) { return wide_tile_switch("CUFLASH_FWD_TILE", pays); }
inline bool bwd_wide_steps(bool pays) { return wide_tile_switch("CUFLASH_BWD_TILE", pays); }
inline bool bwd_fused_wide_steps(bool pays) { return wide_tile_switch("CUFLASH_BWD_FUSED_TILE", pays); }
inline bool debug_switch() { return env_is("CUFLASH_DEBUG", "1"); }
enum class PackGqaSwitch { kDefault, kAlways, kNever };
inline PackGqaSwitch pack_gqa_switch() {
  return env_is("CUFLASH_PACK_GQA", "1") ? PackGqaSwitch::kAlways
         : env_is("CUFLASH_PACK_GQA", "0") ? PackGqaSwitch::kNever
                                           : PackGqaSwitch::kDefault;
}

enum class CpuIsa { kBase, kAvx2, kAvx512, kAvx512Bf16, kAmxBf16 };  // in order: each has the ones before it
inline CpuIsa cpu_isa_switch() {
  return env_is("CUFLASH_CPU_ISA", "base")         ? CpuIsa::kBase
         : env_is("CUFLASH_CPU_ISA", "avx2")       ? CpuIsa::kAvx2
         : env_is("CUFLASH_CPU_ISA", "avx512")     ? CpuIsa::kAvx512
         : env_is("CUFLASH_CPU_ISA", "avx512bf16") ? CpuIsa::kAvx512Bf16
                                                   : CpuIsa::kAmxBf16;
}

// The message for a switch set to something it does not name, or "" if all are valid.
inline std::string run_switch_error() {
  Sm90Switch unused;
  const char* sm90 = std::getenv("CUFLASH_SM90");
  if (!parse_sm90_switch(sm90, &unused))
    return std::string("environment variable CUFLASH_SM90 must be unset, empty, \"0\" or a comma list of cpasync, "
                       "tma, bwd, bwdws, features, persistent, persistentfeatures, persistentwindow, kvcache, "
                       "splits, masktma, bwdmasktma, varlen, bwdvarlen and bwdfeatures, got \"") + sm90 + "\"";
  // The one-value switches: unset, empty or one of the values listed (as the message spells them).
  struct OneOf {
    const char *name, *values[5], *spelled;  // values: unused ones null
  };
  for (const OneOf& v : {OneOf{"CUFLASH_BWD_DQ", {"atomic", "ordered", "separate"},
                               "unset, empty, \"atomic\", \"ordered\" or \"separate\""},
                         OneOf{"CUFLASH_BWD_KV_SPLITS", {"auto", "1", "2", "4", "8"},
                               "unset, empty, \"auto\", \"1\", \"2\", \"4\" or \"8\""},
                         OneOf{"CUFLASH_FWD_TILE", {"wide", "narrow"}, "unset, empty, \"wide\" or \"narrow\""},
                         OneOf{"CUFLASH_BWD_TILE", {"wide", "narrow"}, "unset, empty, \"wide\" or \"narrow\""},
                         OneOf{"CUFLASH_BWD_FUSED_TILE", {"wide", "narrow"}, "unset, empty, \"wide\" or \"narrow\""},
                         OneOf{"CUFLASH_FP32", {"exact", "3xtf32", "wgmma", "pairs"},
                               "unset, empty, \"exact\", \"3xtf32\", \"wgmma\" or \"pairs\""},
                         OneOf{"CUFLASH_DEBUG", {"0", "1"}, "unset, empty, \"0\" or \"1\""},
                         OneOf{"CUFLASH_PACK_GQA", {"0", "1"}, "unset, empty, \"0\" or \"1\""},
                         OneOf{"CUFLASH_CPU_ISA", {"amxbf16", "avx512bf16", "avx512", "avx2", "base"},
                               "unset, empty, \"amxbf16\", \"avx512bf16\", \"avx512\", \"avx2\" or \"base\""}}) {
    const char* set = std::getenv(v.name);
    if (set == nullptr || *set == '\0') continue;
    bool named = false;
    for (const char* value : v.values) named = named || (value != nullptr && std::strcmp(set, value) == 0);
    if (!named)
      return std::string("environment variable ") + v.name + " must be " + v.spelled + ", got \"" + set + "\"";
  }
  return "";
}

}  // namespace cuflash
