"""What Python adds to the C++ ops: shapes for torch.compile (fakes) and the autograd wiring.

The forward saves out and lse; the backward calls the registered backward op, which
recomputes attention from lse (and, with dropout, regenerates the same keep-mask from the
saved rng_state). The ops themselves are defined in csrc/torch_ops.cpp.
"""
import torch
from torch.autograd import forward_ad

from ._load import load_extension

load_extension()  # loading the library registers torch.ops.cuflash_attn

_ops = torch.ops.cuflash_attn


def _empty_like_input(t: torch.Tensor) -> torch.Tensor:
    # The same rule as empty_like_input in csrc/torch_ops.cpp.
    return torch.empty_like(t) if t.stride(-1) == 1 else t.new_empty(t.shape)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_stats(q: torch.Tensor, varlen: bool) -> torch.Tensor:
    # lse: [batch, heads, seqlen_q], or [heads, total_q] for packed inputs (as in the C++ op).
    shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[1], q.shape[2])
    return q.new_empty(shape, dtype=_stats_dtype(q.dtype))


def _check_same_device(q, **tensors):
    # As check_same_kind in csrc/torch_ops.cpp. Fakes run for meta tensors too, and any tensor on
    # the meta device, an option's included, takes the whole call there: without this a real q
    # beside a meta k or attn_mask got an uninitialized output. Options left out are None.
    for name, t in tensors.items():
        if t is not None:
            torch._check_value(t.device == q.device, lambda: f"cuflash_attn: {name} must be on the same device as "
                                                             f"q ({q.device}), got {t.device}")


# What the op takes (csrc/torch_ops.cpp's is_supported_dtype and kMaxHeadDim): the Python layers'
# one copy.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def check_supported_dtype(name, t):
    """The op's dtype check, with its message. (A plain raise, not torch._check_type: dynamo traces
    this where flash_attn_with_kvcache calls it, and takes no closure as a check's message.)"""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"cuflash_attn: {name} must be a CUDA or CPU tensor of dtype float16, bfloat16, float32 or "
                        f"float64, got {t.dtype}")


def _check_attention_shapes(q, k, v, varlen, paged):
    """The op's checks of q, k and v (csrc/torch_ops.cpp, check_attention_tensor and the shape
    checks after it, with its messages), so that torch.export and torch.compile refuse at trace
    time what the op would refuse when it runs. With symbolic sizes a check becomes a runtime
    assertion of the graph rather than a specialization."""
    packed_kv = varlen and not paged
    for name, t, packed in (("q", q, varlen), ("k", k, packed_kv), ("v", v, packed_kv)):
        check_supported_dtype(name, t)
        dims = 3 if packed else 4
        torch._check_value(t.dim() == dims, lambda name=name, t=t, dims=dims: (
            f"cuflash_attn: {name} must have {dims} dimensions, got {t.dim()} (shape {tuple(t.shape)})"))
    for name, t in (("k", k), ("v", v)):
        torch._check_type(t.dtype == q.dtype, lambda name=name, t=t: (
            f"cuflash_attn: {name} must have the same dtype as q ({q.dtype}), got {t.dtype}"))
    rows_k = 0 if packed_kv else 2
    if paged:  # k and v: [num_pages, heads_kv, page_size, head_dim]
        torch._check_value(k.shape[0] == v.shape[0], lambda: (
            f"cuflash_attn: k and v must have the same num_pages, got {k.shape[0]} and {v.shape[0]}"))
    elif not varlen:
        torch._check_value(k.shape[0] == q.shape[0] and v.shape[0] == q.shape[0], lambda: (
            f"cuflash_attn: q, k and v must have the same batch size, got {q.shape[0]}, {k.shape[0]} and {v.shape[0]}"))
    torch._check_value(k.shape[1] == v.shape[1], lambda: (
        f"cuflash_attn: k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}"))
    rows_name = "total_tokens" if packed_kv else "page_size" if paged else "seqlen"
    torch._check_value(k.shape[rows_k] == v.shape[rows_k], lambda: (
        f"cuflash_attn: k and v must have the same {rows_name}, got {k.shape[rows_k]} and {v.shape[rows_k]}"))
    torch._check_value(k.shape[-1] == q.shape[-1] and v.shape[-1] == q.shape[-1], lambda: (
        f"cuflash_attn: q, k and v must have the same head_dim, got {q.shape[-1]}, {k.shape[-1]} and {v.shape[-1]}"))
    heads_q, heads_kv = q.shape[1], k.shape[1]
    torch._check_value(heads_q % heads_kv == 0 if heads_kv > 0 else heads_q == 0, lambda: (
        f"cuflash_attn: the heads of q ({heads_q}) must be a multiple of the heads of k and v ({heads_kv})"))
    torch._check_value(1 <= q.shape[-1] <= MAX_HEAD_DIM, lambda: (
        f"cuflash_attn: head_dim must be in [1, {MAX_HEAD_DIM}], got {q.shape[-1]}"))


@torch.library.register_fake("cuflash_attn::fwd")
def _fwd_fake(q, k, v, scale=None, is_causal=False, bottom_right=False, window_left=-1, window_right=-1,
              softcap=0.0, alibi_slopes=None, dropout_p=0.0, rng_state=None, cu_seqlens_q=None,
              cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, attn_mask=None, deterministic=True, seqused_k=None,
              block_table=None, num_splits=1):
    varlen = cu_seqlens_q is not None
    _check_same_device(q, k=k, v=v, alibi_slopes=alibi_slopes, rng_state=rng_state, cu_seqlens_q=cu_seqlens_q,
                       cu_seqlens_k=cu_seqlens_k, attn_mask=attn_mask, seqused_k=seqused_k, block_table=block_table)
    _check_attention_shapes(q, k, v, varlen, block_table is not None)
    return _empty_like_input(q), _empty_stats(q, varlen)


@torch.library.register_fake("cuflash_attn::bwd")
def _bwd_fake(dout, q, k, v, out, lse, dlse=None, scale=None, is_causal=False, bottom_right=False,
              window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0, rng_state=None,
              cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, attn_mask=None,
              deterministic=True, seqused_k=None, block_table=None, num_splits=1, attn_mask_grad=False):
    _check_same_device(q, dout=dout, k=k, v=v, out=out, lse=lse, dlse=dlse, alibi_slopes=alibi_slopes,
                       rng_state=rng_state, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, attn_mask=attn_mask,
                       seqused_k=seqused_k, block_table=block_table)
    _check_attention_shapes(q, k, v, cu_seqlens_q is not None, block_table is not None)
    torch._check_value(not attn_mask_grad or attn_mask is not None and attn_mask.is_floating_point(),
                       lambda: "cuflash_attn: attn_mask_grad needs a floating-point attn_mask")
    dattn_mask = attn_mask.new_empty(attn_mask.shape) if attn_mask_grad else q.new_empty((0,))
    return _empty_like_input(q), _empty_like_input(k), _empty_like_input(v), dattn_mask


@torch.library.register_fake("cuflash_attn::dropout_mask")
def _dropout_mask_fake(rng_state, dropout_p, batch, heads, seqlen_q, seqlen_k):
    return rng_state.new_empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.bool)


@torch.library.register_fake("cuflash_attn::fwd_tile_counts")
def _fwd_tile_counts_fake(q, k, v, is_causal=False, bottom_right=False, window_left=-1, window_right=-1,
                          cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    return q.new_empty((4,), dtype=torch.int64)


# fwd's options (its inputs after q, k, v), named as the schema in csrc/torch_ops.cpp names them;
# bwd takes the same options in the same order after (dout, q, k, v, out, lse, dlse), then
# attn_mask_grad. The tensors among them are saved for the backward.
_OPTION_NAMES = tuple(a.name for a in _ops.fwd.default._schema.arguments[3:])
_BWD_OPTION_NAMES = tuple(a.name for a in _ops.bwd.default._schema.arguments[7:-1])
assert _BWD_OPTION_NAMES == _OPTION_NAMES, "csrc/torch_ops.cpp: bwd's options must be fwd's, in fwd's order"
_OPTION_TENSORS = tuple(i for i, a in enumerate(_ops.fwd.default._schema.arguments[3:])
                        if a.type.isSubtypeOf(torch._C.OptionalType.ofTensor()))
_ATTN_MASK_OPTION = _OPTION_NAMES.index("attn_mask")
_BLOCK_TABLE_INPUT = 3 + _OPTION_NAMES.index("block_table")  # its position among fwd's inputs

# The host's time is a short problem's limit (benchmarks/NOTES.md, "The host's time per call"):
# the autograd wiring below is written for it. The forward's and the backward's autograd
# kernels are registered by hand, not by torch.library.register_autograd, whose per-call
# fill_defaults walks the schema's arguments in Python (about 300 us a call); the backward
# passes bwd's arguments by position and, outside create_graph, calls it below autograd.


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, *options = inputs
    out, lse = output
    tensor_slots = tuple(i for i in _OPTION_TENSORS if options[i] is not None)
    # A float attn_mask that requires grad (a learned bias) gets one.
    attn_mask = options[_ATTN_MASK_OPTION]
    ctx.attn_mask_grad = attn_mask is not None and attn_mask.requires_grad
    ctx.save_for_backward(q, k, v, out, lse, *(options[i] for i in tensor_slots))
    for i in tensor_slots:  # held by save_for_backward (which checks they were not modified)
        options[i] = None
    ctx.options = options
    ctx.tensor_slots = tensor_slots


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    options = ctx.options
    if tensors:
        options = list(options)
        for i, t in zip(ctx.tensor_slots, tensors):
            options[i] = t
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    args = (dout, q, k, v, out, lse, dlse, *options, ctx.attn_mask_grad)
    if torch.is_grad_enabled():  # create_graph: through bwd's autograd kernel, whose backward raises
        dq, dk, dv, dmask = _ops.bwd.default(*args)
    else:
        with torch._C._AutoDispatchBelowAutograd():
            dq, dk, dv, dmask = _ops.bwd.default(*args)
    grads = [dq, dk, dv] + [None] * len(_OPTION_NAMES)
    if ctx.attn_mask_grad:
        grads[3 + _ATTN_MASK_OPTION] = dmask
    return tuple(grads)


# The dispatcher drops trailing arguments equal to their defaults; the forward puts them back
# (its setup_context reads every option) from a tuple made once.
_FWD_DEFAULTS = tuple(a.default_value for a in _ops.fwd.default._schema.arguments)


def _records_grad(args):
    """Whether autograd records a call on args (the Autograd kernels' test)."""
    return torch.is_grad_enabled() and torch._C._any_requires_grad(*args)


def _refuse_dual_tensors(args):
    """Forward-mode AD (dual tensors: forward_ad, torch.func.jvp, jacfwd) would run below the
    tangents and drop them: the ops have no forward derivative, so it is refused rather than
    answered with zero tangents. Called only while a dual level is open."""
    if any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args):
        raise NotImplementedError(
            "cuflash_attn: forward-mode AD (dual tensors, torch.func.jvp, jacfwd) is not supported: the ops have "
            "no forward derivative (cuflash_attn.scaled_dot_product_attention hands such calls to torch's)")


def _refuse_func_transforms():
    """torch.func's grad transforms need an autograd.Function with setup_context, which
    _FwdFunction is not: refused with a message that names them."""
    if torch._C._functorch.maybe_current_level() is not None:
        raise NotImplementedError(
            "cuflash_attn: torch.func's gradient transforms (grad, vjp, jacrev) are not supported: use "
            "torch.autograd.grad (cuflash_attn.scaled_dot_product_attention hands such calls to torch's)")


def _redispatch(op, keyset, args):
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


class _FwdFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, *args):
        output = _redispatch(_ops.fwd.default, keyset, args)
        _fwd_setup_context(ctx, args, output)
        # An unused output's gradient stays None rather than a tensor of zeros (dlse, almost
        # always): no fill, and the backward skips subtracting it.
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return (None, *_fwd_backward(ctx, dout, dlse))


def _fwd_autograd(keyset, *args):
    args = args + _FWD_DEFAULTS[len(args):]
    if forward_ad._current_level >= 0:  # a dual level is open (one global read on the common path)
        _refuse_dual_tensors(args)
    if _records_grad(args):
        if args[_BLOCK_TABLE_INPUT] is not None:  # refused now, not at the backward
            raise NotImplementedError(
                "cuflash_attn: a paged KV cache (block_table) has no backward: it is for inference (call under "
                "torch.no_grad(), or with inputs that do not require grad)")
        _refuse_func_transforms()
        return _FwdFunction.apply(keyset, *args)
    return _redispatch(_ops.fwd.default, keyset, args)


class _BwdFunction(torch.autograd.Function):
    """bwd called on inputs that require grad (create_graph=True): its outputs carry a backward
    that refuses."""

    @staticmethod
    def forward(ctx, keyset, *args):
        return _redispatch(_ops.bwd.default, keyset, args)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "cuflash_attn: double backward (the gradient of the attention backward) is not supported")


def _bwd_autograd(keyset, *args):
    if forward_ad._current_level >= 0:
        _refuse_dual_tensors(args)
    if _records_grad(args):
        return _BwdFunction.apply(keyset, *args)
    return _redispatch(_ops.bwd.default, keyset, args)


_lib = torch.library.Library("cuflash_attn", "IMPL")  # the Autograd key, where register_autograd registers
_lib.impl("fwd", _fwd_autograd, "Autograd", with_keyset=True)
_lib.impl("bwd", _bwd_autograd, "Autograd", with_keyset=True)


def new_rng_state(device: torch.device) -> torch.Tensor:
    """[seed, offset] for one dropout call, drawn from torch's generator on `device` (so
    torch.manual_seed makes it reproducible, and CUDA graphs replay it with fresh draws)."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)
