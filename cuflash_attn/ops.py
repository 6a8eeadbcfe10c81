"""What Python adds to the C++ ops: shapes for torch.compile (fakes) and the autograd wiring.

The forward saves out and lse; the backward calls the registered backward op, which
recomputes attention from lse. The ops themselves are defined in csrc/torch_ops.cpp.
"""
import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.cuflash_attn)

_ops = torch.ops.cuflash_attn


def _empty_like_input(t: torch.Tensor) -> torch.Tensor:
    # The same rule as empty_like_input in csrc/torch_ops.cpp.
    return torch.empty_like(t) if t.stride(-1) == 1 else t.new_empty(t.shape)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("cuflash_attn::fwd")
def _fwd_fake(q, k, v, scale=None, is_causal=False, causal_bottom_right=False):
    torch._check(q.dim() == 4, lambda: "cuflash_attn: q must have 4 dimensions")
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=_stats_dtype(q.dtype))
    return _empty_like_input(q), lse


@torch.library.register_fake("cuflash_attn::bwd")
def _bwd_fake(dout, q, k, v, out, lse, dlse=None, scale=None, is_causal=False, causal_bottom_right=False):
    return _empty_like_input(q), _empty_like_input(k), _empty_like_input(v)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, scale, is_causal, causal_bottom_right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.is_causal, ctx.causal_bottom_right = scale, is_causal, causal_bottom_right


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ops.bwd(dout, q, k, v, out, lse, dlse, ctx.scale, ctx.is_causal, ctx.causal_bottom_right)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("cuflash_attn::fwd", _fwd_backward, setup_context=_fwd_setup_context)


def _bwd_setup_context(ctx, inputs, output):
    pass


def _bwd_backward(ctx, *grads):
    raise NotImplementedError(
        "cuflash_attn: double backward (the gradient of the attention backward) is not supported")


torch.library.register_autograd("cuflash_attn::bwd", _bwd_backward, setup_context=_bwd_setup_context)
