"""The features flash_attn's users need, through the op (forward, backward, lse) against the
float64 reference under shared/TESTING.md's rule: GQA/MQA, sliding windows, softcap, ALiBi,
dropout, variable-length packed batches, both causal alignments, every dtype; and the
flash_attn-compatible API on top."""
import math

import pytest
import torch

import cuflash_attn
from conftest import (HAS_CUDA, IS_SM90, cuda_kernels, fused_backward_kernel, packed_offsets, poisoned_and_unmodified,
                      sdpa_on_kernels)
from reference import (LOW_PRECISION, assert_close_to_reference, assert_lse_close, attention_reference, dropout_keep_scale,
                       gradient_scale)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = ["fp16", "bf16", "fp32", "fp64"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))]
fwd = torch.ops.cuflash_attn.fwd


# Mask shapes by name, for (batch, heads, seqlen_q, seqlen_k).
MASK_SHAPES = {
    "LS": lambda b, h, nq, nk: (nq, nk),
    "S": lambda b, h, nq, nk: (nk,),
    "B11S": lambda b, h, nq, nk: (b, 1, 1, nk),  # key padding
    "B1LS": lambda b, h, nq, nk: (b, 1, nq, nk),
    "1HLS": lambda b, h, nq, nk: (1, h, nq, nk),
    "H11": lambda b, h, nq, nk: (h, 1, 1),
    "BHLS": lambda b, h, nq, nk: (b, h, nq, nk),
}


def make_mask(kind, shape, device, dtype, seed=0, transposed=False, requires_grad=False):
    """A boolean mask (about 70% True), or a float one in dtype with a tenth of it -inf. With
    transposed, the last two dimensions are a transposed view (strides not row-major)."""
    g = torch.Generator().manual_seed(seed + 11)
    if transposed:
        shape = (*shape[:-2], shape[-1], shape[-2])
    if kind == "bool":
        mask = torch.rand(shape, generator=g) < 0.7
    else:
        mask = 2 * torch.randn(shape, generator=g, dtype=torch.float64)
        mask = mask.masked_fill(torch.rand(shape, generator=g) < 0.1, float("-inf"))
    mask = mask.to(device, dtype if kind == "float" else torch.bool)
    if transposed:
        mask = mask.transpose(-1, -2)
    return mask.requires_grad_(requires_grad)


def make_options(nq_batch, heads_q, device, causal=False, bottom_right=False, window=(-1, -1), softcap=0.0,
                 alibi=None, dropout_p=0.0, seed=0, scale=None):
    """The op's keyword options and the reference's, for one configuration."""
    g = torch.Generator().manual_seed(seed + 7)
    slopes = None
    if alibi == "heads":
        slopes = torch.rand(heads_q, generator=g).to(device)
    elif alibi == "batch":
        slopes = torch.rand(nq_batch, heads_q, generator=g).to(device)
    rng_state = torch.tensor([1234 + seed, 99], dtype=torch.int64, device=device) if dropout_p > 0 else None
    op = dict(scale=scale, is_causal=causal, bottom_right=bottom_right, window_left=window[0],
              window_right=window[1], softcap=softcap, alibi_slopes=slopes, dropout_p=dropout_p, rng_state=rng_state)
    ref = dict(scale=scale, causal=causal, bottom_right=bottom_right, window=window, softcap=softcap,
               alibi_slopes=slopes, dropout_p=dropout_p)
    return op, ref


def reference_grads(q, k, v, dout, dt, ref_options, keep, attn_mask=None):
    """(out, lse, dq, dk, dv) in dtype dt, and the float attn_mask's gradient when it requires grad."""
    qr, kr, vr = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
    inputs = [qr, kr, vr]
    if attn_mask is not None and attn_mask.requires_grad:
        attn_mask = attn_mask.detach().to(dt).requires_grad_()
        inputs.append(attn_mask)
    o, lse = attention_reference(qr, kr, vr, dtype=dt, dropout_keep=keep, attn_mask=attn_mask, **ref_options)
    return (o, lse, *torch.autograd.grad(o, inputs, dout.to(dt)))


def compare(dtype, got, ref, pt):
    out, lse, *grads = got
    assert_close_to_reference("out", out, ref[0], pt[0], dtype, factor=2, lse=ref[1])
    assert_lse_close(lse, ref[1], dtype)
    scale = gradient_scale(ref[2:5])
    for name, g, r, p in zip(("dq", "dk", "dv", "dattn_mask"), grads, ref[2:], pt[2:]):
        assert_close_to_reference(name, g, r, p, dtype, factor=3, lse=ref[1], zero_ref_scale=scale)


def check_dense(device, dtype, batch, heads_q, heads_kv, nq, nk, d, seed=0, attn_mask=None, deterministic=True,
                num_splits=1, **features):
    """attn_mask (on `device`) gets its gradient checked too when it requires grad; a pair
    (kind, MASK_SHAPES name) stands for make_mask's random mask of that kind and shape, float
    ones with a gradient unless constant along the keys (whose gradient is 0 up to rounding).
    deterministic and num_splits are the op's (False: dq may be added up with atomics; the
    forward's split-KV)."""
    if isinstance(attn_mask, tuple):
        kind, shape = attn_mask
        size = MASK_SHAPES[shape](batch, heads_q, nq, nk)
        attn_mask = make_mask(kind, size, device, dtype, seed, requires_grad=kind == "float" and size[-1] != 1)
    torch.manual_seed(seed)
    make = lambda h, n: torch.randn(batch, h, n, d, dtype=torch.float64).to(device, dtype)  # noqa: E731
    q, k, v, dout = make(heads_q, nq), make(heads_kv, nk), make(heads_kv, nk), make(heads_q, nq)
    op, ref_options = make_options(batch, heads_q, device, seed=seed, **features)
    keep = None
    if op["dropout_p"] > 0:
        keep = torch.ops.cuflash_attn.dropout_mask(op["rng_state"], op["dropout_p"], batch, heads_q, nq, nk)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    inputs = [q, k, v] + ([attn_mask] if attn_mask is not None and attn_mask.requires_grad else [])
    with poisoned_and_unmodified(q, k, v, dout, *([] if attn_mask is None else [attn_mask])):
        out, lse = fwd(q, k, v, **op, attn_mask=attn_mask, deterministic=deterministic, num_splits=num_splits)
        grads = torch.autograd.grad(out, inputs, dout)
    ref = reference_grads(q, k, v, dout, torch.float64, ref_options, keep, attn_mask)
    pt = reference_grads(q, k, v, dout, dtype, ref_options, keep, attn_mask) if dtype in LOW_PRECISION else ref
    compare(dtype, (out, lse, *grads), ref, pt)


# ---- GQA / MQA ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 2), (6, 1), (8, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(device, dtype, heads_q, heads_kv, causal):
    check_dense(device, dtype, 2, heads_q, heads_kv, 77, 130, 64, causal=causal, bottom_right=True)


@pytest.mark.skipif(not IS_SM90, reason="the fused warp-specialized backward is sm_90a's")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("splits", ["1", "2", "4", "8"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gqa_backward_kv_splits(dtype, d, splits, deterministic, causal, monkeypatch):
    """The fused Hopper backward over copies of each K/V head, each with a share of its query heads
    (CUFLASH_BWD_KV_SPLITS; torch_ops.cpp sums the copies' dK and dV): 8 query heads on one K/V
    head, with ALiBi slopes and dropout, which follow the query head; both dQ orders."""
    for name in ("CUFLASH_SM90", "CUFLASH_BWD_DQ"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUFLASH_BWD_KV_SPLITS", splits)
    check_dense("cuda", dtype, 2, 8, 1, 150, 260, d, causal=causal, alibi="heads", dropout_p=0.1,
                deterministic=deterministic)


@pytest.mark.skipif(not IS_SM90, reason="the fused warp-specialized backward is sm_90a's")
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gqa_backward_kv_splits_path(d, monkeypatch):
    """Where the rule (CUFLASH_BWD_KV_SPLITS unset, the default, or "auto") picks copies (causal
    GQA, a walk of few tiles): the fused kernel runs, then torch's sum of the copies (a reduction
    kernel, absent under CUFLASH_BWD_KV_SPLITS=1); the ordered dQ route stays bitwise
    reproducible."""
    for name in ("CUFLASH_SM90", "CUFLASH_BWD_DQ", "CUFLASH_BWD_KV_SPLITS"):
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(0)
    q = torch.randn(1, 8, 300, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 1, 300, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    slopes = torch.rand(8, device="cuda")  # the features' fused kernel at every row length
    out, _ = fwd(q, k, v, None, True, alibi_slopes=slopes)
    dout = torch.randn_like(out)

    def grads():
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    names = cuda_kernels(grads)
    assert fused_backward_kernel(d, ordered=True, features=True) in names, names
    assert "reduce_kernel" in names, names
    first, again = grads(), grads()
    for name, a, b in zip("qkv", first, again):
        assert torch.equal(a, b), f"d{name} differs between two runs"
    monkeypatch.setenv("CUFLASH_BWD_KV_SPLITS", "auto")
    assert all(torch.equal(a, b) for a, b in zip(first, grads())), "auto differs from the default"
    monkeypatch.setenv("CUFLASH_BWD_KV_SPLITS", "1")
    assert "reduce_kernel" not in cuda_kernels(grads)


# ---- sliding windows, both alignments ----

WINDOWS = [(0, 0), (16, 0), (5, 7), (-1, 10), (10, -1), (100, 100)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("window", WINDOWS, ids=[f"w{l}_{r}" for l, r in WINDOWS])
@pytest.mark.parametrize("bottom_right", [False, True], ids=["top_left", "bottom_right"])
@pytest.mark.parametrize("nq,nk", [(150, 150), (60, 201), (201, 60)])
def test_window(device, dtype, window, bottom_right, nq, nk):
    check_dense(device, dtype, 1, 2, 2, nq, nk, 64, window=window, bottom_right=bottom_right)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bottom_right", [False, True], ids=["top_left", "bottom_right"])
def test_window_with_causal(device, bottom_right):
    """causal sets the right edge to 0 whatever window_size says, as in flash_attn."""
    check_dense(device, torch.float32, 1, 2, 2, 90, 130, 32, causal=True, window=(12, 40), bottom_right=bottom_right)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bottom_right", [False, True], ids=["top_left", "bottom_right"])
@pytest.mark.parametrize("window", [(2**31 - 1, 2**31 - 1), (-1, 2**62), (2**40, -1), (250, 250)])
@pytest.mark.parametrize("nq,nk", [(150, 100), (100, 150)])
def test_window_wider_than_the_sequences_hides_nothing(device, bottom_right, window, nq, nk):
    """A window at least seqlen_q + seqlen_k wide, up to int64's range, is the unbounded window,
    forward and backward (windows near 2^31 overflowed the kernels' int key arithmetic and hid
    every key)."""
    q = torch.randn(2, 2, nq, 64, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, nk, 64, device=device, requires_grad=True) for _ in range(2))
    dout = torch.randn(2, 2, nq, 64, device=device)

    def run(window_left=-1, window_right=-1):
        out, lse = fwd(q, k, v, bottom_right=bottom_right, window_left=window_left, window_right=window_right)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), run(*window), run()):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("device", DEVICES)
def test_python_ints_beyond_int64_mean_the_same(device):
    """The Python APIs take a window side or num_splits beyond int64 (the ops' schema type) as
    the nearest int64: wider than any sequence, as many splits as keys."""
    from cuflash_attn import flash_attn_interface as fa
    q, k, v = (torch.randn(1, 2, 40, 16, device=device) for _ in range(3))
    want = cuflash_attn.flash_attention(q, k, v)
    assert torch.equal(cuflash_attn.flash_attention(q, k, v, window_size=(2**70, 2**64)), want)
    assert torch.equal(cuflash_attn.flash_attention(q, k, v, num_splits=2**70), want)
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    assert torch.equal(fa.flash_attn_func(qb, kb, vb, window_size=(2**70, 0)),
                       fa.flash_attn_func(qb, kb, vb, causal=True))
    decode = fa.flash_attn_with_kvcache(qb[:, -1:], kb.clone(), vb.clone(), num_splits=2**70)
    assert torch.allclose(decode, fa.flash_attn_with_kvcache(qb[:, -1:], kb.clone(), vb.clone()), atol=1e-6)


# ---- softcap and ALiBi ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
def test_softcap(device, dtype, softcap):
    check_dense(device, dtype, 2, 2, 2, 100, 140, 64, softcap=softcap)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("alibi", ["heads", "batch"])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi(device, dtype, alibi, causal):
    check_dense(device, dtype, 2, 3, 3, 120, 99, 64, alibi=alibi, causal=causal, bottom_right=True)


@pytest.mark.parametrize("device", DEVICES)
def test_alibi_long_distance_fp32(device):
    """Biases of about -500 (1200 queries, 8 keys, top-left): fp32 rounding of scores that large
    is beyond the 1e-5 rule in any implementation (the sweep found it; see accuracy_bound)."""
    check_varlen(device, torch.float32, [1201, 30], [8, 40], 8, 2, 25, alibi="heads")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale", [0.3, -0.2, 0.0])
@pytest.mark.parametrize("features", [dict(softcap=12.0), dict(dropout_p=0.2), dict(softcap=12.0, dropout_p=0.2),
                                      dict(alibi="heads")], ids=["softcap", "dropout", "softcap_dropout", "alibi"])
def test_features_with_a_scale(device, dtype, scale, features):
    """An explicit scale, negative and zero too: the kernels that fold a factor of the scores into
    the exponent (the scale, or softcap's) take only a positive one, the others the scores whole."""
    check_dense(device, dtype, 1, 2, 2, 70, 90, 64, scale=scale, **features)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [40, 128])
def test_all_features_together(device, dtype, d):
    check_dense(device, dtype, 2, 4, 2, 133, 190, d, causal=True, bottom_right=True, window=(50, -1), softcap=20.0,
                alibi="batch", dropout_p=0.15)


# ---- dropout ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_matches_reference_with_its_mask(device, dtype, dropout_p):
    check_dense(device, dtype, 2, 2, 1, 97, 150, 64, dropout_p=dropout_p, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_dropout_near_one_in_fp16(device, d):
    """dropout_p = 0.99999: the keep scale is 2^16, past fp16's largest value, so a kept
    probability near 1 must not be scaled before the 16-bit GEMMs take it (the kernels scale O
    and dV in their epilogues). Each kept element's key dominates its row (q = 4 k), and v and
    dout are small enough that out and the gradients are finite. The 16-bit reference applies
    the scale last too (scaling P in fp16 would make it inf)."""
    batch, heads, n, dropout_p = 1, 4, 1024, 0.99999
    op, ref_options = make_options(batch, heads, device, dropout_p=dropout_p)
    keep = torch.ops.cuflash_attn.dropout_mask(op["rng_state"], dropout_p, batch, heads, n, n)
    kept = keep.nonzero().tolist()
    assert len(kept) >= 8, f"{len(kept)} kept elements"
    torch.manual_seed(0)
    q, k = (torch.randn(batch, heads, n, d, dtype=torch.float64) for _ in range(2))
    for b, h, i, j in kept:
        q[b, h, i] = 4 * k[b, h, j]
    v = torch.randn(batch, heads, n, d, dtype=torch.float64) * 2.0**-16
    dout = torch.randn(batch, heads, n, d, dtype=torch.float64) * 2.0**-8
    q, k, v, dout = (t.to(device, torch.float16) for t in (q, k, v, dout))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = fwd(q, k, v, **op)
    got = (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    assert all(torch.isfinite(t).all() for t in got), "inf or NaN"
    ref = reference_grads(q, k, v, dout, torch.float64, ref_options, keep)
    keep_scale = dropout_keep_scale(dropout_p)
    unscaled = reference_grads(q, k, v, dout * keep_scale, torch.float16, dict(ref_options, dropout_p=0.0), keep)
    pt = (unscaled[0].double() * keep_scale, *unscaled[1:])
    compare(torch.float16, got, ref, pt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout_p", [0.05, 0.3, 0.9])
def test_dropout_keeps_the_right_fraction(device, dropout_p):
    state = torch.tensor([42, 7], dtype=torch.int64, device=device)
    keep = torch.ops.cuflash_attn.dropout_mask(state, dropout_p, 2, 4, 300, 500)
    dropped = 1.0 - keep.double().mean().item()
    assert abs(dropped - dropout_p) < 0.01, f"dropped {dropped:.4f}, want {dropout_p}"
    # Neighbouring rows, columns and heads are not copies of each other.
    assert not torch.equal(keep[:, :, 0::2], keep[:, :, 1::2])
    assert not torch.equal(keep[..., 0::2], keep[..., 1::2])
    assert not torch.equal(keep[:, 0], keep[:, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_draws_are_independent(device):
    """The elements one Philox call draws (4 queries i ^ 1, i ^ 8, i ^ 9 x 2 keys j ^ 1: the 16-bit
    halves of its four words) and their neighbours agree as often as independent coin flips do
    (half the time at p = 0.5), over 2 x 2 x 256 x 256 elements: a draw reused or a half read
    twice would agree every time."""
    state = torch.tensor([1234, 5], dtype=torch.int64, device=device)
    keep = torch.ops.cuflash_attn.dropout_mask(state, 0.5, 2, 2, 256, 256).cpu()
    index = torch.arange(256)
    for name, (di, dj) in {"query ^ 1": (1, 0), "query ^ 8": (8, 0), "query ^ 9": (9, 0), "key ^ 1": (0, 1),
                           "query ^ 9, key ^ 1": (9, 1), "query ^ 16": (16, 0), "key ^ 2": (0, 2)}.items():
        partner = keep[:, :, index ^ di][..., index ^ dj]
        agree = (keep == partner).double().mean().item()
        assert abs(agree - 0.5) < 0.01, f"{name}: agree {agree:.4f}"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_dropout_mask_same_on_cpu_and_cuda():
    state = torch.tensor([2**40 + 5, 3], dtype=torch.int64)
    cpu = torch.ops.cuflash_attn.dropout_mask(state, 0.3, 2, 3, 70, 90)
    cuda = torch.ops.cuflash_attn.dropout_mask(state.cuda(), 0.3, 2, 3, 70, 90)
    assert torch.equal(cpu, cuda.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_follows_torch_seed(device):
    import cuflash_attn
    q, k, v = (torch.randn(1, 2, 64, 32, device=device) for _ in range(3))
    torch.manual_seed(0)
    a = cuflash_attn.flash_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(0)
    b = cuflash_attn.flash_attention(q, k, v, dropout_p=0.2)
    c = cuflash_attn.flash_attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# The public wrappers draw their rng_state from torch's generator themselves and must hand that
# same state to the backward (autograd's saved tensors). Each entry: (call(q, k, v, dropout_p,
# causal) -> out for q, k, v in [B, H, N, D]; the reference's bottom_right for its causal).
def _call_flash_attention(q, k, v, dropout_p, causal):
    import cuflash_attn
    return cuflash_attn.flash_attention(q, k, v, causal=causal, dropout_p=dropout_p)


def _call_flash_attn_func(q, k, v, dropout_p, causal):
    from cuflash_attn import flash_attn_interface as fa
    # flash_attn's layout [B, N, H, D]; its causal is aligned bottom-right.
    return fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                              causal=causal).transpose(1, 2)


def _call_sdpa(q, k, v, dropout_p, causal):
    # 0 < dropout_p < 1 runs on the kernels (README: only dropout_p = 1 falls back to torch).
    return sdpa_on_kernels(q, k, v, dropout_p=dropout_p, is_causal=causal)


DROPOUT_WRAPPERS = {
    "flash_attention": (_call_flash_attention, False),
    "flash_attn_func": (_call_flash_attn_func, True),
    "sdpa_enabled": (_call_sdpa, False),
}


def _wrapper_dropout_masks(device, seed, calls, dropout_p, batch, heads_q, nq, nk):
    """The keep-masks of the wrappers' first `calls` dropout calls after torch.manual_seed(seed):
    each call draws its [seed, offset] with new_rng_state from torch's generator on the device
    (README: "a counter-based Philox stream seeded from torch's generator")."""
    from cuflash_attn.ops import new_rng_state
    torch.manual_seed(seed)
    states = [new_rng_state(torch.device(device)) for _ in range(calls)]
    return [torch.ops.cuflash_attn.dropout_mask(s, dropout_p, batch, heads_q, nq, nk) for s in states]


def _wrapper_inputs(device, dtype, batch, heads_q, heads_kv, nq, nk, d, seed):
    g = torch.Generator().manual_seed(seed + 101)  # not torch's default generator: dropout draws from that
    make = lambda h, n: torch.randn(batch, h, n, d, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    q, k, v = make(heads_q, nq), make(heads_kv, nk), make(heads_kv, nk)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), make(heads_q, nq)


def _compare_wrapper(dtype, out, grads, ref, pt):
    assert_close_to_reference("out", out, ref[0], pt[0], dtype, factor=2, lse=ref[1])
    scale = gradient_scale(ref[2:5])
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref[2:5], pt[2:5]):
        assert_close_to_reference(name, g, r, p, dtype, factor=3, lse=ref[1], zero_ref_scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("wrapper", list(DROPOUT_WRAPPERS))
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_wrappers_backward_uses_the_forwards_mask(device, dtype, wrapper, causal):
    """flash_attention, flash_attn_func and SDPA under enable() with 0 < dropout_p < 1: out and
    the gradients against the float64 reference with the keep-mask the forward's rng_state gives
    (re-derived from torch's generator), so a backward that regenerates its mask from any other
    state (a fresh draw, none, another call's) fails on dq, dk and dv."""
    call, bottom_right = DROPOUT_WRAPPERS[wrapper]
    batch, heads_q, heads_kv, nq, nk, d, p = 2, 4, 2, 37, 53, 32, 0.3
    q, k, v, dout = _wrapper_inputs(device, dtype, batch, heads_q, heads_kv, nq, nk, d, seed=3)
    torch.manual_seed(1234)
    out = call(q, k, v, p, causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    keep, = _wrapper_dropout_masks(device, 1234, 1, p, batch, heads_q, nq, nk)
    assert not keep.all() and keep.any()
    ref_options = dict(causal=causal, bottom_right=bottom_right, dropout_p=p)
    ref = reference_grads(q, k, v, dout, torch.float64, ref_options, keep)
    pt = reference_grads(q, k, v, dout, dtype, ref_options, keep) if dtype in LOW_PRECISION else ref
    _compare_wrapper(dtype, out, grads, ref, pt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrapper", list(DROPOUT_WRAPPERS))
def test_dropout_wrappers_two_calls_keep_their_own_masks(device, wrapper):
    """Two dropout calls before one backward (a model with two attention layers, or activation
    checkpointing's order): each call's backward uses its own forward's state, not the last one
    drawn nor a shared one."""
    call, bottom_right = DROPOUT_WRAPPERS[wrapper]
    batch, heads_q, heads_kv, nq, nk, d, p = 1, 2, 1, 29, 41, 16, 0.4
    dtype = torch.float64
    q, k, v, dout = _wrapper_inputs(device, dtype, batch, heads_q, heads_kv, nq, nk, d, seed=5)
    dout2 = torch.randn(dout.shape, generator=torch.Generator().manual_seed(77), dtype=dtype).to(device)
    torch.manual_seed(99)
    out1 = call(q, k, v, p, True)
    out2 = call(q * 0.5, k, v, p, True)
    grads = torch.autograd.grad((out1, out2), (q, k, v), (dout, dout2))
    keep1, keep2 = _wrapper_dropout_masks(device, 99, 2, p, batch, heads_q, nq, nk)
    assert not torch.equal(keep1, keep2)
    ref_options = dict(causal=True, bottom_right=bottom_right, dropout_p=p)
    qh = (q.detach() * 0.5).requires_grad_()
    ref1 = reference_grads(q, k, v, dout, dtype, ref_options, keep1)
    # The second call's reference through q * 0.5: its dq is half the gradient at q * 0.5.
    ref2 = reference_grads(qh, k, v, dout2, dtype, ref_options, keep2)
    assert_close_to_reference("out1", out1, ref1[0], ref1[0], dtype, factor=2, lse=ref1[1])
    assert_close_to_reference("out2", out2, ref2[0], ref2[0], dtype, factor=2, lse=ref2[1])
    want = (ref1[2] + 0.5 * ref2[2], ref1[3] + ref2[3], ref1[4] + ref2[4])
    scale = gradient_scale(want)
    for name, g, r in zip(("dq", "dk", "dv"), grads, want):
        assert_close_to_reference(name, g, r, r, dtype, factor=3, zero_ref_scale=scale)


# ---- variable length ----

def check_varlen(device, dtype, lens_q, lens_k, heads_q, heads_kv, d, seed=0, max_seqlen=True, num_splits=1,
                 **features):
    torch.manual_seed(seed)
    batch = len(lens_q)
    cu_q, cu_k = packed_offsets(lens_q, device), packed_offsets(lens_k, device)
    total_q, total_k = sum(lens_q), sum(lens_k)
    make = lambda n, h: torch.randn(n, h, d, dtype=torch.float64).to(device, dtype)  # noqa: E731
    q, k, v, dout = make(total_q, heads_q), make(total_k, heads_kv), make(total_k, heads_kv), make(total_q, heads_q)
    op, ref_options = make_options(batch, heads_q, device, seed=seed, **features)
    mq, mk = (max(lens_q), max(lens_k)) if max_seqlen else (0, 0)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    with poisoned_and_unmodified(q, k, v, dout):
        out, lse = fwd(q, k, v, **op, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk,
                       num_splits=num_splits)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert lse.shape == (heads_q, total_q)
    keep_all = None
    if op["dropout_p"] > 0:
        keep_all = torch.ops.cuflash_attn.dropout_mask(op["rng_state"], op["dropout_p"], batch, heads_q,
                                                       max(lens_q), max(lens_k))
    slopes = ref_options.pop("alibi_slopes")
    for b in range(batch):
        sq, sk = slice(cu_q[b].item(), cu_q[b + 1].item()), slice(cu_k[b].item(), cu_k[b + 1].item())
        dense = lambda t, s: t[s].transpose(0, 1)[None]  # noqa: E731
        keep = None if keep_all is None else keep_all[b:b + 1, :, :lens_q[b], :lens_k[b]]
        slopes_b = None if slopes is None else (slopes[b:b + 1] if slopes.dim() == 2 else slopes)
        args = (dense(q, sq), dense(k, sk), dense(v, sk), dense(dout, sq))
        ref = reference_grads(*args, torch.float64, dict(ref_options, alibi_slopes=slopes_b), keep)
        pt = reference_grads(*args, dtype, dict(ref_options, alibi_slopes=slopes_b), keep) \
            if dtype in LOW_PRECISION else ref
        got = (dense(out, sq), lse[:, sq][None], dense(dq, sq), dense(dk, sk), dense(dv, sk))
        try:
            compare(dtype, got, ref, pt)
        except AssertionError as e:
            raise AssertionError(f"sequence {b} (lengths {lens_q[b]}, {lens_k[b]}): {e}") from e


VARLEN_LENGTHS = [([5, 0, 130, 64], [7, 3, 130, 0]), ([1], [1]), ([200, 33, 0], [100, 333, 0])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lens", VARLEN_LENGTHS, ids=["mixed", "one", "zeros_last"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(device, dtype, lens, causal):
    check_varlen(device, dtype, *lens, 4, 2, 64, causal=causal, bottom_right=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_varlen_with_features(device, dtype):
    check_varlen(device, dtype, [70, 0, 129], [90, 12, 64], 4, 1, 96, causal=True, bottom_right=True,
                 window=(20, -1), softcap=10.0, alibi="batch", dropout_p=0.2)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_without_max_seqlen(device):
    """max_seqlen 0 (not known: flash_attn users passing tensors): the packed length bounds it."""
    check_varlen(device, torch.float32, [30, 100, 1], [64, 2, 200], 2, 2, 32, max_seqlen=False, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_random_padding_matches_padded_batch(device):
    """A padded batch with a key-padding mask per sequence, run packed, equals each sequence
    run alone."""
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(0, 90, (6,), generator=g).tolist()
    check_varlen(device, torch.float32, lens, lens, 2, 2, 64, causal=True)


# ---- tile skipping (debug counters) ----

@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("nq,nk", [(1000, 1000), (300, 1000), (1000, 300), (64, 4096)])
@pytest.mark.parametrize("mask", ["none", "causal_tl", "causal_br", "window"])
def test_forward_skips_exactly_the_masked_tiles(d, nq, nk, mask):
    q = torch.randn(2, 3, nq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 3, nk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    causal, bottom_right, window = {"none": (False, False, (-1, -1)), "causal_tl": (True, False, (-1, -1)),
                                    "causal_br": (True, True, (-1, -1)), "window": (False, True, (100, 30))}[mask]
    computed, skipped, block_m, block_n = torch.ops.cuflash_attn.fwd_tile_counts(
        q, k, v, causal, bottom_right, window[0], window[1]).tolist()
    diagonal = nk - nq if bottom_right else 0
    left, right = window[0], 0 if causal else window[1]
    want_computed = want_total = 0
    for m0 in range(0, nq, block_m):
        last = min(m0 + block_m, nq) - 1
        first_key = max(0, m0 + diagonal - left) if left >= 0 else 0
        end_key = min(nk, last + diagonal + right + 1) if right >= 0 else nk
        blocks = 0 if end_key <= first_key else math.ceil(end_key / block_n) - first_key // block_n
        want_computed += blocks
        want_total += math.ceil(nk / block_n)
    assert computed == 2 * 3 * want_computed
    assert computed + skipped == 2 * 3 * want_total


# ---- the flash_attn-compatible API ----

@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_api_layouts_and_packing(device):
    from cuflash_attn import flash_attn_interface as fa
    torch.manual_seed(0)
    b, n, h, d = 2, 50, 4, 32
    qkv = torch.randn(b, n, 3, h, d, device=device)
    q, k, v = qkv.unbind(2)
    out = fa.flash_attn_func(q, k, v, causal=True)
    assert out.shape == (b, n, h, d)
    ref, _ = attention_reference(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, bottom_right=True)
    assert torch.allclose(out.transpose(1, 2).double(), ref, atol=1e-5)
    assert torch.equal(fa.flash_attn_qkvpacked_func(qkv, causal=True), out)
    assert torch.equal(fa.flash_attn_kvpacked_func(q, torch.stack((k, v), 2), causal=True), out)
    # Packed varlen over the same batch.
    cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=device)
    flat = lambda t: t.reshape(b * n, h, d)  # noqa: E731
    out_varlen = fa.flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, n, n, causal=True)
    assert torch.allclose(out_varlen, flat(out), atol=1e-6)
    out_qkv = fa.flash_attn_varlen_qkvpacked_func(qkv.reshape(b * n, 3, h, d), cu, n, causal=True)
    out_kv = fa.flash_attn_varlen_kvpacked_func(flat(q), torch.stack((flat(k), flat(v)), 1), cu, cu, n, n,
                                                causal=True)
    assert torch.equal(out_qkv, out_varlen) and torch.equal(out_kv, out_varlen)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_api_return_attn_probs(device):
    from cuflash_attn import flash_attn_interface as fa
    torch.manual_seed(0)
    q = torch.randn(2, 40, 2, 32, device=device)
    k, v = (torch.randn(2, 60, 1, 32, device=device) for _ in range(2))
    out, lse, probs = fa.flash_attn_func(q, k, v, dropout_p=0.25, causal=True, return_attn_probs=True)
    assert lse.shape == (2, 2, 40) and probs.shape == (2, 2, 40, 60)
    kept = probs.clamp(min=0)
    # The output is the kept probabilities, rescaled, times v (v's heads repeated for GQA).
    want = (kept / 0.75) @ v.transpose(1, 2).repeat_interleave(2, 1).float()
    assert torch.allclose(out.transpose(1, 2).float(), want, atol=1e-5)
    assert torch.allclose(probs.abs().sum(-1), torch.ones(2, 2, 40, device=device), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_api_no_attn_probs_without_dropout(device):
    """As flash_attn: without dropout S_dmask is an empty tensor of q's dtype (callers that set
    return_attn_probs for the lse get no O(N^2) matrix), and the lse is the same as under dropout."""
    from cuflash_attn import flash_attn_interface as fa
    q, k, v = (torch.randn(2, 40, 2, 32, device=device, dtype=torch.bfloat16) for _ in range(3))
    out, lse, probs = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert probs.shape == (0,) and probs.dtype == q.dtype and probs.device == q.device
    assert torch.equal(out, fa.flash_attn_func(q, k, v, causal=True))
    cu = torch.tensor([0, 40, 80], dtype=torch.int32, device=device)
    flat = lambda t: t.reshape(80, 2, 32)  # noqa: E731
    _, lse_varlen, probs_varlen = fa.flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, 40, 40, causal=True,
                                                            return_attn_probs=True)
    assert probs_varlen.shape == (0,)
    assert torch.equal(lse_varlen, lse.transpose(0, 1).reshape(2, 80))


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_api_gradients_flow_through_packing(device):
    from cuflash_attn import flash_attn_interface as fa
    qkv = torch.randn(1, 33, 3, 2, 16, device=device, dtype=torch.float64, requires_grad=True)
    fa.flash_attn_qkvpacked_func(qkv, causal=True).sum().backward()
    q, k, v = qkv.detach().unbind(2)
    ref_qkv = torch.stack((q, k, v), 2).requires_grad_()
    qr, kr, vr = (t.transpose(1, 2) for t in ref_qkv.unbind(2))
    attention_reference(qr, kr, vr, causal=True, bottom_right=True)[0].sum().backward()
    assert torch.allclose(qkv.grad, ref_qkv.grad, atol=1e-10)


def test_flash_attn_install_aliases_the_module():
    import sys
    from cuflash_attn import bert_padding
    from cuflash_attn import flash_attn_interface as fa
    saved = {name: sys.modules.get(name)
             for name in ("flash_attn", "flash_attn.flash_attn_interface", "flash_attn.bert_padding")}
    try:
        fa.install()
        import flash_attn
        from flash_attn.bert_padding import pad_input, unpad_input
        from flash_attn.flash_attn_interface import flash_attn_func
        assert flash_attn.flash_attn_func is fa.flash_attn_func and flash_attn_func is fa.flash_attn_func
        assert flash_attn.bert_padding is bert_padding and (unpad_input, pad_input) == (bert_padding.unpad_input,
                                                                                       bert_padding.pad_input)
        assert flash_attn.__version__ == fa.FLASH_ATTN_VERSION
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_backward_deterministic_with_features(dtype):
    """GQA sums dk/dv over the group and dropout regenerates its mask: still bitwise equal over
    50 runs (no atomics anywhere)."""
    torch.manual_seed(0)
    q = torch.randn(3, 8, 500, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(3, 2, 700, 128, device="cuda", dtype=dtype) for _ in range(2))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    rng = torch.tensor([5, 6], dtype=torch.int64, device="cuda")
    out, _ = fwd(q, k, v, is_causal=True, bottom_right=True, window_left=300, softcap=30.0, dropout_p=0.1,
                 rng_state=rng)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for _ in range(49):
        again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_varlen_rows_outside_every_sequence_are_zero(device, dtype):
    """Rows before cu_seqlens[0] see no key: output 0 and lse -inf, also when the kernels write
    through a staging copy (bf16 on the CPU is computed in float32)."""
    q, k, v = (torch.randn(n, 2, 32, device=device, dtype=dtype) for n in (12, 9, 9))
    cu_q = torch.tensor([2, 7, 12], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    out, lse = fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=5)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.isneginf(lse[:, :2]).all() and torch.isfinite(lse[:, 2:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_api_varlen_return_attn_probs(device):
    """Packed: S_dmask is per sequence, padded to the longest; its kept entries, rescaled, times v
    give each sequence's output."""
    from cuflash_attn import flash_attn_interface as fa
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=device)
    q = torch.randn(14, 2, 16, device=device)
    k, v = (torch.randn(14, 1, 16, device=device) for _ in range(2))
    out, lse, probs = fa.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, dropout_p=0.3, causal=True,
                                                alibi_slopes=torch.rand(3, 2, device=device), return_attn_probs=True)
    assert probs.shape == (3, 2, 9, 9)
    for b, (start, end) in enumerate([(0, 5), (5, 5), (5, 14)]):
        n = end - start
        kept = probs[b, :, :n, :n].clamp(min=0) / 0.7
        want = kept @ v[start:end].transpose(0, 1).float()
        assert torch.allclose(out[start:end].transpose(0, 1), want, atol=1e-5)
