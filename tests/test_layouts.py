"""Strided inputs: [B, N, H, D] views run without a copy and give an output of that layout;
sliced, misaligned and last-dim-non-contiguous tensors (copied) give the same answers."""
import pytest
import torch

import cuflash_attn
from conftest import DEVICES
from test_accuracy import check_against_reference


def randn(*shape, device, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(device, dtype)


def bnhd(batch, heads, d):
    return lambda n, device, dtype: randn(batch, n, heads, d, device=device, dtype=dtype).transpose(1, 2)


def sliced(batch, heads, d):
    return lambda n, device, dtype: randn(batch + 1, heads * 2, n, d + 16, device=device, dtype=dtype)[
        1:, ::2, :, 8 : 8 + d]


def last_dim_strided(batch, heads, d):
    return lambda n, device, dtype: randn(batch, heads, d, n, device=device, dtype=dtype).transpose(-1, -2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("make", [bnhd, sliced, last_dim_strided])
def test_strided_inputs(device, dtype, make):
    check_against_reference(device, dtype, 2, 3, 77, 130, 64, "top_left", layout=make(2, 3, 64))


@pytest.mark.parametrize("device", DEVICES)
def test_bnhd_view_output_layout_and_no_copy(device):
    q, k, v = (torch.randn(2, 100, 4, 64, device=device, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    out = cuflash_attn.flash_attention(q, k, v)
    assert out.stride() == q.stride(), "the output takes the [B, N, H, D] layout of q"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_misaligned_and_sliced_storage(device, dtype):
    base = torch.randn(3 * 2 * 3 * 50 * 64 + 1, device=device, dtype=dtype)
    q, k, v = (base[1 + i * 2 * 3 * 50 * 64 : 1 + (i + 1) * 2 * 3 * 50 * 64].view(2, 3, 50, 64) for i in range(3))
    ref = cuflash_attn.flash_attention(q.clone(), k.clone(), v.clone(), causal=True)
    got = cuflash_attn.flash_attention(q, k, v, causal=True)
    assert torch.equal(ref, got)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_dout(device):
    q, k, v = (torch.randn(1, 2, 64, 32, device=device, requires_grad=True) for _ in range(3))
    out = cuflash_attn.flash_attention(q, k, v)
    dout = torch.randn(1, 64, 2, 32, device=device).transpose(1, 2)
    g1 = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    g2 = torch.autograd.grad(out, (q, k, v), dout.contiguous())
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
