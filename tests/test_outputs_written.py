"""Every element of every output is written by the kernels: with torch's deterministic mode
filling uninitialized memory (torch.empty's, which the op's outputs and scratch come from) with
NaN, finite inputs must give no NaN anywhere. Covers the Hopper kernels whose outputs leave by
TMA store (the forward's, and the persistent deterministic backward's dK and dV), where
compute-sanitizer's initcheck reported reads of unwritten memory that a NaN-free result could
not tell from its own limits, and the KV-cache and split-KV paths, whose outputs come from
several kernels, and packed sequences, whose rows no sequence covers only a small kernel
writes (fill_packed_gaps)."""
import pytest
import torch

from conftest import ALL_DTYPES, HAS_CUDA, IS_SM90, sm90_parts_without
from reference import LOW_PRECISION, LOW_PRECISION_IDS

import cuflash_attn
from cuflash_attn.flash_attn_interface import flash_attn_with_kvcache

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# CUFLASH_SM90 choices: the defaults, and the TMA forward over KV caches with and without splits
# (the sm_90 parts that are not defaults).
KVCACHE_PARTS = [None,
                 pytest.param("tma,persistent,kvcache", marks=pytest.mark.skipif(not IS_SM90, reason="sm_90 only")),
                 pytest.param("tma,kvcache,splits", marks=pytest.mark.skipif(not IS_SM90, reason="sm_90 only"))]

# Packed sequences: the defaults (on sm_90, the TMA forward and backward), the cp.async Hopper
# forward (CUFLASH_SM90's default parts less "varlen") and backward (less "bwdvarlen").
PACKED_PARTS = [None] + [pytest.param(parts, marks=pytest.mark.skipif(not IS_SM90, reason="sm_90 only"))
                         for parts in (sm90_parts_without("varlen"), sm90_parts_without("bwdvarlen"))]


@pytest.fixture(autouse=True)
def nan_filled_empty():
    """torch.empty returns NaN-filled memory for the test's duration (warn_only: torch's own
    nondeterministic ops stay allowed)."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def assert_no_nan(**tensors):
    for name, t in tensors.items():
        assert not torch.isnan(t).any(), f"{name}: NaN, an element no kernel wrote"


def test_fill_is_in_effect():
    """The premise: torch.empty's memory is NaN here (otherwise the tests below prove nothing)."""
    assert torch.isnan(torch.empty(1024, device="cuda", dtype=torch.bfloat16)).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("n", [300, 1000])  # short rows: the persistent forward; longer: the wide tile
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 20.0])  # the features kernels
def test_forward_and_backward_outputs(dtype, d, n, causal, softcap):
    """Out, lse, dq, dk, dv; grouped heads (dk, dv summed over the group); the deterministic
    backward (the persistent kernel at head dim 64) and the unordered one."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, n, d, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, n + 37, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    for deterministic in (True, False):
        out, lse = cuflash_attn.flash_attention(q, k, v, causal=causal, softcap=softcap, return_lse=True,
                                                deterministic=deterministic)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert_no_nan(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


@pytest.mark.skipif(not IS_SM90, reason="sm_90 only")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_features_backward_outputs(d, causal):
    """The fused TMA backward with softcap (CUFLASH_SM90's "bwdfeatures" part, a default; its
    ordered dQ adds, torch's deterministic mode being on here)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 300, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 337, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = cuflash_attn.flash_attention(q, k, v, causal=causal, softcap=20.0)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert_no_nan(out=out, dq=dq, dk=dk, dv=dv)


@pytest.mark.parametrize("parts", KVCACHE_PARTS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("tokens,num_splits", [(1, 1), (1, 5), (5, 0), (130, 1)])
def test_kvcache_outputs(parts, d, tokens, num_splits, monkeypatch):
    """Decoding and chunked prefill over a cache whose sequences use fewer keys than it holds
    (cache_seqlens), grouped heads, contiguous."""
    if parts is not None:
        monkeypatch.setenv("CUFLASH_SM90", parts)
    torch.manual_seed(0)
    batch, heads_q, heads_kv, cache_keys = 3, 8, 2, 700
    q = torch.randn(batch, tokens, heads_q, d, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(batch, cache_keys, heads_kv, d, device="cuda", dtype=torch.bfloat16)
                        for _ in range(2))
    used = torch.tensor([cache_keys - 37 * b for b in range(batch)], dtype=torch.int32, device="cuda")
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=used, num_splits=num_splits,
                                       causal=tokens > 1, return_softmax_lse=True)
    assert_no_nan(out=out, lse=lse)


def packed_rows(offsets, b, total, max_rows):
    """attention_math.h's packed_rows_of: sequence b's first row and row count, clamped to the
    packed tensor's rows and to the grid's (max_seqlen)."""
    first = min(max(offsets[b], 0), total)
    return first, min(min(max(offsets[b + 1], first), total) - first, max_rows)


@pytest.mark.parametrize("parts", PACKED_PARTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("offsets,max_seqlen", [
    ([0, 100, 250, 300], 150),  # 30 spare rows after the last sequence
    ([20, 20, 120, 300], 128),  # rows before the first; an empty sequence; one longer than max_seqlen
    ([40, 12, 200, 500], 100),  # offsets that go back and past the end (unchecked on CUDA)
], ids=["spare_rows", "gaps", "bad_offsets"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_packed_outputs(parts, dtype, offsets, max_seqlen, num_splits, monkeypatch):
    """Every row no sequence covers reads 0 (lse -inf; dq, dk and dv 0 too), and no other row is
    left unwritten, by the forward (split or not) and the backward (the fused kernel, dQ in order
    or not, and the pair)."""
    if parts is not None:
        monkeypatch.setenv("CUFLASH_SM90", parts)
    torch.manual_seed(0)
    total = 330
    q, k, v, dout = (torch.randn(total, 4, 64, device="cuda", dtype=dtype) for _ in range(4))
    cu = torch.tensor(offsets, device="cuda", dtype=torch.int32)
    packed = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, num_splits=num_splits, **packed)
    covered = torch.zeros(total, dtype=torch.bool, device="cuda")
    for b in range(len(offsets) - 1):
        first, count = packed_rows(offsets, b, total, max_seqlen)
        covered[first:first + count] = True
    assert torch.all(out[~covered] == 0), "a row no sequence covers is not 0"
    assert torch.all(torch.isneginf(lse[:, ~covered])), "a row no sequence covers has lse other than -inf"
    assert_no_nan(out=out[covered], lse=lse[:, covered])
    # The fused backward (dQ added in order, or not) and the pair of kernels.
    for deterministic, dq_route in ((True, ""), (False, ""), (True, "separate")):
        monkeypatch.setenv("CUFLASH_BWD_DQ", dq_route)
        dq, dk, dv, _ = torch.ops.cuflash_attn.bwd(dout, q, k, v, out, lse, deterministic=deterministic, **packed)
        for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
            assert torch.all(grad[~covered] == 0), f"{name}: a row no sequence covers is not 0"
            assert_no_nan(**{name: grad[covered]})
