"""The edge-case table of shared/TESTING.md, through cuflash_attn.flash_attention and, where the
row applies, the flash_attn-compatible API (padded and packed)."""
import math

import pytest
import torch

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cuflash_attn
from conftest import ALL_DTYPES, DEVICES, cuda_kernels, poisoned_and_unmodified, sdpa_on_kernels
from cuflash_attn.fallback import TORCH_SDPA
from cuflash_attn import flash_attn_interface as fa
from reference import assert_close_to_reference, assert_lse_close, attention_reference, reference_results

def _bshd(t):
    """[batch, heads, seqlen, head_dim] <-> [batch, seqlen, heads, head_dim] (a view)."""
    return t.transpose(1, 2)


def _packed(t):
    """[batch, heads, seqlen, head_dim] -> [batch * seqlen, heads, head_dim]."""
    b, h, n, d = t.shape
    return _bshd(t).reshape(b * n, h, d)


def _equal_shapes(q, k):
    if q.shape != k.shape:
        pytest.skip("the qkv-packed functions take q, k and v of one shape")


def _flash_attn_padded(function):
    def attend(q, k, v, causal, **kw):
        out, lse, _ = function(*(_bshd(t) for t in (q, k, v)), causal=causal, return_attn_probs=True, **kw)
        return _bshd(out), lse
    return attend


def _flash_attn_varlen(function):
    """A varlen function on a padded batch packed into [batch * seqlen, heads, head_dim]."""
    def attend(q, k, v, causal, **kw):
        b, h, nq, d = q.shape
        nk = k.shape[2]
        offsets = lambda n: torch.arange(b + 1, dtype=torch.int32, device=q.device) * n  # noqa: E731
        out, lse, _ = function(_packed(q), _packed(k), _packed(v), offsets(nq), offsets(nk), nq, nk, causal=causal,
                               return_attn_probs=True, **kw)
        return _bshd(out.reshape(b, nq, h, d)), lse.reshape(h, b, nq).transpose(0, 1)
    return attend


def _qkvpacked(q, k, v, causal, **kw):
    _equal_shapes(q, k)
    return fa.flash_attn_qkvpacked_func(torch.stack((q, k, v), 2), causal=causal, **kw)


def _varlen_qkvpacked(q, k, v, cu_q, cu_k, nq, nk, **kw):
    _equal_shapes(q, k)
    return fa.flash_attn_varlen_qkvpacked_func(torch.stack((q, k, v), 1), cu_q, nq, **kw)


def _sdpa(q, k, v, causal):
    """torch.nn.functional's SDPA after cuflash_attn.enable() (cuflash_attn.scaled_dot_product_attention
    itself), checked to run the kernels; it returns no lse, and aligns is_causal top-left."""
    return sdpa_on_kernels(q, k, v, is_causal=causal), None


# Every Python entry point on [batch, heads, seqlen, head_dim] inputs, returning (out, lse
# [batch, heads, seqlen_q] or None); all but SDPA align causal masks bottom-right (flash_attn's
# rule), and take window_size as a keyword.
ENTRY_POINTS = {
    "flash_attention": lambda q, k, v, causal, **kw: cuflash_attn.flash_attention(q, k, v, causal, return_lse=True,
                                                                                  bottom_right=True, **kw),
    "flash_attn_func": _flash_attn_padded(fa.flash_attn_func),
    "flash_attn_kvpacked_func": _flash_attn_padded(
        lambda q, k, v, **kw: fa.flash_attn_kvpacked_func(q, torch.stack((k, v), 2), **kw)),
    "flash_attn_qkvpacked_func": _flash_attn_padded(_qkvpacked),
    "flash_attn_varlen_func": _flash_attn_varlen(fa.flash_attn_varlen_func),
    "flash_attn_varlen_kvpacked_func": _flash_attn_varlen(
        lambda q, k, v, *offsets, **kw: fa.flash_attn_varlen_kvpacked_func(q, torch.stack((k, v), 1), *offsets, **kw)),
    "flash_attn_varlen_qkvpacked_func": _flash_attn_varlen(_varlen_qkvpacked),
    "scaled_dot_product_attention": _sdpa,
}
TOP_LEFT = {"scaled_dot_product_attention"}
BOTTOM_RIGHT_ENTRY_POINTS = [e for e in ENTRY_POINTS if e not in TOP_LEFT]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", BOTTOM_RIGHT_ENTRY_POINTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_fully_masked_rows(device, entry, dtype):
    """Bottom-right causal with nq > nk: the first nq - nk rows see no key. Their output is 0,
    their lse -inf (documented), their gradients 0, and nothing is NaN."""
    _check_first_rows_see_no_key(device, entry, dtype, 70 - 20, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", BOTTOM_RIGHT_ENTRY_POINTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_rows_outside_the_window_see_no_key(device, entry, dtype):
    """A window alone, no causal mask: bottom-right aligned, 70 queries over 20 keys, query i sees
    keys i - 55 .. i - 45 under window (5, 5), so the first 45 rows see none: the same answers."""
    _check_first_rows_see_no_key(device, entry, dtype, 45, causal=False, window_size=(5, 5))


def _check_first_rows_see_no_key(device, entry, dtype, empty, causal, **kw):
    """70 queries over 20 keys, of which the first `empty` rows see no key: their output 0, lse
    -inf, dq 0; every other row's lse finite; no NaN anywhere."""
    nq, nk = 70, 20
    q, k, v = (torch.randn(1, 2, n, 64, device=device, dtype=dtype, requires_grad=True) for n in (nq, nk, nk))
    out, lse = ENTRY_POINTS[entry](q, k, v, causal, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.all(out[:, :, :empty] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :empty])) and torch.all(torch.isfinite(lse[:, :, empty:]))
    assert torch.all(dq[:, :, :empty] == 0)
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_sdpa_fully_masked_rows(device, dtype):
    """SDPA's rows that a boolean attn_mask hides entirely: output 0 and gradients 0, as torch's
    math backend gives them, and no NaN anywhere."""
    q, k, v = (torch.randn(2, 3, n, 32, device=device, dtype=dtype, requires_grad=True) for n in (12, 20, 20))
    mask = torch.rand(12, 20, device=device) > 0.5
    mask[3] = mask[7] = False
    with cuflash_attn.enable():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    with sdpa_kernel(SDPBackend.MATH):
        want = TORCH_SDPA(q, k, v, attn_mask=mask)
    assert torch.all(out[:, :, [3, 7]] == 0) and torch.all(want[:, :, [3, 7]] == 0)
    assert torch.all(grads[0][:, :, [3, 7]] == 0)
    for t in (out, *grads):
        assert not torch.isnan(t).any()


def _without_attention_kernels(device, fn):
    """fn()'s result; on CUDA, also checks with the profiler that fn launched no attention kernel
    (every forward and backward kernel's name starts with flash_, csrc/cuda; the fills that zero
    an output or set lse to -inf may run)."""
    if device != "cuda":
        return fn()
    result = []
    names = cuda_kernels(lambda: result.append(fn()))
    assert "flash_" not in names, f"an attention kernel ran: {names}"
    return result[0]


def _forward_and_backward(entry, q, k, v):
    out, lse = ENTRY_POINTS[entry](q, k, v, False)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), torch.randn_like(out)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_seqlen_k_zero(device, entry):
    """Output 0, lse -inf, dq 0, and (on CUDA) no attention kernel launched, forward or backward."""
    q = torch.randn(2, 3, 5, 32, device=device, requires_grad=True)
    k = torch.randn(2, 3, 0, 32, device=device, requires_grad=True)
    v = torch.randn(2, 3, 0, 32, device=device, requires_grad=True)
    out, lse, dq, dk, dv = _without_attention_kernels(device, lambda: _forward_and_backward(entry, q, k, v))
    assert torch.all(out == 0) and (lse is None or torch.all(torch.isneginf(lse)))
    assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("shape_q,shape_k", [((0, 2, 5, 32), (0, 2, 7, 32)), ((2, 2, 0, 32), (2, 2, 7, 32)),
                                             ((2, 0, 5, 32), (2, 0, 7, 32)), ((0, 2, 5, 32), (0, 2, 5, 32))])
def test_empty_outputs(device, entry, shape_q, shape_k):
    """Batch, heads or seqlen_q 0: empty outputs of the right shapes, and (on CUDA) no attention
    kernel launched, forward or backward."""
    q = torch.randn(shape_q, device=device, requires_grad=True)
    k = torch.randn(shape_k, device=device, requires_grad=True)
    v = torch.randn(shape_k, device=device, requires_grad=True)
    out, _, dq, dk, dv = _without_attention_kernels(device, lambda: _forward_and_backward(entry, q, k, v))
    assert out.shape == q.shape
    assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("dtype,value", [(torch.bfloat16, 133120.0), (torch.float16, 256.0)])
def test_huge_equal_inputs_are_finite(device, entry, dtype, value):
    q = torch.full((1, 2, 100, 64), value, device=device, dtype=dtype, requires_grad=True)
    out, _ = ENTRY_POINTS[entry](q, q, q, True)
    assert torch.isfinite(out).all()
    assert torch.all(out == value)
    (dq,) = torch.autograd.grad(out, (q,), torch.ones_like(out))
    assert torch.isfinite(dq).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_large_magnitude_fp16_is_finite(device, entry):
    q, k, v = (torch.randn(2, 2, 128, 64, device=device).mul(1e4).half() for _ in range(3))
    out, _ = ENTRY_POINTS[entry](q, k, v, False)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_uniform_attention_over_50k_keys(device, entry, dtype):
    nk = 50_000
    q = torch.zeros(1, 1, 4, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.zeros(1, 1, nk, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 1, nk, 64, device=device, dtype=dtype, requires_grad=True)
    out, _ = ENTRY_POINTS[entry](q, k, v, False)
    mean = v.double().mean(dim=2, keepdim=True).expand_as(out)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert (out.double() - mean).abs().max().item() < tol
    dq, dk, _ = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    # dq = sum_j p_j (dout . v_j - delta) k_j = 0 since k = 0; dk_j = p_j (...) q = 0 since q = 0.
    assert torch.all(dq == 0) and torch.all(dk == 0)


def _reached_by_nan(where, n, pos):
    """Causal attention with seqlen_q = seqlen_k = n (query i attends keys 0..i), one NaN in row
    `pos` of q, k or v (`where`): boolean [n] masks of the query rows of out, lse and dq, and the
    key rows of dk and dv, that the NaN reaches mathematically (the README's promise: the rows
    that attend to it and their gradients). With p = softmax, ds_ij = p_ij (dout_i . v_j - delta_i),
    delta_i = dout_i . out_i: dq_i = sum_j ds_ij k_j, dk_j = sum_i ds_ij q_i, dv_j = sum_i p_ij dout_i."""
    i = torch.arange(n)
    everything, nothing = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    if where == "q":  # row pos only; it reaches the keys row pos attends (0..pos) through p and ds
        return dict(out=i == pos, lse=i == pos, dq=i == pos, dk=i <= pos, dv=i <= pos)
    if where == "k":  # rows pos.. (NaN scores, NaN lse); between them they attend every key
        return dict(out=i >= pos, lse=i >= pos, dq=i >= pos, dk=everything, dv=everything)
    # v: rows pos.. (their out and delta); p stays finite, so lse and dv do (dv has no v in it)
    return dict(out=i >= pos, lse=nothing, dq=i >= pos, dk=everything, dv=nothing)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_propagates_to_affected_rows_only(device, entry, dtype, where):
    """A NaN in q, k or v (row 300 of 512, causal) reaches the rows that attend to it, in out, lse
    and the gradients (_reached_by_nan), and every other row is finite and what the same inputs
    without the NaN give: out and lse bitwise, gradients within the dtype's tolerance (dq may be
    added up with atomics). On CUDA a tile's matrix products also carry it to the rows and keys of
    the tiles that hold it (a masked probability or dS is 0, and 0 x NaN is NaN, as in
    FlashAttention's kernels); no tile is wider than 192 rows or keys and tiles start at multiples
    of their size, so there rows and keys below 192 are held to the exact promise and the others
    may be NaN beyond it. Catches a masked score replaced by a product with the NaN, a row maximum
    taken before the mask, NaN lost from a row that attends to it, and NaN leaking across tiles."""
    n, pos = 512, 300
    exact_below = n if device == "cpu" else 192
    q, k, v = (torch.randn(1, 1, n, 64, device=device, dtype=dtype) for _ in range(3))
    dout = torch.randn(1, 1, n, 64, device=device, dtype=dtype)

    def run(q, k, v):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = ENTRY_POINTS[entry](q, k, v, True)
        return dict(out=out, lse=lse, **dict(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout))))

    clean = run(q, k, v)
    poisoned = dict(q=q, k=k, v=v)[where]
    poisoned[0, 0, pos, 3] = math.nan
    got = run(q, k, v)
    exact = torch.arange(n) < exact_below
    for name, reached in _reached_by_nan(where, n, pos).items():
        if got[name] is None:  # SDPA returns no lse
            continue
        rows, want = (t[0, 0].reshape(n, -1) for t in (got[name], clean[name]))  # lse: [n] -> [n, 1]
        has_nan = torch.isnan(rows).any(dim=-1).cpu()
        assert has_nan[reached].all() and not has_nan[exact & ~reached].any(), (
            f"{name}: NaN in rows {has_nan.nonzero().flatten().tolist()}, expected in "
            f"{reached.nonzero().flatten().tolist()}" + ("" if device == "cpu" else f" (and any from {exact_below})"))
        unaffected = (exact & ~reached).to(rows.device)
        assert torch.isfinite(rows[unaffected]).all(), f"{name}: an unaffected row is not finite"
        if name in ("out", "lse"):
            assert torch.equal(rows[unaffected], want[unaffected]), f"{name}: an unaffected row changed"
        else:
            torch.testing.assert_close(rows[unaffected], want[unaffected], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_default_scale_and_explicit_scale(device):
    q, k, v = (torch.randn(1, 2, 30, 48, device=device, dtype=torch.float64) for _ in range(3))
    a = cuflash_attn.flash_attention(q, k, v)
    b = cuflash_attn.flash_attention(q, k, v, scale=1 / math.sqrt(48))
    assert torch.equal(a, b)
    c = cuflash_attn.flash_attention(q, k, v, scale=-0.7)  # a negative scale is valid
    ref = torch.softmax(-0.7 * q @ k.transpose(-1, -2), -1) @ v
    assert (c - ref).abs().max().item() < 1e-12


EDGE_SHAPES = [  # (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim)
    (1, 1, 1, 1, 1, 1), (1, 1, 239, 2, 1, 256), (3, 17, 1, 4, 2, 1), (1, 130, 70, 2, 2, 256), (2, 5, 0, 2, 1, 8),
    (2, 0, 5, 2, 2, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=["b{}_q{}_k{}_h{}x{}_d{}".format(*s) for s in EDGE_SHAPES])
def test_edge_shapes_match_reference(device, entry, causal, shape):
    """Seqlen 1 and 0, head_dim 1 and 256, batch 1, MQA: out, lse and gradients in float64."""
    b, nq, nk, heads_q, heads_kv, d = shape
    make = lambda h, n: torch.randn(b, h, n, d, device=device, dtype=torch.float64)  # noqa: E731
    q, k, v, dout = make(heads_q, nq), make(heads_kv, nk), make(heads_kv, nk), make(heads_q, nq)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = ENTRY_POINTS[entry](q, k, v, causal)
    got = (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    want = reference_results(q, k, v, dout, causal=causal, bottom_right=entry not in TOP_LEFT)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        if g is not None:  # SDPA returns no lse
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


# The other entry points pack (copy) their inputs in ENTRY_POINTS; flash_attn_varlen_func is
# given a strided packed tensor below.
STRIDE_KEEPING_ENTRY_POINTS = ["flash_attention", "flash_attn_func", "scaled_dot_product_attention"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", STRIDE_KEEPING_ENTRY_POINTS + ["flash_attn_varlen_func"])
def test_last_dim_not_contiguous_is_copied(device, entry):
    """A last dimension that is not contiguous is copied, not rejected: the results of contiguous
    inputs, bitwise, and the inputs unchanged."""
    strided = [torch.randn(2, 3, 40, n, device=device).transpose(-1, -2) for n in (30, 50, 50)]  # [2, 3, n, 40]
    if entry == "flash_attn_varlen_func":
        strided = [torch.randn(40, 2 * n, 3, device=device).permute(1, 2, 0) for n in (30, 50, 50)]  # [2n, 3, 40]
        cu_q, cu_k = (torch.tensor([0, n, 2 * n], dtype=torch.int32, device=device) for n in (30, 50))
        attend = lambda q, k, v: fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 30, 50, causal=True)  # noqa: E731
    else:
        attend = lambda q, k, v: ENTRY_POINTS[entry](q, k, v, True)[0]  # noqa: E731
    assert all(t.stride(-1) != 1 for t in strided)
    for t in strided:
        t.requires_grad_()
    contiguous = [t.detach().contiguous().requires_grad_() for t in strided]
    with poisoned_and_unmodified(*strided):
        out = attend(*strided)
        grads = torch.autograd.grad(out, strided, torch.ones_like(out))
    want = attend(*contiguous)
    assert torch.equal(out, want)
    for g, w in zip(grads, torch.autograd.grad(want, contiguous, torch.ones_like(want))):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_varlen_zero_length_sequences(device):
    """Sequences with no queries, no keys, or neither, between ordinary ones: the packed call
    gives what flash_attn_func gives for each sequence alone (rows with no key: out 0, lse -inf,
    gradients 0)."""
    lens_q, lens_k = [0, 4, 0, 6, 3, 0], [5, 0, 0, 7, 3, 0]
    offsets = lambda lens: [0, *torch.tensor(lens).cumsum(0).tolist()]  # noqa: E731
    starts_q, starts_k = offsets(lens_q), offsets(lens_k)
    q = torch.randn(starts_q[-1], 4, 32, device=device, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(starts_k[-1], 2, 32, device=device, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)
    cu = lambda starts: torch.tensor(starts, dtype=torch.int32, device=device)  # noqa: E731
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu(starts_q), cu(starts_k), max(lens_q), max(lens_k),
                                            causal=True, return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want_out, want_lse, want_grads = [], [], [torch.zeros_like(t) for t in (q, k, v)]
    for b in range(len(lens_q)):
        sq, sk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        out_b, lse_b, _ = fa.flash_attn_func(q[sq][None], k[sk][None], v[sk][None], causal=True,
                                             return_attn_probs=True)
        want_out.append(out_b[0])
        want_lse.append(lse_b[0])
        for total, g in zip(want_grads, torch.autograd.grad(out_b, (q, k, v), dout[sq][None])):
            total += g
    torch.testing.assert_close(out, torch.cat(want_out))
    torch.testing.assert_close(lse, torch.cat(want_lse, dim=1))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    no_keys = slice(starts_q[1], starts_q[2])
    assert torch.all(out[no_keys] == 0) and torch.isneginf(lse[:, no_keys]).all() and torch.all(grads[0][no_keys] == 0)


# flash_attn_with_kvcache: q [batch, seqlen_q, heads, head_dim] over caches [batch, seqlen_cache,
# heads_kv, head_dim]. KVCACHE_ENTRY_POINTS call it on the [batch, heads, seqlen, head_dim] inputs
# of ENTRY_POINTS (keys k, v; causal bottom-right), the keys given three ways, each returning
# (out, lse) in that layout: the whole cache (no cache_seqlens); a cache 3 rows longer (random
# rows past the keys) with cache_seqlens; and the last keys (up to 2) appended as new k, v at
# cache_seqlens into such a cache.
_SPARE_ROWS = 3


def _cache_with_room(t, keys):
    """t [batch, heads_kv, nk, head_dim] -> a fresh cache [batch, nk + _SPARE_ROWS, heads_kv,
    head_dim] holding its first `keys` keys, random rows after them."""
    cache = torch.randn(t.shape[0], t.shape[2] + _SPARE_ROWS, t.shape[1], t.shape[3], device=t.device).to(t.dtype)
    cache[:, :keys] = _bshd(t)[:, :keys]
    return cache


def _kvcache(mode):
    def attend(q, k, v, causal, num_splits=0):
        b, nk = q.shape[0], k.shape[2]
        kw = dict(causal=causal, num_splits=num_splits, return_softmax_lse=True)
        if mode == "cache":
            k_cache, v_cache = _bshd(k), _bshd(v)
        else:
            new = min(nk, 2) if mode == "append" else 0
            k_cache, v_cache = (_cache_with_room(t, nk - new) for t in (k, v))
            kw["cache_seqlens"] = torch.full((b,), nk - new, dtype=torch.int32, device=q.device)
            if new:
                kw.update(k=_bshd(k)[:, nk - new:], v=_bshd(v)[:, nk - new:])
        out, lse = fa.flash_attn_with_kvcache(_bshd(q), k_cache, v_cache, **kw)
        return _bshd(out), lse
    return attend


KVCACHE_ENTRY_POINTS = {f"flash_attn_with_kvcache_{m}": _kvcache(m) for m in ("cache", "seqlens", "append")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [[0, 5, 0, 9], [0, 0, 0, 0]], ids=["some_empty", "all_empty"])
def test_kvcache_zero_cache_seqlens(device, dtype, causal, lengths):
    """flash_attn_with_kvcache without new keys, cache_seqlens 0 for some batch rows: those rows
    see no key (output 0, lse -inf, no NaN); the others are the float64 reference over their
    first cache_seqlens keys (the accuracy rule), unaffected by the empty rows. Catches a length
    of 0 read as "the whole cache", a NaN from an empty softmax, and empty rows shifting the
    others' keys. On CUDA the kernel runs even when every length is 0: the lengths are on the
    device, and reading them would synchronize every decoding step."""
    nq, ncache, heads_q, heads_kv, d = 3, 12, 4, 2, 32
    q = torch.randn(len(lengths), nq, heads_q, d, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(len(lengths), ncache, heads_kv, d, device=device, dtype=dtype) for _ in range(2))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    attend = lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=causal,  # noqa: E731
                                                return_softmax_lse=True)
    out, lse = attend()
    assert out.shape == q.shape and lse.shape == (len(lengths), heads_q, nq)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    for b, n in enumerate(lengths):
        if n == 0:
            assert torch.all(out[b] == 0), f"batch row {b}: cache_seqlens 0 but output not 0"
            assert torch.isneginf(lse[b]).all(), f"batch row {b}: cache_seqlens 0 but lse not -inf"
            continue
        args = [_bshd(t[b:b + 1]) for t in (q, k_cache[:, :n], v_cache[:, :n])]
        ref, ref_lse = attention_reference(*args, causal=causal, bottom_right=True)
        pt, _ = attention_reference(*args, causal=causal, bottom_right=True, dtype=dtype)
        assert_close_to_reference(f"out[{b}]", _bshd(out[b:b + 1]), ref, pt, dtype, factor=2, lse=ref_lse)
        assert_lse_close(lse[b:b + 1], ref_lse, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("new_keys", [0, 2])
@pytest.mark.parametrize("shape_q,shape_cache", [((0, 5, 2, 32), (0, 7, 2, 32)), ((2, 0, 2, 32), (2, 7, 2, 32)),
                                                 ((2, 0, 4, 32), (2, 7, 2, 32)), ((0, 0, 2, 32), (0, 7, 2, 32))])
def test_kvcache_empty_outputs(device, new_keys, shape_q, shape_cache):
    """flash_attn_with_kvcache with batch 0 or seqlen_q 0: out [batch, seqlen_q, heads_q, head_dim]
    and lse [batch, heads_q, seqlen_q], empty, no error, and (on CUDA) no attention kernel
    launched. New keys are still written into the caches at cache_seqlens (flash_attn's append)
    and nothing else in them changes."""
    b, _, heads_kv, d = shape_cache
    q = torch.randn(shape_q, device=device)
    k_cache, v_cache = (torch.randn(shape_cache, device=device) for _ in range(2))
    seqlens = torch.arange(b, dtype=torch.int32, device=device) + 1
    kw = {}
    if new_keys:
        kw = dict(k=torch.randn(b, new_keys, heads_kv, d, device=device), v=torch.randn(b, new_keys, heads_kv, d,
                                                                                         device=device))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for i in range(b):
        for name, want in (("k", want_k), ("v", want_v)):
            if new_keys:
                want[i, i + 1:i + 1 + new_keys] = kw[name][i]
    out, lse = _without_attention_kernels(device, lambda: fa.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, return_softmax_lse=True, **kw))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (shape_q[0], shape_q[2], shape_q[1])
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(KVCACHE_ENTRY_POINTS))
@pytest.mark.parametrize("dtype,value", [(torch.bfloat16, 133120.0), (torch.float16, 256.0)])
def test_kvcache_huge_equal_inputs_are_finite(device, entry, dtype, value):
    """test_huge_equal_inputs_are_finite for flash_attn_with_kvcache (forward: decoding)."""
    q = torch.full((1, 2, 100, 64), value, device=device, dtype=dtype)
    out, lse = KVCACHE_ENTRY_POINTS[entry](q, q, q, True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert torch.all(out == value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(KVCACHE_ENTRY_POINTS))
@pytest.mark.parametrize("num_splits", [0, 3])
def test_kvcache_large_magnitude_fp16_is_finite(device, entry, num_splits):
    """|x| ~ 1e4 in fp16 (scores ~ 1e8 / 8: fp32 accumulation needed): a finite output, within the
    accuracy rule of the float64 reference, for the split-KV path too."""
    q, k, v = (torch.randn(2, 2, n, 64, device=device).mul(1e4).half() for n in (4, 128, 128))
    out, lse = KVCACHE_ENTRY_POINTS[entry](q, k, v, False, num_splits=num_splits)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref, ref_lse = attention_reference(q, k, v)
    pt, _ = attention_reference(q, k, v, dtype=torch.float32)  # (in fp16 the scores overflow: the baseline in fp32)
    assert_close_to_reference("out", out, ref, pt, torch.float16, factor=2, lse=ref_lse)
    assert_lse_close(lse, ref_lse, torch.float16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(KVCACHE_ENTRY_POINTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_splits", [0, 1, 7])
def test_kvcache_uniform_attention_over_many_keys(device, entry, dtype, num_splits):
    """test_uniform_attention_over_50k_keys for flash_attn_with_kvcache (50k keys on CUDA, 8k on CPU,
    which has no split-KV), num_splits chosen, 1 and 7: out = mean of v, lse = log(keys). Catches
    split-KV partial results combined with wrong weights or a split's keys dropped or counted twice."""
    nk = 50_000 if device == "cuda" else 8_000
    q = torch.zeros(2, 2, 4, 64, device=device, dtype=dtype)
    k = torch.zeros(2, 1, nk, 64, device=device, dtype=dtype)
    v = torch.randn(2, 1, nk, 64, device=device, dtype=dtype)
    out, lse = KVCACHE_ENTRY_POINTS[entry](q, k, v, False, num_splits=num_splits)
    mean = v.double().mean(dim=2, keepdim=True).expand_as(out)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert (out.double() - mean).abs().max().item() < tol
    assert (lse.double() - math.log(nk)).abs().max().item() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("where", ["cache", "new", "past_seqlens"])
def test_kvcache_nan_key_reaches_affected_rows_only(device, dtype, num_splits, where):
    """A NaN in one key of batch row 1 (of 3), causal, 4 queries over 300 keys (cache_seqlens 297 +
    3 new keys where where == "new"): "cache" puts it in key 298 of the cache, "new" in the
    second new key (key 298 once appended), so query rows 2 and 3 attend to it and 0 and 1
    (bottom-right: up to keys 296, 297) do not; "past_seqlens" puts it in the cache past the keys
    (which no row reads). The rows that attend to it are NaN in out and lse; every other row,
    in batch row 1 and in the others, is bitwise what the call without the NaN gives. Catches a
    NaN key lost, a NaN spread through a split's combine or across batch rows, and masked or
    unused cache rows read into the scores."""
    b, nq, nk, heads_q, heads_kv, d, pos = 3, 4, 300, 2, 1, 64, 298
    new = 3 if where == "new" else 0
    q = torch.randn(b, nq, heads_q, d, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(b, nk + 8, heads_kv, d, device=device, dtype=dtype) for _ in range(2))
    k_new, v_new = (torch.randn(b, new, heads_kv, d, device=device, dtype=dtype) for _ in range(2))
    seqlens = torch.full((b,), nk - new, dtype=torch.int32, device=device)

    def run(k_cache, k_new):
        kw = dict(k=k_new.clone(), v=v_new.clone()) if new else {}
        return fa.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), cache_seqlens=seqlens, causal=True,
                                          num_splits=num_splits, return_softmax_lse=True, **kw)

    clean_out, clean_lse = run(k_cache, k_new)
    if where == "new":
        k_new[1, pos - (nk - new), 0, 5] = math.nan
    else:
        k_cache[1, pos if where == "cache" else nk + 2, 0, 5] = math.nan
    out, lse = run(k_cache, k_new)
    reached = torch.zeros(b, nq, dtype=torch.bool)  # [batch, query row]
    if where != "past_seqlens":
        reached[1, 2:] = True
    reached = reached.to(device)
    for name, got, want in (("out", out, clean_out), ("lse", lse.transpose(1, 2), clean_lse.transpose(1, 2))):
        got, want = got.reshape(b, nq, -1), want.reshape(b, nq, -1)  # [batch, query row, heads (x head_dim)]
        has_nan = torch.isnan(got).all(dim=-1)
        assert torch.equal(has_nan, reached), f"{name}: NaN rows {has_nan.nonzero().tolist()}, expected " \
                                              f"{reached.nonzero().tolist()}"
        assert torch.equal(got[~reached], want[~reached]), f"{name}: a row that does not see the NaN changed"
