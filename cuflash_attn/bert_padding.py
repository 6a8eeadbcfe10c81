"""flash_attn 2.8's `flash_attn.bert_padding`: between padded batches [batch, seqlen, ...] and the
packed tokens [total_tokens, ...] that the varlen functions take, with their gradients.

    x_unpad, indices, cu_seqlens, max_seqlen, used_seqlens = unpad_input(x, attention_mask)
    out_unpad = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens,
                                       max_seqlen, max_seqlen)
    out = pad_input(out_unpad, indices, batch, seqlen)

`attention_mask` is [batch, seqlen], nonzero (True) where a token is kept, as in flash_attn.
`flash_attn_interface.install()` makes `import flash_attn.bert_padding` give this module.
"""
import operator

import torch
import torch.nn.functional as F


def _check_indices(indices, first_axis_dim):
    """indices must be integer positions in [0, first_axis_dim). Out of range, a GPU's indexing
    would stop the process with a device assert: the range is read back (one sync) except in
    torch.compile's trace and CUDA graph capture, where nothing may be read back."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cuflash_attn: indices must be a 1-dimensional int32 or int64 tensor (unpad_input's), got "
                         f"{indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__} "
                         f"{tuple(indices.shape) if isinstance(indices, torch.Tensor) else ''}")
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    low, high = (int(x) for x in torch.aminmax(indices))
    if low < 0 or high >= first_axis_dim:
        raise ValueError(f"cuflash_attn: indices must lie in [0, {first_axis_dim}), got values from {low} to {high}")


def index_first_axis(input, indices):
    """input[indices] along the first axis; the gradient adds back into input's rows."""
    if not isinstance(input, torch.Tensor) or input.dim() < 1:
        raise ValueError("cuflash_attn: input must be a tensor of at least 1 dimension")
    _check_indices(indices, input.shape[0])
    return input.index_select(0, indices)


def index_put_first_axis(values, indices, first_axis_dim):
    """A tensor [first_axis_dim, *values.shape[1:]] of zeros with values in rows indices."""
    if not isinstance(values, torch.Tensor) or values.dim() < 1:
        raise ValueError("cuflash_attn: values must be a tensor of at least 1 dimension")
    _check_indices(indices, first_axis_dim)
    if values.shape[0] != indices.numel():
        raise ValueError(f"cuflash_attn: values has {values.shape[0]} rows but indices {indices.numel()} entries")
    output = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return output.index_copy(0, indices.long(), values)  # (index_copy takes int64 only)


def _check_mask(name, mask, hidden_states):
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"cuflash_attn: {name} must be a 2-dimensional tensor [batch, seqlen]")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
        raise ValueError("cuflash_attn: hidden_states must be a tensor [batch, seqlen, ...]")
    if tuple(mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"cuflash_attn: {name} has shape {tuple(mask.shape)} but hidden_states starts with "
                         f"[batch, seqlen] = {tuple(hidden_states.shape[:2])}")
    if mask.device != hidden_states.device:
        raise ValueError(f"cuflash_attn: {name} is on {mask.device} but hidden_states on {hidden_states.device}")


def _packed(hidden_states, kept, seqlens):
    """The kept tokens of hidden_states [batch, seqlen, ...] (kept: bool [batch, seqlen]), their
    indices in the flattened batch, cu_seqlens over seqlens (int32) and the longest (an int)."""
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    tokens = hidden_states.reshape(-1, *hidden_states.shape[2:]).index_select(0, indices)
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return tokens, indices, cu_seqlens, int(seqlens.max()) if seqlens.numel() else 0


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """hidden_states [batch, seqlen, ...] -> (the kept tokens [total_tokens, ...], indices (their
    positions in the flattened batch), cu_seqlens [batch + 1] int32, max_seqlen (an int),
    used_seqlens [batch] int32). unused_mask marks tokens that are kept (counted in cu_seqlens)
    but not used: used_seqlens counts attention_mask's alone, for `seqused_q`/`seqused_k`."""
    _check_mask("attention_mask", attention_mask, hidden_states)
    used = attention_mask.bool()
    kept = used
    if unused_mask is not None:
        _check_mask("unused_mask", unused_mask, hidden_states)
        kept = used | unused_mask.bool()
    used_seqlens = used.sum(dim=-1, dtype=torch.int32)
    return (*_packed(hidden_states, kept, kept.sum(dim=-1, dtype=torch.int32)), used_seqlens)


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """For rows that each hold several sequences back to back, then padding:
    attention_mask_in_length [batch, seqlen] lists each row's sequence lengths, then zeros
    (e.g. [[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0]] for rows [a a b b b pad] and [c c c d d pad]).
    Returns (the tokens [total_tokens, ...], indices, cu_seqlens over every sequence, max_seqlen)."""
    _check_mask("attention_mask_in_length", attention_mask_in_length, hidden_states)
    lengths = attention_mask_in_length.to(torch.int64)
    if not torch.compiler.is_compiling() and bool((lengths < 0).any()):
        raise ValueError("cuflash_attn: attention_mask_in_length must hold no negative length")
    row_tokens = lengths.sum(dim=-1)
    seqlen = attention_mask_in_length.shape[1]
    if not torch.compiler.is_compiling() and row_tokens.numel() and int(row_tokens.max()) > seqlen:
        raise ValueError(f"cuflash_attn: attention_mask_in_length's lengths in a row add up to more than seqlen "
                         f"({seqlen})")
    positions = torch.arange(seqlen, device=lengths.device)
    kept = positions.unsqueeze(0) < row_tokens.unsqueeze(1)
    flat_lengths = lengths.flatten()
    return _packed(hidden_states, kept, flat_lengths[flat_lengths > 0].to(torch.int32))


def _size(name, value):
    """A non-negative size: an int, or what converts to one (NumPy's ints, a 0-d integer tensor),
    or a torch.compile symbolic size."""
    if isinstance(value, torch.SymInt):
        return value
    try:
        size = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        size = None
    if size is None or size < 0:
        raise ValueError(f"cuflash_attn: {name} must be a non-negative int, got {value!r}")
    return size


def pad_input(hidden_states, indices, batch, seqlen):
    """The inverse of unpad_input: hidden_states [total_tokens, ...] back to [batch, seqlen, ...],
    zeros where no token was kept."""
    batch, seqlen = _size("batch", batch), _size("seqlen", seqlen)
    padded = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return padded.reshape(batch, seqlen, *hidden_states.shape[1:])


__all__ = ["index_first_axis", "index_put_first_axis", "unpad_input", "unpad_input_for_concatenated_sequences",
           "pad_input"]
