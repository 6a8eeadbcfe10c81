"""The public API."""
import math
import numbers
import sys
from typing import Optional, Tuple

import torch

from .fallback import SDPAArgumentError, fallback_reason, record_kernel_call, run_torch, widens_to_float32
from .ops import _ops, new_rng_state

_PLAIN_NUMBERS = (int, float)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: Optional[float] = None, return_lse: bool = False, *,
                    window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                    bottom_right: bool = False, attn_mask: Optional[torch.Tensor] = None,
                    deterministic: bool = True, seqused_k: Optional[torch.Tensor] = None, num_splits: int = 1):
    """Exact attention softmax(q k^T * scale) v, forward and backward, on CPU or CUDA.

    q: [batch, heads_q, seqlen_q, head_dim]; k, v: [batch, heads_kv, seqlen_k, head_dim] with
    heads_q a multiple of heads_kv (GQA/MQA: query head h uses key/value head
    h // (heads_q // heads_kv), with no copy of k and v); any strides (a [batch, seqlen, heads,
    head_dim] tensor viewed with transpose(1, 2) runs without a copy; a last dimension that is not
    contiguous is copied). dtypes float16, bfloat16, float32, float64; head_dim 1 to 256. scale
    defaults to 1 / sqrt(head_dim).

    Masks and ALiBi are aligned top-left (query i faces key i, as torch's is_causal), or
    bottom-right (query i faces key i + seqlen_k - seqlen_q, flash_attn's rule) with
    bottom_right=True. causal hides keys right of that diagonal; window_size=(left, right)
    shows each query only the keys within left/right of it (-1: unbounded). softcap > 0 maps
    scores s to softcap * tanh(s / softcap); alibi_slopes (float32 [heads_q] or [batch, heads_q])
    subtracts slope * |i + diagonal - j|. attn_mask is torch's (boolean, True takes part, or of
    q's dtype and added to the scores), of any shape that broadcasts to [batch, heads_q, seqlen_q,
    seqlen_k], read in place; a float mask that requires grad gets its gradient. dropout_p drops
    probabilities with torch's generator (seeded by torch.manual_seed); the backward regenerates
    the same mask. deterministic=True (the default) makes every gradient bitwise reproducible;
    False lets the backward add dq up with atomics where that is faster (on Hopper, head dims
    33-64, 97-128 and 225-256), unless torch.use_deterministic_algorithms(True) is in effect. seqused_k
    (int32 [batch], on q's device): how many of each sequence's keys take part, its first ones
    (clamped to seqlen_k; with bottom_right, masks and ALiBi align to that count; the others get
    gradient 0), a padded batch's key lengths or a KV cache's filled lengths, without reading
    the rest. num_splits (the forward's; CUDA float16/bfloat16, and the CPU): 1 (the default), each
    row's keys in one CTA (CPU: one work item); n > 1, split among n of them whose partial outputs
    are merged (split-KV); 0, split where one query block a sequence would leave SMs (CPU: threads)
    idle (decoding).

    Returns out (the layout of q), and with return_lse=True also the logsumexp of the scores,
    [batch, heads_q, seqlen_q] in float32 (float64 for float64 inputs); -inf for a query row that
    sees no key (its output is 0). lse is differentiable.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cuflash_attn: {name} must be a tensor [batch, heads, seqlen, head_dim], got "
                            f"{type(t).__name__}")
        check_dense(name, t)
    _check_scalars("scale", scale, softcap, dropout_p, alibi_slopes)
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"cuflash_attn: attn_mask must be a boolean or floating-point tensor, got "
                        f"{type(attn_mask).__name__}")
    window_left, window_right = _window(window_size)
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"cuflash_attn: num_splits must be an int, got {type(num_splits).__name__}")
    rng_state = new_rng_state(q.device) if dropout_p > 0.0 else None
    out, lse = _ops.fwd(q, k, v, scale, bool(causal), bool(bottom_right), window_left, window_right,
                        float(softcap), alibi_slopes, float(dropout_p), rng_state, attn_mask=attn_mask,
                        deterministic=bool(deterministic), seqused_k=seqused_k, num_splits=_int64(int(num_splits)))
    return (out, lse) if return_lse else out


def check_dense(name, t: torch.Tensor) -> None:
    """The kernels read strided tensors: a sparse or nested one is named here, not by the dispatcher
    ("Could not run 'cuflash_attn::fwd' with arguments from the 'SparseCPU' backend")."""
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"cuflash_attn: {name} must be a dense (strided) tensor, got "
                        f"{'a nested tensor' if t.is_nested else t.layout}")


def _check_number(name, x, optional=False):
    # (type() first: the numbers.Real check alone is a microsecond of every call's host time)
    if not (type(x) in _PLAIN_NUMBERS or isinstance(x, numbers.Real) or (optional and x is None)):
        raise TypeError(f"cuflash_attn: {name} must be a number{' or None' if optional else ''}, got "
                        f"{type(x).__name__}")
    if type(x) is int and not -_FLOAT_MAX <= x <= _FLOAT_MAX:  # (float(x) would raise OverflowError, unnamed)
        raise ValueError(f"cuflash_attn: {name} must be a finite number, got an int beyond a float's range")


_FLOAT_MAX = int(sys.float_info.max)
_INT64_MAX = 2**63 - 1


def _int64(x):
    """A window side or split count as the op's int64 schema takes it: beyond int64's range is
    beyond every sequence, so the nearest int64 means the same."""
    return min(max(x, -_INT64_MAX - 1), _INT64_MAX)


def _check_scalars(scale_name, scale, softcap, dropout_p, alibi_slopes) -> None:
    """Types of the options flash_attention and the flash_attn API share (the op checks their
    values), so that a wrong one raises a TypeError naming it, not torch's comparison or
    schema error."""
    _check_number("dropout_p", dropout_p)
    _check_number(scale_name, scale, optional=True)
    if scale is not None and not math.isfinite(scale):  # (the op's message would say "scale")
        raise ValueError(f"cuflash_attn: {scale_name} must be a finite number, got {scale}")
    _check_number("softcap", softcap)
    if alibi_slopes is not None and not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"cuflash_attn: alibi_slopes must be a float32 tensor [heads] or [batch, heads], got "
                        f"{type(alibi_slopes).__name__}")


def _window(window_size) -> Tuple[int, int]:
    if type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is int and \
            type(window_size[1]) is int:  # the common case, without numbers.Integral's checks
        return _int64(window_size[0]), _int64(window_size[1])
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"cuflash_attn: window_size must be a pair (left, right), got {window_size!r}") from None
    if not (isinstance(left, numbers.Integral) and isinstance(right, numbers.Integral)):
        raise TypeError(f"cuflash_attn: window_size must be a pair of ints (left, right), got {window_size!r}")
    return _int64(int(left)), _int64(int(right))


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention's signature and semantics.

    Shapes (N, ..., L, E) for query and (N, ..., S, E) for key and value; is_causal is aligned
    top-left; attn_mask (boolean or float, any shape that broadcasts to (N, ..., L, S)) runs on
    the kernels. Calls the kernels cannot run (cuflash_attn.fallback lists them: is_causal with
    attn_mask, a value head_dim other than query's, head_dim above 256, ...) run torch's
    implementation, with a FallbackWarning once per reason; input torch rejects raises as torch
    raises it.
    """
    _check_sdpa_args(query, key, value, dropout_p)
    reason = fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reason is not None:
        return run_torch(reason, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    lead = query.shape[:-2]
    # Fold (N, ...) into [batch, heads]: a view whenever the leading dimensions allow one.
    q4, k4, v4 = (_as_4d(t) for t in (query, key, value))
    widen = widens_to_float32(query, attn_mask)
    if widen:
        q4, k4, v4 = (t.float() for t in (q4, k4, v4))
    out = flash_attention(q4, k4, v4, causal=is_causal, scale=scale, dropout_p=float(dropout_p),
                          attn_mask=_mask_as_4d(attn_mask, query, key, q4.dtype))
    if widen:
        out = out.to(query.dtype)
    record_kernel_call()
    if query.dim() == 4:
        return out  # the query's layout, as torch's backends give it
    # torch computes inputs of other ranks in its math backend, whose output is contiguous
    # (callers may view it): ours follows the folded query's layout
    return out.reshape(*lead, out.shape[-2], out.shape[-1]).contiguous()


def _check_sdpa_args(query, key, value, dropout_p) -> None:
    """Errors torch raises too (as RuntimeError; SDPAArgumentError is both), checked here because
    torch's message does not name the argument (dropout_p) or torch 2.11's CPU backend reads
    out of bounds instead of raising (key and value of different lengths)."""
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        raise TypeError(f"cuflash_attn.scaled_dot_product_attention: dropout_p must be a float, "
                        f"got {type(dropout_p).__name__}") from None
    if not 0.0 <= p <= 1.0:  # also NaN
        raise SDPAArgumentError(f"cuflash_attn.scaled_dot_product_attention: dropout_p must be in [0, 1], got {p}")
    dense = all(isinstance(t, torch.Tensor) and not t.is_nested and t.dim() >= 2 for t in (key, value))
    if dense and key.shape[-2] != value.shape[-2]:
        raise SDPAArgumentError("cuflash_attn.scaled_dot_product_attention: key and value must have the same "
                                f"sequence length, got {key.shape[-2]} and {value.shape[-2]}")


def _mask_as_4d(attn_mask: Optional[torch.Tensor], query: torch.Tensor, key: torch.Tensor, dtype: torch.dtype):
    """attn_mask for the folded [batch, heads, L, S] inputs, in their dtype if floating point
    (fallback_reason lets through only the dtypes that widen exactly, and a float32 mask beside a
    16-bit query comes with the inputs widened to float32). Up to 4 dimensions folding
    only prepends ones, so the mask broadcasts as it is; beyond, it is expanded over the leading
    dimensions first."""
    if attn_mask is None:
        return None
    if attn_mask.is_floating_point() and attn_mask.dtype != dtype:
        attn_mask = attn_mask.to(dtype)
    if query.dim() <= 4:
        return attn_mask
    full = attn_mask.expand(*query.shape[:-1], key.shape[-2])
    return full.reshape(math.prod(full.shape[:-3]), *full.shape[-3:])


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:])  # (not -1: a tensor of 0 elements has no -1)


__all__ = ["flash_attention", "scaled_dot_product_attention"]
