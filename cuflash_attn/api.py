"""The public API."""
import math
import numbers
from typing import Optional, Tuple

import torch

from .ops import _ops, new_rng_state

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: Optional[float] = None, return_lse: bool = False, *,
                    window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                    bottom_right: bool = False):
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
    subtracts slope * |i + diagonal - j|. dropout_p drops probabilities with torch's generator
    (seeded by torch.manual_seed); the backward regenerates the same mask.

    Returns out (the layout of q), and with return_lse=True also the logsumexp of the scores,
    [batch, heads_q, seqlen_q] in float32 (float64 for float64 inputs); -inf for a query row that
    sees no key (its output is 0). lse is differentiable.
    """
    window_left, window_right = _window(window_size)
    rng_state = new_rng_state(q.device) if dropout_p > 0.0 else None
    out, lse = _ops.fwd(q, k, v, scale, bool(causal), bool(bottom_right), window_left, window_right,
                        float(softcap), alibi_slopes, float(dropout_p), rng_state)
    return (out, lse) if return_lse else out


def _window(window_size) -> Tuple[int, int]:
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"cuflash_attn: window_size must be a pair (left, right), got {window_size!r}") from None
    if not (isinstance(left, numbers.Integral) and isinstance(right, numbers.Integral)):
        raise TypeError(f"cuflash_attn: window_size must be a pair of ints (left, right), got {window_size!r}")
    return int(left), int(right)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention's signature and semantics.

    Shapes (N, ..., L, E) for query and (N, ..., S, E) for key and value; is_causal is aligned
    top-left. Arguments the kernels cannot honour yet raise NotImplementedError naming the
    argument; nothing is silently ignored.
    """
    if attn_mask is not None:
        raise NotImplementedError("cuflash_attn.scaled_dot_product_attention: attn_mask is not supported yet")
    if not isinstance(dropout_p, (int, float)) or math.isnan(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"cuflash_attn.scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cuflash_attn.scaled_dot_product_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"cuflash_attn.scaled_dot_product_attention: {name} must have at least 2 dimensions "
                             f"(..., seqlen, head_dim), got {t.dim()}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError("cuflash_attn.scaled_dot_product_attention: query, key and value must have the same "
                         f"number of dimensions, got {query.dim()}, {key.dim()} and {value.dim()}")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError("cuflash_attn.scaled_dot_product_attention: value with a head_dim "
                                  f"({value.shape[-1]}) other than query's ({query.shape[-1]}) is not supported yet")
    gqa = query.dim() >= 3 and key.shape[-3] != query.shape[-3]
    if gqa and not enable_gqa:
        raise ValueError("cuflash_attn.scaled_dot_product_attention: query and key must have the same number "
                         f"of heads ({query.shape[-3]} vs {key.shape[-3]}) unless enable_gqa=True")
    lead = query.shape[:-2]
    kv_lead = (*lead[:-1], key.shape[-3]) if gqa else lead
    if key.shape[:-2] != kv_lead or value.shape[:-2] != kv_lead:
        raise ValueError("cuflash_attn.scaled_dot_product_attention: query, key and value must have the same "
                         f"leading dimensions, got {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
    # Fold (N, ...) into [batch, heads]: a view whenever the leading dimensions allow one.
    q4, k4, v4 = (_as_4d(t) for t in (query, key, value))
    out = flash_attention(q4, k4, v4, causal=is_causal, scale=scale, dropout_p=float(dropout_p))
    return out.reshape(*lead, out.shape[-2], out.shape[-1])


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t.reshape(-1, t.shape[-3], t.shape[-2], t.shape[-1])


__all__ = ["flash_attention", "scaled_dot_product_attention"]
