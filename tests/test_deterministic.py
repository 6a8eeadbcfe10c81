"""The deterministic option (the backward's): True (the default of torch.ops.cuflash_attn and
flash_attention) keeps every gradient bitwise reproducible; False (flash_attn's default) lets the
backward add dq up with atomics. Both run the fused warp-specialized kernel where it is faster
than the pair of kernels (on an sm_90a build on a compute capability 9.0 GPU, plain 16-bit
attention at head-dim buckets 64, 128 and 256, at 128 from 512 keys seen by the middle query row):
True makes it add each query block's dq shares in a fixed order, False with atomics. Elsewhere,
and under torch.use_deterministic_algorithms(True), False changes nothing."""
import pytest
import torch

from conftest import DEVICES, HAS_CUDA, IS_SM90, cuda_kernels, fused_backward_kernel
from reference import LOW_PRECISION, LOW_PRECISION_IDS
from test_features import check_dense

import cuflash_attn
from cuflash_attn.flash_attn_interface import flash_attn_func


@pytest.fixture(autouse=True)
def default_switches(monkeypatch):
    """The choice under test is the option's, not the switches'."""
    monkeypatch.delenv("CUFLASH_BWD_DQ", raising=False)
    monkeypatch.delenv("CUFLASH_SM90", raising=False)
    monkeypatch.delenv("CUFLASH_BWD_FUSED_TILE", raising=False)


def grads(q, k, v, **options):
    out = cuflash_attn.flash_attention(q, k, v, **options)
    return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


def inputs(device, dtype, n, d, heads=2):
    torch.manual_seed(0)
    return [torch.randn(1, heads, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("device", DEVICES)
def test_false_is_accepted_and_true_is_bitwise_reproducible(device):
    q, k, v = inputs(device, torch.float32 if device == "cpu" else torch.bfloat16, 100, 64)
    first, again = grads(q, k, v, causal=True), grads(q, k, v, causal=True, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    loose = grads(q, k, v, causal=True, deterministic=False)
    if device == "cpu":  # no atomics on the CPU
        assert all(torch.equal(a, b) for a, b in zip(first, loose))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [40, 64, 128, 256])
@pytest.mark.parametrize("nq,nk", [(77, 200), (1100, 1300), (1300, 1100)])
@pytest.mark.parametrize("causal", [False, True])
def test_false_matches_reference(dtype, d, nq, nk, causal):
    """The same accuracy rule as the deterministic path; GQA (a key block adds to four query
    heads' dq), bottom-right causal."""
    check_dense("cuda", dtype, 2, 8, 2, nq, nk, d, causal=causal, bottom_right=True, deterministic=False)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128])
def test_false_matches_reference_long_causal_rows(dtype, d):
    """Causal rows long enough for the fused kernel at D=128 too (the middle row sees 1200 keys)."""
    check_dense("cuda", dtype, 1, 4, 2, 2200, 2300, d, causal=True, bottom_right=True, deterministic=False)


@pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("d,n,causal,fused", [(64, 100, False, True), (128, 100, False, False),
                                              (128, 2048, False, True), (128, 2048, True, True),
                                              (128, 512, False, True), (128, 1024, True, True),
                                              (128, 512, True, False), (256, 2048, False, True),
                                              (256, 1024, True, True)])
def test_which_kernel(d, n, causal, fused):
    q, k, v = inputs("cuda", torch.bfloat16, n, d)
    for deterministic in (False, True):
        names = cuda_kernels(lambda: grads(q, k, v, causal=causal, deterministic=deterministic))
        assert (fused_backward_kernel(d, ordered=deterministic) in names) == fused, names
        assert fused_backward_kernel(d, ordered=not deterministic) not in names, names
        assert ("flash_bwd_dq_convert_kernel" in names) == fused, names


@pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")
def test_torch_deterministic_mode_wins():
    q, k, v = inputs("cuda", torch.bfloat16, 300, 64)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        names = cuda_kernels(lambda: grads(q, k, v, deterministic=False))
    finally:
        torch.use_deterministic_algorithms(False)
    assert fused_backward_kernel(64) not in names and fused_backward_kernel(64, ordered=True) in names, names


@pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")
def test_inputs_tma_cannot_address_keep_the_pair():
    """k and v broadcast over the heads (zero stride): no tensor map, so no fused kernel; the
    one-kernel cp.async path would be slower than the deterministic pair, which runs instead."""
    q, k, v = inputs("cuda", torch.bfloat16, 300, 64)
    k1, v1 = (t[:, :1].detach().expand(-1, 2, -1, -1).requires_grad_() for t in (k, v))
    for deterministic in (False, True):
        names = cuda_kernels(lambda: grads(q, k1, v1, deterministic=deterministic))
        assert "flash_bwd_dkdv_sm90_tma_kernel" not in names and "flash_bwd_dq_convert_kernel" not in names, names


@pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")
def test_flash_attn_default_is_not_deterministic():
    """flash_attn_func's deterministic=False (its default) takes the fused kernel's atomics; True
    its ordered adds."""
    q, k, v = (t.transpose(1, 2) for t in inputs("cuda", torch.bfloat16, 300, 64))

    def run(**kw):
        out = flash_attn_func(q, k, v, causal=True, **kw)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    assert fused_backward_kernel(64) in cuda_kernels(run)
    assert fused_backward_kernel(64, ordered=True) in cuda_kernels(lambda: run(deterministic=True))


# Ordered adds (deterministic backwards where the fused kernel is faster; everywhere it runs under
# CUFLASH_BWD_DQ=ordered): each query block's dq shares in one order (key blocks from the last
# down, each waiting for its turn on a counter), reproducible bit for bit.
ORDERED_STEPS = [(64, False), (64, True), (128, False), (256, False)]
ORDERED_STEP_IDS = ["d64", "d64_wide", "d128", "d256"]


@pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("d,wide", ORDERED_STEPS, ids=ORDERED_STEP_IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_ordered_adds_are_bitwise_reproducible(d, wide, causal, monkeypatch):
    """GQA (a key block adds to four query heads), 14 key blocks a query block, top-left causal
    with more keys than queries (key blocks that see no query); five backwards agree bit for bit."""
    monkeypatch.setenv("CUFLASH_BWD_DQ", "ordered")
    monkeypatch.setenv("CUFLASH_BWD_FUSED_TILE", "wide" if wide else "narrow")
    torch.manual_seed(0)
    q = torch.randn(2, 8, 1500, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 1700, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    names = cuda_kernels(lambda: grads(q, k, v, causal=causal))
    assert fused_backward_kernel(d, wide=wide, ordered=True) in names, names
    first = grads(q, k, v, causal=causal)
    for _ in range(4):
        again = grads(q, k, v, causal=causal)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d,wide", ORDERED_STEPS + [(40, False), (240, False)],
                         ids=ORDERED_STEP_IDS + ["d40", "d240"])
@pytest.mark.parametrize("nq,nk", [(77, 200), (1100, 1300), (1300, 1100)])
@pytest.mark.parametrize("causal,bottom_right", [(False, False), (True, False), (True, True)],
                         ids=["none", "top_left", "bottom_right"])
def test_ordered_adds_match_reference(dtype, d, wide, nq, nk, causal, bottom_right, monkeypatch):
    """The accuracy rule of every backward, under each mask's order of the key blocks."""
    monkeypatch.setenv("CUFLASH_BWD_DQ", "ordered")
    monkeypatch.setenv("CUFLASH_BWD_FUSED_TILE", "wide" if wide else "narrow")
    check_dense("cuda", dtype, 2, 8, 2, nq, nk, d, causal=causal, bottom_right=bottom_right)


@pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("d,wide", ORDERED_STEPS, ids=ORDERED_STEP_IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_ordered_adds_with_more_key_blocks_than_sms(d, wide, causal, monkeypatch):
    """One head of 40000 keys, with and without a causal mask: 313 key blocks, more CTAs than an
    H100 holds at once, each waiting for other key blocks' turns (no deadlock: a CTA only waits
    for CTAs that took their tiles before it). Checked against the pair of kernels and for
    reproducibility."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 40000, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    monkeypatch.setenv("CUFLASH_BWD_DQ", "separate")
    pair = grads(q, k, v, causal=causal)
    monkeypatch.setenv("CUFLASH_BWD_DQ", "ordered")
    monkeypatch.setenv("CUFLASH_BWD_FUSED_TILE", "wide" if wide else "narrow")
    first, again = grads(q, k, v, causal=causal), grads(q, k, v, causal=causal)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for ours, theirs in zip(first, pair):
        assert (ours.float() - theirs.float()).abs().max() <= 1e-2 * theirs.float().abs().max()


@pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("d,wide", ORDERED_STEPS, ids=ORDERED_STEP_IDS)
@pytest.mark.parametrize("nq,nk,window", [(300, 60, (16, 0)), (300, 30, (16, 0)), (64, 1050, (20, 20)),
                                          (1000, 1050, (30, 5))],
                         ids=["keys_one_consumer", "keys_first_rows", "key_blocks_no_query", "window"])
def test_persistent_ordered_tiles_without_work(d, wide, nq, nk, window, monkeypatch):
    """The persistent ordered kernel over tiles that leave a role idle: 60 keys (at head dims 64
    and 128 the second consumer's 64 rows hold none: it stores nothing; at 256, 80-key tiles, it
    has 20 of its 40) and 30 (at 256 too the second consumer's keys all past the end), a window
    that leaves most key blocks without a query (tiles of no step), and 1050 keys (26 in the last
    block, 10 at 256). 48 heads a side, so some CTAs take several tiles. Against float64, and bit
    for bit over three backwards."""
    monkeypatch.setenv("CUFLASH_BWD_DQ", "ordered")
    monkeypatch.setenv("CUFLASH_BWD_FUSED_TILE", "wide" if wide else "narrow")
    check_dense("cuda", torch.bfloat16, 2, 24, 8, nq, nk, d, window=window)
    torch.manual_seed(0)
    q = torch.randn(2, 24, nq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 8, nk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    names = cuda_kernels(lambda: grads(q, k, v, window_size=window))
    assert fused_backward_kernel(d, wide=wide, ordered=True) in names, names
    first = grads(q, k, v, window_size=window)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, grads(q, k, v, window_size=window)))


@pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")
def test_ordered_switch_leaves_other_paths_alone(monkeypatch):
    """Where the fused kernel cannot run (head dim 224, k and v broadcast over the heads),
    CUFLASH_BWD_DQ=ordered keeps the pair; where it runs, it orders the adds of
    deterministic=False calls too."""
    monkeypatch.setenv("CUFLASH_BWD_DQ", "ordered")
    q, k, v = inputs("cuda", torch.bfloat16, 300, 224)
    names = cuda_kernels(lambda: grads(q, k, v))
    assert "flash_bwd_dq_convert_kernel" not in names, names
    q, k, v = inputs("cuda", torch.bfloat16, 300, 64)
    k1, v1 = (t[:, :1].detach().expand(-1, 2, -1, -1).requires_grad_() for t in (k, v))
    names = cuda_kernels(lambda: grads(q, k1, v1))
    assert "flash_bwd_dq_convert_kernel" not in names, names
    names = cuda_kernels(lambda: grads(q, k, v, deterministic=False))
    assert fused_backward_kernel(64, ordered=True) in names, names
