"""A paged KV cache (block_table; the forward only): k and v as pages [num_pages, heads_kv,
page_size, head_dim] that each sequence's row of the block table strings together. Against float64
attention over the keys the table names (gathered in order), with the accuracy rule of every
path; through ops.fwd, flash_attn_with_kvcache (the new keys written into the named pages) and
flash_attn_varlen_func; and the arguments it refuses."""
from types import SimpleNamespace

import pytest
import torch

from conftest import DEVICES, HAS_CUDA, requires_cuda
from cuflash_attn.flash_attn_interface import flash_attn_varlen_func, flash_attn_with_kvcache
from reference import LOW_PRECISION, assert_close_to_reference, assert_lse_close, attention_reference
from test_kvcache import per_sequence_reference

ops = torch.ops.cuflash_attn
DTYPES = [torch.float64, torch.float32] + [pytest.param(t, marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA"))
                                           for t in LOW_PRECISION]
PAGE = 256  # the smallest page size the kernels take


def paged_case(device, dtype, d, batch=4, heads_kv=2, num_pages=9, width=3, seed=0):
    """Pages [num_pages, heads_kv, PAGE, d] and a table [batch, width] of distinct pages in a
    shuffled order, its last entry of every row -1 (a row's unused tail: never read)."""
    torch.manual_seed(seed)
    k_pages, v_pages = (torch.randn(num_pages, heads_kv, PAGE, d, device=device, dtype=dtype) for _ in range(2))
    used = torch.randperm(num_pages)[:batch * (width - 1)].reshape(batch, width - 1)
    table = torch.cat((used, torch.full((batch, 1), -1)), dim=1).to(torch.int32)
    return k_pages, v_pages, table.to(device)


def gathered(pages, table, n_pages):
    """[batch, heads, n_pages * PAGE, d]: each sequence's first n_pages pages, in table order."""
    rows = table[:, :n_pages].long()
    return pages[rows].permute(0, 2, 1, 3, 4).flatten(2, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_matches_reference(device, dtype, d, causal):
    """GQA, sequences using no key, part of a page, a page and a bit, and two whole pages (the
    table's last column unused: -1 there is never read); more queries than keys under the causal
    mask (rows that see none)."""
    if device == "cpu" and dtype in LOW_PRECISION:
        pytest.skip("the low-precision kernels are CUDA's")
    k_pages, v_pages, table = paged_case(device, dtype, d)
    q = torch.randn(4, 4, 37, d, device=device, dtype=dtype)
    used = torch.tensor([0, 30, PAGE + 5, 2 * PAGE], dtype=torch.int32, device=device)
    out, lse = ops.fwd(q, k_pages, v_pages, None, causal, True, seqused_k=used, block_table=table)
    k, v = gathered(k_pages, table, 2), gathered(v_pages, table, 2)
    ref = per_sequence_reference(q, k, v, used, causal, torch.float64)
    pt = per_sequence_reference(q, k, v, used, causal, dtype)
    assert_close_to_reference("out", out, ref[0], pt[0], dtype, factor=2)
    assert_lse_close(lse, ref[1], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_without_seqused_k_reads_every_page(device):
    """No seqused_k: every page of a sequence's row takes part (a table with no unused entries)."""
    k_pages, v_pages, table = paged_case(device, torch.float64, 32, batch=2, num_pages=5, width=2)
    table[:, -1] = torch.tensor([4, 0], dtype=torch.int32, device=device)
    q = torch.randn(2, 2, 9, 32, device=device, dtype=torch.float64)
    out, lse = ops.fwd(q, k_pages, v_pages, block_table=table)
    ref_out, ref_lse = attention_reference(q, gathered(k_pages, table, 2), gathered(v_pages, table, 2), False)
    assert_close_to_reference("out", out, ref_out, ref_out, torch.float64, factor=2)
    assert_lse_close(lse, ref_lse, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_with_packed_queries(device):
    """cu_seqlens_q packs the queries; seqused_k gives each sequence's keys in its pages."""
    k_pages, v_pages, table = paged_case(device, torch.float64, 64, batch=3)
    lens_q, used = [4, 0, 7], [PAGE + 40, 3, 2 * PAGE]
    cu_q = torch.tensor([0, 4, 4, 11], dtype=torch.int32, device=device)
    q = torch.randn(11, 4, 64, device=device, dtype=torch.float64)
    out, lse = ops.fwd(q, k_pages, v_pages, None, True, True, cu_seqlens_q=cu_q, max_seqlen_q=7,
                       seqused_k=torch.tensor(used, dtype=torch.int32, device=device), block_table=table)
    k, v = gathered(k_pages, table, 2), gathered(v_pages, table, 2)
    for b in range(3):
        q0 = int(cu_q[b])
        qb = q[q0:q0 + lens_q[b]].transpose(0, 1)[None]
        ref_out, ref_lse = attention_reference(qb, k[b:b + 1, :, :used[b]], v[b:b + 1, :, :used[b]], True,
                                               bottom_right=True)
        assert_close_to_reference(f"out[{b}]", out[q0:q0 + lens_q[b]].transpose(0, 1)[None], ref_out, ref_out,
                                  torch.float64, factor=2)
        assert_lse_close(lse[:, q0:q0 + lens_q[b]][None], ref_lse, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kvcache_paged_appends_and_attends(device, dtype):
    """flash_attn_with_kvcache over paged caches [num_blocks, page_block_size, heads_kv, head_dim]:
    the new keys land in the blocks the table names for their positions (one of them across a
    block boundary), nothing else changes, and the output is attention over each sequence's keys."""
    if device == "cpu" and dtype in LOW_PRECISION:
        pytest.skip("the low-precision kernels are CUDA's")
    k_pages, v_pages, table = paged_case(device, dtype, 64, batch=3, num_pages=8)
    k_cache, v_cache = (t.transpose(1, 2).contiguous() for t in (k_pages, v_pages))  # flash_attn's layout
    torch.manual_seed(4)
    q = torch.randn(3, 2, 4, 64, device=device, dtype=dtype)
    k_new, v_new = (torch.randn(3, 3, 2, 64, device=device, dtype=dtype) for _ in range(2))
    cache_seqlens = torch.tensor([0, PAGE - 2, 300], dtype=torch.int32, device=device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                       block_table=table, causal=True, return_softmax_lse=True)
    expected_k, expected_v = k_before.clone(), v_before.clone()
    for b, start in enumerate(cache_seqlens.tolist()):
        for i in range(3):
            block, row = int(table[b, (start + i) // PAGE]), (start + i) % PAGE
            expected_k[block, row], expected_v[block, row] = k_new[b, i], v_new[b, i]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    used = cache_seqlens + 3
    k, v = (gathered(t.transpose(1, 2), table, 2) for t in (k_cache, v_cache))
    ref = per_sequence_reference(q.transpose(1, 2), k, v, used, True, torch.float64)
    pt = per_sequence_reference(q.transpose(1, 2), k, v, used, True, dtype)
    assert_close_to_reference("out", out.transpose(1, 2), ref[0], pt[0], dtype, factor=2)
    assert_lse_close(lse, ref[1], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_func_paged(device):
    """flash_attn_varlen_func with block_table: cu_seqlens_k's differences are the key counts."""
    k_pages, v_pages, table = paged_case(device, torch.float64, 32, batch=2)
    k_cache, v_cache = (t.transpose(1, 2) for t in (k_pages, v_pages))
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 100, 100 + 2 * PAGE], dtype=torch.int32, device=device)
    q = torch.randn(8, 4, 32, device=device, dtype=torch.float64)
    out, lse, probs = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 5, 2 * PAGE, causal=True,
                                             block_table=table, return_attn_probs=True)
    assert probs.shape == (0,)  # no dropout (inference only): flash_attn's empty S_dmask
    assert torch.equal(out, flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 5, 2 * PAGE, causal=True,
                                                   block_table=table))
    k, v = gathered(k_pages, table, 2), gathered(v_pages, table, 2)
    for b, (q0, q1, n) in enumerate(((0, 3, 100), (3, 8, 2 * PAGE))):
        qb = q[q0:q1].transpose(0, 1)[None]
        ref, ref_lse = attention_reference(qb, k[b:b + 1, :, :n], v[b:b + 1, :, :n], True, bottom_right=True)
        assert_close_to_reference(f"out[{b}]", out[q0:q1].transpose(0, 1)[None], ref, ref, torch.float64, factor=2)
        torch.testing.assert_close(lse[:, q0:q1], ref_lse[0].to(lse.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_paged_refuses(device):
    k_pages, v_pages, table = paged_case(device, torch.float32, 32, batch=2)
    q = torch.randn(2, 2, 5, 32, device=device)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    cases = [
        (dict(block_table=table.long()), TypeError, "block_table must have dtype int32"),
        (dict(block_table=table[:1]), ValueError, r"block_table must have shape \[batch, pages a sequence\] = \[2"),
        (dict(block_table=table[0]), ValueError, "block_table must have shape"),
        (dict(block_table=table, max_seqlen_k=7), ValueError, "max_seqlen_k must be 0"),
        (dict(block_table=table, cu_seqlens_k=cu), ValueError, "cu_seqlens_k cannot be given"),
    ]
    if HAS_CUDA:
        other = "cpu" if device == "cuda" else "cuda"
        cases.append((dict(block_table=table.to(other)), ValueError, "block_table must be on the same device as q"))
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            ops.fwd(q, k_pages, v_pages, **kwargs)
    with pytest.raises(ValueError, match="page_size .* must be a positive multiple of 256, got 100"):
        ops.fwd(q, k_pages[:, :, :100], v_pages[:, :, :100], block_table=table)
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        ops.fwd(q, k_pages[0], v_pages[0], block_table=table)
    with pytest.raises(ValueError, match="k and v must have the same num_pages"):
        ops.fwd(q, k_pages, v_pages[:3], block_table=table)
    q.requires_grad_()
    with pytest.raises(NotImplementedError, match="has no backward"):
        ops.fwd(q, k_pages, v_pages, block_table=table)
    with pytest.raises(NotImplementedError, match="has no backward"):
        ops.bwd(q, q, k_pages, v_pages, q, torch.zeros(2, 2, 5, device=device), block_table=table)


def _other_device(x):
    return "cpu" if x.q.is_cuda else "cuda"


VARLEN_PAGED_CASES = [
    # (id, the arguments replaced, from the good ones x, exception type, message pattern)
    ("int64 block_table", lambda x: dict(block_table=x.block_table.long()), ValueError,
     r"block_table must be an int32 tensor \[batch = 2, max_num_blocks_per_seq\] on q's device \(.*\), "
     r"got torch.int64 \(2, 3\)"),
    ("block_table batch 1", lambda x: dict(block_table=x.block_table[:1]), ValueError,
     r"block_table must be an int32 tensor \[batch = 2, .*got torch.int32 \(1, 3\)"),
    ("1-d block_table", lambda x: dict(block_table=x.block_table[0]), ValueError,
     r"block_table must be a 2-dimensional tensor \[batch, max_num_blocks_per_seq\], got shape \(3,\)"),
    ("list block_table", lambda x: dict(block_table=x.block_table.tolist()), TypeError,
     r"block_table must be a tensor \[batch, max_num_blocks_per_seq\], got list"),
    pytest.param("block_table on the other device", lambda x: dict(block_table=x.block_table.to(_other_device(x))),
                 ValueError, r"block_table must be an int32 tensor .* on q's device", marks=requires_cuda),
    ("page_block_size 128", lambda x: dict(k=x.k[:, :128], v=x.v[:, :128]), ValueError,
     r"page_block_size \(the caches' dimension 1\) must be a positive multiple of 256, got 128"),
    ("page_block_size 384", lambda x: dict(k=torch.cat((x.k, x.k[:, :128]), 1), v=torch.cat((x.v, x.v[:, :128]), 1)),
     ValueError, r"page_block_size .* must be a positive multiple of 256, got 384"),
    ("3-d k", lambda x: dict(k=x.k[0]), ValueError,
     r"k must be a 4-dimensional tensor \[num_blocks, page_block_size, heads_kv, head_dim\]"),
    ("dropout_p 0.1", lambda x: dict(dropout_p=0.1), ValueError,
     r"dropout_p must be 0 with block_table \(inference only\), got 0.1"),
    ("int64 cu_seqlens_k", lambda x: dict(cu_seqlens_k=x.cu_seqlens_k.long()), ValueError,
     r"cu_seqlens_k must be an int32 tensor of cu_seqlens_q's shape \(3,\) on q's device \(.*\), got torch.int64"),
    ("cu_seqlens_k of another length", lambda x: dict(cu_seqlens_k=x.cu_seqlens_k[:2]), ValueError,
     r"cu_seqlens_k must be an int32 tensor of cu_seqlens_q's shape \(3,\) .*got torch.int32 \(2,\)"),
    pytest.param("cu_seqlens_k on the other device",
                 lambda x: dict(cu_seqlens_k=x.cu_seqlens_k.to(_other_device(x))), ValueError,
                 r"cu_seqlens_k must be an int32 tensor of cu_seqlens_q's shape \(3,\) on q's device",
                 marks=requires_cuda),
]
# Offsets are checked on the CPU only (on CUDA that would synchronize; a negative key count is clamped to 0).
VARLEN_PAGED_CPU_CASES = [
    ("cu_seqlens_k decreasing", lambda x: dict(cu_seqlens_k=torch.tensor([0, 100, 50], dtype=torch.int32)),
     ValueError, r"cu_seqlens_k must be non-decreasing, got 100 then 50 at index 1"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,arguments,exc,pattern", VARLEN_PAGED_CASES + VARLEN_PAGED_CPU_CASES,
                         ids=[getattr(c, "values", c)[0] for c in VARLEN_PAGED_CASES + VARLEN_PAGED_CPU_CASES])
def test_varlen_func_paged_refuses(device, name, arguments, exc, pattern):
    if device != "cpu" and name in [c[0] for c in VARLEN_PAGED_CPU_CASES]:
        pytest.skip("offsets are validated on the CPU only")
    k_pages, v_pages, table = paged_case(device, torch.float32, 32, batch=2)
    kwargs = dict(q=torch.randn(8, 4, 32, device=device), k=k_pages.transpose(1, 2), v=v_pages.transpose(1, 2),
                  cu_seqlens_q=torch.tensor([0, 3, 8], dtype=torch.int32, device=device),
                  cu_seqlens_k=torch.tensor([0, 100, 100 + 2 * PAGE], dtype=torch.int32, device=device),
                  max_seqlen_q=5, max_seqlen_k=2 * PAGE, block_table=table)
    flash_attn_varlen_func(**kwargs)  # the good arguments are taken
    kwargs.update(arguments(SimpleNamespace(**kwargs)))
    with pytest.raises(exc, match=pattern):
        flash_attn_varlen_func(**kwargs)


def test_paged_table_entries_checked_on_cpu():
    """On the CPU the pages a sequence uses must be pages of k (entries past them are not read);
    on CUDA the kernels clamp them instead (a check would synchronize)."""
    k_pages, v_pages, table = paged_case("cpu", torch.float64, 32, batch=2, num_pages=5, width=2)
    q = torch.randn(2, 2, 3, 32, dtype=torch.float64)
    table[:, -1] = torch.tensor([4, 0], dtype=torch.int32)  # pages may repeat
    table[1, 0] = 5
    with pytest.raises(ValueError, match=r"block_table\[1\]\[0\] = 5 is not a page of k \(it has 5\)"):
        ops.fwd(q, k_pages, v_pages, block_table=table)
    used = torch.tensor([10, 0], dtype=torch.int32)  # sequence 1 uses no page
    ops.fwd(q, k_pages, v_pages, seqused_k=used, block_table=table)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_paged_table_entries_out_of_range_stay_in_bounds_on_cuda(dtype):
    """On CUDA an entry that is not a page of k (past the pages, negative, huge) is clamped into
    the cache by the kernels (attention_math.h's key_at), so nothing is read outside k and v: the
    outputs are finite, and the entries that are pages give the reference's rows. (Under
    compute-sanitizer's memcheck: tests/sanitize_driver.py's "paged_bad_table" case.)"""
    k_pages, v_pages, table = paged_case("cuda", dtype, 64, batch=3, num_pages=6, width=2)
    q = torch.randn(3, 2, 5, 64, device="cuda", dtype=dtype)
    used = torch.full((3,), PAGE, dtype=torch.int32, device="cuda")  # each sequence reads its first page
    good = table.clone()
    table[1, 0], table[2, 0] = 6, -7
    out, lse = ops.fwd(q, k_pages, v_pages, seqused_k=used, block_table=table)
    fa_out = flash_attn_with_kvcache(q.transpose(1, 2), k_pages.transpose(1, 2), v_pages.transpose(1, 2),
                                     cache_seqlens=used, block_table=table)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(fa_out).all()
    want, _ = ops.fwd(q, k_pages, v_pages, seqused_k=used, block_table=good)
    torch.testing.assert_close(out[:1], want[:1], rtol=0, atol=0, msg="sequence 0's pages are in range")


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_paged_refuses(device):
    k_pages, v_pages, table = paged_case(device, torch.float32, 32, batch=2)
    k_cache, v_cache = (t.transpose(1, 2).contiguous() for t in (k_pages, v_pages))
    q = torch.randn(2, 1, 2, 32, device=device)
    k_new = v_new = torch.randn(2, 1, 2, 32, device=device)
    before = k_cache.clone()
    idx = torch.tensor([0, 1], dtype=torch.int32, device=device)
    cases = [
        (dict(cache_batch_idx=idx), ValueError, "cache_batch_idx cannot be given with block_table"),
        (dict(block_table=table.long()), ValueError, "block_table must be an int32 tensor"),
        # position 2 * PAGE is in the table's third (unused, -1) column
        # (the CPU op names the entry; on CUDA the append's own check of the blocks it writes)
        (dict(k=k_new, v=v_new, cache_seqlens=2 * PAGE), ValueError,
         r"block_table(\[0\]\[2\] = -1 is not a page of k| names blocks in \[-1, -1\])"),
        (dict(k=k_new, v=v_new, cache_seqlens=3 * PAGE), ValueError, "cache_seqlens must be in"),
    ]
    if HAS_CUDA:  # the op would refuse it only after the append
        other = "cpu" if device == "cuda" else "cuda"
        cases.append((dict(k=k_new, v=v_new, cache_seqlens=1, block_table=table.to(other)), ValueError,
                      "block_table must be an int32 tensor .* on q's device"))
    for kwargs, error, match in cases:
        kwargs.setdefault("block_table", table)
        with pytest.raises(error, match=match):
            flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs)
    with pytest.raises(ValueError, match="4-dimensional"):
        flash_attn_with_kvcache(q, k_cache[0], v_cache[0], block_table=table)
    assert torch.equal(k_cache, before), "a refused call wrote the cache"
    small = k_cache[:, :128].clone()  # blocks of 128 rows: refused before anything is written
    small_before = small.clone()
    with pytest.raises(ValueError, match="page_block_size .* must be a positive multiple of 256, got 128"):
        flash_attn_with_kvcache(q, small, small, k_new, v_new, cache_seqlens=1, block_table=table)
    assert torch.equal(small, small_before), "a refused call wrote the cache"


@pytest.mark.parametrize("device", DEVICES)
def test_paged_opcheck_and_compile(device):
    """torch.library.opcheck of the paged forward (schema, fake, dispatch), and torch.compile
    (fullgraph) giving the eager result."""
    k_pages, v_pages, table = paged_case(device, torch.float32, 32, batch=2)
    q = torch.randn(2, 4, 6, 32, device=device)
    used = torch.tensor([PAGE + 1, 7], dtype=torch.int32, device=device)
    options = dict(is_causal=True, bottom_right=True, seqused_k=used, block_table=table)
    torch.library.opcheck(ops.fwd.default, (q, k_pages, v_pages), options)
    eager = ops.fwd(q, k_pages, v_pages, **options)[0]
    compiled = torch.compile(lambda *a: ops.fwd(*a, **options)[0], fullgraph=True)(q, k_pages, v_pages)
    assert torch.equal(compiled, eager)
