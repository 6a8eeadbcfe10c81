// Argument checks and error strings of the C++ API. They run before any CUDA call, so these tests
// pass on a machine without a GPU (the few that need one skip there). Pointers are real device
// memory when a GPU is present and otherwise distinct, aligned fake addresses that the checks
// never dereference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <vector>

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

// ---- Checks shared by every dtype, forward and backward ---------------------------------------

class Validation : public ::testing::TestWithParam<DataType> {
 protected:
  Memory mem;
  FlashAttentionForwardArgs fwd = forward_args(mem, GetParam());
  FlashAttentionBackwardArgs bwd = backward_args(mem, GetParam());

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
  const std::pair<const char*, std::function<void(FlashAttentionForwardArgs&)>> fwd_cases[] = {
      {"q", [](auto& a) { a.q = nullptr; }}, {"k", [](auto& a) { a.k = nullptr; }},
      {"v", [](auto& a) { a.v = nullptr; }}, {"o", [](auto& a) { a.o = nullptr; }},
      {"lse", [](auto& a) { a.lse = nullptr; }}};
  for (const auto& [name, change] : fwd_cases) {
    FlashAttentionForwardArgs f = fwd;
    change(f);
    expect_error(cuflash::flash_attention_forward(f), E::NULL_POINTER, std::string(name) + " must not be null");
  }
  const std::pair<const char*, std::function<void(FlashAttentionBackwardArgs&)>> bwd_cases[] = {
      {"q", [](auto& a) { a.q = nullptr; }},     {"k", [](auto& a) { a.k = nullptr; }},
      {"v", [](auto& a) { a.v = nullptr; }},     {"o", [](auto& a) { a.o = nullptr; }},
      {"lse", [](auto& a) { a.lse = nullptr; }}, {"d_o", [](auto& a) { a.d_o = nullptr; }},
      {"dq", [](auto& a) { a.dq = nullptr; }},   {"dk", [](auto& a) { a.dk = nullptr; }},
      {"dv", [](auto& a) { a.dv = nullptr; }}};
  for (const auto& [name, change] : bwd_cases) {
    FlashAttentionBackwardArgs b = bwd;
    change(b);
    expect_error(cuflash::flash_attention_backward(b), E::NULL_POINTER, std::string(name) + " must not be null");
  }
}

TEST_P(Validation, NullIsAllowedForEmptyTensors) {
  FlashAttentionForwardArgs f = fwd;
  f.seqlen_k = 0, f.k = nullptr, f.v = nullptr;  // no keys: out 0, lse -inf
  expect_accepted(cuflash::flash_attention_forward(f), mem);
  FlashAttentionBackwardArgs b = bwd;
  b.seqlen_q = 0, b.q = b.o = b.d_o = nullptr, b.lse = nullptr, b.dq = nullptr;  // no queries: dk = dv = 0
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
  f.k = static_cast<const char*>(f.k) + (tc ? 8 : 2);
  expect_error(cuflash::flash_attention_forward(f), E::INVALID_ALIGNMENT, tc ? "k must be 16-byte aligned"
                                                                             : "k must be 4-byte aligned");
  FlashAttentionBackwardArgs b = bwd;
  b.lse = reinterpret_cast<const float*>(reinterpret_cast<const char*>(b.lse) + 2);
  expect_error(cuflash::flash_attention_backward(b), E::INVALID_ALIGNMENT, "lse must be 4-byte aligned");
  b = bwd;
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

TEST_P(Validation, BadLayouts) {
  FlashAttentionForwardArgs f = fwd;
  f.k_strides.head = -f.k_strides.head;
  expect_error(cuflash::flash_attention_forward(f), E::INVALID_LAYOUT, "k's head stride must be >= 0");
  // Outputs must not overlap themselves: rows closer than head_dim, heads sharing rows, a
  // broadcast (stride 0) dimension.
  f = fwd;
  f.o_strides.row = 32;
  expect_error(cuflash::flash_attention_forward(f), E::INVALID_LAYOUT, "o is an output");
  f = fwd;
  f.o_strides.head = f.o_strides.row;
  expect_error(cuflash::flash_attention_forward(f), E::INVALID_LAYOUT, "o is an output");
  FlashAttentionBackwardArgs b = bwd;
  b.dk_strides.batch = 0;
  expect_error(cuflash::flash_attention_backward(b), E::INVALID_LAYOUT, "dk is an output");
  // A tensor reaching past 2^62 elements.
  f = fwd;
  f.v_strides.batch = int64_t{1} << 62;
  expect_error(cuflash::flash_attention_forward(f), E::INVALID_LAYOUT, "v spans 2^62");
  // Inputs may broadcast (stride 0), and outputs may interleave ([batch, seqlen, heads, head_dim]).
  f = fwd;
  f.k_strides.batch = f.v_strides.batch = 0;
  f.o_strides = cuflash::bshd_strides(f.num_heads_q, f.seqlen_q, f.head_dim);
  expect_accepted(cuflash::flash_attention_forward(f), mem);
}

TEST_P(Validation, Workspace) {
  FlashAttentionBackwardArgs b = bwd;
  EXPECT_EQ(cuflash::flash_attention_backward_workspace_size(b),
            size_t(b.batch_size) * b.num_heads_q * b.seqlen_q * sizeof(float));
  b.workspace = mem.next();
  b.workspace_bytes = cuflash::flash_attention_backward_workspace_size(b) - 1;
  expect_error(cuflash::flash_attention_backward(b), E::INVALID_ARGUMENT, "workspace_bytes must be at least");
  b.workspace_bytes += 1;
  expect_accepted(cuflash::flash_attention_backward(b), mem);
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
  expect_error(fwd(nullptr, lse, 2, 3, 40, 64, 0.125f), E::NULL_POINTER, "q must not be null");
  expect_error(fwd(q, nullptr, 2, 3, 40, 64, 0.125f), E::NULL_POINTER, "lse must not be null");
  expect_error(bwd(nullptr, dk, 2, 3, 40, 64, 0.125f), E::NULL_POINTER, "d_o must not be null");
  expect_error(bwd(dout, nullptr, 2, 3, 40, 64, 0.125f), E::NULL_POINTER, "dk must not be null");
  expect_error(fwd(q, lse, -2, 3, 40, 64, 0.125f), E::INVALID_DIMENSION, "batch_size");
  expect_error(bwd(dout, dk, 2, 3, -40, 64, 0.125f), E::INVALID_DIMENSION, "seqlen_q");
  expect_error(fwd(q, lse, 2, 70000, 40, 64, 0.125f), E::INVALID_DIMENSION, "at most 65535");
  expect_error(fwd(q, lse, 2, 3, 40, 300, 0.125f), E::UNSUPPORTED_HEAD_DIM, "at most 256");
  expect_error(bwd(dout, dk, 2, 3, 40, 64, NAN), E::INVALID_ARGUMENT, "scale");
  if (!std::is_same_v<T, float>) {
    expect_error(fwd(q, lse, 2, 3, 40, 36, 0.125f), E::UNSUPPORTED_HEAD_DIM, "multiple of 8");
  }
  const T* misaligned = reinterpret_cast<const T*>(reinterpret_cast<const char*>(q) + 2);
  expect_error(fwd(misaligned, lse, 2, 3, 40, 64, 0.125f), E::INVALID_ALIGNMENT, "q must be");
  EXPECT_EQ(fwd(nullptr, nullptr, 0, 3, 40, 64, 0.125f), E::SUCCESS);  // empty batch
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
}

}  // namespace
}  // namespace cuflash_test
