"""The edge-case table of shared/TESTING.md."""
import math

import pytest
import torch

import cuflash_attn
from conftest import DEVICES

ops = torch.ops.cuflash_attn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fully_masked_rows(device, dtype):
    """Bottom-right causal with nq > nk: the first nq - nk rows see no key. Their output is 0,
    their lse -inf (documented), their gradients 0, and nothing is NaN."""
    nq, nk = 70, 20
    q, k, v = (torch.randn(1, 2, n, 64, device=device, dtype=dtype, requires_grad=True) for n in (nq, nk, nk))
    out, lse = ops.fwd(q, k, v, None, True, True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    empty = nq - nk
    assert torch.all(out[:, :, :empty] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :empty])) and torch.all(torch.isfinite(lse[:, :, empty:]))
    assert torch.all(dq[:, :, :empty] == 0)
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("device", DEVICES)
def test_seqlen_k_zero(device):
    q = torch.randn(2, 3, 5, 32, device=device, requires_grad=True)
    k = torch.randn(2, 3, 0, 32, device=device, requires_grad=True)
    v = torch.randn(2, 3, 0, 32, device=device, requires_grad=True)
    out, lse = cuflash_attn.flash_attention(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_q,shape_k", [((0, 2, 5, 32), (0, 2, 7, 32)), ((2, 2, 0, 32), (2, 2, 7, 32)),
                                             ((2, 0, 5, 32), (2, 0, 7, 32))])
def test_empty_outputs(device, shape_q, shape_k):
    q = torch.randn(shape_q, device=device, requires_grad=True)
    k = torch.randn(shape_k, device=device, requires_grad=True)
    v = torch.randn(shape_k, device=device, requires_grad=True)
    out = cuflash_attn.flash_attention(q, k, v)
    assert out.shape == q.shape
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,value", [(torch.bfloat16, 133120.0), (torch.float16, 256.0)])
def test_huge_equal_inputs_are_finite(device, dtype, value):
    q = torch.full((1, 2, 100, 64), value, device=device, dtype=dtype, requires_grad=True)
    out = cuflash_attn.flash_attention(q, q, q, causal=True)
    assert torch.isfinite(out).all()
    assert torch.all(out == value)
    (dq,) = torch.autograd.grad(out, (q,), torch.ones_like(out))
    assert torch.isfinite(dq).all()


@pytest.mark.parametrize("device", DEVICES)
def test_large_magnitude_fp16_is_finite(device):
    q, k, v = (torch.randn(1, 2, 128, 64, device=device).mul(1e4).half() for _ in range(3))
    out = cuflash_attn.flash_attention(q, k, v)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_uniform_attention_over_50k_keys(device, dtype):
    nk = 50_000
    q = torch.zeros(1, 1, 4, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.zeros(1, 1, nk, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 1, nk, 64, device=device, dtype=dtype, requires_grad=True)
    out = cuflash_attn.flash_attention(q, k, v)
    mean = v.double().mean(dim=2, keepdim=True).expand_as(out)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert (out.double() - mean).abs().max().item() < tol
    dq, dk, _ = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    # dq = sum_j p_j (dout . v_j - delta) k_j = 0 since k = 0; dk_j = p_j (...) q = 0 since q = 0.
    assert torch.all(dq == 0) and torch.all(dk == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_propagates_to_affected_rows_only(device, dtype):
    """A NaN in key 40 reaches the causal rows that attend to it (40 and after) and no other."""
    q, k, v = (torch.randn(1, 1, 100, 64, device=device, dtype=dtype) for _ in range(3))
    k[0, 0, 40, 3] = math.nan
    out = cuflash_attn.flash_attention(q, k, v, causal=True)
    rows_with_nan = torch.isnan(out[0, 0]).any(dim=-1)
    assert not rows_with_nan[:40].any() and rows_with_nan[40:].all()


@pytest.mark.parametrize("device", DEVICES)
def test_default_scale_and_explicit_scale(device):
    q, k, v = (torch.randn(1, 2, 30, 48, device=device, dtype=torch.float64) for _ in range(3))
    a = cuflash_attn.flash_attention(q, k, v)
    b = cuflash_attn.flash_attention(q, k, v, scale=1 / math.sqrt(48))
    assert torch.equal(a, b)
    c = cuflash_attn.flash_attention(q, k, v, scale=-0.7)  # a negative scale is valid
    ref = torch.softmax(-0.7 * q @ k.transpose(-1, -2), -1) @ v
    assert (c - ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_score_gives_nan_lse(device, dtype):
    q, k, v = (torch.randn(1, 1, 100, 64, device=device, dtype=dtype) for _ in range(3))
    k[0, 0, 40, 3] = math.nan
    _, lse = cuflash_attn.flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.isnan(lse[0, 0, 40:]).all() and torch.isfinite(lse[0, 0, :40]).all()
