"""What cuflash_attn.scaled_dot_product_attention does with calls its kernels cannot run: it
hands them to torch.nn.functional.scaled_dot_product_attention (the function torch had when
cuflash_attn was imported, so that cuflash_attn.enable() never routes a fallback back to us),
which computes them or raises its own error for input it rejects. A call that torch completes
warns once per reason (FallbackWarning); sdpa_stats() counts where the calls went.
"""
import math
import numbers
import threading
import warnings
from typing import Dict, Optional

import torch
import torch.autograd.forward_ad as forward_ad

from .ops import MAX_HEAD_DIM, SUPPORTED_DTYPES


def _original_sdpa():
    fn = torch.nn.functional.scaled_dot_product_attention
    # Imported again while cuflash_attn.enable() is on (importlib.reload): torch's builtin.
    return torch._C._nn.scaled_dot_product_attention if fn.__module__.startswith("cuflash_attn") else fn


TORCH_SDPA = _original_sdpa()

_DEVICES = ("cpu", "cuda", "meta")  # meta: the ops' fakes give the shapes
_MAX_CUDA_GRID = 65535  # batch and heads: grid dimensions of the CUDA kernels


class FallbackWarning(UserWarning):
    """A scaled_dot_product_attention call ran torch's implementation instead of cuflash_attn's."""


class SDPAArgumentError(ValueError, RuntimeError):
    """Input that torch's scaled_dot_product_attention rejects as well (with a RuntimeError):
    `except ValueError` and `except RuntimeError` both catch it."""


def fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Optional[str]:
    """Why the kernels cannot run this call (it then goes to torch), or None. Input torch rejects
    goes to torch as well, which raises its own error."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "query, key or value is not a tensor"
    if any(t.is_nested for t in tensors):  # before the subclass check: jagged ones are subclasses
        return "nested tensors"
    if any(_overrides_torch_function(t) for t in (*tensors, attn_mask)):
        return "a tensor subclass with __torch_function__ (e.g. DTensor)"
    reason = _tensor_reason(tensors)
    if reason is None:
        reason = _feature_reason(attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reason is None:
        reason = _shape_reason(query, key, value, enable_gqa)
    if reason is None and attn_mask is not None:
        reason = _mask_reason(query, key, attn_mask)
    return reason


def _overrides_torch_function(t) -> bool:
    # torch.overrides.has_torch_function's test of one argument, without its test for active
    # TorchFunctionModes: `with torch.device("cuda"):` is one, and must not turn the kernels off.
    cls = type(t)
    return cls is not torch.Tensor and getattr(cls, "__torch_function__", None) not in (
        None, torch._C._disabled_torch_function_impl)


def widens_to_float32(query: torch.Tensor, attn_mask) -> bool:
    """A float32 attn_mask beside a float16/bfloat16 query (outside autocast, which casts the mask
    to the query's dtype): the kernels add a float mask in the query's dtype, and rounding a
    float32 bias to 16 bits can move the scores by far more than their own rounding (a bias near
    1000 by up to 4), so such a call runs in float32. (torch 2.11's CUDA backends gave NaN rows
    for it on an H100: benchmarks/NOTES.md, the fifty-fourth session.)"""
    return (attn_mask is not None and _op_dtype(attn_mask) == torch.float32
            and _op_dtype(query) in (torch.float16, torch.bfloat16))


def _op_dtype(t: torch.Tensor) -> torch.dtype:
    """t's dtype as the op receives it: in an autocast region of t's device type, the op's
    autocast rule (autocast.py) casts float16/bfloat16/float32 tensors to the region's dtype, as
    torch's SDPA does (so q, k of float32 and v of bfloat16 are one dtype there)."""
    device_type = t.device.type
    if (t.is_floating_point() and t.dtype != torch.float64 and device_type in ("cpu", "cuda")
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def _tensor_reason(tensors) -> Optional[str]:
    dtype, device = _op_dtype(tensors[0]), tensors[0].device
    for t in tensors:
        if t.layout != torch.strided:
            return f"layout {t.layout}"
        if _op_dtype(t) != dtype or t.device != device:
            return "query, key and value of different dtypes or devices"
        if t.dim() < 2:
            return "a tensor with fewer than 2 dimensions"
    if device.type not in _DEVICES:
        return f"device type {device.type}"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype}"
    # The ops have no forward-mode derivative and no functorch rules: torch's SDPA has both.
    if any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return "forward-mode AD (dual tensors)"
    if torch._C._functorch.maybe_current_level() is not None:
        return "a torch.func transform (vmap, grad, jvp, ...)"
    return None


def _feature_reason(attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Optional[str]:
    # Types torch's argument parser rejects ("argument 'is_causal' must be bool, not str") or that
    # the kernels' float scale does not take (a 0-dim tensor): torch raises or computes them.
    if not (isinstance(is_causal, bool) and isinstance(enable_gqa, bool)):
        return "is_causal or enable_gqa not a bool"
    if not (scale is None or isinstance(scale, numbers.Real)):
        return f"a scale of type {type(scale).__name__}"
    if attn_mask is not None:
        if is_causal:
            # torch 2.11's math backend raises here and its CPU flash backend combines the two:
            # torch decides, whether or not the kernels take attn_mask.
            return "is_causal together with attn_mask"
    if dropout_p == 1.0:
        return "dropout_p = 1"
    if scale is not None and not math.isfinite(scale):
        return "a scale that is not finite"
    return None


def _shape_reason(query, key, value, enable_gqa) -> Optional[str]:
    head_dim = query.shape[-1]
    if key.shape[-1] != head_dim:
        return "key with a head_dim other than query's"
    if value.shape[-1] != head_dim:
        return "value with a head_dim other than query's"
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head_dim outside [1, {MAX_HEAD_DIM}]"
    if not query.dim() == key.dim() == value.dim():
        return "query, key and value with different numbers of dimensions (torch broadcasts them)"
    lead = query.shape[:-2]
    kv_lead = lead
    if enable_gqa and query.dim() >= 3:
        heads_kv = key.shape[-3]
        # Before any fallback: torch 2.11's CPU backend divides by key's or value's heads (the
        # process dies of SIGFPE), whether or not they are equal.
        if heads_kv == 0 or value.shape[-3] == 0:
            raise SDPAArgumentError("cuflash_attn.scaled_dot_product_attention: key and value must have at least "
                                    f"one head under enable_gqa, got {heads_kv} and {value.shape[-3]}")
        if value.shape[-3] != heads_kv:
            return "key and value with different numbers of heads"
        if query.shape[-3] % heads_kv != 0:
            return "heads of query not a multiple of the heads of key and value"
        kv_lead = (*lead[:-1], heads_kv)
    if key.shape[:-2] != kv_lead or value.shape[:-2] != kv_lead:
        return "leading dimensions (batch, heads) that differ between query, key and value (torch broadcasts them)"
    if query.is_cuda and query.dim() >= 3 and (query.shape[:-3].numel() > _MAX_CUDA_GRID or
                                                query.shape[-3] > _MAX_CUDA_GRID):
        return f"batch or heads above {_MAX_CUDA_GRID} on CUDA"
    return None


def _mask_reason(query, key, attn_mask) -> Optional[str]:
    """The kernels take a boolean or floating-point mask on query's device that broadcasts to
    (N, ..., L, S), a float one in query's dtype or float32 (beside a float64 query widened
    exactly, beside a 16-bit one with the call widened: widens_to_float32); anything else is
    torch's to accept or reject."""
    if not isinstance(attn_mask, torch.Tensor):
        return "attn_mask is not a tensor"
    if attn_mask.layout != torch.strided or attn_mask.device != query.device:
        return "attn_mask of another layout or device than query"
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        return f"attn_mask of dtype {attn_mask.dtype}"
    mask_dtype, query_dtype = _op_dtype(attn_mask), _op_dtype(query)
    if attn_mask.is_floating_point() and mask_dtype != query_dtype and mask_dtype != torch.float32:
        # torch takes a float mask of query's dtype or float32 only
        return "a floating-point attn_mask of another dtype than query's, other than float32"
    target = (*query.shape[:-1], key.shape[-2])
    if attn_mask.dim() > len(target) or any(m not in (1, t) for m, t in zip(reversed(attn_mask.shape),
                                                                          reversed(target))):
        return "attn_mask that does not broadcast to (N, ..., L, S)"
    return None


def run_torch(reason: str, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    out = TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    _record(reason)  # after torch: a call torch rejects raised above, and is neither warned about nor counted
    return out


_KERNEL = "cuflash_attn"
_lock = threading.Lock()
_counts: Dict[str, int] = {}
_warned = set()


@torch.compiler.assume_constant_result
def _record(route: str) -> bool:
    # Runs in Python on every eager call; under torch.compile, while tracing only (counting inside
    # the graph would make dynamo guard on the counts and recompile on every call).
    with _lock:
        _counts[route] = _counts.get(route, 0) + 1
        first = route != _KERNEL and route not in _warned
        _warned.add(route)
    if first:
        warnings.warn(f"cuflash_attn.scaled_dot_product_attention: {route}: running torch's "
                      "scaled_dot_product_attention instead (shown once per reason)", FallbackWarning, stacklevel=4)
    return True


def record_kernel_call() -> None:
    _record(_KERNEL)


def sdpa_stats() -> Dict[str, object]:
    """Where cuflash_attn.scaled_dot_product_attention calls went since import or the last
    reset_sdpa_stats(): {"cuflash_attn": calls its kernels ran, "fallback": {reason: calls sent
    to torch}}. Eager calls count every time; under torch.compile a call counts when dynamo traces
    it (the route is chosen then and fixed in the graph): once per compilation, or twice where
    dynamo restarts its analysis, never per run of the compiled code."""
    with _lock:
        fallback = {r: n for r, n in _counts.items() if r != _KERNEL}
        return {_KERNEL: _counts.get(_KERNEL, 0), "fallback": fallback}


def reset_sdpa_stats() -> None:
    """Zeroes sdpa_stats() and forgets which fallback reasons were warned about."""
    with _lock:
        _counts.clear()
        _warned.clear()
