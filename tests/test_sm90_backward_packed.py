"""Packed sequences (cu_seqlens) on the warp-specialized TMA backward: CUFLASH_SM90's "bwdvarlen"
part, a default, at head-dim buckets 64 and 128 (flash_bwd_sm90_tma.cuh's kPacked kernels:
the dQ and dK/dV pair and the fused kernel, dQ added in order or not; 64- and 128-query steps at
head dim 64) and at 256 (the fused kernel of flash_bwd_sm90_fused256.cuh, 80-key tiles; the pair
there takes none). Each route against the float64 reference over lengths that end inside and on
a box's edge, GQA and masks; sequences kept apart (a NaN in one never reaches another's
gradients); the ordered dQ bitwise reproducible, and bitwise each sequence's as if alone; the
kernels the profiler shows. Without the part packed sequences take the cp.async backward."""
import pytest
import torch

from conftest import (IS_SM90, SM90_DEFAULT_PARTS, cuda_kernels, dkdv_tma_kernel, fused_backward_kernel,
                      packed_offsets, skip_outside_head_dim_bucket, sm90_parts_without)
from reference import LOW_PRECISION, LOW_PRECISION_IDS
from test_features import check_varlen, compare, reference_grads

pytestmark = pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")

# (CUFLASH_BWD_DQ, query steps at head dim 64): the pair, and the fused kernel's two dQ orders.
ROUTES = [("separate", "wide"), ("separate", "narrow"), ("ordered", "wide"), ("ordered", "narrow"),
          ("atomic", "wide"), ("atomic", "narrow")]


@pytest.fixture(params=ROUTES, ids=[f"{dq}-{steps}" for dq, steps in ROUTES])
def route(request, monkeypatch):
    """The part on, the route's CUFLASH_BWD_DQ and, at head dim 64, its steps (the pair's
    CUFLASH_BWD_TILE, the fused kernel's CUFLASH_BWD_FUSED_TILE). Returns the route."""
    dq, steps = request.param
    if steps == "narrow":
        skip_outside_head_dim_bucket(request, 64, "the steps differ at head dim 64 only")
    monkeypatch.setenv("CUFLASH_SM90", SM90_DEFAULT_PARTS)
    monkeypatch.setenv("CUFLASH_BWD_DQ", dq)
    monkeypatch.setenv("CUFLASH_BWD_TILE" if dq == "separate" else "CUFLASH_BWD_FUSED_TILE", steps)
    return request.param


def packed_backward_kernels(lengths, d):
    """The kernels of a bf16 packed backward over sequences of these lengths."""
    cu = packed_offsets(lengths)
    q, k, v = (torch.randn(sum(lengths), 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out, _ = torch.ops.cuflash_attn.fwd(q, k, v, None, False, False, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                        max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    return cuda_kernels(lambda: torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))


@pytest.mark.parametrize("d", [40, 64, 100, 128, 232, 256])
def test_path_taken(d, route):
    names = packed_backward_kernels([100, 300], d)
    dq, steps = route
    bucket = 64 if d <= 64 else 128 if d <= 128 else 256
    wide = steps == "wide" and bucket == 64
    if bucket == 256 and dq == "separate":  # the pair at 256 takes no packed sequences
        assert "flash_bwd_dkdv_sm90_kernel<" in names and "tma" not in names.replace("flash_fwd_sm90_tma", ""), names
        return
    if dq == "separate":
        assert f"flash_bwd_dq_sm90_tma_kernel<__nv_bfloat16, {bucket}, true>" in names, names
        expected = dkdv_tma_kernel(bucket, wide=wide, packed=True)
    else:
        expected = fused_backward_kernel(bucket, wide=wide, ordered=dq == "ordered", packed=True)
    assert expected in names, names


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dq", ["separate", "ordered"])
def test_cpasync_elsewhere(d, dq, monkeypatch):
    """Without the part the cp.async kernels (ordered dQ adds, which only the fused kernels make,
    then fall back to the pair rather than fail)."""
    monkeypatch.setenv("CUFLASH_SM90", sm90_parts_without("bwdvarlen"))
    monkeypatch.setenv("CUFLASH_BWD_DQ", dq)
    names = packed_backward_kernels([100, 300], d)
    assert "flash_bwd_dkdv_sm90_kernel<" in names and "tma" not in names.replace("flash_fwd_sm90_tma", ""), names


# Lengths (q, k) whose last blocks end inside a box, on its edge and one past it, with empty
# sequences and sequences of one token, keys and queries of different lengths.
# (Head dim 256's key tiles are 80 rows: 79, 80, 81, 159, 160, 161.)
LENGTHS = [([1, 63, 64, 65, 0, 127, 128, 129], [1, 63, 64, 65, 0, 127, 128, 129]),
           ([70, 0, 129, 300], [90, 12, 0, 257]),
           ([300, 129, 700], [300, 129, 700]),
           ([79, 80, 81, 0, 159, 160, 161], [79, 80, 81, 0, 159, 160, 161])]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("lens", LENGTHS, ids=[f"lens{i}" for i in range(len(LENGTHS))])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(dtype, d, lens, causal, route):
    check_varlen("cuda", dtype, *lens, 4, 2, d, causal=causal, bottom_right=causal)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_window(d, route):
    check_varlen("cuda", torch.bfloat16, [300, 129, 700], [300, 129, 700], 4, 4, d, window=(130, 20))


# (cu_seqlens_q, cu_seqlens_k): three sequences and 30 spare rows after them, keys and queries of
# one length or not.
APART = {"equal": ([0, 100, 250, 300], [0, 100, 250, 300]), "unequal": ([0, 100, 250, 300], [0, 120, 210, 280])}


# The masks of test_keeps_sequences_apart: (causal, window); bottom-right where causal.
APART_MASKS = {"none": (False, (-1, -1)), "causal": (True, (-1, -1)), "window": (False, (40, 10))}


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("mask", list(APART_MASKS))
@pytest.mark.parametrize("lengths", list(APART))
def test_keeps_sequences_apart(d, mask, lengths, route):
    """NaN in the middle sequence's q, k, v and dout: each box that reads past a sequence's end
    brings the next sequence's rows, which must not reach the first or the last sequence's
    gradients (each against its own reference; causal bottom-right; a window, whose key blocks
    start inside the sequence), and the 30 rows after the last sequence stay 0."""
    causal, window = APART_MASKS[mask]
    torch.manual_seed(0)
    heads_q, heads_kv = 4, 2
    cu_q, cu_k = APART[lengths]
    rows_q, rows_k = cu_q[-1] + 30, cu_k[-1] + 30
    q, dout = (torch.randn(rows_q, heads_q, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(rows_k, heads_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for t, cu in ((q, cu_q), (dout, cu_q), (k, cu_k), (v, cu_k)):
        t[cu[1]:cu[2]] = float("nan")
    offsets = [torch.tensor(cu, device="cuda", dtype=torch.int32) for cu in (cu_q, cu_k)]
    packed = dict(cu_seqlens_q=offsets[0], cu_seqlens_k=offsets[1], max_seqlen_q=150, max_seqlen_k=150)
    options = dict(is_causal=causal, bottom_right=causal, window_left=window[0], window_right=window[1])
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, **options, **packed)
    dq, dk, dv, _ = torch.ops.cuflash_attn.bwd(dout, q, k, v, out, lse, **options,
                                               deterministic=route[0] != "atomic", **packed)
    for b in (0, 2):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        seq = [t[s].transpose(0, 1)[None] for t, s in ((q, sq), (k, sk), (v, sk), (dout, sq))]
        ref_options = {"causal": causal, "bottom_right": causal, "window": window}
        ref = reference_grads(*seq, torch.float64, ref_options, None)
        pt = reference_grads(*seq, torch.bfloat16, ref_options, None)
        got = (out[sq].transpose(0, 1)[None], lse[:, sq][None], dq[sq].transpose(0, 1)[None],
               dk[sk].transpose(0, 1)[None], dv[sk].transpose(0, 1)[None])
        compare(torch.bfloat16, got, ref, pt)
    for name, grad, end in (("dq", dq, cu_q[-1]), ("dk", dk, cu_k[-1]), ("dv", dv, cu_k[-1])):
        assert torch.all(grad[end:] == 0), f"{name}: the rows after the last sequence"


@pytest.mark.parametrize("d", [64, 128, 256])
def test_ordered_is_reproducible(d, monkeypatch):
    """The fused kernel's ordered dQ adds over more tiles than SMs (sequences of every length up
    to 1000), bitwise the same in three runs; the zeros a part adds past its sequence's end to the
    next one's rows change nothing."""
    monkeypatch.setenv("CUFLASH_SM90", SM90_DEFAULT_PARTS)
    monkeypatch.setenv("CUFLASH_BWD_DQ", "ordered")
    torch.manual_seed(0)
    lengths = [1000, 1, 333, 640, 17, 999, 512, 64, 129, 700] * 4
    cu = packed_offsets(lengths)
    q, dout = (torch.randn(sum(lengths), 8, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(sum(lengths), 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    packed = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, None, True, False, **packed)
    backward = lambda: torch.ops.cuflash_attn.bwd(dout, q, k, v, out, lse, None, None, True, False,  # noqa: E731
                                                  deterministic=True, **packed)[:3]
    names = cuda_kernels(backward)
    assert any(fused_backward_kernel(d, wide=wide, ordered=True, packed=True) in names for wide in (False, True)), \
        names  # the fused kernel's ordered adds, not the pair's
    runs = [backward() for _ in range(3)]
    for again in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], again))


@pytest.mark.parametrize("dq", ["ordered", "atomic"])
@pytest.mark.parametrize("causal", [False, True])
def test_features_at_256(dq, causal, monkeypatch):
    """Softcap, ALiBi and dropout (the "bwdfeatures" part) over packed sequences on head dim 256's
    fused kernel, both dQ orders: the kernel the profiler shows, then the reference."""
    monkeypatch.setenv("CUFLASH_SM90", SM90_DEFAULT_PARTS)
    monkeypatch.setenv("CUFLASH_BWD_DQ", dq)
    names = cuda_kernels(lambda: check_varlen("cuda", torch.bfloat16, [70, 0, 161, 300], [90, 12, 0, 257], 4, 2, 256,
                                              causal=causal, bottom_right=causal, softcap=10.0, alibi="batch",
                                              dropout_p=0.1))
    assert fused_backward_kernel(256, ordered=dq == "ordered", packed=True, features=True) in names, names


@pytest.mark.parametrize("d", [64, 128, 256])
def test_each_sequence_as_if_alone(d, monkeypatch):
    """The ordered route's gradients of each packed sequence bitwise equal to the same kernel's on
    that sequence alone (the packed forward's out and lse, as a batch of one in the packed rows'
    strides): a box that read or wrote another sequence's rows, or an add of that sequence's dQ
    past its end that was not exactly zero, shows here whatever the timing (64-query steps forced
    at head dim 64, so that both calls take the same tiles)."""
    monkeypatch.setenv("CUFLASH_SM90", SM90_DEFAULT_PARTS)
    monkeypatch.setenv("CUFLASH_BWD_DQ", "ordered")
    monkeypatch.setenv("CUFLASH_BWD_FUSED_TILE", "narrow")
    # No K/V head copies: the batch of one would take them (GQA, causal), the packed call cannot.
    monkeypatch.setenv("CUFLASH_BWD_KV_SPLITS", "1")
    torch.manual_seed(0)
    lengths = [79, 200, 0, 161, 64, 1]
    cu = packed_offsets(lengths)
    q, dout = (torch.randn(sum(lengths), 4, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(sum(lengths), 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    packed = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, None, True, True, **packed)
    grads = torch.ops.cuflash_attn.bwd(dout, q, k, v, out, lse, None, None, True, True, deterministic=True,
                                       **packed)[:3]
    assert fused_backward_kernel(d, ordered=True, packed=True) in cuda_kernels(
        lambda: torch.ops.cuflash_attn.bwd(dout, q, k, v, out, lse, None, None, True, True, deterministic=True,
                                           **packed))
    for b, length in enumerate(lengths):
        if length == 0:
            continue
        rows = slice(cu[b].item(), cu[b + 1].item())
        alone = [t[rows].transpose(0, 1)[None] for t in (dout, q, k, v, out)]  # [1, H, N, D] views
        got = torch.ops.cuflash_attn.bwd(*alone, lse[:, rows][None].contiguous(), None, None, True, True,
                                         deterministic=True)[:3]
        for name, mine, single in zip(("dq", "dk", "dv"), grads, got):
            assert torch.equal(mine[rows], single[0].transpose(0, 1)), f"sequence {b} (length {length}): {name}"


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("splits", ["auto", "1", "4"])
def test_gqa_copies(d, splits, monkeypatch):
    """GQA under a causal mask, packed: the fused kernel over CUFLASH_BWD_KV_SPLITS's copies of each
    K/V head, then torch's sum of them (reduce_kernel; "auto": the rule's, 8 on so few tiles);
    against the float64 reference over sequences that end inside a box, with empty ones; the rows
    after the last sequence 0 (the copies' zeroed as dk's are). The fused kernel forced
    ("ordered"): on its own the rule takes the pair, which sees no copies, at head dim 128 on
    sequences this short (prefers_fused_backward; H100 2026-12-07)."""
    monkeypatch.setenv("CUFLASH_SM90", SM90_DEFAULT_PARTS)
    monkeypatch.setenv("CUFLASH_BWD_DQ", "ordered")
    monkeypatch.setenv("CUFLASH_BWD_KV_SPLITS", splits)
    lens_q, lens_k = [70, 0, 129, 300], [90, 12, 0, 257]
    torch.manual_seed(0)
    cu_q, cu_k = packed_offsets(lens_q), packed_offsets(lens_k)
    q = torch.randn(sum(lens_q) + 30, 8, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(sum(lens_k) + 30, 1, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    out, _ = torch.ops.cuflash_attn.fwd(q, k, v, None, True, True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                        max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    dout = torch.randn_like(out)
    names = cuda_kernels(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    assert ("reduce_kernel" in names) == (splits != "1"), names
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, grad, end in zip(("dq", "dk", "dv"), grads, (sum(lens_q), sum(lens_k), sum(lens_k))):
        assert torch.all(grad[end:] == 0), f"{name}: the rows after the last sequence"
    check_varlen("cuda", torch.bfloat16, lens_q, lens_k, 8, 1, d, causal=True, bottom_right=True)
