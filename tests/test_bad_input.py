"""Every public entry point validates before launching and raises a clear Python exception
naming the argument (shared/TESTING.md, "Bad input")."""
import math

import pytest
import torch

import cuflash_attn
from conftest import DEVICES, requires_cuda

ops = torch.ops.cuflash_attn


def good(device="cpu", dtype=torch.float32, b=2, h=4, nq=16, nk=24, d=32):
    return [torch.randn(b, h, n, d, device=device, dtype=dtype) for n in (nq, nk, nk)]


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
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,breaker,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_fwd_rejects(device, name, breaker, exc, pattern):
    args = [t.to(device) for t in breaker(good())]
    with pytest.raises(exc, match=pattern):
        cuflash_attn.flash_attention(*args)
    with pytest.raises(exc, match=pattern):
        ops.fwd(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [math.nan, math.inf])
def test_non_finite_scale(device, scale):
    with pytest.raises(ValueError, match=r"scale must be a finite number"):
        cuflash_attn.flash_attention(*good(device), scale=scale)


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_rejects_bad_stats_and_shapes(device):
    q, k, v = good(device)
    out, lse = ops.fwd(q, k, v)
    dout = torch.randn_like(out)
    with pytest.raises(TypeError, match=r"lse must have dtype Float, got Double"):
        ops.bwd(dout, q, k, v, out, lse.double())
    with pytest.raises(ValueError, match=r"lse must have shape \[batch, heads, seqlen_q\]"):
        ops.bwd(dout, q, k, v, out, lse[:, :, :3])
    with pytest.raises(ValueError, match=r"dout must have the shape of q"):
        ops.bwd(dout[:, :, :3], q, k, v, out, lse)
    with pytest.raises(TypeError, match=r"out must have the same dtype as q"):
        ops.bwd(dout, q, k, v, out.double(), lse)
    with pytest.raises(ValueError, match=r"dlse must have shape"):
        ops.bwd(dout, q, k, v, out, lse, lse[:1])


@requires_cuda
def test_mixed_devices():
    q, k, v = good("cuda")
    with pytest.raises(ValueError, match=r"k must be on the same device as q \(cuda:0\), got cpu"):
        cuflash_attn.flash_attention(q, k.cpu(), v)
    with pytest.raises(ValueError, match=r"v must be on the same device as q \(cpu\), got cuda"):
        ops.fwd(q.cpu(), k.cpu(), v)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus():
    q, k, v = good("cuda:0")
    with pytest.raises(ValueError, match=r"k must be on the same device as q"):
        cuflash_attn.flash_attention(q, k.to("cuda:1"), v)


SDPA_CASES = [
    ("attn_mask", dict(attn_mask=torch.ones(16, 24, dtype=torch.bool)), NotImplementedError, r"attn_mask"),
    ("dropout_p 1", dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    ("dropout_p -0.1", dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout_p nan", dict(dropout_p=math.nan), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("scale nan", dict(scale=math.nan), ValueError, r"scale must be a finite number"),
]


@pytest.mark.parametrize("name,kwargs,exc,pattern", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_rejects(name, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cuflash_attn.scaled_dot_product_attention(*good(), **kwargs)


def test_sdpa_shape_errors():
    q, k, v = good()
    with pytest.raises(NotImplementedError, match=r"value with a head_dim"):
        cuflash_attn.scaled_dot_product_attention(q, k, torch.randn(2, 4, 24, 16))
    with pytest.raises(ValueError, match=r"same number of heads .* unless enable_gqa=True"):
        cuflash_attn.scaled_dot_product_attention(q, k[:, :2], v[:, :2])
    with pytest.raises(TypeError, match=r"query must be a tensor"):
        cuflash_attn.scaled_dot_product_attention([1.0], k, v)


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
    options = {key: t.to(device) if isinstance(t, torch.Tensor) else t for key, t in options.items()}
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
]
# Values are checked on the CPU only (on CUDA that would synchronize; the kernels clamp instead).
VARLEN_CPU_CASES = [
    ("decreasing", dict(cu_seqlens_q=torch.tensor([0, 12, 5], dtype=torch.int32),
                        cu_seqlens_k=torch.tensor([0, 10, 30], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q must be non-decreasing, got 12 then 5 at index 1"),
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
    kwargs = {key: t.to(device) if isinstance(t, torch.Tensor) else t for key, t in kwargs.items()}
    with pytest.raises(exc, match=pattern):
        ops.fwd(q, k, v, **kwargs)


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
