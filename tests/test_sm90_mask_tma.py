"""CUFLASH_SM90's "masktma" part (a default): the TMA forward's attn_mask tiles staged in
shared memory by the producer's TMA loads (flash_fwd_sm90_tma.cuh's MaskStaging), in a kernel of
their own. The staged route adds each score's bias by the same FFMA as the route that reads the
mask from global memory (the part left out), so their outputs and logsumexps are equal bit for
bit (test_attn_mask.py checks the defaults against the float64 reference): over float and bool masks, every broadcast TMA can
stage (one row for all queries, per head, per batch), tiles at the sequence's edges, causal,
softcap and ALiBi, and each head dim's features tile. CUFLASH_DEBUG's launch line names the
kernel's staged-mask instance (its last flag, kStagedMask) where the mask is staged, and the other
where it cannot be (the keys not contiguous, rows TMA cannot address, head dim 128's wide tile).

The "bwdmasktma" part (a default) stages them in the fused TMA backward too (flash_bwd_sm90_tma.cuh,
kStagedMask: each step's mask tile with its Q and dO, read transposed by ldmatrix or a byte at a
time): its dQ (ordered adds), dK and dV equal those of the global reads (the part left out) bit for bit, over the same masks,
GQA, causal, softcap, ALiBi and dropout, at head dims 64 and 128 (the steps with room for it)."""
import re

import pytest
import torch

from conftest import IS_SM90, SM90_DEFAULT_PARTS, sm90_parts_without
from test_features import MASK_SHAPES, make_mask, make_options

pytestmark = pytest.mark.skipif(not IS_SM90, reason="the TMA forward is sm_90a's")

fwd = torch.ops.cuflash_attn.fwd
# Each kernel's last template flag is kStagedMask: its instance that stages the mask.
LAUNCH = re.compile(r"cuflash_attn: .*flash_fwd_sm90_tma_kernel<[^>]*, (true|false)>")
BWD_LAUNCH = re.compile(r"cuflash_attn: .*flash_bwd_dkdv_sm90_tma_kernel<[^>]*, (true|false)>")


def launched_staged(launch, capfd, what, parts):
    """Whether the one launch of the kernel `launch` matches since capfd was last read (CUFLASH_DEBUG's
    launch lines) is its staged-mask instance."""
    torch.cuda.synchronize()
    staged = [m.group(1) == "true" for m in launch.finditer(capfd.readouterr().err)]
    assert len(staged) == 1, f"one {what} launch expected under {parts}: {staged}"
    return staged[0]


def random_inputs(batch, heads, heads_kv, nq, nk, d, dtype):
    """q, k, v and dout, the same for each route compared."""
    torch.manual_seed(0)
    make = lambda h, n: torch.randn(batch, h, n, d, device="cuda", dtype=dtype)  # noqa: E731
    return make(heads, nq), make(heads_kv, nk), make(heads_kv, nk), make(heads, nq)


def forward(parts, q, k, v, mask, monkeypatch, capfd, **options):
    """(out, lse) under CUFLASH_SM90=parts, and whether the TMA forward's one launch staged the mask."""
    monkeypatch.setenv("CUFLASH_SM90", parts)
    monkeypatch.setenv("CUFLASH_DEBUG", "1")
    capfd.readouterr()
    out, lse = fwd(q, k, v, attn_mask=mask, **options)
    return out, lse, launched_staged(LAUNCH, capfd, "TMA forward", parts)


def every_mask(test):
    """The masks both directions compare staged and read from global memory: each dtype, kind and
    broadcast TMA can stage, causal or not."""
    for name, values, ids in (("causal", [False, True], ["full", "causal"]),
                              ("shape", ["BHLS", "B11S", "1HLS", "LS", "S"], None), ("kind", ["bool", "float"], None),
                              ("dtype", [torch.bfloat16, torch.float16], ["bf16", "fp16"])):
        test = pytest.mark.parametrize(name, values, ids=ids)(test)  # as decorators listed bottom-up
    return test


def unstageable_mask(case):
    """(nq, nk, mask) of a mask TMA cannot stage: keys not contiguous (a transposed view), rows of
    300 bool elements (not a multiple of 16 bytes), or sliced from wider rows (a 16-byte row stride
    but a base 2 bytes past an aligned one)."""
    nq, nk = 130, 300 if case == "unaligned_rows" else 256
    if case == "transposed":
        return nq, nk, make_mask("float", (2, 1, nq, nk), "cuda", torch.bfloat16, transposed=True)
    if case == "unaligned_rows":
        return nq, nk, make_mask("bool", (2, 1, nq, nk), "cuda", torch.bfloat16)
    return nq, nk, make_mask("float", (2, 1, nq, nk + 8), "cuda", torch.bfloat16)[..., 1:nk + 1]


def check_staged(batch, heads, nq, nk, d, dtype, mask, monkeypatch, capfd, staged=True, causal=False, **features):
    q, k, v, _ = random_inputs(batch, heads, heads, nq, nk, d, dtype)
    options, _ = make_options(batch, heads, "cuda", causal=causal, **features)
    mask_before = mask.clone()
    out, lse, ran_staged = forward(sm90_parts_without("masktma"), q, k, v, mask, monkeypatch, capfd, **options)
    out_staged, lse_staged, ran_staged_default = forward(SM90_DEFAULT_PARTS, q, k, v, mask, monkeypatch, capfd,
                                                         **options)
    assert torch.equal(mask, mask_before)
    assert not ran_staged and ran_staged_default == staged
    assert torch.equal(out_staged, out), (out_staged - out).abs().max()
    assert torch.equal(lse_staged, lse)
    assert out.isfinite().any()


@pytest.mark.parametrize("d", [64, 128, 256])
@every_mask
def test_staged_mask_equals_default(d, dtype, kind, shape, causal, monkeypatch, capfd):
    """200 query rows (a partial last tile) over 320 keys (a partial last key block)."""
    batch, heads, nq, nk = 2, 3, 200, 320
    mask = make_mask(kind, MASK_SHAPES[shape](batch, heads, nq, nk), "cuda", dtype)
    check_staged(batch, heads, nq, nk, d, dtype, mask, monkeypatch, capfd, causal=causal)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_staged_mask_with_softcap_and_alibi(d, kind, monkeypatch, capfd):
    mask = make_mask(kind, (2, 1, 150, 256), "cuda", torch.bfloat16)
    check_staged(2, 4, 150, 256, d, torch.bfloat16, mask, monkeypatch, capfd, softcap=30.0, alibi="batch")


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", ["BHLS", "B11S"])
def test_staged_mask_on_wide_tile(kind, shape, monkeypatch, capfd):
    """Head dim 64's wide features tile (three consumers, 192 rows), which long rows take."""
    monkeypatch.setenv("CUFLASH_FWD_TILE", "wide")
    mask = make_mask(kind, MASK_SHAPES[shape](2, 2, 400, 1104), "cuda", torch.bfloat16)
    check_staged(2, 2, 400, 1104, 64, torch.bfloat16, mask, monkeypatch, capfd, causal=True)


def test_head_dim_128_wide_tile_reads_from_global_memory(monkeypatch, capfd):
    """No room for the staging beside its 192-key blocks: the global reads, the same results."""
    monkeypatch.setenv("CUFLASH_FWD_TILE", "wide")
    mask = make_mask("float", (2, 2, 200, 384), "cuda", torch.bfloat16)
    check_staged(2, 2, 200, 384, 128, torch.bfloat16, mask, monkeypatch, capfd, staged=False)


@pytest.mark.parametrize("case", ["transposed", "unaligned_rows", "sliced"])
def test_masks_tma_cannot_stage(case, monkeypatch, capfd):
    """unstageable_mask's three: the global reads, the same results."""
    nq, nk, mask = unstageable_mask(case)
    check_staged(2, 2, nq, nk, 64, torch.bfloat16, mask, monkeypatch, capfd, staged=False)


def gradients(parts, q, k, v, mask, dout, monkeypatch, capfd, **options):
    """(dq, dk, dv) under CUFLASH_SM90=parts with dQ's ordered adds, and whether the fused
    backward's one launch staged the mask."""
    monkeypatch.setenv("CUFLASH_SM90", parts)
    monkeypatch.setenv("CUFLASH_BWD_DQ", "ordered")
    monkeypatch.setenv("CUFLASH_DEBUG", "1")
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, _ = fwd(*inputs, attn_mask=mask, **options)
    capfd.readouterr()
    grads = torch.autograd.grad(out, inputs, dout)
    return grads, launched_staged(BWD_LAUNCH, capfd, "fused backward", parts)


def check_staged_backward(batch, heads, heads_kv, nq, nk, d, dtype, mask, monkeypatch, capfd, staged=True,
                          causal=False, **features):
    q, k, v, dout = random_inputs(batch, heads, heads_kv, nq, nk, d, dtype)
    options, _ = make_options(batch, heads, "cuda", causal=causal, **features)
    mask_before = mask.clone()
    grads, ran_staged = gradients(sm90_parts_without("bwdmasktma"), q, k, v, mask, dout, monkeypatch, capfd,
                                  **options)
    grads_staged, ran_staged_default = gradients(SM90_DEFAULT_PARTS, q, k, v, mask, dout, monkeypatch, capfd,
                                                 **options)
    assert torch.equal(mask, mask_before)
    assert not ran_staged and ran_staged_default == staged
    for name, got, want in zip(("dq", "dk", "dv"), grads_staged, grads):
        assert torch.equal(got, want), (name, (got - want).abs().max())
    assert grads[0].isfinite().all() and grads[0].abs().sum() > 0


@pytest.mark.parametrize("d", [64, 128])
@every_mask
def test_staged_mask_backward_equals_default(d, dtype, kind, shape, causal, monkeypatch, capfd):
    """200 queries (a partial last step) over 320 keys (a partial last key block), 4 heads over 2."""
    batch, heads, nq, nk = 2, 4, 200, 320
    mask = make_mask(kind, MASK_SHAPES[shape](batch, heads, nq, nk), "cuda", dtype)
    check_staged_backward(batch, heads, 2, nq, nk, d, dtype, mask, monkeypatch, capfd, causal=causal)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_staged_mask_backward_with_the_other_features(d, kind, monkeypatch, capfd):
    """softcap, ALiBi and dropout beside the mask (each step's scores, P z and dS)."""
    mask = make_mask(kind, (2, 1, 150, 256), "cuda", torch.bfloat16)
    check_staged_backward(2, 4, 4, 150, 256, d, torch.bfloat16, mask, monkeypatch, capfd, causal=True,
                          bottom_right=True, softcap=30.0, alibi="batch", dropout_p=0.1)


@pytest.mark.parametrize("case", ["transposed", "unaligned_rows"])
def test_masks_the_backward_cannot_stage(case, monkeypatch, capfd):
    """Keys not contiguous, and bool rows of 300 elements (unstageable_mask's): the global reads, the
    same gradients."""
    nq, nk, mask = unstageable_mask(case)
    check_staged_backward(2, 2, 2, nq, nk, 64, torch.bfloat16, mask, monkeypatch, capfd, staged=False)
