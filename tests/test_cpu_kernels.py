"""The CPU kernels' vector widths (csrc/cpu/flash_cpu.cpp: AMX tiles for bfloat16's matrix
products, AVX-512 with or without its bfloat16 pair dot products for bfloat16 scores, AVX2 and the
baseline's SSE2, CUFLASH_CPU_ISA), each on the
checks that reach its code paths: tiles that every row sees
and tiles that a mask cuts (the lanes a mask hides), head dims that are not a multiple of the
vector (the scalar tails), the features' scores, packed sequences, a float mask's gradient, a
NaN that only some rows see (the one-pair-at-a-time path), and blocks of a few query rows (a row
at a time, or half the lanes). A width the CPU does not have runs its
best one instead, so on a CPU without AVX-512 the "avx512" cases repeat the "avx2" ones. Also the
backward's split of a (batch, key head) pair over several threads, and the threads themselves."""
import math
from pathlib import Path

import pytest
import torch

import cuflash_attn

from test_pack_gqa import op_names

import test_edge_cases
from test_features import check_dense, check_varlen

ISAS = ["base", "avx2", "avx512", "avx512bf16", "amxbf16"]


def _cpu_has_amx_bf16():
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags and "amx_tile" in flags


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("CUFLASH_CPU_ISA", request.param)  # read at every call
    return request.param


@pytest.mark.parametrize("dtype,magnitude", [(torch.float16, 100), (torch.bfloat16, 300), (torch.float32, 3000)],
                         ids=["fp16", "bf16", "fp32"])
def test_backward_of_large_scores_in_a_block_of_few_rows(isa, dtype, magnitude):
    """37 query rows: a block of 32 and one of 5, which the forward takes a row at a time (its
    scores' head dims added in another order than a full block's). The backward recomputes P from
    the same scores, so that with scores of |s| ~ 4e4 (fp16) to 3e7 (fp32) P stays exact: before,
    P reached e^(ulps of |s|) and dv missed the rule (fp16 0.022 against 0.0098; fp32 887 against
    37), and at |s| ~ 4e8 it was inf."""
    from reference import accuracy_bound, max_err, reference_results
    torch.manual_seed(0)
    q, k = ((torch.randn(1, 2, 37, 64) * magnitude).to(dtype) for _ in range(2))
    v, dout = (torch.randn(1, 2, 37, 64).to(dtype) for _ in range(2))
    v.requires_grad_()
    cuflash_attn.flash_attention(q, k, v).backward(dout)
    _, lse, _, _, dv = reference_results(q, k, v, dout)
    pt_dv = dv if dtype == torch.float32 else reference_results(q, k, v, dout, dtype=dtype)[4]
    assert max_err(v.grad, dv) <= accuracy_bound(dv, pt_dv, dtype, 3, lse=lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("d", [8, 59, 64, 136, 232])
def test_plain_and_masked(isa, dtype, d):
    check_dense("cpu", dtype, 2, 2, 1, 70, 150, d)  # tiles every row sees; a partial last tile
    check_dense("cpu", dtype, 1, 4, 2, 100, 77, d, causal=True, bottom_right=True, window=(33, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("nq", [1, 5, 12])
def test_few_rows(isa, dtype, nq):
    """Blocks of fewer than 8 query rows go a row at a time, the keys as lanes (decoding steps);
    of 8 to 16 rows, on half the lanes."""
    check_dense("cpu", dtype, 2, 4, 1, nq, 333, 72)
    check_dense("cpu", dtype, 1, 4, 2, nq, 130, 64, causal=True, bottom_right=True, window=(70, -1), softcap=15.0,
                alibi="batch", dropout_p=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("nq", [1, 3])  # two query heads a key head: blocks of 2 and 6 packed rows
def test_row_path_widens_16_bit_rows_exactly(isa, dtype, nq):
    """Blocks of fewer than 8 rows read K and V's 16-bit rows as they are, widened in registers
    (load_pair, load_row): the output is float32 inputs' output rounded, bit for bit, and lse the same, over
    values that take each branch of the widening: subnormals, the largest finite, -0, Inf and NaN
    (in V, at a key some rows' windows leave out), in vector lanes and in a head dim's scalar tail."""
    torch.manual_seed(0)
    d = 88  # 64-byte vectors: pairs of vectors (64 dims), one vector, a scalar tail
    q = torch.randn(1, 4, nq, d).to(dtype)
    k, v = (torch.randn(1, 2, 200, d).to(dtype) for _ in range(2))
    tiny = torch.finfo(dtype).smallest_normal
    for t in (k, v):
        t[0, 0, 3, :] = torch.tensor([tiny / 4, -tiny / 1024, -0.0, tiny], dtype=dtype).repeat(d // 4)
        t[0, 1, 7, ::9] = torch.finfo(dtype).max / 8
        t[0, 1, 8, -3:] = -torch.finfo(dtype).max / 8
    v[0, 0, 150, 5] = float("inf")
    v[0, 1, 160, d - 2] = float("nan")
    kwargs = dict(is_causal=True, bottom_right=True, window_left=60)  # rows' windows: some hold 150 and 160
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, **kwargs)
    out32, lse32 = torch.ops.cuflash_attn.fwd(q.float(), k.float(), v.float(), **kwargs)
    assert out.isnan().any() and not out.isnan().all()
    torch.testing.assert_close(out, out32.to(dtype), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse, lse32, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("heads_q,nq", [(12, 1), (6, 2)])  # blocks of 6 packed rows: fewer than 8, the row path
def test_row_path_groups_heads_without_changing_their_bits(isa, dtype, heads_q, nq):
    """A decoding step's query heads of one key head go through the row path together (each key's K
    and V read once for up to four of them): every head's out and lse are the bits of the same head
    run alone, against its own copy of K and V. Groups of 4 and 2 (one query position), and by
    position (two positions, whose windows hold different keys of a tile); a head dim with a
    scalar tail."""
    torch.manual_seed(1)
    d, heads_kv = 88, 2  # 64-byte vectors: pairs of vectors, one vector, a scalar tail
    q = torch.randn(1, heads_q, nq, d).to(dtype)
    k, v = (torch.randn(1, heads_kv, 300, d).to(dtype) for _ in range(2))
    kwargs = dict(is_causal=True, bottom_right=True, window_left=200)
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, **kwargs)
    group = heads_q // heads_kv
    k_each, v_each = (t.repeat_interleave(group, dim=1).contiguous() for t in (k, v))
    out_each, lse_each = torch.ops.cuflash_attn.fwd(q, k_each, v_each, **kwargs)
    torch.testing.assert_close(out, out_each, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_each, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_features(isa, dtype):
    check_dense("cpu", dtype, 2, 4, 2, 97, 130, 40, causal=True, window=(50, -1), softcap=20.0, alibi="batch",
                dropout_p=0.15)
    check_dense("cpu", dtype, 1, 2, 2, 45, 99, 64, attn_mask=("float", "B1LS"))
    check_varlen("cpu", dtype, [70, 0, 129], [90, 12, 64], 4, 1, 48, causal=True, bottom_right=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_reaches_affected_rows_only(isa, dtype, where):
    test_edge_cases.test_nan_propagates_to_affected_rows_only("cpu", "flash_attention", dtype, where)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_dout_reaches_affected_rows_only(isa, dtype, bad):
    """A NaN or Inf in dout (row 300 of 512, causal) reaches dq of that row and dk and dv of the keys
    it sees, nothing else: the AMX backward takes it as 0 on the tiles (a hidden pair's P is 0, and
    0 x NaN would reach every key of its tiles), then adds its products over the pairs that see it.
    The other rows' gradients are what the same inputs without it give."""
    n, pos = 512, 300
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, 1, n, 64, dtype=dtype) for _ in range(4))

    def grads(dout):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = cuflash_attn.flash_attention(*leaves, causal=True)
        return torch.autograd.grad(out, leaves, dout)

    clean = grads(dout)
    dout = dout.clone()
    dout[0, 0, pos, 3] = bad
    got = grads(dout)
    i = torch.arange(n)
    for name, reached, a, b in zip(("dq", "dk", "dv"), (i == pos, i <= pos, i <= pos), got, clean):
        rows, want = a[0, 0], b[0, 0]
        finite = torch.isfinite(rows).all(dim=-1)
        assert not finite[reached].any() and finite[~reached].all(), (
            f"{name}: non-finite rows {(~finite).nonzero().flatten().tolist()}")
        torch.testing.assert_close(rows[~reached], want[~reached], msg=lambda m, name=name: f"{name}: {m}")


def test_bfloat16_backward_over_keys_past_the_tiles_sums(isa):
    """Over 66,000 keys at D=128 a (batch, key head)'s dK and dV sums for the AMX backward would pass
    kAmxHeadBytes a thread: its products stay in float there, and match the reference."""
    check_dense("cpu", torch.bfloat16, 1, 1, 1, 40, 66000, 128)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mask", ["window", "hidden_tiles"])
def test_bfloat16_backward_blocks_that_see_other_keys(isa, mask, d):
    """The AMX backward adds the dV and dK products of two blocks at a time (flash_cpu.cpp's
    AmxPendingBlocks), each block's P^T and dS^T 0 over the keys only the other sees: a sliding
    window (each block's keys start 32 further on), or an attn_mask that hides two whole key tiles
    from the first two blocks between keys they see (tiles skipped); GQA (blocks of two query
    heads wait together) and 161 rows (a block of one row goes alone). Against the reference."""
    if mask == "window":
        check_dense("cpu", torch.bfloat16, 1, 4, 2, 161, 300, d, window=(70, 5))
    else:
        shown = torch.ones(161, 300, dtype=torch.bool)
        shown[:64, 64:192] = False
        check_dense("cpu", torch.bfloat16, 1, 4, 2, 161, 300, d, attn_mask=shown[None, None])


@pytest.mark.skipif(not _cpu_has_amx_bf16(), reason="the CPU has no AMX-BF16")
def test_the_bfloat16_backward_takes_amx_where_the_cpu_has_it(monkeypatch):
    """The default bfloat16 backward runs its products on AMX tiles where the CPU has them: dK, dV
    and dQ take P and dS rounded to bfloat16, so they differ in the last bits from
    CUFLASH_CPU_ISA=avx512bf16's (float products), within bfloat16's rounding."""
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, 64, 128, dtype=torch.bfloat16) for _ in range(4))
    results = {}
    for isa in ("amxbf16", "avx512bf16"):
        monkeypatch.setenv("CUFLASH_CPU_ISA", isa)
        out, lse = torch.ops.cuflash_attn.fwd(q, k, v)
        results[isa] = torch.ops.cuflash_attn.bwd(dout, q, k, v, out, lse)[:3]
    for name, a, b in zip(("dq", "dk", "dv"), results["amxbf16"], results["avx512bf16"]):
        assert not torch.equal(a, b), name
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_reads_16_bit_rows_itself(isa, dtype):
    """The forward converts each tile as it loads it (and rounds its output): no whole copy of q, k
    or v in float32 (a KV cache would be copied at every decoding step); the result as checked
    against float64 by the tests above."""
    q, k, v = (torch.randn(1, 2, n, 64, dtype=dtype) for n in (3, 300, 300))
    names = op_names(lambda: torch.ops.cuflash_attn.fwd(q, k, v))
    assert "aten::_to_copy" not in names and "aten::copy_" not in names, names


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_backward_reads_16_bit_rows_itself(isa, dtype):
    """The backward reads q, k, v, out and dout a row or a tile at a time too (it took float32
    copies of all five); only dq, dk and dv, summed in float32, are copied out once."""
    q, k, v = (torch.randn(1, 2, n, 64, dtype=dtype) for n in (30, 300, 300))
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v)
    dout = torch.randn_like(out)
    names = op_names(lambda: torch.ops.cuflash_attn.bwd(dout, q, k, v, out, lse))
    assert "aten::_to_copy" not in names and names.count("aten::copy_") == 3, names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("num_splits", [0, 3, 1000])
def test_split_kv(isa, dtype, num_splits):
    """Split-KV: each block of query rows over ranges of its keys' tiles, merged (num_splits 0:
    chosen, here where the blocks are fewer than the threads; 1000: one a key tile). Rows a
    window or causal mask leaves no key in some splits (or in all: lse -inf), features whose
    scores depend on the key, dropout (which scales each split's probabilities), packed sequences."""
    check_dense("cpu", dtype, 1, 2, 1, 3, 1000, 64, num_splits=num_splits)  # heads packed: 1 block, 0 splits it
    check_dense("cpu", dtype, 1, 4, 2, 40, 700, 72, num_splits=num_splits, causal=True, bottom_right=True,
                window=(300, 0), softcap=20.0, alibi="batch", dropout_p=0.1)
    check_dense("cpu", dtype, 2, 2, 2, 12, 333, 40, num_splits=num_splits, window=(-1, 100))  # rows past every key
    check_varlen("cpu", dtype, [3, 0, 20], [500, 12, 0], 4, 2, 48, num_splits=num_splits, causal=True,
                 bottom_right=True)

    check_varlen("cpu", dtype, [3, 0, 20], [500, 12, 0], 4, 2, 48, max_seqlen=False, num_splits=num_splits)


def test_split_kv_takes_the_threads_and_keeps_nan_apart(set_threads):
    """num_splits=0 splits where the blocks are fewer than the threads (one query row over one KV
    head: its result differs in the last bits from the unsplit one); a NaN key that only some of a
    block's rows see (a window) reaches those rows only, split or not, on the lanes path (40 rows)."""
    set_threads(2)
    q, k, v = (torch.randn(1, 1, n, 64) for n in (1, 4096, 4096))
    split, unsplit = (torch.ops.cuflash_attn.fwd(q, k, v, num_splits=n) for n in (0, 1))
    assert not torch.equal(split[1], unsplit[1]) or not torch.equal(split[0], unsplit[0])
    torch.testing.assert_close(split[0], unsplit[0], rtol=1e-5, atol=1e-6)
    q, k, v = (torch.randn(1, 2, n, 64) for n in (40, 700, 700))
    k[:, :, 680] = float("nan")
    window = dict(window_left=20, window_right=0, bottom_right=True)  # row i sees keys [i + 640, i + 660]
    for n in (1, 3):
        out, lse = torch.ops.cuflash_attn.fwd(q, k, v, **window, num_splits=n)
        sees = torch.arange(40) + 660 >= 680
        assert torch.isnan(out[:, :, sees]).all() and torch.isnan(lse[:, :, sees]).all()
        assert torch.isfinite(out[:, :, ~sees]).all() and torch.isfinite(lse[:, :, ~sees]).all()


def test_split_kv_over_many_tiles():
    """More splits than fit in 32-bit products of split index and key tiles (46,875 tiles of 3M keys,
    num_splits clamped to them): each split's range computed in 64 bits."""
    q, k, v = (torch.randn(1, 1, n, 8) for n in (1, 3_000_000, 3_000_000))
    split, unsplit = (torch.ops.cuflash_attn.fwd(q, k, v, num_splits=n) for n in (100_000, 1))
    torch.testing.assert_close(split[1], unsplit[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(split[0], unsplit[0], rtol=1e-4, atol=1e-6)


def test_results_do_not_depend_on_the_threads_for_fixed_splits(monkeypatch, set_threads):
    """Each work item writes its own rows (a race would show as a result that varies): the forward
    bitwise the same on 1, 3 and 8 threads for a fixed num_splits (packed grouped heads, blocks on
    the lanes, split-KV)."""
    monkeypatch.setenv("CUFLASH_PACK_GQA", "1")  # (not by the thread count)
    q, k, v = torch.randn(2, 8, 3, 64), torch.randn(2, 2, 900, 64), torch.randn(2, 2, 900, 64)
    q_long = torch.randn(2, 8, 100, 64)
    results = []
    for t in (1, 3, 8):
        set_threads(t)
        results.append([torch.ops.cuflash_attn.fwd(q_, k, v, None, True, True, num_splits=n)
                        for q_ in (q, q_long) for n in (1, 3)])
    for again in results[1:]:
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(results[0], again))


def tile_hiding_mask(kind, nq, nk, dtype):
    """An attn_mask that hides whole tiles of 64 keys from blocks of rows: keys 64-191 from every
    row, and a causal mask (bottom-right) over the rest; as bool or as 0 / -inf of dtype."""
    shows = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)
    shows[:, 64:192] = False
    if kind == "bool":
        return shows
    return torch.zeros(nq, nk, dtype=dtype).masked_fill(~shows, float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("nq", [5, 100])
def test_tiles_an_attn_mask_hides(isa, dtype, kind, nq):
    """Tiles whose pairs the attn_mask hides all are skipped (the lanes path, 100 rows; the row
    path, 5): the result as the float64 reference's, gradients included."""
    check_dense("cpu", dtype, 1, 2, 2, nq, 300, 64, attn_mask=tile_hiding_mask(kind, nq, 300, dtype))


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("nq", [5, 100])
def test_nan_in_a_tile_an_attn_mask_hides(where, nq):
    """A NaN key or value where the attn_mask hides it: the mask's -inf added to a NaN score is NaN
    (and 0 x a NaN value too), as in torch's SDPA, so the tile is computed, not skipped: every
    row's output NaN in both."""
    q, k, v = (torch.randn(1, 1, n, 32, dtype=torch.float64) for n in (nq, 300, 300))
    (k if where == "k" else v)[0, 0, 100] = float("nan")
    mask = tile_hiding_mask("bool", nq, 300, torch.float64)
    ours = cuflash_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(torch.isnan(ours), torch.isnan(torch_out)) and torch.isnan(ours).all()


@pytest.fixture(params=[1, 3, 4])
def threads(request, set_threads):
    """torch's thread count: the backward splits each (batch, key head) pair into parts, each
    summing dK and dV on its own, where the pairs are too few to share out evenly over the threads."""
    set_threads(request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_backward_parts(threads, dtype):
    check_dense("cpu", dtype, 1, 1, 1, 200, 150, 64)  # one pair, 7 blocks of query rows
    check_dense("cpu", dtype, 1, 6, 2, 70, 130, 40, causal=True, window=(60, -1), dropout_p=0.1)  # grouped heads
    check_dense("cpu", dtype, 1, 2, 1, 45, 99, 64, attn_mask=("float", "B1LS"))  # the mask's gradient
    check_varlen("cpu", dtype, [70, 0, 129], [90, 12, 64], 2, 1, 48, causal=True)  # a sequence with no rows


def test_threads_reach_the_kernels():
    """at::parallel_for shares the CPU kernels' items over torch's threads only in code compiled with
    OpenMP; without -fopenmp (setup.py) it runs every item on the calling thread, silently (the CPU
    kernels ran on one core until the thirty-second session)."""
    assert b"GOMP_parallel" in Path(cuflash_attn._C.__file__).read_bytes()


def test_torch_kernels_on_the_same_threads_keep_their_amx_tiles(monkeypatch):
    """The AMX forward configures the tile registers for each block and puts the thread's earlier
    configuration back: torch's bfloat16 CPU attention (oneDNN, which may keep its tiles configured
    across calls) gives the same bits before and after ours, on the same threads."""
    monkeypatch.setenv("CUFLASH_CPU_ISA", "amxbf16")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, dtype=torch.bfloat16) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    before = sdpa(q, k, v)
    for _ in range(3):
        ours = cuflash_attn.flash_attention(q, k, v)
        assert torch.equal(sdpa(q, k, v), before)
    torch.testing.assert_close(ours, before, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not _cpu_has_amx_bf16(), reason="the CPU has no AMX-BF16")
def test_the_bfloat16_forward_takes_amx_where_the_cpu_has_it(monkeypatch):
    """Where the CPU has AMX-BF16 (and Linux grants its tiles) the default bfloat16 forward runs on
    them: its scores are summed in another order than the pair dot products' and its P rounded to
    bfloat16, so lse differs in the last bits from CUFLASH_CPU_ISA=avx512bf16's (were the tiles
    silently not taken, the two would agree bitwise)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 128, dtype=torch.bfloat16) for _ in range(3))
    results = {}
    for isa in ("amxbf16", "avx512bf16"):
        monkeypatch.setenv("CUFLASH_CPU_ISA", isa)
        results[isa] = torch.ops.cuflash_attn.fwd(q, k, v)
    assert not torch.equal(results["amxbf16"][1], results["avx512bf16"][1])
    torch.testing.assert_close(results["amxbf16"][0], results["avx512bf16"][0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("rise", [0.01, 0.04])
def test_rows_whose_maximum_keeps_rising(isa, dtype, rise):
    """Scores that rise along the keys by `rise` a key, over noise: each row's maximum moves in
    nearly every tile, by about 0.6 or 2.6 a 64 keys (O^T rescaled each time; 128-key tiles past
    head dim 64 on AMX). out, lse and the gradients against the float64 reference."""
    from reference import assert_close_to_reference, assert_lse_close, reference_results
    torch.manual_seed(0)
    nq, nk, d = 70, 300, 128
    q = torch.randn(1, 2, nq, d, dtype=torch.float64) * 0.3
    k = torch.randn(1, 2, nk, d, dtype=torch.float64) * 0.3
    q[..., 0] = 1.0
    k[..., 0] = torch.arange(nk, dtype=torch.float64) * rise  # scale 1: score j ~ rise * j
    v, dout = (torch.randn(1, 2, n, d, dtype=torch.float64) for n in (nk, nq))
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = cuflash_attn.flash_attention(q, k, v, scale=1.0, return_lse=True)
    out.backward(dout)
    ref_out, ref_lse, *ref_grads = reference_results(q, k, v, dout, scale=1.0)
    pt_out, _, *pt_grads = reference_results(q, k, v, dout, scale=1.0, dtype=dtype)
    assert_lse_close(lse, ref_lse, dtype)
    for name, got, ref, pt in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), (ref_out, *ref_grads),
                                  (pt_out, *pt_grads)):
        assert_close_to_reference(name, got, ref, pt, dtype, 3, lse=ref_lse)


@pytest.mark.skipif(not _cpu_has_amx_bf16(), reason="the CPU has no AMX-BF16")
@pytest.mark.parametrize("d", [40, 128])
@pytest.mark.parametrize("nk", [64, 300])
@pytest.mark.parametrize("features", ["plain", "causal", "window", "softcap_alibi_dropout"])
def test_amx_forward_packed_whole_heads_equal_a_tile_at_a_time(set_threads, d, nk, features):
    """One thread taking the three blocks of 32 query rows of each (batch, key head) packs its K and
    V^T once (flash_cpu.cpp's AmxHeadTiles); six threads take a block each, and each block packs
    its key tiles on the way. The same sums, so the same bits (a change to either path's tiles,
    buffers or order of products must keep them so: results do not depend on the thread count);
    300 keys end in a partial tile. Past head dim 64 the tiles that every row of a block sees take
    128 keys (kAmxForwardKeys): plain, and causal before the diagonal."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 96, d, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, nk, d, dtype=torch.bfloat16) for _ in range(2))
    kwargs = {"plain": {},
              "causal": {"is_causal": True, "bottom_right": True},  # 128-key tiles, then the diagonal's 64
              "window": {"window_left": 70, "window_right": 10},
              "softcap_alibi_dropout": {"softcap": 30.0, "alibi_slopes": torch.tensor([0.002, 0.004]), "dropout_p": 0.2,
                                        "rng_state": torch.tensor([7, 0], dtype=torch.int64)}}[features]
    results = {}
    for threads in (1, 6):
        set_threads(threads)
        results[threads] = torch.ops.cuflash_attn.fwd(q, k, v, **kwargs)
    assert torch.equal(results[1][0], results[6][0])
    assert torch.equal(results[1][1], results[6][1])


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("d", [33, 128])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_nan_in_a_partial_key_group_reaches_the_rows_that_see_it(isa, where, d, num_splits):
    """bfloat16 with grouped heads and a window: a NaN in K or V at key 290 of 300 (in the last,
    partial 32-key group of the AMX tiles; with one split the head's K and V packed whole, with
    three a tile at a time) reaches the rows whose window holds it (60-69 of 70), and every other
    row's out and lse are bitwise those of the same call without it."""
    torch.manual_seed(0)
    q = torch.randn(1, 4, 70, d, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 300, d, dtype=torch.bfloat16) for _ in range(2))
    window = dict(window_left=20, window_right=0, bottom_right=True, num_splits=num_splits)  # row i: keys i+210..i+230
    clean = torch.ops.cuflash_attn.fwd(q, k, v, **window)
    (k if where == "k" else v)[0, 1, 290, d // 2] = float("nan")
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, **window)
    sees = torch.arange(70) >= 60
    heads = torch.arange(4) // 2 == 1  # the query heads of key head 1
    reached = heads[:, None] & sees[None, :]
    assert torch.isnan(out[0][reached]).any(dim=-1).all()
    assert torch.equal(out[0][~reached], clean[0][0][~reached])
    if where == "k":  # (a value's NaN leaves the scores, so lse, as they were)
        assert torch.isnan(lse[0][reached]).all() and torch.equal(lse[0][~reached], clean[1][0][~reached])
    else:
        assert torch.equal(lse, clean[1])
