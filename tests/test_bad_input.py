"""Every public entry point validates before launching and raises a clear Python exception
naming the argument (shared/TESTING.md, "Bad input")."""
import math
from types import SimpleNamespace

import pytest
import torch

import cuflash_attn
from cuflash_attn import flash_attn_interface as fa
from conftest import DEVICES, requires_cuda

ops = torch.ops.cuflash_attn


def good(device="cpu", dtype=torch.float32, b=2, h=4, nq=16, nk=24, d=32):
    return [torch.randn(b, h, n, d, device=device, dtype=dtype) for n in (nq, nk, nk)]


def _on(device, options):
    """Keyword options with their tensors moved to device."""
    return {key: t.to(device) if isinstance(t, torch.Tensor) else t for key, t in options.items()}


def replace(args, i, t):
    args = list(args)
    args[i] = t
    return args


CASES = [
    # (id, how to break the good inputs, exception type, message pattern)
    ("int32 q", lambda a: replace(a, 0, a[0].int()), TypeError, r"q must be .* dtype float16, bfloat16, float32 or float64, got Int"),
    ("mixed dtypes", lambda a: replace(a, 1, a[1].double()), TypeError, r"k must have the same dtype as q"),
    ("rank 3 q", lambda a: replace(a, 0, a[0][0]), ValueError, r"q must have 4 dimensions"),
    ("rank 5 v", lambda a: replace(a, 2, a[2][None]), ValueError, r"v must have 4 dimensions"),
    ("batch mismatch", lambda a: replace(a, 1, a[1][:1]), ValueError, r"same batch size"),
    ("k/v heads mismatch", lambda a: replace(a, 2, a[2][:, :2]), ValueError, r"k and v must have the same number of heads"),
    ("k/v seqlen mismatch", lambda a: replace(a, 2, a[2][:, :, :5]), ValueError, r"k and v must have the same seqlen"),
    ("head_dim mismatch", lambda a: replace(a, 1, a[1][..., :16]), ValueError, r"same head_dim"),
    ("heads not a multiple", lambda a: [a[0], a[1][:, :3], a[2][:, :3]], ValueError, r"heads of q \(4\) must be a multiple"),
    ("head_dim 257", lambda a: [torch.randn(2, 4, n, 257) for n in (16, 24, 24)], ValueError, r"head_dim must be in \[1, 256\], got 257"),
    ("head_dim 0", lambda a: [torch.randn(2, 4, n, 0) for n in (16, 24, 24)], ValueError, r"head_dim must be in \[1, 256\], got 0"),
    ("no k/v heads", lambda a: [a[0], a[1][:, :0], a[2][:, :0]], ValueError,
     r"heads of q \(4\) must be a multiple of the heads of k and v \(0\)"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,breaker,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_fwd_rejects(device, name, breaker, exc, pattern):
    args = [t.to(device) for t in breaker(good())]
    with pytest.raises(exc, match=pattern):
        cuflash_attn.flash_attention(*args)
    with pytest.raises(exc, match=pattern):
        ops.fwd(*args)
    # bwd checks q, k and v first (q stands in for dout and out; lse is never read).
    with pytest.raises(exc, match=pattern):
        ops.bwd(args[0], *args, args[0], torch.zeros(0, device=device))


@pytest.mark.parametrize("i,name", [(0, "q"), (1, "k"), (2, "v")])
def test_non_tensor_inputs(i, name):
    args = replace(good(), i, good()[i].tolist())
    with pytest.raises(TypeError, match=rf"{name} must be a tensor \[batch, heads, seqlen, head_dim\], got list"):
        cuflash_attn.flash_attention(*args)
    # The op's schema rejects it: torch's dispatcher raises a RuntimeError naming the argument.
    with pytest.raises(RuntimeError, match=rf"Expected a value of type 'Tensor' for argument '{name}'"):
        ops.fwd(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i,name", [(0, "dout"), (1, "q"), (2, "k"), (3, "v"), (4, "out"), (5, "lse")])
def test_ops_reject_none_tensors(device, i, name):
    """None for a Tensor argument reaches the op as an undefined tensor: named, not a crash."""
    q, k, v = good(device)
    out, lse = ops.fwd(q, k, v)
    fwd_args = [q, k, v]
    if 1 <= i <= 3:
        with pytest.raises(TypeError, match=rf"{name} must be a tensor, got None"):
            ops.fwd(*replace(fwd_args, i - 1, None))
    with pytest.raises(TypeError, match=rf"{name} must be a tensor, got None"):
        ops.bwd(*replace([torch.randn_like(out), q, k, v, out, lse], i, None))


BWD_CASES = [
    # (id, the argument broken, how, exception type, message pattern)
    ("lse float64", "lse", lambda t: t.double(), TypeError, r"lse must have dtype Float, got Double"),
    ("lse shape", "lse", lambda t: t[:, :, :3], ValueError, r"lse must have shape \[batch, heads, seqlen_q\]"),
    ("dout shape", "dout", lambda t: t[:, :, :3], ValueError, r"dout must have the shape of q"),
    ("dout float64", "dout", lambda t: t.double(), TypeError,
     r"dout must have the same dtype as q \(Float\), got Double"),
    ("dout int32", "dout", lambda t: t.int(), TypeError,
     r"dout must be a CUDA or CPU tensor of dtype float16, bfloat16, float32 or float64, got Int"),
    ("dout rank 3", "dout", lambda t: t[0], ValueError, r"dout must have 4 dimensions"),
    ("out float64", "out", lambda t: t.double(), TypeError, r"out must have the same dtype as q"),
    ("out shape", "out", lambda t: t[:, :, :3], ValueError,
     r"out must have the shape of q \[2, 4, 16, 32\], got \[2, 4, 3, 32\]"),
    ("dlse shape", "dlse", lambda t: t[:1], ValueError, r"dlse must have shape"),
    ("dlse float64", "dlse", lambda t: t.double(), TypeError, r"dlse must have dtype Float, got Double"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,argument,breaker,exc,pattern", BWD_CASES, ids=[c[0] for c in BWD_CASES])
def test_bwd_rejects_bad_stats_and_shapes(device, name, argument, breaker, exc, pattern):
    q, k, v = good(device)
    out, lse = ops.fwd(q, k, v)
    args = dict(dout=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse, dlse=torch.randn_like(lse))
    args[argument] = breaker(args[argument])
    with pytest.raises(exc, match=pattern):
        ops.bwd(**args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variable,value", [("CUFLASH_SM90", "tma,wgmma"), ("CUFLASH_SM90", "1"),
                                            ("CUFLASH_SM90", "tma,"), ("CUFLASH_BWD_DQ", "atomics"),
                                            ("CUFLASH_FWD_TILE", "wider"), ("CUFLASH_BWD_TILE", "1"),
                                            ("CUFLASH_FP32", "tf32"), ("CUFLASH_BWD_FUSED_TILE", "on"),
                                            ("CUFLASH_DEBUG", "yes"), ("CUFLASH_PACK_GQA", "on"),
                                            ("CUFLASH_CPU_ISA", "avx"), ("CUFLASH_BWD_KV_SPLITS", "3")])
def test_run_switch_naming_nothing_is_refused(device, variable, value, monkeypatch):
    """A misspelt switch is an error at the next call, not a silent default."""
    q, k, v = good(device)
    out, lse = ops.fwd(q, k, v)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=rf"environment variable {variable} must be .*, got \"{value}\""):
        ops.fwd(q, k, v)
    with pytest.raises(ValueError, match=rf"environment variable {variable} must be"):
        ops.bwd(torch.randn_like(out), q, k, v, out, lse)


@pytest.mark.parametrize("variable,value", [("CUFLASH_SM90", ""), ("CUFLASH_SM90", "0"), ("CUFLASH_SM90", "cpasync"),
                                            ("CUFLASH_SM90", "features,bwd,tma"), ("CUFLASH_SM90", "tma,persistent"),
                                            ("CUFLASH_SM90", "bwd,bwdws"), ("CUFLASH_SM90", "tma,kvcache,splits"),
                                            ("CUFLASH_SM90", "tma,varlen"),
                                            ("CUFLASH_BWD_DQ", "atomic"), ("CUFLASH_BWD_DQ", "ordered"),
                                            ("CUFLASH_BWD_DQ", "separate"),
                                            ("CUFLASH_FWD_TILE", "wide"), ("CUFLASH_FWD_TILE", "narrow"),
                                            ("CUFLASH_BWD_TILE", "wide"), ("CUFLASH_BWD_TILE", "narrow"),
                                            ("CUFLASH_BWD_FUSED_TILE", "wide"), ("CUFLASH_BWD_FUSED_TILE", "narrow"),
                                            ("CUFLASH_BWD_KV_SPLITS", "1"), ("CUFLASH_BWD_KV_SPLITS", "8"),
                                            ("CUFLASH_BWD_KV_SPLITS", "auto"),
                                            ("CUFLASH_FP32", "exact"), ("CUFLASH_FP32", "3xtf32"),
                                            ("CUFLASH_FP32", "wgmma"), ("CUFLASH_FP32", "pairs"),
                                            ("CUFLASH_DEBUG", "0"), ("CUFLASH_DEBUG", "1"),
                                            ("CUFLASH_PACK_GQA", "0"), ("CUFLASH_PACK_GQA", "1"),
                                            ("CUFLASH_CPU_ISA", "amxbf16"), ("CUFLASH_CPU_ISA", "avx512bf16"),
                                            ("CUFLASH_CPU_ISA", "avx512"),
                                            ("CUFLASH_CPU_ISA", "avx2"), ("CUFLASH_CPU_ISA", "base")])
def test_run_switch_values_are_accepted(variable, value, monkeypatch):
    q, k, v = good()
    monkeypatch.setenv(variable, value)
    out, lse = ops.fwd(q, k, v)
    ops.bwd(torch.randn_like(out), q, k, v, out, lse)


@requires_cuda
def test_mixed_devices():
    q, k, v = good("cuda")
    with pytest.raises(ValueError, match=r"k must be on the same device as q \(cuda:0\), got cpu"):
        cuflash_attn.flash_attention(q, k.cpu(), v)
    with pytest.raises(ValueError, match=r"v must be on the same device as q \(cpu\), got cuda"):
        ops.fwd(q.cpu(), k.cpu(), v)
    out, lse = ops.fwd(q, k, v)
    for name, args in [("k", (out, q, k.cpu(), v, out, lse)), ("dout", (out.cpu(), q, k, v, out, lse)),
                       ("lse", (out, q, k, v, out, lse.cpu()))]:
        with pytest.raises(ValueError, match=rf"{name} must be on the same device as q \(cuda:0\), got cpu"):
            ops.bwd(*args)
    rng = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"rng_state must be on the same device as q \(cuda:0\), got cpu"):
        ops.fwd(q, k, v, dropout_p=0.1, rng_state=rng)


def test_forward_ad_and_func_grad_transforms_are_refused():
    """The ops have no forward derivative: dual tensors (forward_ad, torch.func.jvp, jacfwd) are
    refused rather than given zero tangents; torch.func.grad/jacrev too, with a message that says
    so. Plain autograd, and a dual level open around inputs without tangents, still run."""
    import torch.autograd.forward_ad as fwAD
    q, k, v = good(dtype=torch.float64)
    tangent = torch.randn_like(q)
    attend = lambda a: cuflash_attn.flash_attention(a, k, v)  # noqa: E731
    for call in (lambda: torch.func.jvp(attend, (q,), (tangent,)), lambda: torch.func.jacfwd(attend)(q[:1, :1])):
        with pytest.raises(NotImplementedError, match="forward-mode AD .* is not supported"):
            call()
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            ops.fwd(q, fwAD.make_dual(k, torch.randn_like(k)), v)
        out, lse = ops.fwd(q, k, v)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            ops.bwd(fwAD.make_dual(out, torch.randn_like(out)), q, k, v, out, lse)
        assert torch.equal(out, ops.fwd(q, k, v)[0])
    for transform in (torch.func.grad, torch.func.jacrev):
        with pytest.raises(NotImplementedError, match="torch.func's gradient transforms"):
            transform(lambda a: attend(a).sum())(q)
    assert torch.autograd.grad(attend(q.requires_grad_()).sum(), q)[0].abs().sum() > 0


def test_meta_beside_real_tensors():
    """A meta tensor takes the call to the meta kernels (the fakes): they refuse the mix as the
    real kernels do, rather than return an uninitialized output on q's device."""
    q, k, v = good()
    with pytest.raises(ValueError, match=r"k must be on the same device as q \(cpu\), got meta"):
        cuflash_attn.flash_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"v must be on the same device as q \(cpu\), got meta"):
        fa.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v.to("meta"))))
    out, lse = ops.fwd(q, k, v)
    with pytest.raises(ValueError, match=r"lse must be on the same device as q \(cpu\), got meta"):
        ops.bwd(torch.randn_like(out), q, k, v, out, lse.to("meta"))
    B, H, N, _ = q.shape
    meta_options = {"attn_mask": torch.ones(N, N, dtype=torch.bool), "alibi_slopes": torch.ones(H),
                    "rng_state": torch.zeros(2, dtype=torch.int64), "seqused_k": torch.full((B,), N, dtype=torch.int32)}
    for name, option in meta_options.items():
        with pytest.raises(ValueError, match=rf"{name} must be on the same device as q \(cpu\), got meta"):
            ops.fwd(q, k, v, **{name: option.to("meta")})
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be on the same device as q \(cpu\), got meta"):
        packed = [t[0].transpose(0, 1) for t in (q, k, v)]
        offsets = torch.tensor([0, N], dtype=torch.int32)
        ops.fwd(*packed, cu_seqlens_q=offsets.to("meta"), cu_seqlens_k=offsets, max_seqlen_q=N, max_seqlen_k=N)
    with pytest.raises(ValueError, match=r"dlse must be on the same device as q \(cpu\), got meta"):
        ops.bwd(torch.randn_like(out), q, k, v, out, lse, torch.zeros_like(lse, device="meta"))
    meta = [t.to("meta") for t in (q, k, v)]
    assert ops.fwd(*meta)[0].device.type == "meta"  # all on meta: shapes only, as before
    out_meta, lse_meta = ops.fwd(*meta)
    with pytest.raises(ValueError, match="attn_mask_grad needs a floating-point attn_mask"):
        ops.bwd(torch.empty_like(out_meta), *meta, out_meta, lse_meta, attn_mask_grad=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus():
    """A tensor on another GPU than q's: each entry point names it (the SDPA drop-in raises what
    torch's raises: tests/test_sdpa_dropin.py)."""
    q, k, v = good("cuda:0")
    out, lse = ops.fwd(q, k, v)
    x = _fa_inputs("cuda:0")
    other = lambda t: t.to("cuda:1")  # noqa: E731
    cases = [
        (lambda: cuflash_attn.flash_attention(q, other(k), v), r"k must be on the same device as q \(cuda:0\), got cuda:1"),
        (lambda: ops.fwd(q, k, other(v)), r"v must be on the same device as q \(cuda:0\), got cuda:1"),
        (lambda: ops.bwd(other(torch.randn_like(out)), q, k, v, out, lse),
         r"dout must be on the same device as q \(cuda:0\), got cuda:1"),
        (lambda: fa.flash_attn_func(x.q, other(x.k), x.v), r"k must be on the same device as q \(cuda:0\), got cuda:1"),
        (lambda: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, x.cu_q, other(x.cu_k), 6, 8),
         r"cu_seqlens_k must be on the same device as q \(cuda:0\), got cuda:1"),
        (lambda: fa.flash_attn_with_kvcache(x.q, other(x.k), other(x.v)),
         r"k_cache must hold q's dtype \(torch.float32\), device \(cuda:0\)"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


# scaled_dot_product_attention raises what torch's raises: tests/test_sdpa_dropin.py.


def _option_cases():
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    rng = torch.tensor([1, 2])
    return [
        # (id, op keyword options, exception type, message pattern)
        ("window_left -2", dict(window_left=-2), ValueError, r"window_left and window_right must be >= -1"),
        ("window_right -5", dict(window_right=-5), ValueError, r"window_left and window_right must be >= -1"),
        ("softcap negative", dict(softcap=-1.0), ValueError, r"softcap must be a finite number >= 0"),
        ("softcap nan", dict(softcap=math.nan), ValueError, r"softcap must be a finite number >= 0"),
        ("alibi float64", dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), TypeError,
         r"alibi_slopes must have dtype float32"),
        ("alibi shape", dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \[heads\] = \[4\]"),
        ("alibi batch shape", dict(alibi_slopes=torch.ones(3, 4)), ValueError, r"or \[batch, heads\] = \[2, 4\]"),
        ("dropout_p 1", dict(dropout_p=1.0, rng_state=rng), ValueError, r"dropout_p must be in \[0, 1\), got 1"),
        ("dropout_p nan", dict(dropout_p=math.nan, rng_state=rng), ValueError, r"dropout_p must be in \[0, 1\)"),
        ("dropout_p negative", dict(dropout_p=-0.1, rng_state=rng), ValueError, r"dropout_p must be in \[0, 1\)"),
        ("scale nan", dict(scale=math.nan), ValueError, r"scale must be a finite number, got nan"),
        ("scale inf", dict(scale=-math.inf), ValueError, r"scale must be a finite number, got -inf"),
        ("dropout without rng", dict(dropout_p=0.1), ValueError, r"dropout_p > 0 needs rng_state"),
        ("rng int32", dict(dropout_p=0.1, rng_state=rng.int()), TypeError, r"rng_state must have dtype int64"),
        ("rng 3 values", dict(dropout_p=0.1, rng_state=torch.tensor([1, 2, 3])), ValueError,
         r"rng_state must hold 2 values"),
        ("cu_seqlens_q alone", dict(cu_seqlens_q=i32(0, 16)), ValueError, r"cu_seqlens_q and cu_seqlens_k must be given together"),
        ("varlen with 4-d q", dict(cu_seqlens_q=i32(0, 16), cu_seqlens_k=i32(0, 24)), ValueError,
         r"with cu_seqlens, q must have 3 dimensions \[total_tokens, heads, head_dim\]"),
    ]


OPTION_CASES = _option_cases()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,options,exc,pattern", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_fwd_and_bwd_reject_bad_options(device, name, options, exc, pattern):
    q, k, v = good(device)
    options = _on(device, options)
    with pytest.raises(exc, match=pattern):
        ops.fwd(q, k, v, **options)
    out, lse = ops.fwd(q, k, v)
    with pytest.raises(exc, match=pattern):
        ops.bwd(torch.randn_like(out), q, k, v, out, lse, **options)


def _varlen_inputs(device, total_q=20, total_k=30):
    return [torch.randn(n, 4, 32, device=device) for n in (total_q, total_k, total_k)]


VARLEN_CASES = [
    ("int64 offsets", dict(cu_seqlens_q=torch.tensor([0, 20]), cu_seqlens_k=torch.tensor([0, 30])), TypeError,
     r"cu_seqlens_q must have dtype int32"),
    ("2-d offsets", dict(cu_seqlens_q=torch.zeros(2, 2, dtype=torch.int32)), ValueError,
     r"cu_seqlens_q must have shape \[batch \+ 1\]"),
    ("lengths differ", dict(cu_seqlens_k=torch.tensor([0, 10, 30], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q and cu_seqlens_k must have the same length"),
    ("negative max_seqlen", dict(max_seqlen_q=-1), ValueError, r"max_seqlen_q and max_seqlen_k must be >= 0"),
    ("empty offsets", dict(cu_seqlens_q=torch.zeros(0, dtype=torch.int32)), ValueError,
     r"cu_seqlens_q must have shape \[batch \+ 1\], got \[0\]"),
]
# Values are checked on the CPU only (on CUDA that would synchronize; the kernels clamp instead).
VARLEN_CPU_CASES = [
    ("decreasing", dict(cu_seqlens_q=torch.tensor([0, 12, 5], dtype=torch.int32),
                        cu_seqlens_k=torch.tensor([0, 10, 30], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q must be non-decreasing, got 12 then 5 at index 1"),
    ("decreasing k", dict(cu_seqlens_q=torch.tensor([0, 10, 20], dtype=torch.int32),
                          cu_seqlens_k=torch.tensor([0, 30, 10], dtype=torch.int32)), ValueError,
     r"cu_seqlens_k must be non-decreasing, got 30 then 10 at index 1"),
    ("past the end", dict(cu_seqlens_k=torch.tensor([0, 31], dtype=torch.int32), max_seqlen_k=0), ValueError,
     r"cu_seqlens_k ends at 31, past the 30 rows"),
    ("max_seqlen too small", dict(max_seqlen_q=10), ValueError,
     r"sequence 0 of cu_seqlens_q has length 20, above the max_seqlen given \(10\)"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,options,exc,pattern", VARLEN_CASES + VARLEN_CPU_CASES,
                         ids=[c[0] for c in VARLEN_CASES + VARLEN_CPU_CASES])
def test_varlen_rejects(device, name, options, exc, pattern):
    if device != "cpu" and (name, options, exc, pattern) in VARLEN_CPU_CASES:
        pytest.skip("offsets are validated on the CPU only")
    q, k, v = _varlen_inputs(device)
    kwargs = dict(cu_seqlens_q=torch.tensor([0, 20], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, 30], dtype=torch.int32), max_seqlen_q=20, max_seqlen_k=30)
    kwargs.update(options)
    kwargs = _on(device, kwargs)
    with pytest.raises(exc, match=pattern):
        ops.fwd(q, k, v, **kwargs)
    with pytest.raises(exc, match=pattern):  # q stands in for dout and out; lse is never read
        ops.bwd(q, q, k, v, q, torch.zeros(0, device=device), **kwargs)


DROPOUT_MASK_CASES = [
    # (id, arguments after rng_state: dropout_p, batch, heads, seqlen_q, seqlen_k; exception, pattern)
    ("dropout_p 1", (1.0, 1, 2, 3, 4), ValueError, r"dropout_p must be in \[0, 1\), got 1"),
    ("dropout_p negative", (-0.5, 1, 2, 3, 4), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("negative batch", (0.1, -1, 2, 3, 4), ValueError,
     r"dropout_mask's batch and heads must be in \[0, 65535\] .*got batch -1, heads 2, seqlen_q 3, seqlen_k 4"),
    ("heads above the grid", (0.1, 1, 65536, 3, 4), ValueError, r"got batch 1, heads 65536, seqlen_q 3, seqlen_k 4"),
    ("seqlen_k 2^31", (0.1, 1, 1, 1, 2**31), ValueError,
     r"seqlen_q and seqlen_k in \[0, 2\^31 - 1\], got batch 1, heads 1, seqlen_q 1, seqlen_k 2147483648"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,args,exc,pattern", DROPOUT_MASK_CASES, ids=[c[0] for c in DROPOUT_MASK_CASES])
def test_dropout_mask_rejects(device, name, args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ops.dropout_mask(torch.tensor([1, 2], device=device), *args)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_rejects_bad_rng_state(device):
    with pytest.raises(TypeError, match=r"rng_state must have dtype int64, got Int"):
        ops.dropout_mask(torch.tensor([1, 2], dtype=torch.int32, device=device), 0.1, 1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"rng_state must hold 2 values \[seed, offset\], got shape \[3\]"):
        ops.dropout_mask(torch.tensor([1, 2, 3], device=device), 0.1, 1, 2, 3, 4)


def test_fwd_tile_counts_is_cuda_only():
    """The debug op counts the tiles of the CUDA tensor-core forward: no CPU kernel is registered."""
    with pytest.raises(NotImplementedError, match=r"fwd_tile_counts.*'CPU' backend"):
        ops.fwd_tile_counts(*good())


@requires_cuda
def test_fwd_tile_counts_rejects_other_dtypes():
    with pytest.raises(NotImplementedError, match=r"q must be a float16 or bfloat16 CUDA tensor, got Float"):
        ops.fwd_tile_counts(*good("cuda"))


@requires_cuda
def test_varlen_bad_offsets_on_cuda_stay_in_bounds():
    """Unchecked on CUDA, out-of-range offsets are clamped to the packed tensors: no memory
    fault, and rows no sequence covers read 0."""
    q, k, v = _varlen_inputs("cuda")
    cu_q = torch.tensor([-5, 12, 5, 400], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 100, 30, 31], dtype=torch.int32, device="cuda")
    out, lse = ops.fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=20, max_seqlen_k=30)
    torch.cuda.synchronize()
    assert not out.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(16, 32), (3, 16, 32), (2, 4, 16, 32), (2, 3, 4, 16, 32)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch(device, shape, is_causal):
    q, k, v = (torch.randn(*shape, device=device, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.2)
    got = cuflash_attn.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.2)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_gqa_matches_torch(device, is_causal):
    q = torch.randn(2, 6, 20, 32, device=device, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 33, 32, device=device, dtype=torch.float64) for _ in range(2))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    got = cuflash_attn.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# ---- the flash_attn-compatible API (cuflash_attn/flash_attn_interface.py) ----

def _fa_inputs(device):
    """Good inputs for each of the six functions: 2 sequences of 6 queries and 8 keys, 4 query
    heads over 2 key/value heads, head_dim 16; padded, packed into qkv/kv, and packed varlen."""
    r = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return SimpleNamespace(q=r(2, 6, 4, 16), k=r(2, 8, 2, 16), v=r(2, 8, 2, 16), qkv=r(2, 6, 3, 4, 16),
                           kv=r(2, 8, 2, 2, 16), tq=r(12, 4, 16), tk=r(16, 2, 16), tv=r(16, 2, 16),
                           tqkv=r(12, 3, 4, 16), tkv=r(16, 2, 2, 16), cu_q=i32(0, 6, 12), cu_k=i32(0, 8, 16))


FA_FUNCTIONS = {  # each function called with the good inputs and the given keyword options
    "func": lambda x, **kw: fa.flash_attn_func(x.q, x.k, x.v, **kw),
    "qkvpacked": lambda x, **kw: fa.flash_attn_qkvpacked_func(x.qkv, **kw),
    "kvpacked": lambda x, **kw: fa.flash_attn_kvpacked_func(x.q, x.kv, **kw),
    "varlen": lambda x, **kw: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, x.cu_q, x.cu_k, 6, 8, **kw),
    "varlen_qkvpacked": lambda x, **kw: fa.flash_attn_varlen_qkvpacked_func(x.tqkv, x.cu_q, 6, **kw),
    "varlen_kvpacked": lambda x, **kw: fa.flash_attn_varlen_kvpacked_func(x.tq, x.tkv, x.cu_q, x.cu_k, 6, 8, **kw),
}

FA_OPTION_CASES = [
    # (id, keyword options, exception type, message pattern): the same for every function
    # window sides below -1 are refused (TESTING.md's bad input), where flash_attn takes any negative as -1
    ("window -2", dict(window_size=(-2, 0)), ValueError, r"window_left and window_right must be >= -1"),
    ("window right -5", dict(window_size=(0, -5)), ValueError, r"window_left and window_right must be >= -1"),
    ("window not a pair", dict(window_size=5), ValueError, r"window_size must be a pair \(left, right\)"),
    ("window of floats", dict(window_size=(1.5, 0)), TypeError, r"window_size must be a pair of ints"),
    ("window beyond int64", dict(window_size=(-2**70, 0)), ValueError, r"window_left and window_right must be >= -1"),
    ("softcap negative", dict(softcap=-1.0), ValueError, r"softcap must be a finite number >= 0"),
    ("softcap nan", dict(softcap=math.nan), ValueError, r"softcap must be a finite number >= 0"),
    ("softcap None", dict(softcap=None), TypeError, r"softcap must be a number, got NoneType"),
    ("dropout_p 1", dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1"),
    ("dropout_p negative", dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout_p nan", dict(dropout_p=math.nan), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout_p str", dict(dropout_p="0.1"), TypeError, r"dropout_p must be a number, got str"),
    ("softmax_scale nan", dict(softmax_scale=math.nan), ValueError, r"softmax_scale must be a finite number"),
    ("softmax_scale inf", dict(softmax_scale=math.inf), ValueError, r"softmax_scale must be a finite number"),
    ("softmax_scale str", dict(softmax_scale="0.1"), TypeError, r"softmax_scale must be a number or None"),
    ("softmax_scale huge int", dict(softmax_scale=10**400), ValueError, r"softmax_scale must be a finite number"),
    ("softcap huge int", dict(softcap=10**400), ValueError, r"softcap must be a finite number"),
    ("alibi float64", dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), TypeError,
     r"alibi_slopes must have dtype float32"),
    ("alibi shape", dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \[heads\] = \[4\]"),
    ("alibi batch shape", dict(alibi_slopes=torch.ones(3, 4)), ValueError, r"or \[batch, heads\] = \[2, 4\]"),
    ("alibi list", dict(alibi_slopes=[0.5] * 4), TypeError, r"alibi_slopes must be a float32 tensor"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,options,exc,pattern", FA_OPTION_CASES, ids=[c[0] for c in FA_OPTION_CASES])
def test_flash_attention_rejects_bad_options(device, name, options, exc, pattern):
    """flash_attention takes the flash_attn API's options, with its scale named scale."""
    options = {("scale" if key == "softmax_scale" else key): value for key, value in _on(device, options).items()}
    with pytest.raises(exc, match=pattern.replace("softmax_scale", "scale")):
        cuflash_attn.flash_attention(*good(device), **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("function", list(FA_FUNCTIONS))
@pytest.mark.parametrize("name,options,exc,pattern", FA_OPTION_CASES, ids=[c[0] for c in FA_OPTION_CASES])
def test_flash_attn_api_rejects_bad_options(device, function, name, options, exc, pattern):
    with pytest.raises(exc, match=pattern):
        FA_FUNCTIONS[function](_fa_inputs(device), **_on(device, options))


def _fa_tensor_cases():
    i32 = lambda x, *v: torch.tensor(v, dtype=torch.int32, device=x.q.device)  # noqa: E731
    dims = lambda x, d: [torch.randn(2, n, h, d, device=x.q.device) for n, h in ((6, 4), (8, 2), (8, 2))]  # noqa: E731
    dtype_pattern = r"q must be a CUDA or CPU tensor of dtype float16, bfloat16, float32 or float64, got Long"
    return [
        # (id, the call on the good inputs x, exception type, message pattern)
        ("func: list q", lambda x: fa.flash_attn_func(x.q.tolist(), x.k, x.v), TypeError,
         r"q must be a tensor \[batch, seqlen, heads, head_dim\], got list"),
        ("func: 3-d k", lambda x: fa.flash_attn_func(x.q, x.k[0], x.v), ValueError,
         r"k must be a 4-dimensional tensor \[batch, seqlen, heads, head_dim\], got shape \(8, 2, 16\)"),
        ("func: int64", lambda x: fa.flash_attn_func(x.q.long(), x.k.long(), x.v.long()), TypeError, dtype_pattern),
        ("func: mixed dtypes", lambda x: fa.flash_attn_func(x.q, x.k, x.v.double()), TypeError,
         r"v must have the same dtype as q"),
        ("func: batch mismatch", lambda x: fa.flash_attn_func(x.q, x.k[:1], x.v[:1]), ValueError,
         r"q, k and v must have the same batch size, got 2, 1 and 1"),
        ("func: k/v seqlen mismatch", lambda x: fa.flash_attn_func(x.q, x.k, x.v[:, :5]), ValueError,
         r"k and v must have the same seqlen, got 8 and 5"),
        ("func: k/v heads mismatch", lambda x: fa.flash_attn_func(x.q, x.k, x.v[:, :, :1]), ValueError,
         r"k and v must have the same number of heads"),
        ("func: heads not a multiple", lambda x: fa.flash_attn_func(x.q[:, :, :3], x.k, x.v), ValueError,
         r"heads of q \(3\) must be a multiple of the heads of k and v \(2\)"),
        ("func: head_dim mismatch", lambda x: fa.flash_attn_func(x.q, x.k[..., :8], x.v[..., :8]), ValueError,
         r"same head_dim, got 16, 8 and 8"),
        ("func: head_dim 0", lambda x: fa.flash_attn_func(*dims(x, 0)), ValueError,
         r"head_dim must be in \[1, 256\], got 0"),
        ("func: head_dim 257", lambda x: fa.flash_attn_func(*dims(x, 257)), ValueError,
         r"head_dim must be in \[1, 256\], got 257"),
        ("qkvpacked: list", lambda x: fa.flash_attn_qkvpacked_func(x.qkv.tolist()), TypeError,
         r"qkv must be a tensor \[batch, seqlen, 3, heads, head_dim\], got list"),
        ("qkvpacked: 4-d", lambda x: fa.flash_attn_qkvpacked_func(x.qkv[0]), ValueError,
         r"qkv must be a 5-dimensional tensor"),
        ("qkvpacked: 2 packed", lambda x: fa.flash_attn_qkvpacked_func(x.qkv[:, :, :2]), ValueError,
         r"qkv must have shape \[batch, seqlen, 3, heads, head_dim\], got \(2, 6, 2, 4, 16\)"),
        # q, k and v are views of qkv: the op names the first, q.
        ("qkvpacked: int64", lambda x: fa.flash_attn_qkvpacked_func(x.qkv.long()), TypeError, dtype_pattern),
        ("kvpacked: 4-d kv", lambda x: fa.flash_attn_kvpacked_func(x.q, x.kv[0]), ValueError,
         r"kv must be a 5-dimensional tensor \[batch, seqlen_k, 2, heads_kv, head_dim\]"),
        ("kvpacked: 3 packed", lambda x: fa.flash_attn_kvpacked_func(x.q, torch.cat((x.kv, x.kv[:, :, :1]), 2)),
         ValueError, r"kv must have shape \[batch, seqlen_k, 2, heads_kv, head_dim\], got \(2, 8, 3, 2, 16\)"),
        ("kvpacked: batch mismatch", lambda x: fa.flash_attn_kvpacked_func(x.q, x.kv[:1]), ValueError,
         r"same batch size"),
        ("kvpacked: mixed dtypes", lambda x: fa.flash_attn_kvpacked_func(x.q, x.kv.double()), TypeError,
         r"k must have the same dtype as q"),
        ("kvpacked: head_dim mismatch", lambda x: fa.flash_attn_kvpacked_func(x.q, x.kv[..., :8]), ValueError,
         r"same head_dim"),
        ("varlen: 4-d q", lambda x: fa.flash_attn_varlen_func(x.q, x.tk, x.tv, x.cu_q, x.cu_k, 6, 8), ValueError,
         r"q must be a 3-dimensional tensor \[total_tokens, heads, head_dim\]"),
        ("varlen: list v", lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv.tolist(), x.cu_q, x.cu_k, 6, 8),
         TypeError, r"v must be a tensor \[total_tokens, heads, head_dim\], got list"),
        ("varlen: int64", lambda x: fa.flash_attn_varlen_func(x.tq.long(), x.tk.long(), x.tv.long(), x.cu_q, x.cu_k,
                                                               6, 8), TypeError, dtype_pattern),
        ("varlen: no cu_seqlens_q", lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, None, x.cu_k, 6, 8),
         TypeError, r"cu_seqlens_q must be a tensor \[batch \+ 1\], got NoneType"),
        ("varlen: cu_seqlens_k list", lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, x.cu_q, [0, 8, 16], 6, 8),
         TypeError, r"cu_seqlens_k must be a tensor \[batch \+ 1\], got list"),
        ("varlen: int64 offsets", lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, x.cu_q.long(), x.cu_k, 6, 8),
         TypeError, r"cu_seqlens_q must have dtype int32, got Long"),
        ("varlen: 2-d offsets", lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, x.cu_q, x.cu_k[None], 6, 8),
         ValueError, r"cu_seqlens_k must be a 1-dimensional tensor \[batch \+ 1\]"),
        ("varlen: offsets lengths differ",
         lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, x.cu_q, i32(x, 0, 16), 6, 16), ValueError,
         r"cu_seqlens_q and cu_seqlens_k must have the same length \(batch \+ 1\), got 3 and 2"),
        ("varlen: k/v total mismatch", lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv[:10], x.cu_q, x.cu_k, 6, 8),
         ValueError, r"k and v must have the same total_tokens, got 16 and 10"),
        ("varlen: heads not a multiple",
         lambda x: fa.flash_attn_varlen_func(x.tq[:, :3], x.tk, x.tv, x.cu_q, x.cu_k, 6, 8), ValueError,
         r"heads of q \(3\) must be a multiple"),
        ("varlen: head_dim mismatch",
         lambda x: fa.flash_attn_varlen_func(x.tq, x.tk[..., :8], x.tv, x.cu_q, x.cu_k, 6, 8), ValueError,
         r"same head_dim"),
        ("varlen: negative max_seqlen", lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, x.cu_q, x.cu_k, 6, -1),
         ValueError, r"max_seqlen_q and max_seqlen_k must be >= 0"),
        ("varlen_qkvpacked: 5-d", lambda x: fa.flash_attn_varlen_qkvpacked_func(x.qkv, x.cu_q, 6), ValueError,
         r"qkv must be a 4-dimensional tensor \[total_tokens, 3, heads, head_dim\]"),
        ("varlen_qkvpacked: 2 packed", lambda x: fa.flash_attn_varlen_qkvpacked_func(x.tqkv[:, :2], x.cu_q, 6),
         ValueError, r"qkv must have shape \[total_tokens, 3, heads, head_dim\], got \(12, 2, 4, 16\)"),
        ("varlen_qkvpacked: int64 offsets",
         lambda x: fa.flash_attn_varlen_qkvpacked_func(x.tqkv, x.cu_q.long(), 6), TypeError,
         r"cu_seqlens_q must have dtype int32"),
        ("varlen_kvpacked: 5-d kv", lambda x: fa.flash_attn_varlen_kvpacked_func(x.tq, x.kv, x.cu_q, x.cu_k, 6, 8),
         ValueError, r"kv must be a 4-dimensional tensor \[total_tokens_k, 2, heads_kv, head_dim\]"),
        ("varlen_kvpacked: 1 packed",
         lambda x: fa.flash_attn_varlen_kvpacked_func(x.tq, x.tkv[:, :1], x.cu_q, x.cu_k, 6, 8), ValueError,
         r"kv must have shape \[total_tokens_k, 2, heads_kv, head_dim\], got \(16, 1, 2, 16\)"),
        ("varlen_kvpacked: no cu_seqlens_k",
         lambda x: fa.flash_attn_varlen_kvpacked_func(x.tq, x.tkv, x.cu_q, None, 6, 8), TypeError,
         r"cu_seqlens_k must be a tensor"),
    ]


def _fa_cpu_value_cases():
    # Offsets are checked on the CPU only (on CUDA that would synchronize; the kernels clamp instead).
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return [
        ("varlen: decreasing", lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, i32(0, 8, 6), x.cu_k, 8, 8),
         ValueError, r"cu_seqlens_q must be non-decreasing, got 8 then 6 at index 1"),
        ("varlen: cu_seqlens_k decreasing",
         lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, x.cu_q, i32(0, 8, 6), 6, 8), ValueError,
         r"cu_seqlens_k must be non-decreasing, got 8 then 6 at index 1"),
        ("varlen_kvpacked: cu_seqlens_k decreasing",
         lambda x: fa.flash_attn_varlen_kvpacked_func(x.tq, x.tkv, x.cu_q, i32(0, 16, 8), 6, 16), ValueError,
         r"cu_seqlens_k must be non-decreasing, got 16 then 8 at index 1"),
        ("varlen: negative start", lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, i32(-1, 6, 12), x.cu_k, 7, 8),
         ValueError, r"cu_seqlens_q\[0\] must be >= 0, got -1"),
        ("varlen: past the end", lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, x.cu_q, i32(0, 8, 17), 6, 9),
         ValueError, r"cu_seqlens_k ends at 17, past the 16 rows"),
        ("varlen: max_seqlen too small", lambda x: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, x.cu_q, x.cu_k, 3, 8),
         ValueError, r"sequence 0 of cu_seqlens_q has length 6, above the max_seqlen given \(3\)"),
        ("varlen_qkvpacked: decreasing",
         lambda x: fa.flash_attn_varlen_qkvpacked_func(x.tqkv, i32(0, 7, 3), 7), ValueError,
         r"cu_seqlens_q must be non-decreasing"),
        ("varlen_kvpacked: past the end",
         lambda x: fa.flash_attn_varlen_kvpacked_func(x.tq, x.tkv, x.cu_q, i32(0, 9, 20), 6, 11), ValueError,
         r"cu_seqlens_k ends at 20, past the 16 rows"),
    ]


FA_TENSOR_CASES, FA_CPU_VALUE_CASES = _fa_tensor_cases(), _fa_cpu_value_cases()


@pytest.mark.parametrize("name,call,exc,pattern", FA_TENSOR_CASES + FA_CPU_VALUE_CASES,
                         ids=[c[0] for c in FA_TENSOR_CASES + FA_CPU_VALUE_CASES])
@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_api_rejects_bad_tensors(device, name, call, exc, pattern):
    if device != "cpu" and (name, call, exc, pattern) in FA_CPU_VALUE_CASES:
        pytest.skip("offsets are validated on the CPU only")
    with pytest.raises(exc, match=pattern):
        call(_fa_inputs(device))


@requires_cuda
def test_flash_attn_api_rejects_mixed_devices():
    x = _fa_inputs("cuda")
    cases = [
        (lambda: fa.flash_attn_func(x.q, x.k.cpu(), x.v), r"k must be on the same device as q \(cuda:0\), got cpu"),
        (lambda: fa.flash_attn_kvpacked_func(x.q.cpu(), x.kv), r"k must be on the same device as q \(cpu\)"),
        (lambda: fa.flash_attn_varlen_func(x.tq, x.tk, x.tv, x.cu_q.cpu(), x.cu_k, 6, 8),
         r"cu_seqlens_q must be on the same device as q \(cuda:0\), got cpu"),
        (lambda: fa.flash_attn_varlen_qkvpacked_func(x.tqkv, x.cu_q.cpu(), 6),
         r"cu_seqlens_q must be on the same device"),
        (lambda: fa.flash_attn_func(x.q, x.k, x.v, alibi_slopes=torch.ones(4)),
         r"alibi_slopes must be on the same device as q \(cuda:0\), got cpu"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


@pytest.mark.parametrize("layout", ["sparse", "nested"])
@pytest.mark.parametrize("entry", ["flash_attention", "flash_attn_func", "flash_attn_qkvpacked_func",
                                   "flash_attn_with_kvcache"])
def test_sparse_or_nested_tensors_are_named(entry, layout):
    """A sparse or nested tensor gets a TypeError naming it, not the dispatcher's message about
    the op's backends (or, nested, torch's "NestedTensorImpl doesn't support sizes")."""
    dense = torch.randn(1, 4, 2, 8)

    def odd(t):
        return t.to_sparse() if layout == "sparse" else torch.nested.as_nested_tensor([t[0]], layout=torch.jagged)

    calls = {"flash_attention": ("k", lambda: cuflash_attn.flash_attention(dense, odd(dense), dense)),
             "flash_attn_func": ("q", lambda: fa.flash_attn_func(odd(dense), dense, dense)),
             "flash_attn_qkvpacked_func": ("qkv",
                                           lambda: fa.flash_attn_qkvpacked_func(odd(torch.randn(1, 4, 3, 2, 8)))),
             "flash_attn_with_kvcache": ("v_cache", lambda: fa.flash_attn_with_kvcache(dense, dense, odd(dense)))}
    name, call = calls[entry]
    with pytest.raises(TypeError, match=rf"{name} must be a dense \(strided\) tensor, got "):
        call()
