// The C++ API (include/cuflash/flash_attention.h): argument checks, the translation into the
// params struct the kernels take (the same one the torch ops fill), and the launches. Every
// check that needs no CUDA runs before the first CUDA call, so bad arguments are reported the
// same way on a machine without a GPU.
#include "cuflash/flash_attention.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

#include "../attention_math.h"
#include "../cuda/flash_launch.h"
#include "../cuda/run_switches.h"
#include "../flash_params.h"
#include "fill_kernels.h"

namespace cuflash {
namespace {

using Error = FlashAttentionError;

constexpr int kMaxGridDim = 65535;  // batch and heads are grid dimensions
constexpr int kMaxHeadDim = 256;
__extension__ using Wide = __int128;  // products of a size and a stride, without overflow
constexpr Wide kMaxSpan = Wide{1} << 62;  // keeps every element offset far inside int64

// ---- Error reporting: a code, and a message kept per thread ----------------------------------

thread_local std::string last_message;

void append(std::string& s, const char* part) { s += part; }
void append(std::string& s, double x) { s += std::to_string(x); }
template <typename Int, typename = std::enable_if_t<std::is_integral_v<Int>>>
void append(std::string& s, Int x) {
  s += std::to_string(x);
}

// Records why the call failed and returns `code`. Never throws: if the message cannot be built,
// the code alone is reported.
template <typename... Parts>
Error fail(Error code, const Parts&... parts) {
  try {
    last_message = "cuflash_attn: ";
    (append(last_message, parts), ...);
  } catch (...) {
    last_message.clear();
  }
  return code;
}

Error succeed() {
  last_message.clear();
  return Error::SUCCESS;
}

Error cuda_failure(cudaError_t err, const char* what) {
  cudaGetLastError();  // leave no stale error behind for the caller's own checks
  return fail(Error::CUDA_ERROR, what, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

// ---- Data types ------------------------------------------------------------------------------

bool is_valid(DataType t) { return t == DataType::FLOAT32 || t == DataType::FLOAT16 || t == DataType::BFLOAT16; }
bool on_tensor_cores(DataType t) { return t != DataType::FLOAT32; }
int element_bytes(DataType t) { return t == DataType::FLOAT32 ? 4 : 2; }
const char* name_of(DataType t) {
  return t == DataType::FLOAT32 ? "float32" : t == DataType::FLOAT16 ? "float16" : "bfloat16";
}
DType kernel_dtype(DataType t) {
  return t == DataType::FLOAT32 ? DType::kFloat32 : t == DataType::FLOAT16 ? DType::kFloat16 : DType::kBFloat16;
}
// flash_attention_supports: a valid dtype, head_dim in 1..256 (a multiple of 8 on the tensor
// cores), a bucket this build has.
bool supported(DataType dtype, int head_dim) {
  return is_valid(dtype) && head_dim >= 1 && head_dim <= kMaxHeadDim &&
         (!on_tensor_cores(dtype) || head_dim % 8 == 0) && cuda_head_dim_bucket(kernel_dtype(dtype), head_dim) > 0;
}

template <typename T>
constexpr DataType data_type_of() {
  if constexpr (std::is_same_v<T, float>) return DataType::FLOAT32;
  else if constexpr (std::is_same_v<T, half>) return DataType::FLOAT16;
  else return DataType::BFLOAT16;
}

// ---- Checks that need no CUDA -----------------------------------------------------------------

Error check_config(const AttentionConfig& c) {
  if (!is_valid(c.dtype))
    return fail(Error::UNSUPPORTED_DTYPE, "dtype must be FLOAT32, FLOAT16 or BFLOAT16, got the value ",
                static_cast<int>(c.dtype));
  const std::pair<const char*, int> sizes[] = {{"batch_size", c.batch_size},   {"num_heads_q", c.num_heads_q},
                                               {"num_heads_kv", c.num_heads_kv}, {"seqlen_q", c.seqlen_q},
                                               {"seqlen_k", c.seqlen_k}};
  for (const auto& [name, size] : sizes)
    if (size < 0) return fail(Error::INVALID_DIMENSION, name, " must be >= 0, got ", size);
  if (c.batch_size > kMaxGridDim || c.num_heads_q > kMaxGridDim)
    return fail(Error::INVALID_DIMENSION, "batch_size and num_heads_q must be at most ", kMaxGridDim,
                " (CUDA grid dimensions), got ", c.batch_size, " and ", c.num_heads_q);
  if (c.num_heads_kv == 0 ? c.num_heads_q != 0 : c.num_heads_q % c.num_heads_kv != 0)
    return fail(Error::INVALID_DIMENSION, "num_heads_q (", c.num_heads_q, ") must be a multiple of num_heads_kv (",
                c.num_heads_kv, ")");
  if (c.head_dim < 1) return fail(Error::INVALID_DIMENSION, "head_dim must be >= 1, got ", c.head_dim);
  if (c.head_dim > kMaxHeadDim)
    return fail(Error::UNSUPPORTED_HEAD_DIM, "head_dim must be at most ", kMaxHeadDim, ", got ", c.head_dim);
  if (on_tensor_cores(c.dtype) && c.head_dim % 8 != 0)
    return fail(Error::UNSUPPORTED_HEAD_DIM, "head_dim must be a multiple of 8 for ", name_of(c.dtype),
                " (pad q, k and v with zeros), got ", c.head_dim);
  if (cuda_head_dim_bucket(kernel_dtype(c.dtype), c.head_dim) == 0)
    return fail(Error::UNSUPPORTED_HEAD_DIM, "head_dim ", c.head_dim, " for ", name_of(c.dtype),
                " was not compiled into this build (see CUFLASH_HEAD_DIMS)");
  const Wide q_elems = Wide{c.batch_size} * c.num_heads_q * c.seqlen_q * c.head_dim;
  const Wide k_elems = Wide{c.batch_size} * c.num_heads_kv * c.seqlen_k * c.head_dim;
  if (q_elems >= kMaxSpan || k_elems >= kMaxSpan)
    return fail(Error::INVALID_DIMENSION, "q and k must have fewer than 2^62 elements");
  if (!std::isfinite(c.scale)) return fail(Error::INVALID_ARGUMENT, "scale must be finite, got ", c.scale);
  if (const std::string bad_switch = run_switch_error(); !bad_switch.empty())
    return fail(Error::INVALID_ARGUMENT, bad_switch.c_str());
  if (c.window_left < -1 || c.window_right < -1)
    return fail(Error::INVALID_ARGUMENT, "window_left and window_right must be >= -1 (-1: unbounded), got ",
                c.window_left, " and ", c.window_right);
  return Error::SUCCESS;
}

// One [batch, heads, rows, head_dim] argument.
struct TensorArg {
  const char* name;
  const void* data;
  Strides strides;
  int batch, heads, rows, head_dim;
  bool is_output;

  // In Wide: a paged cache's num_pages x page_size is not bounded by the config's checks (an int64
  // product wrapped to 0 took a null pointer for an empty tensor).
  Wide elements() const { return Wide{batch} * heads * rows * head_dim; }
};

TensorArg query_like(const char* name, const void* data, const Strides& s, const AttentionConfig& c, bool out) {
  return {name, data, s, c.batch_size, c.num_heads_q, c.seqlen_q, c.head_dim, out};
}
TensorArg key_like(const char* name, const void* data, const Strides& s, const AttentionConfig& c, bool out) {
  return {name, data, s, c.batch_size, c.num_heads_kv, c.seqlen_k, c.head_dim, out};
}

Error check_tensor(const TensorArg& t, DataType dtype) {
  if (t.elements() == 0) return Error::SUCCESS;  // never read or written
  if (t.data == nullptr)
    return fail(Error::NULL_POINTER, t.name, " must not be null (it has ", t.batch, " x ", t.heads, " x ", t.rows,
                " x ", t.head_dim, " elements)");
  struct Dim {
    const char* name;
    int64_t size, stride;
  };
  // The strided dimensions; sizes of 1 never multiply their stride, so they are left out.
  Dim dims[4];
  int n = 0;
  for (const Dim& d : {Dim{"batch", t.batch, t.strides.batch}, Dim{"head", t.heads, t.strides.head},
                       Dim{"row", t.rows, t.strides.row}})
    if (d.size > 1) dims[n++] = d;
  for (int i = 0; i < n; ++i)
    if (dims[i].stride < 0)
      return fail(Error::INVALID_LAYOUT, t.name, "'s ", dims[i].name, " stride must be >= 0, got ", dims[i].stride);

  const bool tc = on_tensor_cores(dtype);
  const int alignment = tc ? 16 : element_bytes(dtype);
  if (reinterpret_cast<uintptr_t>(t.data) % alignment != 0)
    return fail(Error::INVALID_ALIGNMENT, t.name, " must be ", alignment, "-byte aligned for ", name_of(dtype),
                tc ? " (the tensor-core kernels move 16-byte vectors)" : "");
  for (int i = 0; i < n && tc; ++i)
    if (dims[i].stride % 8 != 0)
      return fail(Error::INVALID_ALIGNMENT, t.name, "'s ", dims[i].name,
                  " stride must be a multiple of 8 elements for ", name_of(dtype), ", got ", dims[i].stride);

  Wide last = t.head_dim - 1;
  for (int i = 0; i < n; ++i) last += Wide{dims[i].size - 1} * dims[i].stride;
  if (last >= kMaxSpan) return fail(Error::INVALID_LAYOUT, t.name, " spans 2^62 elements or more");

  if (t.is_output) {
    // Distinct indices must be distinct elements. Sorted by stride, each dimension must step over
    // everything the smaller ones span (sufficient, and what every dense or permuted layout does).
    dims[n++] = Dim{"head_dim", t.head_dim, 1};
    for (int i = 1; i < n; ++i)  // insertion sort by stride (std::sort trips g++ 12's -Warray-bounds here)
      for (int j = i; j > 0 && dims[j].stride < dims[j - 1].stride; --j) std::swap(dims[j], dims[j - 1]);
    for (int i = 0; i < n; ++i) {
      if (dims[i].stride == 0)
        return fail(Error::INVALID_LAYOUT, t.name, " is an output, so its elements must not overlap, but its ",
                    dims[i].name, " stride is 0");
      if (i > 0 && Wide{dims[i].stride} < Wide{dims[i - 1].stride} * dims[i - 1].size)
        return fail(Error::INVALID_LAYOUT, t.name, " is an output, so its elements must not overlap, but its ",
                    dims[i].name, " stride (", dims[i].stride, ") is below the span of its ", dims[i - 1].name,
                    " dimension (", dims[i - 1].size, " x ", dims[i - 1].stride, ")");
    }
  }
  return Error::SUCCESS;
}

// lse: float32 [batch, heads_q, seqlen_q], contiguous.
Error check_lse(const void* lse, const AttentionConfig& c) {
  if (int64_t{c.batch_size} * c.num_heads_q * c.seqlen_q == 0) return Error::SUCCESS;
  if (lse == nullptr) return fail(Error::NULL_POINTER, "lse must not be null");
  if (reinterpret_cast<uintptr_t>(lse) % alignof(float) != 0)
    return fail(Error::INVALID_ALIGNMENT, "lse must be ", alignof(float), "-byte aligned (float32)");
  return Error::SUCCESS;
}

// seqused_k and block_table: int32 arrays the kernels read element by element.
Error check_int32_arrays(const int* seqused_k, const int* block_table) {
  for (const auto& [name, ptr] : {std::pair{"seqused_k", seqused_k}, std::pair{"block_table", block_table}})
    if (reinterpret_cast<uintptr_t>(ptr) % alignof(int) != 0)
      return fail(Error::INVALID_ALIGNMENT, name, " must be ", alignof(int), "-byte aligned (int32)");
  return Error::SUCCESS;
}

template <typename Args, size_t N>
Error check_tensors(const Args& a, const std::array<TensorArg, N>& tensors) {
  if (Error e = check_config(a); e != Error::SUCCESS) return e;
  for (const TensorArg& t : tensors)
    if (Error e = check_tensor(t, a.dtype); e != Error::SUCCESS) return e;
  return check_lse(a.lse, a);
}

// ---- Checks that ask CUDA ---------------------------------------------------------------------

// Every pointer must be memory the current device can read: a kernel reading host memory would
// fault and poison the context, so it is refused here instead.
template <size_t N>
Error check_device_memory(const std::array<TensorArg, N>& tensors, const void* lse, bool lse_used,
                          const int* seqused_k, const int* block_table = nullptr) {
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return cuda_failure(err, "cudaGetDevice");
  auto check = [&](const char* name, const void* ptr) -> Error {
    cudaPointerAttributes attr{};
    if (cudaError_t err = cudaPointerGetAttributes(&attr, ptr); err != cudaSuccess)
      return cuda_failure(err, "cudaPointerGetAttributes");
    switch (attr.type) {
      case cudaMemoryTypeDevice:
        if (attr.device != device)
          return fail(Error::INVALID_ARGUMENT, name, " is memory of device ", attr.device,
                      " but the current device is ", device, " (see cudaSetDevice)");
        return Error::SUCCESS;
      case cudaMemoryTypeManaged: return Error::SUCCESS;
      case cudaMemoryTypeHost:  // pinned: readable where mapped at the same address (UVA)
        if (attr.devicePointer == ptr) return Error::SUCCESS;
        break;
      default: {  // pageable host memory: readable only on systems with HMM/ATS
        int pageable = 0;
        cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, device);
        if (pageable) return Error::SUCCESS;
      }
    }
    return fail(Error::INVALID_ARGUMENT, name, " is host memory that device ", device,
                " cannot access; pass device memory (cudaMalloc)");
  };
  for (const TensorArg& t : tensors)
    if (t.elements() > 0)
      if (Error e = check(t.name, t.data); e != Error::SUCCESS) return e;
  if (seqused_k != nullptr)
    if (Error e = check("seqused_k", seqused_k); e != Error::SUCCESS) return e;
  if (block_table != nullptr)
    if (Error e = check("block_table", block_table); e != Error::SUCCESS) return e;
  return lse_used ? check("lse", lse) : Error::SUCCESS;
}

// ---- Params: the one place the API is mapped onto the kernels' params struct -----------------

TensorStrides to_kernel(const Strides& s) { return {s.batch, s.head, s.row}; }

template <typename Args>
void set_common(AttentionParams& p, const Args& a) {
  p.dtype = kernel_dtype(a.dtype);
  p.shape.batch = a.batch_size;
  p.shape.heads_q = a.num_heads_q;
  p.shape.heads_kv = a.num_heads_kv;
  p.shape.seqlen_q = a.seqlen_q;
  p.shape.seqlen_k = a.seqlen_k;
  p.shape.head_dim = a.head_dim;
  p.mask = make_mask_params(a.causal_bottom_right, a.causal, a.window_left, a.window_right, a.seqlen_q, a.seqlen_k);
  p.scale = a.scale;
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.q_strides = to_kernel(a.q_strides);
  p.k_strides = to_kernel(a.k_strides);
  p.v_strides = to_kernel(a.v_strides);
  p.stats_strides.batch = int64_t{a.num_heads_q} * a.seqlen_q;  // lse and delta: [batch, heads_q, seqlen_q]
  p.stats_strides.head = a.seqlen_q;
  p.varlen.seqused_k = a.seqused_k;
}

FlashFwdParams make_params(const FlashAttentionForwardArgs& a) {
  FlashFwdParams p;
  set_common(p, a);
  p.out = a.o;
  p.lse = a.lse;
  p.out_strides = to_kernel(a.o_strides);
  if (a.block_table != nullptr)
    p.paged = {a.block_table, a.block_table_stride, a.page_size, a.num_pages};
  return p;
}

// The forward's paged-cache and split arguments (the tensors' extents are check_tensor's).
Error check_paged_and_splits(const FlashAttentionForwardArgs& a) {
  if (a.num_splits < 0)
    return fail(Error::INVALID_ARGUMENT, "num_splits must be >= 0 (0: chosen, 1: none), got ", a.num_splits);
  if (a.block_table == nullptr) return Error::SUCCESS;
  if (a.page_size <= 0 || a.page_size % kPageSizeMultiple != 0)
    return fail(Error::INVALID_ARGUMENT, "with block_table, page_size must be a positive multiple of ",
                kPageSizeMultiple, ", got ", a.page_size);
  if (a.num_pages <= 0) return fail(Error::INVALID_ARGUMENT, "with block_table, num_pages must be > 0, got ", a.num_pages);
  if (a.block_table_stride < 0 || Wide{a.block_table_stride} * a.page_size < a.seqlen_k)
    return fail(Error::INVALID_ARGUMENT, "block_table_stride (", a.block_table_stride, ") pages of page_size (",
                a.page_size, ") must hold seqlen_k (", a.seqlen_k, ") keys");
  return Error::SUCCESS;
}

FlashBwdParams make_params(const FlashAttentionBackwardArgs& a) {  // delta: the workspace's, set by the caller
  FlashBwdParams p;
  set_common(p, a);
  p.out = a.o;
  p.dout = a.d_o;
  p.lse = a.lse;
  p.dq = a.dq;
  p.dk = a.dk;
  p.dv = a.dv;
  p.out_strides = to_kernel(a.o_strides);
  p.dout_strides = to_kernel(a.d_o_strides);
  p.dq_strides = to_kernel(a.dq_strides);
  p.dk_strides = to_kernel(a.dk_strides);
  p.dv_strides = to_kernel(a.dv_strides);
  return p;
}

// ---- The backward's workspace --------------------------------------------------------------
// delta (batch * heads_q * seqlen_q floats), then, where the fused Hopper backward has kernels
// (fused_backward_built_for), its fp32 dQ accumulator ([batch][heads_q][seqlen_q][head_dim], 16
// bytes in) and the counters of its ordered adds (the C API's backward is deterministic), used by
// each backward that takes that kernel (prefers_fused_backward: where it beats the pair).
struct WorkspaceLayout {
  Wide delta_bytes = 0, accum_offset = 0, accum_elems = 0, counters = 0;
  // fused_dq_scratch_elems's block (dq_accum, then the counters), in Wide: any config may be asked.
  Wide scratch_bytes() const { return (accum_elems + counters) * 4; }
  Wide total() const { return accum_elems == 0 ? delta_bytes : accum_offset + scratch_bytes(); }
};

WorkspaceLayout workspace_layout(const AttentionConfig& c) {
  WorkspaceLayout w;
  if (c.batch_size <= 0 || c.num_heads_q <= 0 || c.seqlen_q <= 0) return w;
  const Wide rows = Wide{c.batch_size} * c.num_heads_q * c.seqlen_q;
  w.delta_bytes = rows * sizeof(float);
  if (supported(c.dtype, c.head_dim) &&
      fused_backward_built_for(kernel_dtype(c.dtype), c.head_dim)) {
    w.accum_offset = (w.delta_bytes + 15) / 16 * 16;
    w.accum_elems = rows * c.head_dim;
    AttentionShape sh;
    sh.batch = c.batch_size;
    sh.heads_q = c.num_heads_q;
    sh.seqlen_q = c.seqlen_q;
    w.counters = dq_semaphore_count(sh);
  }
  return w;
}

// ---- Entry points -----------------------------------------------------------------------------

Error zero(const TensorArg& t, DataType dtype, cudaStream_t stream) {
  const cudaError_t err = zero_tensor(const_cast<void*>(t.data), element_bytes(dtype), to_kernel(t.strides), t.batch,
                                      t.heads, t.rows, t.head_dim, stream);
  return err == cudaSuccess ? Error::SUCCESS : cuda_failure(err, "zeroing an output");
}

// float32 as fp16 pairs' scratch (fp32_pair_scratch_bytes) from cudaMallocAsync, set in p, or null
// (none needed, or none to be had: the 3xTF32 kernels, which need none, take the call).
template <class Params>
void* alloc_fp32_pair_scratch(Params& p, cudaStream_t stream) {
  const int64_t bytes = fp32_pair_scratch_bytes(p);
  if (bytes <= 0) return nullptr;
  void* scratch = nullptr;
  if (cudaMallocAsync(&scratch, static_cast<size_t>(bytes), stream) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  p.fp32_pair_scratch = scratch;
  return scratch;
}

Error forward_unguarded(const FlashAttentionForwardArgs& a, cudaStream_t stream) {
  if (Error e = check_paged_and_splits(a); e != Error::SUCCESS) return e;
  const TensorArg o = query_like("o", a.o, a.o_strides, a, true);
  // A paged cache's k and v: num_pages pages of page_size rows.
  auto keys = [&](const char* name, const void* data, const Strides& s) {
    TensorArg t = key_like(name, data, s, a, false);
    if (a.block_table != nullptr) t.batch = a.num_pages, t.rows = a.page_size;
    return t;
  };
  const std::array<TensorArg, 4> tensors = {query_like("q", a.q, a.q_strides, a, false),
                                            keys("k", a.k, a.k_strides), keys("v", a.v, a.v_strides), o};
  if (Error e = check_tensors(a, tensors); e != Error::SUCCESS) return e;
  if (Error e = check_int32_arrays(a.seqused_k, a.block_table); e != Error::SUCCESS) return e;
  if (a.batch_size == 0 || a.num_heads_q == 0 || a.seqlen_q == 0) return succeed();
  if (Error e = check_device_memory(tensors, a.lse, true, a.seqused_k, a.block_table); e != Error::SUCCESS) return e;

  if (a.seqlen_k == 0) {  // no keys: output 0, logsumexp of an empty set
    if (Error e = zero(o, a.dtype, stream); e != Error::SUCCESS) return e;
    const int64_t rows = int64_t{a.batch_size} * a.num_heads_q * a.seqlen_q;
    const cudaError_t err = fill_floats(a.lse, rows, -INFINITY, stream);
    return err == cudaSuccess ? succeed() : cuda_failure(err, "filling lse");
  }
  FlashFwdParams p = make_params(a);
  p.num_splits = fwd_num_splits(p, std::min(a.num_splits, kMaxFwdSplits));
  void* partials = nullptr;  // split-KV's: out_partial, then lse_partial (FlashFwdParams)
  if (p.num_splits > 1) {
    const size_t rows = size_t(p.num_splits) * a.batch_size * a.num_heads_q * a.seqlen_q;
    if (cudaError_t err = cudaMallocAsync(&partials, rows * (a.head_dim + 1) * sizeof(float), stream);
        err != cudaSuccess) {
      if (a.num_splits != 0) return cuda_failure(err, "cudaMallocAsync of the split forward's partial outputs");
      cudaGetLastError();  // a split this call chose for itself: without its scratch, none
      partials = nullptr;
      p.num_splits = 1;
    } else {
      p.out_partial = static_cast<float*>(partials);
      p.lse_partial = p.out_partial + rows * a.head_dim;
    }
  }
  void* const pair_scratch = alloc_fp32_pair_scratch(p, stream);
  cudaError_t err = run_flash_fwd_cuda(p, stream);
  for (void* scratch : {partials, pair_scratch}) {
    if (scratch == nullptr) continue;
    const cudaError_t free_err = cudaFreeAsync(scratch, stream);
    if (err == cudaSuccess) err = free_err;
  }
  return err == cudaSuccess ? succeed() : cuda_failure(err, "the forward kernel launch");
}

Error backward_unguarded(const FlashAttentionBackwardArgs& a, cudaStream_t stream) {
  const TensorArg dq = query_like("dq", a.dq, a.dq_strides, a, true), dk = key_like("dk", a.dk, a.dk_strides, a, true),
                  dv = key_like("dv", a.dv, a.dv_strides, a, true);
  const std::array<TensorArg, 8> tensors = {
      query_like("q", a.q, a.q_strides, a, false),      key_like("k", a.k, a.k_strides, a, false),
      key_like("v", a.v, a.v_strides, a, false),        query_like("o", a.o, a.o_strides, a, false),
      query_like("d_o", a.d_o, a.d_o_strides, a, false), dq, dk, dv};
  if (Error e = check_tensors(a, tensors); e != Error::SUCCESS) return e;
  if (Error e = check_int32_arrays(a.seqused_k, nullptr); e != Error::SUCCESS) return e;
  const size_t workspace_bytes = flash_attention_backward_workspace_size(a);
  if (a.workspace != nullptr) {
    if (a.workspace_bytes < workspace_bytes)
      return fail(Error::INVALID_ARGUMENT, "workspace_bytes must be at least ", workspace_bytes,
                  " (flash_attention_backward_workspace_size), got ", a.workspace_bytes);
    if (reinterpret_cast<uintptr_t>(a.workspace) % 16 != 0)
      return fail(Error::INVALID_ALIGNMENT, "workspace must be 16-byte aligned");
  }
  if (a.batch_size == 0 || a.num_heads_q == 0) return succeed();
  if (Error e = check_device_memory(tensors, a.lse, a.seqlen_q > 0, a.seqused_k); e != Error::SUCCESS) return e;

  if (a.seqlen_q == 0 || a.seqlen_k == 0) {  // no query sees a key: every gradient is 0
    for (const TensorArg* t : {&dq, &dk, &dv})
      if (Error e = zero(*t, a.dtype, stream); e != Error::SUCCESS) return e;
    return succeed();
  }
  if (a.seqused_k != nullptr) {  // keys past a sequence's used ones get gradient 0 (no kernel writes them)
    for (const TensorArg* t : {&dk, &dv})
      if (Error e = zero(*t, a.dtype, stream); e != Error::SUCCESS) return e;
  }
  FlashBwdParams p = make_params(a);
  const WorkspaceLayout layout = workspace_layout(a);
  const bool fused = layout.accum_elems > 0 && prefers_fused_backward(p);
  void* workspace = a.workspace;
  if (workspace == nullptr) {  // what this call takes, no more
    const size_t bytes = static_cast<size_t>(fused ? layout.total() : layout.delta_bytes);
    if (cudaError_t err = cudaMallocAsync(&workspace, bytes, stream); err != cudaSuccess)
      return cuda_failure(err, "cudaMallocAsync of the backward's workspace");
  }
  p.delta = workspace;
  cudaError_t err = cudaSuccess;
  if (fused) {  // dQ added up by the dK/dV kernel in fp32, in a fixed order, then converted
    char* scratch = static_cast<char*>(workspace) + static_cast<size_t>(layout.accum_offset);
    // The ordered adds' counters; dq_accum is zeroed by the backward's first kernel.
    err = cudaMemsetAsync(scratch + static_cast<size_t>(layout.accum_elems) * 4, 0,
                          static_cast<size_t>(layout.counters) * 4, stream);
    set_fused_dq_scratch(p, scratch, static_cast<int64_t>(layout.accum_elems), true);
    p.dq_accum_strides.row = a.head_dim;
    p.dq_accum_strides.head = p.dq_accum_strides.row * a.seqlen_q;
    p.dq_accum_strides.batch = p.dq_accum_strides.head * a.num_heads_q;
  }
  // float32 as fp16 pairs' scratch where the call allocates its own: a caller's workspace is
  // sized without it (flash_attention_backward_workspace_size).
  void* const pair_scratch = a.workspace == nullptr ? alloc_fp32_pair_scratch(p, stream) : nullptr;
  if (err == cudaSuccess) err = run_flash_bwd_cuda(p, stream);
  for (void* scratch : {a.workspace == nullptr ? workspace : nullptr, pair_scratch}) {
    if (scratch == nullptr) continue;
    const cudaError_t free_err = cudaFreeAsync(scratch, stream);
    if (err == cudaSuccess) err = free_err;
  }
  return err == cudaSuccess ? succeed() : cuda_failure(err, "the backward kernel launch");
}

// No exception leaves the API: the host side allocates (messages, the launchers' caches), and an
// allocation that fails is reported as the call's error.
template <class Call>
Error guarded(Call&& call) noexcept {
  try {
    return call();
  } catch (const std::exception& e) {
    return fail(Error::CUDA_ERROR, "a host-side step failed: ", e.what());
  } catch (...) {
    return fail(Error::CUDA_ERROR, "a host-side step failed");
  }
}
Error forward(const FlashAttentionForwardArgs& a, cudaStream_t stream) {
  return guarded([&] { return forward_unguarded(a, stream); });
}
Error backward(const FlashAttentionBackwardArgs& a, cudaStream_t stream) {
  return guarded([&] { return backward_unguarded(a, stream); });
}

// The simple form's names for the extended form's, in the last message: a failed simple call
// names the argument the caller passed (seq_len, not seqlen_q; L, not lse). Never throws.
void name_simple_form_arguments() {
  static constexpr std::pair<const char*, const char*> kNames[] = {
      {"num_heads_q", "num_heads"}, {"num_heads_kv", "num_heads"}, {"seqlen_q", "seq_len"}, {"seqlen_k", "seq_len"},
      {"q", "Q"}, {"k", "K"}, {"v", "V"}, {"o", "O"}, {"lse", "L"}, {"d_o", "dO"}, {"dq", "dQ"}, {"dk", "dK"},
      {"dv", "dV"}};
  try {
    std::string renamed;
    for (size_t i = 0; i < last_message.size();) {
      auto word_char = [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_'; };
      size_t end = i;
      while (end < last_message.size() && word_char(last_message[end])) ++end;
      if (end == i) {
        renamed += last_message[i++];
        continue;
      }
      const std::string word = last_message.substr(i, end - i);
      const auto* match = std::find_if(std::begin(kNames), std::end(kNames),
                                       [&](const auto& names) { return word == names.first; });
      renamed += match != std::end(kNames) ? match->second : word;
      i = end;
    }
    last_message = std::move(renamed);
  } catch (...) {  // the extended form's names are still a message
  }
}

// The simple form's configuration: equal heads and lengths, contiguous [B, H, N, D] tensors.
template <typename T>
AttentionConfig simple_config(int batch_size, int num_heads, int seq_len, int head_dim, float scale, bool causal) {
  AttentionConfig c;
  c.dtype = data_type_of<T>();
  c.batch_size = batch_size;
  c.num_heads_q = c.num_heads_kv = num_heads;
  c.seqlen_q = c.seqlen_k = seq_len;
  c.head_dim = head_dim;
  c.scale = scale;
  c.causal = causal;
  return c;
}

template <typename T>
Error forward_simple(const T* Q, const T* K, const T* V, T* O, float* L, int batch_size, int num_heads, int seq_len,
                     int head_dim, float scale, bool causal, cudaStream_t stream) {
  FlashAttentionForwardArgs a;
  static_cast<AttentionConfig&>(a) = simple_config<T>(batch_size, num_heads, seq_len, head_dim, scale, causal);
  a.q = Q;
  a.k = K;
  a.v = V;
  a.o = O;
  a.lse = L;
  a.q_strides = a.k_strides = a.v_strides = a.o_strides = bhsd_strides(num_heads, seq_len, head_dim);
  const Error e = forward(a, stream);
  if (e != Error::SUCCESS) name_simple_form_arguments();
  return e;
}

template <typename T>
Error backward_simple(const T* Q, const T* K, const T* V, const T* O, const float* L, const T* dO, T* dQ, T* dK, T* dV,
                      int batch_size, int num_heads, int seq_len, int head_dim, float scale, bool causal,
                      cudaStream_t stream) {
  FlashAttentionBackwardArgs a;
  static_cast<AttentionConfig&>(a) = simple_config<T>(batch_size, num_heads, seq_len, head_dim, scale, causal);
  a.q = Q;
  a.k = K;
  a.v = V;
  a.o = O;
  a.lse = L;
  a.d_o = dO;
  a.dq = dQ;
  a.dk = dK;
  a.dv = dV;
  a.q_strides = a.k_strides = a.v_strides = a.o_strides = a.d_o_strides = a.dq_strides = a.dk_strides =
      a.dv_strides = bhsd_strides(num_heads, seq_len, head_dim);
  const Error e = backward(a, stream);
  if (e != Error::SUCCESS) name_simple_form_arguments();
  return e;
}

}  // namespace

const char* get_error_string(FlashAttentionError error) {
  switch (error) {
    case Error::SUCCESS: return "success";
    case Error::INVALID_DIMENSION: return "invalid dimension";
    case Error::NULL_POINTER: return "null pointer";
    case Error::UNSUPPORTED_HEAD_DIM: return "unsupported head dimension";
    case Error::UNSUPPORTED_DTYPE: return "unsupported data type";
    case Error::INVALID_ALIGNMENT: return "misaligned pointer or stride";
    case Error::INVALID_LAYOUT: return "invalid tensor layout";
    case Error::INVALID_ARGUMENT: return "invalid argument";
    case Error::CUDA_ERROR: return "CUDA error";
  }
  return "unknown error code";
}

const char* get_last_error_message() { return last_message.c_str(); }

FlashAttentionError flash_attention_forward(const FlashAttentionForwardArgs& args, cudaStream_t stream) {
  return forward(args, stream);
}

FlashAttentionError flash_attention_backward(const FlashAttentionBackwardArgs& args, cudaStream_t stream) {
  return backward(args, stream);
}

size_t flash_attention_backward_workspace_size(const AttentionConfig& c) {
  // Sizes the API accepts keep this below 2^63; larger ones saturate (and are rejected anyway).
  const Wide bytes = workspace_layout(c).total();
  return bytes < Wide{SIZE_MAX} ? static_cast<size_t>(bytes) : SIZE_MAX;
}

bool flash_attention_supports(DataType dtype, int head_dim) { return supported(dtype, head_dim); }

#define CUFLASH_SIMPLE_FORMS(T)                                                                                     \
  FlashAttentionError flash_attention_forward(const T* Q, const T* K, const T* V, T* O, float* L, int batch_size,   \
                                              int num_heads, int seq_len, int head_dim, float scale, bool causal,   \
                                              cudaStream_t stream) {                                                \
    return forward_simple(Q, K, V, O, L, batch_size, num_heads, seq_len, head_dim, scale, causal, stream);          \
  }                                                                                                                 \
  FlashAttentionError flash_attention_backward(const T* Q, const T* K, const T* V, const T* O, const float* L,      \
                                               const T* dO, T* dQ, T* dK, T* dV, int batch_size, int num_heads,     \
                                               int seq_len, int head_dim, float scale, bool causal,                 \
                                               cudaStream_t stream) {                                               \
    return backward_simple(Q, K, V, O, L, dO, dQ, dK, dV, batch_size, num_heads, seq_len, head_dim, scale, causal, \
                           stream);                                                                                 \
  }
CUFLASH_SIMPLE_FORMS(float)
CUFLASH_SIMPLE_FORMS(half)
CUFLASH_SIMPLE_FORMS(__nv_bfloat16)
#undef CUFLASH_SIMPLE_FORMS

}  // namespace cuflash
