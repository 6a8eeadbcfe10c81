"""seqused_k (how many of each sequence's keys take part) and flash_attn_with_kvcache on it: against
float64 attention over each sequence's used keys, with the same accuracy rule as every path; the
in-place append into the caches; the rotary embedding (against complex multiplication); and the
arguments it refuses."""
from types import SimpleNamespace

import pytest
import torch

from conftest import DEVICES, HAS_CUDA
from cuflash_attn.flash_attn_interface import flash_attn_with_kvcache
from reference import LOW_PRECISION, assert_close_to_reference, assert_lse_close, attention_reference

ops = torch.ops.cuflash_attn
DTYPES = [torch.float64, torch.float32] + [pytest.param(t, marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA"))
                                           for t in LOW_PRECISION]


def per_sequence_reference(q, k, v, used, causal, dtype, dout=None):
    """out, lse (and dq, dk, dv with dout) in dtype, sequence b over its first used[b] keys
    (bottom-right aligned); keys past them get gradient 0."""
    outs, lses, grads = [], [], [[], [], []]
    for b in range(q.shape[0]):
        n = int(used[b])
        qb, kb, vb = (t[b:b + 1].detach().to(dtype).requires_grad_(dout is not None) for t in (q, k[:, :, :n], v[:, :, :n]))
        out, lse = attention_reference(qb, kb, vb, causal, bottom_right=True, dtype=dtype)
        outs.append(out)
        lses.append(lse)
        if dout is not None:
            dqb, dkb, dvb = torch.autograd.grad(out, (qb, kb, vb), dout[b:b + 1].to(dtype))
            pad = (0, 0, 0, k.shape[2] - n)
            grads[0].append(dqb)
            grads[1].append(torch.nn.functional.pad(dkb, pad))
            grads[2].append(torch.nn.functional.pad(dvb, pad))
    results = [torch.cat(outs), torch.cat(lses)]
    return results + [torch.cat(g) for g in grads] if dout is not None else results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_seqused_k_matches_reference(device, dtype, d, causal):
    """Padded batch, GQA; sequences using none, some, all and more than all (clamped) of the keys,
    with more queries than used keys under the causal mask (rows that see no key); forward and
    backward (keys past the used ones: gradient 0)."""
    if device == "cpu" and dtype in LOW_PRECISION:
        pytest.skip("the low-precision kernels are CUDA's")
    torch.manual_seed(0)
    nq, nk = 37, 300
    q = torch.randn(5, 4, nq, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(5, 2, nk, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    used = torch.tensor([0, 1, 150, 300, 1000], dtype=torch.int32, device=device)
    clamped = used.clamp(max=nk)
    dout = torch.randn_like(q)
    out, lse = ops.fwd(q, k, v, None, causal, True, seqused_k=used)
    got = (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    ref = per_sequence_reference(q, k, v, clamped, causal, torch.float64, dout)
    pt = per_sequence_reference(q, k, v, clamped, causal, dtype, dout)
    assert_lse_close(got[1], ref[1], dtype)
    for name, g, r, p in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], ref[:1] + ref[2:], pt[:1] + pt[2:]):
        assert_close_to_reference(name, g, r, p, dtype, factor=2 if name == "out" else 3)
    assert not got[3][2, :, 150:].any() and not got[4][0].any()  # dk, dv of keys past the used ones


@pytest.mark.parametrize("device", DEVICES)
def test_seqused_k_is_checked(device):
    q, k, v = (torch.randn(2, 2, 8, 16, device=device) for _ in range(3))
    for bad, error, match in ((torch.tensor([3, 4], device=device), TypeError, "seqused_k must have dtype int32"),
                              (torch.tensor([3], dtype=torch.int32, device=device), ValueError, r"shape \[batch\]"),
                              (torch.tensor([[3, 4]], dtype=torch.int32, device=device), ValueError, "seqused_k")):
        with pytest.raises(error, match=match):
            ops.fwd(q, k, v, seqused_k=bad)
    if HAS_CUDA:
        other = "cpu" if device == "cuda" else "cuda"
        with pytest.raises(ValueError, match="seqused_k must be on the same device as q"):
            ops.fwd(q, k, v, seqused_k=torch.tensor([3, 4], dtype=torch.int32, device=other))


def cache_case(device, dtype, batch=3, seqlen_cache=40, heads_kv=2, heads_q=4, d=64, seqlen_q=3, seqlen_new=3):
    torch.manual_seed(1)
    q = torch.randn(batch, seqlen_q, heads_q, d, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(batch, seqlen_cache, heads_kv, d, device=device, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(batch, seqlen_new, heads_kv, d, device=device, dtype=dtype) for _ in range(2))
    return q, k_cache, v_cache, k, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", ["int", "tensor"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch_idx", [False, True])
@pytest.mark.parametrize("seqlen_cache", [40, 256])
def test_kvcache_appends_and_attends(device, dtype, lengths, causal, batch_idx, seqlen_cache):
    """k and v written into the caches at cache_seqlens (nothing else in them changes), then q
    attends to each sequence's keys up to the new ones; cache_batch_idx picks the cache rows
    (gathered at 40 rows, read in place as pages at 256)."""
    if device == "cpu" and dtype in LOW_PRECISION:
        pytest.skip("the low-precision kernels are CUDA's")
    q, k_cache, v_cache, k, v = cache_case(device, dtype, seqlen_cache=seqlen_cache)
    batch, seqlen_new = q.shape[0], k.shape[1]
    cache_seqlens = 5 if lengths == "int" else torch.tensor([0, 17, 37], dtype=torch.int32, device=device)
    idx = torch.tensor([2, 0, 1], dtype=torch.int32, device=device) if batch_idx else None
    rows = idx.long().tolist() if batch_idx else list(range(batch))
    starts = [cache_seqlens] * batch if lengths == "int" else cache_seqlens.tolist()
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=idx,
                                       causal=causal, return_softmax_lse=True)
    expected_k, expected_v = k_before.clone(), v_before.clone()
    for b, (row, start) in enumerate(zip(rows, starts)):
        expected_k[row, start:start + seqlen_new] = k[b]
        expected_v[row, start:start + seqlen_new] = v[b]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    kc, vc = (t[rows].transpose(1, 2) for t in (expected_k, expected_v))
    used = torch.tensor([s + seqlen_new for s in starts])
    ref = per_sequence_reference(q.transpose(1, 2), kc, vc, used, causal, torch.float64)
    pt = per_sequence_reference(q.transpose(1, 2), kc, vc, used, causal, dtype)
    assert_close_to_reference("out", out.transpose(1, 2), ref[0], pt[0], dtype, factor=2)
    assert_lse_close(lse, ref[1], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_without_new_keys(device):
    """No k, v: attention over the first cache_seqlens keys (or all of them when None); the
    caches are not written."""
    q, k_cache, v_cache, _, _ = cache_case(device, torch.float64)
    before = k_cache.clone(), v_cache.clone()
    lengths = torch.tensor([1, 40, 9], dtype=torch.int32, device=device)
    for cache_seqlens, used in ((lengths, lengths.tolist()), (None, [40] * 3)):
        out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True)
        ref = per_sequence_reference(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), used, True,
                                     torch.float64)
        assert_close_to_reference("out", out.transpose(1, 2), ref[0], ref[0], torch.float64, factor=2)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_gradient_survives_a_changed_cache_seqlens(device):
    """With no new keys, a step that asks for no gradient reads cache_seqlens itself (no copy); one
    that does saves its own copy, so a caller advancing cache_seqlens in place before the
    backward (a decoding loop's habit) changes nothing: the gradients are those of the lengths
    at the call, against float64."""
    q, k_cache, v_cache, _, _ = cache_case(device, torch.float64)
    q, k_cache, v_cache = (t.clone().requires_grad_() for t in (q, k_cache, v_cache))
    lengths = torch.tensor([1, 40, 9], dtype=torch.int32, device=device)
    used = lengths.tolist()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=True)
    lengths += 1
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k_cache, v_cache), dout)
    ref = per_sequence_reference(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), used, True,
                                 torch.float64, dout.transpose(1, 2))
    for name, g, r in zip(("dq", "dk", "dv"), got, ref[2:]):
        assert_close_to_reference(name, g.transpose(1, 2), r, r, torch.float64, factor=2)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_refuses(device):
    q, k_cache, v_cache, k, v = cache_case(device, torch.float32)
    before = k_cache.clone()
    cases = [
        (dict(cache_leftpad=torch.zeros(3, dtype=torch.int64, device=device)), ValueError, "cache_leftpad must be an int32"),
        (dict(cache_leftpad=torch.zeros(2, dtype=torch.int32, device=device)), ValueError, "cache_leftpad must be"),
        (dict(rotary_cos=torch.zeros(40, 16, device=device)), ValueError, "rotary_cos and rotary_sin must be given"),
        (dict(rotary_cos=torch.zeros(40, 40, device=device), rotary_sin=torch.zeros(40, 40, device=device)),
         ValueError, r"rotary_dim <= head_dim \(64\)"),
        (dict(k=k, v=v, cache_seqlens=36, rotary_cos=torch.zeros(38, 16, device=device),
              rotary_sin=torch.zeros(38, 16, device=device)), ValueError, "position 38 is needed"),
        (dict(k=k), ValueError, "k and v must be given together"),
        (dict(k=k, v=v), ValueError, "which must be given"),
        (dict(k=k, v=v, cache_seqlens=38), ValueError, r"cache_seqlens must be in \[0, 37\]"),
        (dict(k=k, v=v, cache_seqlens=-1), ValueError, "cache_seqlens must be in"),
        (dict(k=k, v=v, cache_seqlens=torch.tensor([0, 38, 1], dtype=torch.int32, device=device)), ValueError,
         r"values in \[0, 38\]"),
        (dict(cache_seqlens=torch.tensor([1, 2, 3], device=device)), ValueError, "cache_seqlens must be an int32"),
        (dict(cache_seqlens=2.0), TypeError, "cache_seqlens must be an int"),
        (dict(k=k.double(), v=v, cache_seqlens=1), ValueError, "k must be"),
        (dict(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32, device=device)), ValueError, "cache_batch_idx"),
        # the op's own checks run before the append
        (dict(k=k, v=v, cache_seqlens=1, softmax_scale=float("nan")), ValueError, "scale must be a finite number"),
        (dict(k=k, v=v, cache_seqlens=1, alibi_slopes=torch.ones(5, device=device)), ValueError,
         r"alibi_slopes must have shape \[heads\]"),
        (dict(k=k, v=v, cache_seqlens=1, window_size=(-3, 0)), ValueError, "window_left and window_right"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs)
    with pytest.raises(ValueError, match="k_cache and v_cache must have the same shape"):
        flash_attn_with_kvcache(q, k_cache, v_cache[:, :20])
    with pytest.raises(ValueError, match="k_cache must hold q's dtype"):  # refused before the append
        flash_attn_with_kvcache(q.double(), k_cache, v_cache, k, v, cache_seqlens=1)
    with pytest.raises(ValueError, match="heads_kv dividing"):
        flash_attn_with_kvcache(q[:, :, :3], k_cache, v_cache, k, v, cache_seqlens=1)
    if HAS_CUDA:  # new values on another device than the cache
        other = "cpu" if device == "cuda" else "cuda"
        with pytest.raises(ValueError, match="v must be .* and device"):
            flash_attn_with_kvcache(q, k_cache, v_cache, k, v.to(other), cache_seqlens=1)
    if device == "cpu":  # lengths outside the cache, without an append: read back only on the CPU
        for lengths in ([9, -1, 0], [41, 0, 0]):
            with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 40\]"):
                flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(lengths, dtype=torch.int32))
    if device == "cpu":  # on CUDA an index past the cache is clamped (no synchronization)
        with pytest.raises(ValueError, match=r"cache_batch_idx must be in \[0, 3\)"):
            flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=1,
                                    cache_batch_idx=torch.tensor([0, 3, 1], dtype=torch.int32))
    assert torch.equal(k_cache, before), "a refused call wrote the cache"


def _inference_copy(t):
    with torch.inference_mode():
        return t.clone()


def _every(x, f):
    """q, k_cache, v_cache, k and v, each through f."""
    return {name: f(t) for name, t in vars(x).items() if isinstance(t, torch.Tensor)}


def _on_q(x, *shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype, device=x.q.device)


KVCACHE_TENSOR_CASES = [
    # (id, the arguments replaced, from the good ones x (k and v appended at cache_seqlens=1),
    # exception type, message pattern)
    ("int32 q and caches", lambda x: _every(x, torch.Tensor.int), TypeError,
     r"q must be a CUDA or CPU tensor of dtype float16, bfloat16, float32 or float64, got torch.int32"),
    ("rank 3 q", lambda x: dict(q=x.q[0]), ValueError,
     r"q must be a 4-dimensional tensor \[batch, seqlen, heads, head_dim\], got shape \(3, 4, 64\)"),
    ("rank 5 q", lambda x: dict(q=x.q[None]), ValueError, r"q must be a 4-dimensional tensor"),
    ("cache batch 2", lambda x: dict(k_cache=x.k_cache[:2], v_cache=x.v_cache[:2]), ValueError,
     r"k_cache must have batch_cache = batch \(3\) without cache_batch_idx, got 2"),
    ("head_dim 257", lambda x: _every(x, lambda t: t.repeat(1, 1, 1, 5)[..., :257]), ValueError,
     r"head_dim must be in \[1, 256\], got 257"),
    ("head_dim 0", lambda x: _every(x, lambda t: t[..., :0]), ValueError, r"head_dim must be in \[1, 256\], got 0"),
    ("int32 rotary_cos", lambda x: dict(rotary_cos=_on_q(x, 40, 16, dtype=torch.int32), rotary_sin=_on_q(x, 40, 16)),
     ValueError, r"rotary_cos must be a floating-point tensor on q's device \(.*\), got torch.int32"),
    ("bool rotary_sin", lambda x: dict(rotary_cos=_on_q(x, 40, 16), rotary_sin=_on_q(x, 40, 16, dtype=torch.bool)),
     ValueError, r"rotary_sin must be a floating-point tensor on q's device \(.*\), got torch.bool"),
    ("float cache_seqlens", lambda x: dict(cache_seqlens=_on_q(x, 3)), ValueError,
     r"cache_seqlens must be an int32 tensor \[batch\] = \[3\], got torch.float32 \(3,\)"),
    ("cache_seqlens [2]", lambda x: dict(cache_seqlens=_on_q(x, 2, dtype=torch.int32)), ValueError,
     r"cache_seqlens must be an int32 tensor \[batch\] = \[3\], got torch.int32 \(2,\)"),
    ("cache_seqlens [3, 1]", lambda x: dict(cache_seqlens=_on_q(x, 3, 1, dtype=torch.int32)), ValueError,
     r"cache_seqlens must be an int32 tensor \[batch\] = \[3\], got torch.int32 \(3, 1\)"),
    ("0-d cache_seqlens", lambda x: dict(cache_seqlens=_on_q(x, dtype=torch.int32)), ValueError,
     r"cache_seqlens must be an int32 tensor \[batch\] = \[3\], got torch.int32 \(\)"),
    ("bool q", lambda x: dict(q=x.q.bool()), TypeError,
     r"q must be a CUDA or CPU tensor of dtype float16, bfloat16, float32 or float64, got torch.bool"),
    ("bf16 v_cache", lambda x: dict(v_cache=x.v_cache.bfloat16()), ValueError,
     r"v_cache must have k_cache's dtype \(torch.float32\) and device \(.*\), got torch.bfloat16"),
    # The caches the append cannot write: refused before k_cache is written (the in-place write
    # into v_cache used to fail after k_cache's).
    ("v_cache a leaf that requires grad", lambda x: dict(v_cache=x.v_cache.clone().requires_grad_()), ValueError,
     r"v_cache is a leaf tensor that requires grad, which k and v cannot be written into in place"),
    ("inference v_cache", lambda x: dict(v_cache=_inference_copy(x.v_cache)), ValueError,
     r"v_cache is an inference tensor, which k and v cannot be written into outside torch.inference_mode\(\)"),
    ("expanded k_cache", lambda x: dict(k_cache=x.k_cache[:1].expand_as(x.k_cache)), ValueError,
     r"k_cache has elements that share memory \(an expanded or overlapping view\)"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,arguments,exc,pattern", KVCACHE_TENSOR_CASES, ids=[c[0] for c in KVCACHE_TENSOR_CASES])
def test_kvcache_refuses_bad_tensors(device, name, arguments, exc, pattern):
    """Refused before the append: the caches are left as they were."""
    q, k_cache, v_cache, k, v = cache_case(device, torch.float32)
    kwargs = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=1)
    flash_attn_with_kvcache(**dict(kwargs, k_cache=k_cache.clone(), v_cache=v_cache.clone()))  # taken
    kwargs.update(arguments(SimpleNamespace(**kwargs)))
    caches = [kwargs["k_cache"], kwargs["v_cache"]]
    before = [t.clone() for t in caches]
    with pytest.raises(exc, match=pattern):
        flash_attn_with_kvcache(**kwargs)
    assert all(torch.equal(t, b) for t, b in zip(caches, before)), "a refused call wrote the cache"


def rotate_reference(x, cos, sin, positions, interleaved):
    """flash_attn's rotary embedding as complex multiplication, in float64: x [batch, seqlen,
    heads, head_dim] at positions [batch, seqlen]; pairs (2i, 2i + 1) or (i, i + half)."""
    half = cos.shape[1]
    x = x.double()
    angle = torch.complex(cos.double(), sin.double())[positions][:, :, None, :]
    pairs = x[..., :2 * half]
    if interleaved:
        z = torch.complex(pairs[..., 0::2], pairs[..., 1::2]) * angle
        rotated = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        z = torch.complex(pairs[..., :half], pairs[..., half:]) * angle
        rotated = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((rotated, x[..., 2 * half:]), dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_rotary(device, dtype, interleaved, causal):
    """k rotated at cache_seqlens + i before it is written; q at cache_seqlens + i when causal,
    else at cache_seqlens; a rotary_dim below head_dim leaves the rest as it is."""
    if device == "cpu" and dtype in LOW_PRECISION:
        pytest.skip("the low-precision kernels are CUDA's")
    q, k_cache, v_cache, k, v = cache_case(device, dtype)
    batch, seqlen_q, seqlen_new = q.shape[0], q.shape[1], k.shape[1]
    theta = torch.arange(60, dtype=torch.float64)[:, None] * 0.1 ** torch.linspace(0, 4, 24, dtype=torch.float64)
    cos, sin = (f(theta).to(device=device, dtype=torch.float32) for f in (torch.cos, torch.sin))  # rotary_dim 48
    cache_seqlens = torch.tensor([0, 11, 37], dtype=torch.int32, device=device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=cache_seqlens, causal=causal,
                                  rotary_interleaved=interleaved)
    offsets = cache_seqlens.long()[:, None]
    k_rot = rotate_reference(k, cos, sin, offsets + torch.arange(seqlen_new, device=device), interleaved)
    q_positions = offsets + (torch.arange(seqlen_q, device=device) if causal else torch.zeros(seqlen_q, dtype=torch.long,
                                                                                              device=device))
    q_rot = rotate_reference(q, cos, sin, q_positions, interleaved)
    expected_k = k_before.double()
    for b, start in enumerate(cache_seqlens.tolist()):
        expected_k[b, start:start + seqlen_new] = k_rot[b]
        assert torch.equal(v_cache[b, start:start + seqlen_new], v[b])
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    assert (k_cache.double() - expected_k).abs().max().item() <= tol * expected_k.abs().max().item()
    used = (cache_seqlens + seqlen_new).tolist()
    ref = per_sequence_reference(q_rot.transpose(1, 2), expected_k.transpose(1, 2), v_cache.double().transpose(1, 2),
                                 used, causal, torch.float64)
    pt = per_sequence_reference(q_rot.to(dtype).transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                used, causal, dtype)
    assert_close_to_reference("out", out.transpose(1, 2), ref[0], pt[0], dtype, factor=2)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attention_takes_seqused_k(device):
    """The public function passes seqused_k through, and its autograd saves it for the backward
    (key padding without reading the padding)."""
    import cuflash_attn
    torch.manual_seed(2)
    q = torch.randn(3, 4, 20, 32, device=device, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 2, 50, 32, device=device, dtype=torch.float64, requires_grad=True) for _ in range(2))
    used = torch.tensor([50, 21, 1], dtype=torch.int32, device=device)
    dout = torch.randn_like(q)
    out = cuflash_attn.flash_attention(q, k, v, causal=True, bottom_right=True, seqused_k=used)
    got = (out, *torch.autograd.grad(out, (q, k, v), dout))
    ref = per_sequence_reference(q, k, v, used, True, torch.float64, dout)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref[:1] + ref[2:]):
        assert_close_to_reference(name, g, r, r, torch.float64, factor=2)


@pytest.mark.parametrize("device", DEVICES)
def test_seqused_k_with_packed_sequences(device):
    """Packed (cu_seqlens) batches: seqused_k counts from each sequence's first key, clamped to its
    length; against float64 attention over each sequence's used keys."""
    torch.manual_seed(3)
    lens_q, lens_k, used = [5, 0, 9], [12, 7, 4], [3, 5, 10]
    cu_q = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 12, 19, 23], dtype=torch.int32, device=device)
    q = torch.randn(14, 2, 16, device=device, dtype=torch.float64)
    k, v = (torch.randn(23, 1, 16, device=device, dtype=torch.float64) for _ in range(2))
    out, lse = ops.fwd(q, k, v, None, True, True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                       seqused_k=torch.tensor(used, dtype=torch.int32, device=device))
    for b in range(3):
        q0, k0 = int(cu_q[b]), int(cu_k[b])
        n = min(used[b], lens_k[b])
        qb = q[q0:q0 + lens_q[b]].transpose(0, 1)[None]
        kb, vb = (t[k0:k0 + n].transpose(0, 1)[None] for t in (k, v))
        ref_out, ref_lse = attention_reference(qb, kb, vb, True, bottom_right=True)
        got = out[q0:q0 + lens_q[b]].transpose(0, 1)[None]
        assert_close_to_reference(f"out[{b}]", got, ref_out, ref_out, torch.float64, factor=2)
        assert_lse_close(lse[:, q0:q0 + lens_q[b]][None], ref_lse, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_leftpad(device, dtype, causal, paged):
    """cache_leftpad: sequence b's keys are cache positions leftpad[b] .. cache_seqlens[b] +
    seqlen_new (the new keys written at cache_seqlens, as without it); the causal mask aligned to
    its last key; a left pad past every key leaves rows that see none (lse -inf, output 0)."""
    if device == "cpu" and dtype in LOW_PRECISION:
        pytest.skip("the low-precision kernels are CUDA's")
    seqlen_cache = 256 if paged else 40
    q, k_cache, v_cache, k, v = cache_case(device, dtype, seqlen_cache=seqlen_cache)
    cache_seqlens = torch.tensor([4, 17, 30], dtype=torch.int32, device=device)
    leftpad = torch.tensor([0, 9, 40], dtype=torch.int32, device=device)
    block_table = None
    if paged:  # the cache rows as pages, in another order
        block_table = torch.tensor([[2], [0], [1]], dtype=torch.int32, device=device)
        k_cache, v_cache = k_cache[[1, 2, 0]].clone(), v_cache[[1, 2, 0]].clone()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_leftpad=leftpad,
                                       block_table=block_table, causal=causal, return_softmax_lse=True)
    rows = [2, 0, 1] if paged else [0, 1, 2]
    for b, (start, end) in enumerate(zip(leftpad.tolist(), (cache_seqlens + k.shape[1]).tolist())):
        qb = q[b:b + 1].transpose(1, 2)
        kb, vb = (t[rows[b]:rows[b] + 1, start:end].transpose(1, 2) for t in (k_cache, v_cache))
        ref, ref_lse = attention_reference(qb, kb, vb, causal, bottom_right=True)
        pt, _ = attention_reference(qb, kb, vb, causal, bottom_right=True, dtype=dtype)
        assert_close_to_reference(f"out[{b}]", out[b:b + 1].transpose(1, 2), ref, pt, dtype, factor=2)
        assert_lse_close(lse[b:b + 1], ref_lse, dtype)
    assert torch.isneginf(lse[2]).all() and not out[2].any()
    assert torch.equal(k_cache[rows[1], 17:20], k[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhnd", "hbnd"])
def test_decoding_with_grouped_heads(device, dtype, layout):
    """One query a sequence and 4 query heads a KV head: on CUDA the op runs each group's queries
    as rows of one head (the decoding swap; the CPU checks the plain path). Against float64
    attention, and against the same call with an all-True attn_mask (which keeps the heads apart)
    to rounding; out and lse in q's shape, the output in q's layout (heads outermost in
    "hbnd") and modifiable in place under autograd; causal aligned bottom-right sees every key,
    seqused_k and softcap kept; a bad window is refused as on any other shape."""
    if device == "cpu" and dtype in LOW_PRECISION:
        pytest.skip("the low-precision kernels are CUDA's")
    torch.manual_seed(5)
    q = torch.randn(3, 8, 1, 64, device=device, dtype=dtype)
    if layout == "hbnd":
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
    k, v = (torch.randn(3, 2, 90, 64, device=device, dtype=dtype) for _ in range(2))
    used = torch.tensor([90, 1, 40], dtype=torch.int32, device=device)
    out, lse = ops.fwd(q, k, v, None, True, True, softcap=30.0, seqused_k=used)
    assert out.shape == q.shape and out.stride() == q.stride() and lse.shape == (3, 8, 1)
    kept, kept_lse = ops.fwd(q, k, v, None, True, True, softcap=30.0, seqused_k=used,
                             attn_mask=torch.ones(1, 1, 1, 90, dtype=torch.bool, device=device))
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    assert (out.double() - kept.double()).abs().max().item() <= tol
    torch.testing.assert_close(lse, kept_lse, atol=1e-5, rtol=1e-6)
    for b in range(3):
        n = int(used[b])
        ref, ref_lse = attention_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], True, bottom_right=True,
                                           softcap=30.0)
        pt, _ = attention_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], True, bottom_right=True,
                                    softcap=30.0, dtype=dtype)
        assert_close_to_reference(f"out[{b}]", out[b:b + 1], ref, pt, dtype, factor=2)
        assert_lse_close(lse[b:b + 1], ref_lse, dtype)
    with pytest.raises(ValueError, match="window_left and window_right must be >= -1"):
        ops.fwd(q, k, v, None, True, True, -3, 0)
    with_grad = ops.fwd(q.clone().requires_grad_(), k, v, None, True, True)[0]
    with_grad.mul_(2)  # an output, not a view made inside the op (autograd refuses those in place)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_in_cuda_graph(paged):
    """A decoding step (the append at tensor cache_seqlens, the rotary embedding, split-KV, the
    grouped-heads swap) captured in a CUDA graph (no host sync inside) and replayed with new
    lengths and inputs gives what the eager call gives, caches included."""
    torch.manual_seed(6)
    batch, heads_kv, d = 2, 2, 64
    clean = [torch.randn(batch, 256, heads_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    k_cache, v_cache = (t.clone() for t in clean)
    table = torch.tensor([[1], [0]], dtype=torch.int32, device="cuda") if paged else None
    q = torch.zeros(batch, 1, 4, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.zeros(batch, 1, heads_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.zeros(batch, dtype=torch.int32, device="cuda")
    theta = torch.arange(300, device="cuda")[:, None] * 0.1 ** torch.linspace(0, 4, 16, device="cuda")
    cos, sin = torch.cos(theta), torch.sin(theta)

    def step():
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=lengths, block_table=table,
                                       causal=True)

    def restore():
        k_cache.copy_(clean[0])
        v_cache.copy_(clean[1])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up, outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for lens in ([5, 100], [37, 0]):
        restore()
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        lengths.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        replayed, replayed_k = static_out.clone(), k_cache.clone()
        restore()
        assert torch.equal(step(), replayed)
        assert torch.equal(k_cache, replayed_k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_seqused_k_never_reads_unused_keys(device, dtype):
    """Keys past seqused_k take no part even when they hold NaN and Inf (a cache's unused rows):
    out, lse and every gradient bitwise what finite rows there give (on Hopper the TMA kernels,
    whose boxes would read those rows, step aside for seqused_k)."""
    if device == "cpu" and dtype in LOW_PRECISION:
        pytest.skip("the low-precision kernels are CUDA's")
    torch.manual_seed(7)
    q = torch.randn(2, 4, 20, 64, device=device, dtype=dtype)
    k, v = (torch.randn(2, 2, 200, 64, device=device, dtype=dtype) for _ in range(2))
    dout = torch.randn_like(q)
    used = torch.tensor([77, 130], dtype=torch.int32, device=device)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for b, n in enumerate(used.tolist()):
        poisoned_k[b, :, n:] = float("nan")
        poisoned_v[b, :, n:] = float("inf")
    results = []
    for kk, vv in ((k, v), (poisoned_k, poisoned_v)):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, kk, vv))
        out, lse = ops.fwd(qq, kk, vv, None, True, True, seqused_k=used)
        results.append((out, lse, *torch.autograd.grad(out, (qq, kk, vv), dout)))
    for name, clean, poisoned in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(clean, poisoned), name
