"""Grouped query heads packed as rows of their KV head (CUFLASH_PACK_GQA, torch_ops.cpp's
group_packing): row r = i * G + g is query i of head g of the group, and the masks take query
r / G (MaskParams::rows_per_query, attention_math.h). Under CUFLASH_PACK_GQA=1 the CPU kernels
pack too, so these run everywhere: against float64 attention with every mask alignment and
window, softcap, seqused_k, a paged cache and through flash_attn_with_kvcache, and against the
unpacked forward (CUFLASH_PACK_GQA=0); the profiler shows the packed path ran."""
import pytest
import torch

from conftest import DEVICES
from cuflash_attn.flash_attn_interface import flash_attn_with_kvcache
from reference import LOW_PRECISION, assert_close_to_reference, assert_lse_close, attention_reference
from test_kvcache import per_sequence_reference
from test_paged_kv import PAGE, gathered, paged_case

ops = torch.ops.cuflash_attn
DTYPES = [torch.float64, torch.float32] + [
    pytest.param(t, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")) for t in LOW_PRECISION]


def op_names(fn):
    """The torch ops (CPU side) that fn() runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def packed(monkeypatch, on):
    monkeypatch.setenv("CUFLASH_PACK_GQA", "1" if on else "0")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq,nk", [(3, 50), (7, 300), (5, 2), (1, 40), (50, 200)])
@pytest.mark.parametrize("mask", ["none", "top_left", "bottom_right", "window", "window_top_left"])
@pytest.mark.parametrize("group", [2, 3, 4])
def test_packed_rows_match_reference(monkeypatch, device, dtype, nq, nk, mask, group):
    """Every alignment (top-left with more queries than keys leaves rows that see none: lse -inf,
    out 0), windows on both sides, softcap; a [B, N, H, D] q (the packing's copy is a gather);
    150 rows of 3 a query (several query blocks, queries split across tiles)."""
    if device == "cpu" and dtype in LOW_PRECISION:
        pytest.skip("the low-precision kernels are CUDA's")
    torch.manual_seed(nq * 100 + nk + group)
    heads_kv, d = 2, 64
    q = torch.randn(2, nq, heads_kv * group, d, device=device, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(2, heads_kv, nk, d, device=device, dtype=dtype) for _ in range(2))
    causal = mask in ("top_left", "bottom_right")
    bottom_right = mask in ("bottom_right", "window")
    window = (4, 1) if mask.startswith("window") else (-1, -1)
    args = (q, k, v, None, causal, bottom_right, window[0], window[1], 5.0)
    packed(monkeypatch, True)
    out, lse = ops.fwd(*args)
    ref, ref_lse = attention_reference(q, k, v, causal, bottom_right=bottom_right, window=window, softcap=5.0)
    pt, _ = attention_reference(q, k, v, causal, bottom_right=bottom_right, window=window, softcap=5.0, dtype=dtype)
    assert_close_to_reference("out", out, ref, pt, dtype, factor=2)
    assert_lse_close(lse, ref_lse, dtype)
    packed(monkeypatch, False)
    whole, whole_lse = ops.fwd(*args)
    # The unpacked call's layout (strides of dimensions longer than 1).
    assert [s for s, n in zip(out.stride(), out.shape) if n > 1] == [s for s, n in zip(whole.stride(), whole.shape)
                                                                     if n > 1]
    torch.testing.assert_close(out, whole, atol=1e-12 if dtype == torch.float64 else 4e-3, rtol=0)
    torch.testing.assert_close(lse, whole_lse, atol=1e-12 if dtype == torch.float64 else 1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_packed_multi_query_attention_and_splits(monkeypatch, device, num_splits):
    """One KV head for 8 query heads (q's rows then a view, not a copy), causal, over 600 keys,
    split-KV on CUDA (the combine kernel merging packed rows; the CPU ignores num_splits)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float64
    torch.manual_seed(8)
    q = torch.randn(2, 8, 5, 64, device=device, dtype=dtype)
    k, v = (torch.randn(2, 1, 600, 64, device=device, dtype=dtype) for _ in range(2))
    packed(monkeypatch, True)
    out, lse = ops.fwd(q, k, v, None, True, True, num_splits=num_splits)
    ref, ref_lse = attention_reference(q, k, v, True, bottom_right=True)
    pt, _ = attention_reference(q, k, v, True, bottom_right=True, dtype=dtype)
    assert_close_to_reference("out", out, ref, pt, dtype, factor=2)
    assert_lse_close(lse, ref_lse, dtype)


def test_packing_runs_only_where_asked(monkeypatch, set_threads):
    """CUFLASH_PACK_GQA=1 packs several queries (copies of q, out and lse inside the op) and one
    query (views); =0 never does; ALiBi, attn_mask and dropout are never packed. The CPU's default
    packs where a head's queries fill less than a 32-row block and the packed blocks' rounds over
    the threads, split-KV sharing their keys out where num_splits lets it (from 512 keys), cost no
    more than the unpacked ones' (here 2 packed blocks of 12 rows, or 8 blocks of 3 a row at a
    time)."""
    q = torch.randn(1, 8, 3, 32, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 20, 32, dtype=torch.float64) for _ in range(2))

    def copies(q=q, k=k, num_splits=1, **options):
        return op_names(lambda: ops.fwd(q, k, k, None, True, True, **options, num_splits=num_splits)).count(
            "aten::copy_")

    packed(monkeypatch, True)
    assert copies() >= 3
    assert copies(alibi_slopes=torch.rand(8)) == 0
    assert copies(attn_mask=torch.ones(3, 20, dtype=torch.bool)) == 0
    assert "aten::_unsafe_view" in op_names(lambda: ops.fwd(q[:, :, :1], k, v, None, True, True))
    packed(monkeypatch, False)
    assert copies() == 0
    monkeypatch.delenv("CUFLASH_PACK_GQA")
    set_threads(2)
    assert copies() >= 3  # one round of packed blocks against four of unpacked ones
    assert copies(q.repeat(1, 1, 11, 1)) == 0  # 33 queries: a block of their own
    set_threads(8)
    assert copies() == 0  # one round either way, the unpacked blocks a few rows each
    assert copies(num_splits=0) == 0  # as many: 20 keys are one tile, which does not split
    long_k = torch.randn(1, 2, 2048, 32, dtype=torch.float64)
    assert copies(k=long_k, num_splits=0) >= 3  # split-KV shares the packed blocks' keys out
    assert copies(k=long_k) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
@pytest.mark.parametrize("queries,group,packs", [(4, 4, True), (2, 8, True), (64, 4, True), (33, 8, False),
                                                 (60, 2, True), (128, 4, False), (200, 4, False)])
def test_cuda_packs_by_default_where_tiles_would_be_empty(monkeypatch, queries, group, packs):
    """Unset, CUDA packs several queries where a head's queries fill its 128-row query tiles
    poorly and the group's rows fill them better (FlashAttention-3's rule), up to 256 rows: a
    step of a few tokens, not a prompt."""
    monkeypatch.delenv("CUFLASH_PACK_GQA", raising=False)
    q = torch.randn(1, 2 * group, queries, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    names = op_names(lambda: ops.fwd(q, k, v, None, True, True))
    assert (names.count("aten::copy_") >= 3) == packs, names


@pytest.mark.parametrize("device", DEVICES)
def test_packed_with_seqused_k_paged_and_kvcache(monkeypatch, device):
    """seqused_k over a paged cache (sequences using no key, part of a page, two pages), and a
    flash_attn_with_kvcache step of 3 new tokens a sequence, packed."""
    packed(monkeypatch, True)
    dtype = torch.float64
    k_pages, v_pages, table = paged_case(device, dtype, 64)
    q = torch.randn(4, 8, 5, 64, device=device, dtype=dtype)
    used = torch.tensor([0, 30, PAGE + 5, 2 * PAGE], dtype=torch.int32, device=device)
    out, lse = ops.fwd(q, k_pages, v_pages, None, True, True, seqused_k=used, block_table=table)
    k, v = gathered(k_pages, table, 2), gathered(v_pages, table, 2)
    ref = per_sequence_reference(q, k, v, used, True, dtype)
    assert_close_to_reference("out", out, ref[0], ref[0], dtype, factor=2)
    assert_lse_close(lse, ref[1], dtype)

    torch.manual_seed(6)
    k_cache, v_cache = (torch.randn(2, 64, 2, 32, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(2, 3, 8, 32, device=device, dtype=dtype)
    k_new, v_new = (torch.randn(2, 3, 2, 32, device=device, dtype=dtype) for _ in range(2))
    lengths = torch.tensor([10, 40], dtype=torch.int32, device=device)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths, causal=True,
                                       window_size=(6, -1), return_softmax_lse=True)
    # The unpacked step over the same keys (now in the cache), with and without the window.
    packed(monkeypatch, False)
    after = lengths + 3
    whole, whole_lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=after, causal=True,
                                               window_size=(6, -1), return_softmax_lse=True)
    torch.testing.assert_close(out, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, whole_lse, atol=1e-12, rtol=0)
    packed(monkeypatch, True)
    got = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=after, causal=True)
    ref = per_sequence_reference(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), after, True,
                                 dtype)
    assert_close_to_reference("out", got.transpose(1, 2), ref[0], ref[0], dtype, factor=2)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_forward_keeps_its_backward(monkeypatch, device):
    """Under autograd the packed forward's out and lse feed the usual backward: gradients equal
    the unpacked ones."""
    torch.manual_seed(7)
    q, k, v, dout = (torch.randn(1, h, n, 32, dtype=torch.float64, device=device)
                     for h, n in ((4, 6), (2, 40), (2, 40), (4, 6)))
    grads = []
    for on in (True, False):
        packed(monkeypatch, on)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, _ = ops.fwd(*leaves, None, True, True)
        grads.append(torch.autograd.grad(out, leaves, dout))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
