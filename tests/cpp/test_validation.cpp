// Argument checks and error strings of the C++ API. They run before any CUDA call, so these tests
// pass on a machine without a GPU (the few that need one skip there). Pointers are real device
// memory when a GPU is present and otherwise distinct, aligned fake addresses that the checks
// never dereference.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "../../csrc/cuda/run_switches.h"
#include "cuflash/flash_attention.h"
#include "test_utils.h"

namespace cuflash_test {
namespace {

using cuflash::AttentionConfig;
using cuflash::FlashAttentionBackwardArgs;
using cuflash::FlashAttentionForwardArgs;
using cuflash::Strides;
using E = FlashAttentionError;

constexpr E kAllErrors[] = {E::SUCCESS,         E::INVALID_DIMENSION, E::NULL_POINTER,    E::UNSUPPORTED_HEAD_DIM,
                            E::UNSUPPORTED_DTYPE, E::INVALID_ALIGNMENT, E::INVALID_LAYOUT, E::INVALID_ARGUMENT,
                            E::CUDA_ERROR};

// Memory for the tensors of one small problem: device buffers with a GPU, fake addresses without.
class Memory {
 public:
  static constexpr size_t kBytes = 1 << 20;  // per tensor: more than any accepted problem below needs
  Memory() : device_(cuda_device_available()) {}
  void* next() {
    if (device_) {
      buffers_.emplace_back(kBytes);
      return buffers_.back().get();
    }
    return reinterpret_cast<void*>(uintptr_t{0x10000000} + kBytes * fakes_++);
  }
  bool device() const { return device_; }

 private:
  bool device_;
  std::vector<DeviceBuffer> buffers_;
  size_t fakes_ = 0;
};

// What a call that passes every check returns: SUCCESS with a GPU; without one, CUDA_ERROR from
// the first CUDA call.
void expect_accepted(E err, const Memory& mem) {
  EXPECT_EQ(err, mem.device() ? E::SUCCESS : E::CUDA_ERROR) << cuflash::get_last_error_message();
  if (mem.device()) {
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
}

// The call failed with `code` and a message that names `mention`.
void expect_error(E err, E code, const std::string& mention) {
  EXPECT_EQ(err, code) << "got " << cuflash::get_error_string(err) << ": " << cuflash::get_last_error_message();
  const std::string message = cuflash::get_last_error_message();
  EXPECT_NE(message.find(mention), std::string::npos) << "message \"" << message << "\" does not mention " << mention;
}

void set_config(AttentionConfig& c, DataType dtype) {
  c.dtype = dtype;
  c.batch_size = 2, c.num_heads_q = 4, c.num_heads_kv = 2;
  c.seqlen_q = 16, c.seqlen_k = 24, c.head_dim = 64;
  c.scale = 0.125f;
}

FlashAttentionForwardArgs forward_args(Memory& mem, DataType dtype) {
  FlashAttentionForwardArgs a;
  set_config(a, dtype);
  a.q = mem.next(), a.k = mem.next(), a.v = mem.next(), a.o = mem.next();
  a.lse = static_cast<float*>(mem.next());
  a.q_strides = a.o_strides = cuflash::bhsd_strides(a.num_heads_q, a.seqlen_q, a.head_dim);
  a.k_strides = a.v_strides = cuflash::bhsd_strides(a.num_heads_kv, a.seqlen_k, a.head_dim);
  return a;
}

FlashAttentionBackwardArgs backward_args(Memory& mem, DataType dtype) {
  FlashAttentionBackwardArgs a;
  set_config(a, dtype);
  a.q = mem.next(), a.k = mem.next(), a.v = mem.next(), a.o = mem.next(), a.d_o = mem.next();
  a.lse = static_cast<const float*>(mem.next());
  a.dq = mem.next(), a.dk = mem.next(), a.dv = mem.next();
  a.q_strides = a.o_strides = a.d_o_strides = a.dq_strides =
      cuflash::bhsd_strides(a.num_heads_q, a.seqlen_q, a.head_dim);
  a.k_strides = a.v_strides = a.dk_strides = a.dv_strides =
      cuflash::bhsd_strides(a.num_heads_kv, a.seqlen_k, a.head_dim);
  return a;
}

// The tensor pointers of each direction, by the names the messages use, with a way to edit each.
using PointerEdit = const void* (*)(const void*);
template <typename Args>
using PointerFields = std::vector<std::pair<std::string, std::function<void(Args&, PointerEdit)>>>;
#define CUFLASH_POINTER_FIELD(f) \
  {#f, [](auto& a, PointerEdit edit) { a.f = static_cast<decltype(a.f)>(const_cast<void*>(edit(a.f))); }}
const PointerFields<FlashAttentionForwardArgs> kForwardPointers = {
    CUFLASH_POINTER_FIELD(q), CUFLASH_POINTER_FIELD(k), CUFLASH_POINTER_FIELD(v), CUFLASH_POINTER_FIELD(o),
    CUFLASH_POINTER_FIELD(lse)};
const PointerFields<FlashAttentionBackwardArgs> kBackwardPointers = {
    CUFLASH_POINTER_FIELD(q),   CUFLASH_POINTER_FIELD(k),  CUFLASH_POINTER_FIELD(v),
    CUFLASH_POINTER_FIELD(o),   CUFLASH_POINTER_FIELD(lse), CUFLASH_POINTER_FIELD(d_o),
    CUFLASH_POINTER_FIELD(dq),  CUFLASH_POINTER_FIELD(dk), CUFLASH_POINTER_FIELD(dv)};
#undef CUFLASH_POINTER_FIELD

// The strides of each tensor, and whether the call writes it.
template <typename Args>
struct StridesField {
  const char* name;
  Strides Args::*strides;
  bool output;
};
const StridesField<FlashAttentionForwardArgs> kForwardStrides[] = {
    {"q", &FlashAttentionForwardArgs::q_strides, false}, {"k", &FlashAttentionForwardArgs::k_strides, false},
    {"v", &FlashAttentionForwardArgs::v_strides, false}, {"o", &FlashAttentionForwardArgs::o_strides, true}};
const StridesField<FlashAttentionBackwardArgs> kBackwardStrides[] = {
    {"q", &FlashAttentionBackwardArgs::q_strides, false},     {"k", &FlashAttentionBackwardArgs::k_strides, false},
    {"v", &FlashAttentionBackwardArgs::v_strides, false},     {"o", &FlashAttentionBackwardArgs::o_strides, false},
    {"d_o", &FlashAttentionBackwardArgs::d_o_strides, false}, {"dq", &FlashAttentionBackwardArgs::dq_strides, true},
    {"dk", &FlashAttentionBackwardArgs::dk_strides, true},    {"dv", &FlashAttentionBackwardArgs::dv_strides, true}};
const std::pair<const char*, int64_t Strides::*> kStrideDims[] = {
    {"batch", &Strides::batch}, {"head", &Strides::head}, {"row", &Strides::row}};

// One call of for_each_stride: its result, and the stride it changed.
struct StrideCase {
  E err;
  std::string tensor, dim;
  bool output;
};

const void* to_null(const void*) { return nullptr; }
const void* off_by_two_bytes(const void* p) { return static_cast<const char*>(p) + 2; }

// ---- Error strings ----------------------------------------------------------------------------

TEST(ErrorStrings, DistinctForEveryCode) {
  std::set<std::string> seen;
  for (E e : kAllErrors) {
    const std::string s = cuflash::get_error_string(e);
    EXPECT_FALSE(s.empty());
    EXPECT_TRUE(seen.insert(s).second) << "duplicate string " << s;
  }
  EXPECT_STREQ(cuflash::get_error_string(E::SUCCESS), "success");
  EXPECT_STREQ(cuflash::get_error_string(static_cast<E>(1000)), "unknown error code");
}

TEST(ErrorStrings, LastMessageIsPerCall) {
  Memory mem;
  FlashAttentionForwardArgs a = forward_args(mem, DataType::FLOAT16);
  a.q = nullptr;
  expect_error(cuflash::flash_attention_forward(a), E::NULL_POINTER, "q must not be null");
  a = forward_args(mem, DataType::FLOAT16);
  a.batch_size = 0;  // empty: succeeds without touching CUDA
  EXPECT_EQ(cuflash::flash_attention_forward(a), E::SUCCESS);
  EXPECT_STREQ(cuflash::get_last_error_message(), "");
}

TEST(ErrorStrings, LastMessageIsPerThread) {
  Memory mem;
  FlashAttentionForwardArgs a = forward_args(mem, DataType::FLOAT16);
  a.v = nullptr;
  expect_error(cuflash::flash_attention_forward(a), E::NULL_POINTER, "v must not be null");
  std::string other_thread_message;
  std::thread([&] {
    FlashAttentionForwardArgs b = forward_args(mem, DataType::FLOAT16);
    b.head_dim = 0;
    cuflash::flash_attention_forward(b);
    other_thread_message = cuflash::get_last_error_message();
  }).join();
  EXPECT_NE(other_thread_message.find("head_dim must be >= 1"), std::string::npos) << other_thread_message;
  EXPECT_NE(std::string(cuflash::get_last_error_message()).find("v must not be null"), std::string::npos)
      << cuflash::get_last_error_message();
}

// ---- Checks shared by every dtype, forward and backward ---------------------------------------

class Validation : public ::testing::TestWithParam<DataType> {
 protected:
  Memory mem;
  FlashAttentionForwardArgs fwd = forward_args(mem, GetParam());
  FlashAttentionBackwardArgs bwd = backward_args(mem, GetParam());

  // Edits each pointer of each direction in turn; every call must fail with `code` and a message
  // holding mention(the pointer's name).
  void expect_each_pointer(PointerEdit edit, E code, const std::function<std::string(const std::string&)>& mention) {
    for (const auto& [name, set] : kForwardPointers) {
      SCOPED_TRACE("forward, " + name);
      FlashAttentionForwardArgs f = fwd;
      set(f, edit);
      expect_error(cuflash::flash_attention_forward(f), code, mention(name));
    }
    for (const auto& [name, set] : kBackwardPointers) {
      SCOPED_TRACE("backward, " + name);
      FlashAttentionBackwardArgs b = bwd;
      set(b, edit);
      expect_error(cuflash::flash_attention_backward(b), code, mention(name));
    }
  }

  // Edits each stride of each tensor of each direction in turn, and hands every call's result to `check`.
  void for_each_stride(const std::function<void(int64_t&)>& edit, const std::function<void(const StrideCase&)>& check) {
    for (const auto& [dim, member] : kStrideDims) {
      for (const auto& t : kForwardStrides) {
        SCOPED_TRACE(std::string("forward, ") + t.name + "'s " + dim + " stride");
        FlashAttentionForwardArgs f = fwd;
        edit((f.*t.strides).*member);
        check({cuflash::flash_attention_forward(f), t.name, dim, t.output});
      }
      for (const auto& t : kBackwardStrides) {
        SCOPED_TRACE(std::string("backward, ") + t.name + "'s " + dim + " stride");
        FlashAttentionBackwardArgs b = bwd;
        edit((b.*t.strides).*member);
        check({cuflash::flash_attention_backward(b), t.name, dim, t.output});
      }
    }
  }

  // Applies `change` to the config of both directions and expects both to fail with `code`.
  void expect_both(const std::function<void(AttentionConfig&)>& change, E code, const std::string& mention) {
    FlashAttentionForwardArgs f = fwd;
    FlashAttentionBackwardArgs b = bwd;
    change(f);
    change(b);
    SCOPED_TRACE("forward");
    expect_error(cuflash::flash_attention_forward(f), code, mention);
    SCOPED_TRACE("backward");
    expect_error(cuflash::flash_attention_backward(b), code, mention);
  }
};

TEST_P(Validation, ValidArgumentsAreAccepted) {
  expect_accepted(cuflash::flash_attention_forward(fwd), mem);
  expect_accepted(cuflash::flash_attention_backward(bwd), mem);
}

TEST_P(Validation, NullPointers) {
  expect_each_pointer(to_null, E::NULL_POINTER, [](const std::string& name) { return name + " must not be null"; });
}

TEST_P(Validation, MisalignedPointers) {  // 2 bytes off: misaligned for every element type
  const std::string alignment = GetParam() == DataType::FLOAT32 ? "4" : "16";
  expect_each_pointer(off_by_two_bytes, E::INVALID_ALIGNMENT, [&](const std::string& name) {
    return name + " must be " + (name == "lse" ? "4" : alignment) + "-byte aligned";
  });
}

TEST_P(Validation, NullIsAllowedForEmptyTensors) {
  FlashAttentionForwardArgs f = fwd;
  f.seqlen_k = 0, f.k = nullptr, f.v = nullptr;  // no keys: out 0, lse -inf
  expect_accepted(cuflash::flash_attention_forward(f), mem);
  FlashAttentionBackwardArgs b = bwd;
  b.seqlen_q = 0, b.q = b.o = b.d_o = nullptr, b.lse = nullptr, b.dq = nullptr;  // no queries: dk = dv = 0
  expect_accepted(cuflash::flash_attention_backward(b), mem);
  b = bwd;
  b.seqlen_k = 0, b.k = b.v = nullptr, b.dk = b.dv = nullptr;  // no keys: dq = 0
  expect_accepted(cuflash::flash_attention_backward(b), mem);
}

TEST_P(Validation, EmptyProblemsSucceedWithoutCuda) {
  for (auto change : {+[](AttentionConfig& c) { c.batch_size = 0; }, +[](AttentionConfig& c) {
                        c.num_heads_q = c.num_heads_kv = 0;
                      }}) {
    FlashAttentionForwardArgs f{};
    FlashAttentionBackwardArgs b{};
    set_config(f, GetParam());
    set_config(b, GetParam());
    change(f), change(b);
    EXPECT_EQ(cuflash::flash_attention_forward(f), E::SUCCESS) << cuflash::get_last_error_message();
    EXPECT_EQ(cuflash::flash_attention_backward(b), E::SUCCESS) << cuflash::get_last_error_message();
  }
  FlashAttentionForwardArgs f{};
  set_config(f, GetParam());
  f.seqlen_q = 0;
  f.k = f.v = mem.next();
  EXPECT_EQ(cuflash::flash_attention_forward(f), E::SUCCESS) << cuflash::get_last_error_message();
}

TEST_P(Validation, BadDimensions) {
  expect_both([](auto& c) { c.batch_size = -1; }, E::INVALID_DIMENSION, "batch_size must be >= 0");
  expect_both([](auto& c) { c.num_heads_q = -4; }, E::INVALID_DIMENSION, "num_heads_q must be >= 0");
  expect_both([](auto& c) { c.num_heads_kv = -2; }, E::INVALID_DIMENSION, "num_heads_kv must be >= 0");
  expect_both([](auto& c) { c.seqlen_q = -1; }, E::INVALID_DIMENSION, "seqlen_q must be >= 0");
  expect_both([](auto& c) { c.seqlen_k = -1; }, E::INVALID_DIMENSION, "seqlen_k must be >= 0");
  expect_both([](auto& c) { c.batch_size = 65536; }, E::INVALID_DIMENSION, "at most 65535");
  expect_both([](auto& c) { c.num_heads_q = 65536, c.num_heads_kv = 1; }, E::INVALID_DIMENSION, "at most 65535");
  expect_both([](auto& c) { c.num_heads_kv = 3; }, E::INVALID_DIMENSION, "multiple of num_heads_kv");
  expect_both([](auto& c) { c.num_heads_kv = 8; }, E::INVALID_DIMENSION,
              "num_heads_q (4) must be a multiple of num_heads_kv (8)");
  expect_both([](auto& c) { c.num_heads_kv = 0; }, E::INVALID_DIMENSION, "multiple of num_heads_kv");
  expect_both([](auto& c) { c.head_dim = 0; }, E::INVALID_DIMENSION, "head_dim must be >= 1");
  expect_both(
      [](auto& c) {
        c.batch_size = c.num_heads_q = c.num_heads_kv = 65535;
        c.seqlen_q = c.seqlen_k = std::numeric_limits<int>::max();
      },
      E::INVALID_DIMENSION, "2^62");
}

TEST_P(Validation, UnsupportedHeadDims) {
  expect_both([](auto& c) { c.head_dim = 257; }, E::UNSUPPORTED_HEAD_DIM, "at most 256");
  expect_both([](auto& c) { c.head_dim = 1 << 20; }, E::UNSUPPORTED_HEAD_DIM, "at most 256");
  if (GetParam() != DataType::FLOAT32)
    expect_both([](auto& c) { c.head_dim = 60; }, E::UNSUPPORTED_HEAD_DIM, "multiple of 8");
  // Every head dim either runs or is reported as not compiled in (CUFLASH_HEAD_DIMS builds).
  for (int d = 1; d <= 256; ++d) {
    if (cuflash::flash_attention_supports(GetParam(), d) || (GetParam() != DataType::FLOAT32 && d % 8 != 0)) continue;
    expect_both([d](auto& c) { c.head_dim = d; }, E::UNSUPPORTED_HEAD_DIM, "not compiled");
  }
}

TEST_P(Validation, BadScalarsAndWindows) {
  expect_both([](auto& c) { c.scale = std::nanf(""); }, E::INVALID_ARGUMENT, "scale must be finite");
  expect_both([](auto& c) { c.scale = INFINITY; }, E::INVALID_ARGUMENT, "scale must be finite");
  expect_both([](auto& c) { c.window_left = -2; }, E::INVALID_ARGUMENT, "window_left and window_right");
  expect_both([](auto& c) { c.window_right = -5; }, E::INVALID_ARGUMENT, "window_left and window_right");
}

// A paged KV cache and split-KV (the forward's): their arguments, and the pages as k's extent.
TEST_P(Validation, PagedCacheAndSplits) {
  FlashAttentionForwardArgs paged = fwd;
  const int table[2] = {0, 1};  // never read: every call below fails or runs without a GPU first
  paged.block_table = table, paged.block_table_stride = 1, paged.page_size = 256, paged.num_pages = 2;
  paged.k_strides = paged.v_strides = cuflash::bhsd_strides(paged.num_heads_kv, 256, paged.head_dim);
  auto expect = [&](const std::function<void(FlashAttentionForwardArgs&)>& change, const std::string& mention) {
    FlashAttentionForwardArgs f = paged;
    change(f);
    expect_error(cuflash::flash_attention_forward(f), E::INVALID_ARGUMENT, mention);
  };
  expect([](auto& f) { f.page_size = 100; }, "page_size must be a positive multiple of 256, got 100");
  expect([](auto& f) { f.page_size = 0; }, "page_size must be a positive multiple of 256");
  expect([](auto& f) { f.num_pages = 0; }, "num_pages must be > 0");
  expect([](auto& f) { f.block_table_stride = 0; }, "must hold seqlen_k (24) keys");
  expect([](auto& f) { f.seqlen_k = 300; }, "block_table_stride (1) pages of page_size (256) must hold seqlen_k");
  expect([](auto& f) { f.num_splits = -1; }, "num_splits must be >= 0");
  {  // k spans num_pages pages of page_size rows: a negative page stride is named as k's batch stride
    FlashAttentionForwardArgs f = paged;
    f.k_strides.batch = -1;
    expect_error(cuflash::flash_attention_forward(f), E::INVALID_LAYOUT, "k's batch stride must be >= 0");
  }
  {  // pages x page_size x heads x head_dim past int64 is not an empty k: a null k is named
    FlashAttentionForwardArgs f = paged;
    f.num_pages = f.page_size = 1 << 30, f.k = f.v = nullptr;
    expect_error(cuflash::flash_attention_forward(f), E::NULL_POINTER, "k must not be null");
  }
  for (const int offset : {1, 2}) {  // the int32 arrays the kernels read element by element
    FlashAttentionForwardArgs f = paged;
    f.block_table = reinterpret_cast<const int*>(reinterpret_cast<const char*>(table) + offset);
    expect_error(cuflash::flash_attention_forward(f), E::INVALID_ALIGNMENT, "block_table must be 4-byte aligned");
    f = fwd;
    f.seqused_k = reinterpret_cast<const int*>(reinterpret_cast<const char*>(table) + offset);
    expect_error(cuflash::flash_attention_forward(f), E::INVALID_ALIGNMENT, "seqused_k must be 4-byte aligned");
    FlashAttentionBackwardArgs b = bwd;
    b.seqused_k = f.seqused_k;
    expect_error(cuflash::flash_attention_backward(b), E::INVALID_ALIGNMENT, "seqused_k must be 4-byte aligned");
  }
  if (!mem.device()) {  // the table in host memory is refused on a GPU (CudaChecks); here: no CUDA
    EXPECT_EQ(cuflash::flash_attention_forward(paged), E::CUDA_ERROR) << cuflash::get_last_error_message();
  }
}

TEST_P(Validation, RunSwitchNamingNothingIsRefused) {  // csrc/cuda/run_switches.h
  for (const auto& [variable, value] : {std::pair{"CUFLASH_SM90", "tma,wgmma"}, {"CUFLASH_SM90", "1"},
                                        {"CUFLASH_BWD_DQ", "atomics"}, {"CUFLASH_FWD_TILE", "wider"},
                                        {"CUFLASH_BWD_TILE", "1"}, {"CUFLASH_FP32", "tf32"},
                                        {"CUFLASH_BWD_FUSED_TILE", "on"}, {"CUFLASH_BWD_KV_SPLITS", "3"}}) {
    SCOPED_TRACE(std::string(variable) + "=" + value);
    setenv(variable, value, 1);
    expect_both([](auto&) {}, E::INVALID_ARGUMENT, std::string("environment variable ") + variable);
    unsetenv(variable);
  }
}

// CUFLASH_SM90 unset is the list run_switches.h documents as the default parts, part for part;
// a list runs exactly its parts ("varlen" left out: packed sequences on the cp.async forward).
TEST(RunSwitches, DefaultPartsAreTheDocumentedList) {
  auto parts = [](const cuflash::Sm90Switch& s) {
    return std::vector<bool>{s.on,         s.tma,        s.bwd,          s.features,
                             s.persistent, s.bwd_ws,     s.tma_kv_cache, s.tma_splits,
                             s.tma_varlen, s.bwd_varlen, s.bwd_features, s.tma_mask, s.bwd_tma_mask,
                             s.persistent_features, s.persistent_window};
  };
  cuflash::Sm90Switch unset, listed, without_varlen, none, with_bwd_features;
  ASSERT_TRUE(cuflash::parse_sm90_switch(nullptr, &unset));
  ASSERT_TRUE(cuflash::parse_sm90_switch("tma,bwd,bwdws,features,persistent,kvcache,varlen,bwdvarlen,bwdfeatures,masktma,"
                                          "bwdmasktma,persistentfeatures,persistentwindow",
                                          &listed));
  EXPECT_EQ(parts(unset), parts(listed));
  ASSERT_TRUE(cuflash::parse_sm90_switch("tma,bwd,bwdws,features,persistent,kvcache", &without_varlen));
  EXPECT_FALSE(without_varlen.tma_varlen || without_varlen.bwd_varlen || without_varlen.bwd_features ||
               without_varlen.tma_mask || without_varlen.bwd_tma_mask || without_varlen.persistent_features ||
               without_varlen.persistent_window);
  EXPECT_TRUE(without_varlen.tma && without_varlen.persistent && !without_varlen.tma_splits);
  // Parts that are not defaults run only where named.
  EXPECT_FALSE(unset.tma_splits);
  ASSERT_TRUE(cuflash::parse_sm90_switch("tma,bwd,bwdws,features,bwdfeatures", &with_bwd_features));
  EXPECT_TRUE(with_bwd_features.bwd_features && !with_bwd_features.bwd_varlen);
  ASSERT_TRUE(cuflash::parse_sm90_switch("0", &none));
  EXPECT_FALSE(none.on);
}

TEST_P(Validation, WindowsOfAnySizeAreAccepted) {
  for (const auto& [left, right] : {std::pair{0, 0}, {-1, 0}, {0, -1}, {std::numeric_limits<int>::max(), 3},
                                    {2, std::numeric_limits<int>::max()}}) {
    SCOPED_TRACE("window " + std::to_string(left) + ", " + std::to_string(right));
    for (bool bottom_right : {false, true}) {
      fwd.window_left = bwd.window_left = left, fwd.window_right = bwd.window_right = right;
      fwd.causal_bottom_right = bwd.causal_bottom_right = bottom_right;
      expect_accepted(cuflash::flash_attention_forward(fwd), mem);
      expect_accepted(cuflash::flash_attention_backward(bwd), mem);
    }
  }
}

TEST_P(Validation, CausalOverridesTheRightWindow) {  // as the torch ops: causal sets window_right to 0
  fwd.causal = bwd.causal = true;
  fwd.window_right = bwd.window_right = 4;
  expect_accepted(cuflash::flash_attention_forward(fwd), mem);
  expect_accepted(cuflash::flash_attention_backward(bwd), mem);
}

TEST_P(Validation, BadDtype) {
  expect_both([](auto& c) { c.dtype = static_cast<DataType>(7); }, E::UNSUPPORTED_DTYPE, "dtype must be");
  expect_both([](auto& c) { c.dtype = static_cast<DataType>(-1); }, E::UNSUPPORTED_DTYPE, "dtype must be");
}

TEST_P(Validation, Misalignment) {
  const bool tc = GetParam() != DataType::FLOAT32;
  FlashAttentionForwardArgs f = fwd;
  f.k = static_cast<const char*>(f.k) + 8;  // aligned to its element, not to the tensor cores' 16-byte vectors
  if (tc)
    expect_error(cuflash::flash_attention_forward(f), E::INVALID_ALIGNMENT, "k must be 16-byte aligned");
  else
    expect_accepted(cuflash::flash_attention_forward(f), mem);
  FlashAttentionBackwardArgs b = bwd;
  b.workspace = static_cast<char*>(mem.next()) + 4;
  b.workspace_bytes = cuflash::flash_attention_backward_workspace_size(b);
  expect_error(cuflash::flash_attention_backward(b), E::INVALID_ALIGNMENT, "workspace must be 16-byte aligned");

  // A row stride of 68 elements: fine for float32, not a multiple of 8 for the tensor cores.
  f = fwd;
  f.q_strides.row = 68, f.q_strides.head = 68 * f.seqlen_q, f.q_strides.batch = 68 * f.seqlen_q * f.num_heads_q;
  if (tc)
    expect_error(cuflash::flash_attention_forward(f), E::INVALID_ALIGNMENT, "q's row stride must be a multiple of 8");
  else
    expect_accepted(cuflash::flash_attention_forward(f), mem);
  // The stride of a size-1 dimension is never used, so it is not checked.
  f = fwd;
  f.batch_size = 1, f.q_strides.batch = 3;
  expect_accepted(cuflash::flash_attention_forward(f), mem);
}

TEST_P(Validation, NegativeStrides) {
  for_each_stride([](int64_t& stride) { stride = -stride; }, [](const StrideCase& c) {
    expect_error(c.err, E::INVALID_LAYOUT, c.tensor + "'s " + c.dim + " stride must be >= 0");
  });
  // The stride of a size-1 dimension is never used, so it is not checked.
  FlashAttentionForwardArgs f = fwd;
  f.batch_size = 1, f.q_strides.batch = -5;
  expect_accepted(cuflash::flash_attention_forward(f), mem);
}

TEST_P(Validation, ZeroStrides) {  // inputs may broadcast; outputs must not overlap themselves
  for_each_stride([](int64_t& stride) { stride = 0; }, [&](const StrideCase& c) {
    if (c.output)
      expect_error(c.err, E::INVALID_LAYOUT,
                   c.tensor + " is an output, so its elements must not overlap, but its " + c.dim + " stride is 0");
    else
      expect_accepted(c.err, mem);
  });
}

TEST_P(Validation, StridesSpanning2To62Elements) {
  for_each_stride([](int64_t& stride) { stride = int64_t{1} << 62; }, [](const StrideCase& c) {
    expect_error(c.err, E::INVALID_LAYOUT, c.tensor + " spans 2^62 elements or more");
  });
}

TEST_P(Validation, TensorCoreStridesAreMultiplesOf8) {
  if (GetParam() == DataType::FLOAT32) GTEST_SKIP() << "float32 takes any stride (see Misalignment)";
  for_each_stride([](int64_t& stride) { stride += 4; }, [](const StrideCase& c) {
    expect_error(c.err, E::INVALID_ALIGNMENT, c.tensor + "'s " + c.dim + " stride must be a multiple of 8");
  });
}

TEST_P(Validation, BadLayouts) {
  // Outputs must not overlap themselves: rows closer than head_dim, heads sharing rows (zero
  // strides: ZeroStrides).
  FlashAttentionForwardArgs f = fwd;
  f.o_strides.row = 32;
  expect_error(cuflash::flash_attention_forward(f), E::INVALID_LAYOUT, "o is an output");
  f = fwd;
  f.o_strides.head = f.o_strides.row;
  expect_error(cuflash::flash_attention_forward(f), E::INVALID_LAYOUT, "o is an output");
  FlashAttentionBackwardArgs b = bwd;
  b.dv_strides.batch = b.dv_strides.head / 2;  // batches sharing elements
  expect_error(cuflash::flash_attention_backward(b), E::INVALID_LAYOUT,
               "dv is an output, so its elements must not overlap, but its batch stride (768) is below the span "
               "of its row dimension (24 x 64)");
  // Outputs may interleave ([batch, seqlen, heads, head_dim]).
  f = fwd;
  f.o_strides = cuflash::bshd_strides(f.num_heads_q, f.seqlen_q, f.head_dim);
  expect_accepted(cuflash::flash_attention_forward(f), mem);
}

TEST_P(Validation, Workspace) {
  FlashAttentionBackwardArgs b = bwd;
  // delta; at 16 bits also the fused Hopper backward's fp32 dQ and one counter per (batch, head,
  // 64-row query block) plus one, 16 bytes after delta.
  const size_t rows = size_t(b.batch_size) * b.num_heads_q * b.seqlen_q;
  const size_t counters = size_t(b.batch_size) * b.num_heads_q * ((b.seqlen_q + 63) / 64) + 1;
  EXPECT_EQ(cuflash::flash_attention_backward_workspace_size(b),
            GetParam() == DataType::FLOAT32 ? rows * sizeof(float)
                                            : (rows * sizeof(float) + 15) / 16 * 16 +
                                                  (rows * b.head_dim + counters) * sizeof(float));
  b.workspace = mem.next();
  b.workspace_bytes = cuflash::flash_attention_backward_workspace_size(b) - 1;
  expect_error(cuflash::flash_attention_backward(b), E::INVALID_ARGUMENT, "workspace_bytes must be at least");
  b.workspace_bytes += 1;
  expect_accepted(cuflash::flash_attention_backward(b), mem);
  // Problems with no query rows need none; a zero-byte workspace is then enough.
  for (auto change : {+[](AttentionConfig& c) { c.batch_size = 0; }, +[](AttentionConfig& c) { c.seqlen_q = 0; },
                      +[](AttentionConfig& c) { c.num_heads_q = -1; }}) {
    AttentionConfig c = bwd;
    change(c);
    EXPECT_EQ(cuflash::flash_attention_backward_workspace_size(c), 0u);
  }
  b = bwd;
  b.seqlen_q = 0, b.q = b.o = b.d_o = nullptr, b.lse = nullptr, b.dq = nullptr;
  b.workspace = mem.next(), b.workspace_bytes = 0;
  expect_accepted(cuflash::flash_attention_backward(b), mem);
}

// The fused Hopper backward's fp32 dQ and counters are in the workspace of every 16-bit config at
// the head dims it has kernels for (buckets 64, 128 and 256: head dims 33-64, 97-128, 225-256),
// whatever the device; float32 and the other head dims need delta alone. Host arithmetic only.
TEST(Workspace, FusedBackwardHeadDims) {
  AttentionConfig c;
  c.batch_size = 2, c.num_heads_q = 3, c.num_heads_kv = 3, c.seqlen_q = 130, c.seqlen_k = 70, c.scale = 0.1f;
  const size_t rows = size_t(c.batch_size) * c.num_heads_q * c.seqlen_q;
  const size_t counters = size_t(c.batch_size) * c.num_heads_q * ((c.seqlen_q + 63) / 64) + 1;
  for (DataType dtype : {DataType::FLOAT16, DataType::BFLOAT16, DataType::FLOAT32})
    for (int d : {32, 40, 64, 72, 96, 104, 128, 136, 224, 232, 256}) {
      c.dtype = dtype, c.head_dim = d;
      if (!cuflash::flash_attention_supports(dtype, d)) continue;  // not compiled (CUFLASH_HEAD_DIMS)
      const bool fused = dtype != DataType::FLOAT32 && ((d > 32 && d <= 64) || (d > 96 && d <= 128) || d > 224);
      EXPECT_EQ(cuflash::flash_attention_backward_workspace_size(c),
                fused ? (rows * sizeof(float) + 15) / 16 * 16 + (rows * d + counters) * sizeof(float)
                      : rows * sizeof(float))
          << dtype_name(dtype) << " head_dim " << d;
    }
}

INSTANTIATE_TEST_SUITE_P(CApi, Validation,
                         ::testing::Values(DataType::FLOAT32, DataType::FLOAT16, DataType::BFLOAT16),
                         [](const ::testing::TestParamInfo<DataType>& info) { return dtype_name(info.param); });

// ---- The simple form: every overload checks the same way --------------------------------------

template <typename T>
class SimpleForm : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, half, __nv_bfloat16>;
TYPED_TEST_SUITE(SimpleForm, ElementTypes);

TYPED_TEST(SimpleForm, ChecksItsArguments) {
  using T = TypeParam;
  Memory mem;
  const T* q = static_cast<const T*>(mem.next());
  const T* k = static_cast<const T*>(mem.next());
  const T* v = static_cast<const T*>(mem.next());
  T* o = static_cast<T*>(mem.next());
  float* lse = static_cast<float*>(mem.next());
  T* dq = static_cast<T*>(mem.next());
  T* dk = static_cast<T*>(mem.next());
  T* dv = static_cast<T*>(mem.next());
  const T* dout = static_cast<const T*>(mem.next());
  auto fwd = [&](const T* Q, float* L, int batch, int heads, int n, int d, float scale) {
    return cuflash::flash_attention_forward(Q, k, v, o, L, batch, heads, n, d, scale, true);
  };
  auto bwd = [&](const T* dO, T* dK, int batch, int heads, int n, int d, float scale) {
    return cuflash::flash_attention_backward(q, k, v, o, lse, dO, dq, dK, dv, batch, heads, n, d, scale, false);
  };
  expect_accepted(fwd(q, lse, 2, 3, 40, 64, 0.125f), mem);
  expect_accepted(bwd(dout, dk, 2, 3, 40, 64, 0.125f), mem);
  expect_error(fwd(q, lse, -2, 3, 40, 64, 0.125f), E::INVALID_DIMENSION, "batch_size");
  expect_error(bwd(dout, dk, 2, 3, 40, 0, 0.125f), E::INVALID_DIMENSION, "head_dim must be >= 1");
  expect_error(bwd(dout, dk, 2, 3, -40, 64, 0.125f), E::INVALID_DIMENSION, "seq_len must be >= 0, got -40");
  expect_error(fwd(q, lse, 2, -3, 40, 64, 0.125f), E::INVALID_DIMENSION, "num_heads must be >= 0, got -3");
  expect_error(fwd(q, lse, 2, 70000, 40, 64, 0.125f), E::INVALID_DIMENSION, "at most 65535");
  expect_error(fwd(q, lse, 2, 3, 40, 300, 0.125f), E::UNSUPPORTED_HEAD_DIM, "at most 256");
  expect_error(bwd(dout, dk, 2, 3, 40, 64, NAN), E::INVALID_ARGUMENT, "scale");
  expect_error(fwd(q, lse, 2, 3, 40, 64, -INFINITY), E::INVALID_ARGUMENT, "scale");
  if (!std::is_same_v<T, float>) {
    expect_error(fwd(q, lse, 2, 3, 40, 36, 0.125f), E::UNSUPPORTED_HEAD_DIM, "multiple of 8");
  }
  EXPECT_EQ(fwd(nullptr, nullptr, 0, 3, 40, 64, 0.125f), E::SUCCESS);  // empty batch
  EXPECT_EQ(fwd(nullptr, nullptr, 2, 0, 40, 64, 0.125f), E::SUCCESS);  // no heads
}

// Each pointer reaches the check of its own name, as the simple form names it: the forward's Q, K,
// V, O, L and the backward's Q, K, V, O, L, dO, dQ, dK, dV, set to null or misaligned one at a time.
TYPED_TEST(SimpleForm, NamesEachPointer) {
  using T = TypeParam;
  Memory mem;
  const std::string names[] = {"Q", "K", "V", "O", "L", "dO", "dQ", "dK", "dV"};
  std::array<const void*, 9> good;
  for (const void*& p : good) p = mem.next();
  auto fwd = [](const std::array<const void*, 9>& p) {
    auto in = [&](int i) { return static_cast<const T*>(p[i]); };
    return cuflash::flash_attention_forward(in(0), in(1), in(2), const_cast<T*>(in(3)),
                                            static_cast<float*>(const_cast<void*>(p[4])), 2, 3, 40, 64, 0.125f, true);
  };
  auto bwd = [](const std::array<const void*, 9>& p) {
    auto in = [&](int i) { return static_cast<const T*>(p[i]); };
    auto out = [&](int i) { return const_cast<T*>(in(i)); };
    return cuflash::flash_attention_backward(in(0), in(1), in(2), in(3), static_cast<const float*>(p[4]), in(5),
                                             out(6), out(7), out(8), 2, 3, 40, 64, 0.125f, true);
  };
  for (int i = 0; i < 9; ++i) {
    SCOPED_TRACE(names[i]);
    for (PointerEdit edit : {to_null, off_by_two_bytes}) {
      std::array<const void*, 9> p = good;
      p[i] = edit(p[i]);
      const E code = edit == to_null ? E::NULL_POINTER : E::INVALID_ALIGNMENT;
      const std::string mention = names[i] + (edit == to_null ? " must not be null" : " must be");
      if (i < 5) expect_error(fwd(p), code, mention);
      expect_error(bwd(p), code, mention);
    }
  }
}

// ---- Checks that ask CUDA ----------------------------------------------------------------------

TEST(CudaChecks, NoDeviceIsReportedAsCudaError) {
  if (cuda_device_available()) GTEST_SKIP() << "a CUDA device is present";
  Memory mem;
  expect_error(cuflash::flash_attention_forward(forward_args(mem, DataType::FLOAT16)), E::CUDA_ERROR, "failed");
  expect_error(cuflash::flash_attention_backward(backward_args(mem, DataType::BFLOAT16)), E::CUDA_ERROR, "failed");
}

TEST(CudaChecks, HostMemoryIsRejected) {
  CUFLASH_REQUIRE_CUDA();
  int device = 0, pageable = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, device), cudaSuccess);
  if (pageable) GTEST_SKIP() << "this device reads pageable host memory (HMM/ATS)";
  Memory mem;
  FlashAttentionForwardArgs f = forward_args(mem, DataType::FLOAT16);
  std::vector<char> host(Memory::kBytes + 16);
  f.v = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(host.data()) + 15) / 16 * 16);
  expect_error(cuflash::flash_attention_forward(f), E::INVALID_ARGUMENT, "v is host memory");
  // seqused_k too, forward and backward.
  f = forward_args(mem, DataType::FLOAT16);
  std::vector<int> used(size_t(f.batch_size), f.seqlen_k);
  f.seqused_k = used.data();
  expect_error(cuflash::flash_attention_forward(f), E::INVALID_ARGUMENT, "seqused_k is host memory");
  f = forward_args(mem, DataType::FLOAT16);  // a paged cache's table too
  std::vector<int> table(size_t(f.batch_size), 0);
  f.block_table = table.data(), f.block_table_stride = 1, f.page_size = 256, f.num_pages = 1;
  f.k_strides = f.v_strides = cuflash::bhsd_strides(f.num_heads_kv, 256, f.head_dim);
  expect_error(cuflash::flash_attention_forward(f), E::INVALID_ARGUMENT, "block_table is host memory");
  FlashAttentionBackwardArgs b = backward_args(mem, DataType::BFLOAT16);
  b.seqused_k = used.data();
  expect_error(cuflash::flash_attention_backward(b), E::INVALID_ARGUMENT, "seqused_k is host memory");
}

TEST(CudaChecks, PinnedAndManagedMemoryAreAccepted) {
  CUFLASH_REQUIRE_CUDA();
  void *pinned = nullptr, *managed = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, Memory::kBytes), cudaSuccess);
  ASSERT_EQ(cudaMallocManaged(&managed, Memory::kBytes), cudaSuccess);
  std::memset(pinned, 0, Memory::kBytes), std::memset(managed, 0, Memory::kBytes);
  Memory mem;
  FlashAttentionForwardArgs f = forward_args(mem, DataType::FLOAT16);
  f.k = pinned, f.v = managed;
  expect_accepted(cuflash::flash_attention_forward(f), mem);
  EXPECT_EQ(cudaFreeHost(pinned), cudaSuccess);
  EXPECT_EQ(cudaFree(managed), cudaSuccess);
}

TEST(CudaChecks, MemoryOfAnotherDeviceIsRejected) {
  int count = 0;
  if (!cuda_device_available() || cudaGetDeviceCount(&count) != cudaSuccess || count < 2)
    GTEST_SKIP() << "needs two CUDA devices";
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  DeviceBuffer on_device_1(Memory::kBytes);
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  Memory mem;
  FlashAttentionBackwardArgs b = backward_args(mem, DataType::BFLOAT16);
  b.dk = on_device_1.get();
  expect_error(cuflash::flash_attention_backward(b), E::INVALID_ARGUMENT,
               "dk is memory of device 1 but the current device is 0");
}

}  // namespace
}  // namespace cuflash_test
