"""flash_attn 2.8's Python API on cuflash_attn's kernels: the same functions, signatures,
layouts ([batch, seqlen, heads, head_dim], packed [total_tokens, heads, head_dim]) and return
values, so that changing the import is the whole switch:

    from cuflash_attn.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

or, for code that imports flash_attn itself, `cuflash_attn.flash_attn_interface.install()`
before that import. Beyond flash_attn: float32 and float64, CPU tensors, torch.compile without
graph breaks. Causal masks, windows and ALiBi are aligned bottom-right, as in flash_attn.
`deterministic` is flash_attn's: with the default False the backward may add dq up with atomics
where that is faster (on Hopper, head dims 33-64, 97-128 and 225-256), so dq is not bitwise reproducible
there (unless torch.use_deterministic_algorithms(True) is in effect); True keeps every gradient
bitwise reproducible.
"""
import sys

import torch

from . import bert_padding
from .api import _check_scalars, _int64, _window, check_dense
from .ops import _ops, check_supported_dtype, new_rng_state

_PADDED = ("batch", "seqlen", "heads", "head_dim")
_PACKED = ("total_tokens", "heads", "head_dim")


def _check_tensor(name, t, dims):
    """t must be a tensor with the dimensions named by dims (the op checks the sizes)."""
    if isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_nested and t.dim() == len(dims):
        return  # (before any message is formatted: this runs on every call)
    layout = f"[{', '.join(dims)}]"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"cuflash_attn: {name} must be a tensor {layout}, got {type(t).__name__}")
    check_dense(name, t)
    raise ValueError(f"cuflash_attn: {name} must be a {len(dims)}-dimensional tensor {layout}, got shape "
                     f"{tuple(t.shape)}")


def _check_writable(name, cache):
    """Refuses, before either cache is written, a cache that the append could not write in place,
    or could write only into rows that batch entries share. Not in torch.compile's trace, which
    cannot trace these tests (is_inference) and whose graph writes the caches at its end."""
    if torch.compiler.is_compiling():
        return
    if cache.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"cuflash_attn: {name} is an inference tensor, which k and v cannot be written into outside "
                         "torch.inference_mode()")
    if cache.requires_grad and cache.is_leaf and torch.is_grad_enabled():
        raise ValueError(f"cuflash_attn: {name} is a leaf tensor that requires grad, which k and v cannot be written "
                         "into in place (call under torch.no_grad(), or append to a cache that does not require grad)")
    if torch._debug_has_internal_overlap(cache) == 1:  # expanded (stride 0) or overlapping
        raise ValueError(f"cuflash_attn: {name} has elements that share memory (an expanded or overlapping view), "
                         "which k and v cannot be written into")


def _unpack(name, t, dims):
    """The views a packed tensor holds: dims names its dimensions, the packed one by its size
    ("3" for qkv, "2" for kv)."""
    _check_tensor(name, t, dims)
    axis = next(i for i, d in enumerate(dims) if d.isdigit())
    if t.shape[axis] != int(dims[axis]):
        raise ValueError(f"cuflash_attn: {name} must have shape [{', '.join(dims)}], got {tuple(t.shape)}")
    return t.unbind(axis)


def _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
               return_attn_probs, varlen=None):
    """varlen: None for padded inputs, else (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, _PADDED if varlen is None else _PACKED)
    _check_scalars("softmax_scale", softmax_scale, softcap, dropout_p, alibi_slopes)
    window_left, window_right = _window(window_size)
    rng_state = new_rng_state(q.device) if dropout_p > 0.0 else None
    cu_seqlens_q = cu_seqlens_k = None
    max_seqlen_q = max_seqlen_k = 0
    if varlen is not None:
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = varlen
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            _check_tensor(name, cu, ("batch + 1",))
        # Tensors are accepted (flash_attn users sometimes pass them) without a host sync: 0
        # lets the packed length bound every sequence.
        max_seqlen_q = max_seqlen_q if isinstance(max_seqlen_q, int) else 0
        max_seqlen_k = max_seqlen_k if isinstance(max_seqlen_k, int) else 0
        qk, kk, vk = q, k, v
    else:
        qk, kk, vk = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = _ops.fwd(qk, kk, vk, softmax_scale, bool(causal), True, window_left, window_right, float(softcap),
                        alibi_slopes, float(dropout_p), rng_state, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, deterministic=bool(deterministic))
    if varlen is None:
        out = out.transpose(1, 2)
    if not return_attn_probs:
        return out
    if dropout_p == 0.0:  # flash_attn's S_dmask only exists under dropout; callers often want just the lse
        return out, lse, q.new_empty(0)
    probs = _attention_probs(q, k, lse, softmax_scale, causal, (window_left, window_right), softcap, alibi_slopes,
                             dropout_p, rng_state, cu_seqlens_q, cu_seqlens_k)
    return out, lse, probs


def _attention_probs(q, k, lse, softmax_scale, causal, window, softcap, alibi_slopes, dropout_p, rng_state,
                     cu_seqlens_q, cu_seqlens_k):
    """flash_attn's S_dmask under dropout, for tests only: the softmax probabilities [batch, heads,
    seqlen_q, seqlen_k], negated where dropout dropped them. Built from lse with plain torch ops
    (O(N^2) memory), with no gradient."""
    with torch.no_grad():
        if cu_seqlens_q is None:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            keep = _ops.dropout_mask(rng_state, dropout_p, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            return _dense_probs(q, k, lse, alibi_slopes, keep, softmax_scale, causal, window, softcap)
        starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        batch = len(starts_q) - 1
        lens_q = [starts_q[b + 1] - starts_q[b] for b in range(batch)]
        lens_k = [starts_k[b + 1] - starts_k[b] for b in range(batch)]
        probs = q.new_zeros((batch, q.shape[1], max(lens_q, default=0), max(lens_k, default=0)),
                            dtype=torch.float32)
        # One dropout mask for the whole batch, sliced per sequence.
        keep_all = _ops.dropout_mask(rng_state, dropout_p, batch, q.shape[1], probs.shape[2], probs.shape[3])
        for b in range(batch):
            qb = q[starts_q[b]:starts_q[b + 1]].transpose(0, 1)[None]
            kb = k[starts_k[b]:starts_k[b + 1]].transpose(0, 1)[None]
            lse_b = lse[:, starts_q[b]:starts_q[b + 1]][None]
            slopes_b = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
            keep_b = keep_all[b:b + 1, :, :lens_q[b], :lens_k[b]]
            probs[b, :, :lens_q[b], :lens_k[b]] = _dense_probs(qb, kb, lse_b, slopes_b, keep_b, softmax_scale,
                                                               causal, window, softcap)[0]
        return probs


def _dense_probs(q, k, lse, alibi_slopes, keep, softmax_scale, causal, window, softcap):
    # q, k: [batch, heads, n, d] (k's heads are repeated for GQA); alibi_slopes [heads] or
    # [batch, heads]; keep: the dropout keep-mask [batch, heads, n_q, n_k].
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    k = k.repeat_interleave(q.shape[1] // max(k.shape[1], 1), dim=1)  # no heads: none to repeat
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    nq, nk = q.shape[-2], k.shape[-2]
    rel = torch.arange(nk, device=q.device)[None, :] - torch.arange(nq, device=q.device)[:, None] - (nk - nq)
    if alibi_slopes is not None:
        s = s - alibi_slopes.reshape(-1 if alibi_slopes.dim() == 2 else 1, q.shape[1], 1, 1) * rel.abs()
    left, right = window
    right = 0 if causal else right
    hidden = torch.zeros_like(rel, dtype=torch.bool)
    if right >= 0:
        hidden |= rel > right
    if left >= 0:
        hidden |= rel < -left
    lse = lse[..., None].float()
    probs = torch.where(torch.isneginf(lse), 0.0, torch.exp(s.masked_fill(hidden, float("-inf")) - lse))
    return torch.where(keep, probs, -probs)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: [batch, seqlen_q, heads_q, head_dim]; k, v: [batch, seqlen_k, heads_kv, head_dim]. Returns
    out [batch, seqlen_q, heads_q, head_dim], and with return_attn_probs also softmax_lse
    [batch, heads_q, seqlen_q] (float32; float64 for float64 inputs) and S_dmask: under dropout
    the probabilities, dropped ones negated (tests only: O(N^2) memory); without dropout an empty
    tensor, as flash_attn's."""
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv: [batch, seqlen, 3, heads, head_dim] (views into it, no copy)."""
    q, k, v = _unpack("qkv", qkv, ("batch", "seqlen", "3", "heads", "head_dim"))
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: [batch, seqlen_q, heads_q, head_dim]; kv: [batch, seqlen_k, 2, heads_kv, head_dim]."""
    k, v = _unpack("kv", kv, ("batch", "seqlen_k", "2", "heads_kv", "head_dim"))
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q: [total_q, heads_q, head_dim]; k, v: [total_k, heads_kv, head_dim]; cu_seqlens_q/k: int32
    [batch + 1] offsets of the sequences; max_seqlen_q/k: ints (or tensors: then no host sync, and
    the packed lengths bound the grid). Returns out [total_q, heads_q, head_dim], and with
    return_attn_probs also softmax_lse [heads_q, total_q] and S_dmask (flash_attn_func's). With block_table (int32
    [batch, max_num_blocks_per_seq]; inference only, no backward) k and v are a paged cache
    [num_blocks, page_block_size, heads_kv, head_dim], page_block_size a multiple of 256, sequence
    b's keys its first cu_seqlens_k[b + 1] - cu_seqlens_k[b] rows of pages block_table[b]."""
    if block_table is not None:
        return _varlen_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table, dropout_p,
                             softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv: [total, 3, heads, head_dim]."""
    q, k, v = _unpack("qkv", qkv, ("total_tokens", "3", "heads", "head_dim"))
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen))


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: [total_q, heads_q, head_dim]; kv: [total_k, 2, heads_kv, head_dim]."""
    k, v = _unpack("kv", kv, ("total_tokens_k", "2", "heads_kv", "head_dim"))
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))

_CACHE = ("batch_cache", "seqlen_cache", "heads_kv", "head_dim")
_PAGE_SIZE_MULTIPLE = 256  # the kernels' rule for a paged cache (kPageSizeMultiple, csrc/flash_params.h)
_PAGED_CACHE = ("num_blocks", "page_block_size", "heads_kv", "head_dim")


def _check_block_table(block_table, batch, k_cache, device):
    """The op checks these too, but flash_attn_with_kvcache writes the cache first."""
    _check_tensor("block_table", block_table, ("batch", "max_num_blocks_per_seq"))
    if block_table.dtype != torch.int32 or block_table.shape[0] != batch or block_table.device != device:
        raise ValueError(f"cuflash_attn: block_table must be an int32 tensor [batch = {batch}, "
                         f"max_num_blocks_per_seq] on q's device ({device}), got {block_table.dtype} "
                         f"{tuple(block_table.shape)} on {block_table.device}")
    if k_cache.shape[1] == 0 or k_cache.shape[1] % _PAGE_SIZE_MULTIPLE:
        raise ValueError(f"cuflash_attn: with block_table, page_block_size (the caches' dimension 1) must be a "
                         f"positive multiple of {_PAGE_SIZE_MULTIPLE}, got {k_cache.shape[1]}")


def _varlen_paged(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table, dropout_p,
                  softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs):
    """flash_attn_varlen_func over a paged cache: the op takes the key counts as seqused_k."""
    _check_tensor("q", q, _PACKED)
    for name, t in (("k", k_cache), ("v", v_cache)):
        _check_tensor(name, t, _PAGED_CACHE)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_tensor(name, cu, ("batch + 1",))
    if cu_seqlens_k.dtype != torch.int32 or cu_seqlens_k.shape != cu_seqlens_q.shape or \
            cu_seqlens_k.device != q.device:
        raise ValueError(f"cuflash_attn: cu_seqlens_k must be an int32 tensor of cu_seqlens_q's shape "
                         f"{tuple(cu_seqlens_q.shape)} on q's device ({q.device}), got {cu_seqlens_k.dtype} "
                         f"{tuple(cu_seqlens_k.shape)} on {cu_seqlens_k.device}")
    # Its differences are the key counts (the op would clamp a negative one to 0): checked on the
    # CPU, as the op checks offsets (on CUDA that would synchronize), outside torch.compile's tracing.
    if not cu_seqlens_k.is_cuda and cu_seqlens_k.numel() > 1 and not torch.compiler.is_compiling():
        steps = (cu_seqlens_k[1:] < cu_seqlens_k[:-1]).nonzero()
        if steps.numel():
            b = int(steps[0])
            raise ValueError(f"cuflash_attn: cu_seqlens_k must be non-decreasing, got {int(cu_seqlens_k[b])} then "
                             f"{int(cu_seqlens_k[b + 1])} at index {b}")
    _check_block_table(block_table, cu_seqlens_q.shape[0] - 1, k_cache, q.device)
    if dropout_p != 0.0:
        raise ValueError(f"cuflash_attn: dropout_p must be 0 with block_table (inference only), got {dropout_p}")
    _check_scalars("softmax_scale", softmax_scale, softcap, 0.0, alibi_slopes)
    window_left, window_right = _window(window_size)
    max_seqlen_q = max_seqlen_q if isinstance(max_seqlen_q, int) else 0
    used = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    out, lse = _ops.fwd(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), softmax_scale, bool(causal), True,
                        window_left, window_right, float(softcap), alibi_slopes, cu_seqlens_q=cu_seqlens_q,
                        max_seqlen_q=max_seqlen_q, seqused_k=used, block_table=block_table)
    return (out, lse, q.new_empty(0)) if return_attn_probs else out  # no dropout: no S_dmask


def _cache_lengths(cache_seqlens, batch, seqlen_cache, seqlen_new, device, need_max, can_sync):
    """cache_seqlens (an int, or int32 [batch]) as an int32 tensor on device, and its largest value
    where need_max or new keys are appended or it is on the CPU (a tensor's is read back: one host
    sync, the price of an append, or rotary positions, that cannot index out of bounds), else None;
    checked to lie in the cache, leaving room for the new keys. Without can_sync (CUDA graph capture, torch.compile) a tensor
    is not read back: None, and the caller clamps what it indexes with it."""
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise TypeError(f"cuflash_attn: cache_seqlens must be an int or an int32 tensor [batch], got "
                        f"{type(cache_seqlens).__name__}")
    def room():  # (formatted only for a message)
        return f"[0, {seqlen_cache - seqlen_new}] (seqlen_cache {seqlen_cache} less the {seqlen_new} new keys)"

    if isinstance(cache_seqlens, int):
        if not 0 <= cache_seqlens <= seqlen_cache - seqlen_new:
            raise ValueError(f"cuflash_attn: cache_seqlens must be in {room()}, got {cache_seqlens}")
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device), cache_seqlens
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cuflash_attn: cache_seqlens must be an int32 tensor [batch] = [{batch}], got "
                         f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cuflash_attn: cache_seqlens must be on q's device ({device}), got {cache_seqlens.device}")
    # Read back where that is an append's or rotary's price anyway, and on the CPU, where it costs
    # no synchronization (on CUDA, with neither, the kernels clamp the lengths into the cache).
    if batch == 0 or not can_sync or not (need_max or seqlen_new > 0 or not cache_seqlens.is_cuda):
        return cache_seqlens, None
    low, high = (int(x) for x in torch.aminmax(cache_seqlens))
    if low < 0 or high > seqlen_cache - seqlen_new:
        raise ValueError(f"cuflash_attn: cache_seqlens must be in {room()}, got values in [{low}, {high}]")
    return cache_seqlens, high


def _rotary(x, cos, sin, positions, interleaved):
    """x [batch, seqlen, heads, head_dim] rotated at positions [batch, seqlen], as flash_attn's
    apply_rotary_emb: its first 2 * cos.shape[1] dimensions, in pairs (2i, 2i + 1) when
    interleaved (GPT-J), else (i, i + cos.shape[1]) (GPT-NeoX), computed in float32 (float64 for
    float64 inputs) and rounded once to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = cos.shape[1]
    c, s = (t.to(compute)[positions][:, :, None, :] for t in (cos, sin))  # [batch, seqlen, 1, half]
    rot = x[..., :2 * half].to(compute)
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :half], rot[..., half:])
    r1, r2 = x1 * c - x2 * s, x1 * s + x2 * c
    rotated = torch.stack((r1, r2), dim=-1).flatten(-2) if interleaved else torch.cat((r1, r2), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _check_rotary(rotary_cos, rotary_sin, head_dim, device):
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("cuflash_attn: rotary_cos and rotary_sin must be given together")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        _check_tensor(name, t, ("seqlen_ro", "rotary_dim / 2"))
        if not t.is_floating_point() or t.device != device:
            raise ValueError(f"cuflash_attn: {name} must be a floating-point tensor on q's device ({device}), got "
                             f"{t.dtype} on {t.device}")
    if rotary_cos.shape != rotary_sin.shape or not 0 < 2 * rotary_cos.shape[1] <= head_dim:
        raise ValueError(f"cuflash_attn: rotary_cos and rotary_sin must both be [seqlen_ro, rotary_dim / 2] with "
                         f"rotary_dim <= head_dim ({head_dim}), got {tuple(rotary_cos.shape)} and "
                         f"{tuple(rotary_sin.shape)}")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q over a KV cache, for incremental decoding. q: [batch, seqlen_q, heads_q,
    head_dim]; k_cache, v_cache: [batch_cache, seqlen_cache, heads_kv, head_dim]; cache_seqlens:
    an int or int32 [batch], the keys each sequence has in the cache (None: all of them). With
    block_table (int32 [batch, max_num_blocks_per_seq]) the caches are paged, [num_blocks,
    page_block_size, heads_kv, head_dim] with page_block_size a multiple of 256: sequence b's key
    j is row j % page_block_size of block block_table[b][j // page_block_size]. With k
    and v ([batch, seqlen_new, heads_kv, head_dim]) they are first written into the caches, in
    place, at cache_seqlens .. cache_seqlens + seqlen_new, and attended to. rotary_cos, rotary_sin
    ([seqlen_ro, rotary_dim / 2]): k rotated at positions cache_seqlens + i before it is written, q
    at cache_seqlens + i when causal or windowed, else at cache_seqlens (flash_attn's rule;
    rotary_interleaved picks the pairs). cache_batch_idx (int32 [batch]): the cache row of each
    sequence (read in place as one page each where seqlen_cache is a multiple of 256, else gathered
    first, a copy). Under CUDA graph capture nothing is read back to the host: cache_seqlens past
    the room for the new keys, rotary positions past the table and block ids past the cache are
    clamped into them instead of refused (as cache_batch_idx always is on CUDA). cache_leftpad
    (int32 [batch]): where each sequence's keys start in its cache row (left padding): keys
    before it take no part (a key-padding mask read in place; positions, the rotary embedding's
    and the append's, stay cache indices, as in flash_attn). Causal masks
    and windows are aligned bottom-right to each sequence's last key. Returns out [batch,
    seqlen_q, heads_q, head_dim], and with return_softmax_lse also lse [batch, heads_q, seqlen_q].
    num_splits (flash_attn's): 0 (or any value below 1, as in flash_attn) chooses how many CTAs
    share a row's keys (split-KV, on CUDA for 16-bit inputs, where a few query tokens a sequence
    would leave SMs idle; on the CPU work items and threads), 1 never splits, n > 1 splits n ways
    (capped at the key blocks)."""
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"cuflash_attn: num_splits must be an int (below 1: chosen), got {num_splits!r}")
    num_splits = _int64(max(num_splits, 0))  # flash_attn's heuristic takes every value below 1
    paged = block_table is not None
    _check_tensor("q", q, _PADDED)
    # No host sync under CUDA graph capture, nor in torch.compile's trace (a read-back there is a
    # graph break, or an error under fullgraph): indices are clamped into the caches instead.
    no_sync = torch.compiler.is_compiling() or q.is_cuda and torch.cuda.is_current_stream_capturing()
    _check_tensor("k_cache", k_cache, _PAGED_CACHE if paged else _CACHE)
    _check_tensor("v_cache", v_cache, _PAGED_CACHE if paged else _CACHE)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"cuflash_attn: k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if v_cache.dtype != k_cache.dtype or v_cache.device != k_cache.device:
        raise ValueError(f"cuflash_attn: v_cache must have k_cache's dtype ({k_cache.dtype}) and device "
                         f"({k_cache.device}), got {v_cache.dtype} on {v_cache.device}")
    check_supported_dtype("q", q)
    if (k is None) != (v is None):
        raise ValueError("cuflash_attn: k and v must be given together")
    # What the op would refuse only after the new keys were written into the caches.
    heads_kv = k_cache.shape[2]
    if k_cache.dtype != q.dtype or k_cache.device != q.device or k_cache.shape[3] != q.shape[3] or \
            heads_kv == 0 or q.shape[2] % heads_kv:
        raise ValueError(f"cuflash_attn: k_cache must hold q's dtype ({q.dtype}), device ({q.device}) and head_dim "
                         f"({q.shape[3]}), with heads_kv dividing q's heads ({q.shape[2]}); got {k_cache.dtype} on "
                         f"{k_cache.device}, shape {tuple(k_cache.shape)}")
    _check_scalars("softmax_scale", softmax_scale, softcap, 0.0, alibi_slopes)
    window_left, window_right = _window(window_size)
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        _check_rotary(rotary_cos, rotary_sin, q.shape[-1], q.device)
    batch, seqlen_q, seqlen_cache = q.shape[0], q.shape[1], k_cache.shape[1]
    if cache_leftpad is not None:
        _check_tensor("cache_leftpad", cache_leftpad, ("batch",))
        if cache_leftpad.dtype != torch.int32 or cache_leftpad.shape[0] != batch or cache_leftpad.device != q.device:
            raise ValueError(f"cuflash_attn: cache_leftpad must be an int32 tensor [batch] = [{batch}] on q's device "
                             f"({q.device}), got {cache_leftpad.dtype} {tuple(cache_leftpad.shape)} on "
                             f"{cache_leftpad.device}")
    rows = None
    if paged:
        _check_block_table(block_table, batch, k_cache, q.device)
        if cache_batch_idx is not None:
            raise ValueError("cuflash_attn: cache_batch_idx cannot be given with block_table (the table picks each "
                             "sequence's blocks)")
        seqlen_cache = block_table.shape[1] * k_cache.shape[1]  # the keys a sequence's blocks hold
    elif cache_batch_idx is not None:
        _check_tensor("cache_batch_idx", cache_batch_idx, ("batch",))
        if cache_batch_idx.dtype != torch.int32 or cache_batch_idx.shape[0] != batch or \
                cache_batch_idx.device != q.device:
            raise ValueError(f"cuflash_attn: cache_batch_idx must be an int32 tensor [batch] = [{batch}] on q's device "
                             f"({q.device}), got {cache_batch_idx.dtype} {tuple(cache_batch_idx.shape)} on "
                             f"{cache_batch_idx.device}")
        # Checked where that costs no synchronization; on CUDA an index past the cache is clamped.
        rows = cache_batch_idx.long()
        if not cache_batch_idx.is_cuda and not no_sync and batch > 0:
            low, high = (int(x) for x in torch.aminmax(cache_batch_idx))
            if low < 0 or high >= k_cache.shape[0]:
                raise ValueError(f"cuflash_attn: cache_batch_idx must be in [0, {k_cache.shape[0]}) (batch_cache), "
                                 f"got values in [{low}, {high}]")
        elif k_cache.shape[0] > 0:
            rows = rows.clamp(0, k_cache.shape[0] - 1)
            cache_batch_idx = rows.int()
    elif k_cache.shape[0] != batch:
        raise ValueError(f"cuflash_attn: k_cache must have batch_cache = batch ({batch}) without cache_batch_idx, got "
                         f"{k_cache.shape[0]}")
    seqlen_new = 0
    if k is not None:
        for name, new, cache in (("k", k, k_cache), ("v", v, v_cache)):
            _check_tensor(name, new, ("batch", "seqlen_new", "heads_kv", "head_dim"))
            if new.shape[0] != batch or new.shape[2:] != cache.shape[2:] or new.dtype != cache.dtype or \
                    new.device != cache.device:
                raise ValueError(f"cuflash_attn: {name} must be [batch, seqlen_new, heads_kv, head_dim] = [{batch}, "
                                 f"seqlen_new, {cache.shape[2]}, {cache.shape[3]}] in {name}_cache's dtype "
                                 f"{cache.dtype} and device {cache.device}, got {tuple(new.shape)} {new.dtype} on "
                                 f"{new.device}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"cuflash_attn: k and v must have the same seqlen_new, got {k.shape[1]} and {v.shape[1]}")
        seqlen_new = k.shape[1]
        if cache_seqlens is None:
            raise ValueError("cuflash_attn: k and v are written at cache_seqlens, which must be given")
        if seqlen_new > seqlen_cache:  # (checked here too: without a sync lengths are not read back)
            raise ValueError(f"cuflash_attn: the {seqlen_new} new keys do not fit the cache's {seqlen_cache}")
        if paged and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_cache, v_cache)):
            raise NotImplementedError("cuflash_attn: a paged KV cache (block_table) has no backward: it is for "
                                      "inference (call under torch.no_grad())")
    used = lengths = high = None
    if cache_seqlens is not None:
        lengths, high = _cache_lengths(cache_seqlens, batch, seqlen_cache, seqlen_new, q.device, rotary,
                                       not no_sync)
        # cache_seqlens itself where no key is appended (an add is a kernel launch on CUDA),
        # unless a backward will read it: then a copy the caller cannot change before it runs.
        appends_or_keeps_it = seqlen_new > 0 or torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k_cache, v_cache))
        used = lengths + seqlen_new if appends_or_keeps_it else lengths
    if rotary:
        if lengths is None:  # no cache_seqlens: positions from 0
            lengths, high = torch.zeros(batch, dtype=torch.int32, device=q.device), 0
        # Positions past the table would index out of it: checked against the largest length.
        q_steps = seqlen_q if causal or window_left >= 0 or window_right >= 0 else 1
        last = high + max(seqlen_new, q_steps) - 1 if high is not None else 0
        if batch > 0 and last >= rotary_cos.shape[0]:
            raise ValueError(f"cuflash_attn: rotary_cos and rotary_sin have {rotary_cos.shape[0]} positions, and "
                             f"position {last} is needed (cache_seqlens + the new or query tokens)")
        offsets = lengths.long()[:, None]
        q_positions = offsets + (torch.arange(seqlen_q, device=q.device) if q_steps > 1 else 0)
        k_positions = offsets + torch.arange(seqlen_new, device=q.device)
        if high is None:  # not read back (no_sync): positions clamped into the table
            q_positions, k_positions = (t.clamp(0, rotary_cos.shape[0] - 1) for t in (q_positions, k_positions))
        q = _rotary(q, rotary_cos, rotary_sin, q_positions.expand(batch, seqlen_q), rotary_interleaved)
        if k is not None:
            k = _rotary(k, rotary_cos, rotary_sin, k_positions, rotary_interleaved)
    # Left padding: keys before cache_leftpad masked, [batch, 1, 1, keys] read through broadcast
    # strides (the alignment to each sequence's last key is the same with or without it).
    key_padding = None
    if cache_leftpad is not None:
        key_padding = torch.arange(seqlen_cache, device=q.device) >= cache_leftpad[:, None, None, None]

    def attend(queries, kc, vc, table):
        return _ops.fwd(queries.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), softmax_scale, bool(causal),
                        True, window_left, window_right, float(softcap), alibi_slopes, attn_mask=key_padding,
                        seqused_k=used, block_table=table, num_splits=num_splits)

    if seqlen_new > 0:  # the new keys into the caches, in place
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            _check_writable(name, cache)
        # First the op's own checks of every argument, so that a call it refuses writes nothing: a
        # call with no queries checks them all and computes nothing (the cache rows of
        # cache_batch_idx stood in for by a view of the first).
        if rows is None:
            attend(q[:, :0], k_cache, v_cache, block_table)
        elif k_cache.shape[0] > 0:
            attend(q[:, :0], *(t[:1].expand(batch, *t.shape[1:]) for t in (k_cache, v_cache)), None)
        cache_rows = (rows if rows is not None else torch.arange(batch, device=k_cache.device))[:, None]
        positions = lengths.to(device=k_cache.device, dtype=torch.long)[:, None] + \
            torch.arange(seqlen_new, device=k_cache.device)
        if no_sync:  # lengths not read back: positions clamped into the cache
            positions = positions.clamp(0, seqlen_cache - 1)
        if paged:  # row positions % page of the blocks the table names for them
            page = k_cache.shape[1]
            cache_rows = block_table.long().gather(1, positions // page)
            if no_sync:
                cache_rows = cache_rows.clamp(0, k_cache.shape[0] - 1)
            else:  # an index past the cache would fault on CUDA
                low, high = (int(x) for x in torch.aminmax(cache_rows)) if batch > 0 else (0, 0)
                if low < 0 or high >= k_cache.shape[0]:
                    raise ValueError(f"cuflash_attn: block_table names blocks in [{low}, {high}] for the new keys, "
                                     f"and k_cache has {k_cache.shape[0]}")
            positions = positions % page
        k_cache[cache_rows, positions] = k
        v_cache[cache_rows, positions] = v
    kc, vc = k_cache, v_cache
    if rows is not None:
        # Each cache row one page, read in place, where the page rule allows and no gradient is
        # asked for (a paged cache has no backward); else the rows gathered, a copy.
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
        if seqlen_cache > 0 and seqlen_cache % _PAGE_SIZE_MULTIPLE == 0 and not wants_grad:
            block_table = cache_batch_idx.view(batch, 1)
        else:
            kc, vc = k_cache.index_select(0, rows), v_cache.index_select(0, rows)
    out, lse = attend(q, kc, vc, block_table)
    out = out.transpose(1, 2)
    return (out, lse) if return_softmax_lse else out


# The flash_attn release whose API this module follows: `flash_attn.__version__` after install(),
# which code reads to choose the arguments it passes.
FLASH_ATTN_VERSION = "2.8.3"


def install() -> None:
    """Makes `import flash_attn` and `import flash_attn.flash_attn_interface` give this module,
    and `import flash_attn.bert_padding` cuflash_attn.bert_padding (for code that imports
    flash_attn directly)."""
    module = sys.modules[__name__]
    module.flash_attn_interface = module
    module.bert_padding = bert_padding
    module.__version__ = FLASH_ATTN_VERSION
    sys.modules["flash_attn"] = module
    sys.modules["flash_attn.flash_attn_interface"] = module
    sys.modules["flash_attn.bert_padding"] = bert_padding


__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache",
           "install"]
