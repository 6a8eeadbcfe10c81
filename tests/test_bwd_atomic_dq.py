"""CUFLASH_BWD_DQ=atomic: the tensor-core backward in one kernel, which adds dQ up in fp32: the
dK/dV one with atomics (flash_bwd_kernel.cuh; on Hopper flash_bwd_sm90.cuh's, for plain attention
at head dims up to 128) or, on Hopper, the fused warp-specialized kernels with TMA reduce-adds
(head-dim buckets 64, 128 and 256). The same accuracy rule as the deterministic path, over every
head-dim bucket and the features; the profiler shows which kernels ran."""
import pytest
import torch

import cuflash_attn
from conftest import (HAS_CUDA, IS_SM90, cuda_kernels, fused_backward_kernel, skip_outside_head_dim_bucket,
                      sm90_parts_without)
from reference import LOW_PRECISION, LOW_PRECISION_IDS
from test_features import check_dense, check_varlen

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


CPASYNC_PARTS = sm90_parts_without("bwdws")


@pytest.fixture(params=[CPASYNC_PARTS, "", "wide"], ids=["cpasync", "ws", "wide"], autouse=True)
def atomic_dq(request, monkeypatch):
    """Every test under the cp.async dK/dV kernel with dQ (bwdws left out), under the defaults
    (the fused warp-specialized kernels at head-dim buckets 64, 128 and 256; at 64 its 64-query
    steps on the tests' short columns), and with that kernel's 128-query steps at head dim 64 at every length
    (CUFLASH_BWD_FUSED_TILE=wide)."""
    monkeypatch.setenv("CUFLASH_BWD_DQ", "atomic")  # read by the op at every call
    monkeypatch.setenv("CUFLASH_SM90", "" if request.param == "wide" else request.param)
    if request.param == "wide":
        skip_outside_head_dim_bucket(request, 64, "the wide steps are head dim 64's (the ws mode covers the others)")
        monkeypatch.setenv("CUFLASH_BWD_FUSED_TILE", "wide")
    return request.param


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [32, 59, 64, 96, 128, 160, 192, 224, 240, 256])
@pytest.mark.parametrize("nq,nk", [(1, 1), (77, 200), (200, 77), (257, 513)])
@pytest.mark.parametrize("causal,bottom_right", [(False, False), (True, False), (True, True)],
                         ids=["none", "top_left", "bottom_right"])
def test_matches_reference(dtype, d, nq, nk, causal, bottom_right):
    check_dense("cuda", dtype, 2, 2, 2, nq, nk, d, causal=causal, bottom_right=bottom_right)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_features(dtype, d):
    """GQA (each key block adds to dQ of 4 query heads), a window, softcap, ALiBi and dropout."""
    check_dense("cuda", dtype, 2, 8, 2, 150, 300, d, causal=True, bottom_right=True, window=(60, -1),
                softcap=20.0, alibi="batch", dropout_p=0.2)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_varlen(dtype):
    check_varlen("cuda", dtype, [70, 0, 129, 300], [90, 12, 0, 257], 4, 2, 128, causal=True, bottom_right=True)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_many_blocks(dtype, d):
    """Many key blocks adding to the same dQ rows (each CTA starting at its own query block), GQA,
    both causal alignments, ragged blocks."""
    check_dense("cuda", dtype, 2, 8, 2, 1000, 1100, d)
    check_dense("cuda", dtype, 2, 4, 4, 777, 1300, d, causal=True, bottom_right=True)
    check_dense("cuda", dtype, 1, 4, 1, 1300, 777, d, causal=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask(kind):
    """A float mask's gradient needs the dQ kernel (it writes the score gradients): that case
    runs the deterministic path."""
    check_dense("cuda", torch.bfloat16, 2, 4, 2, 130, 77, 64, attn_mask=(kind, "B1LS"))


@pytest.mark.parametrize("route", ["atomic", "ordered"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_dq_buffer_starts_from_garbage(route, d, causal, monkeypatch, atomic_dq):
    """The fp32 dQ buffer comes from torch.empty and is zeroed by the backward's first kernel
    (flash_bwd_delta_kernel): carved from memory full of NaN, it gives the pair of kernels'
    gradients. (The ordered route runs where the fused kernel does, else the pair.)"""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 700, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 900, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)

    def grads():
        out = cuflash_attn.flash_attention(q, k, v, causal=causal)
        return torch.autograd.grad(out, (q, k, v), dout)
    monkeypatch.setenv("CUFLASH_BWD_DQ", "separate")
    expected = grads()
    monkeypatch.setenv("CUFLASH_BWD_DQ", route)
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the cache's only free block is the NaN one below
        torch.full((64 << 20,), float("nan"), device="cuda")  # 256 MB, freed at once
        ours = grads()
        for name, a, b in zip("qkv", ours, expected):
            assert torch.isfinite(a).all(), f"d{name} has non-finite values"
            assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max(), name


def test_path_taken(monkeypatch, atomic_dq):
    q, k, v = (torch.randn(1, 2, 100, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out, _ = torch.ops.cuflash_attn.fwd(q, k, v, None, False, False)
    names = cuda_kernels(lambda: torch.autograd.grad(out, (q, k, v), torch.ones_like(out), retain_graph=True))
    assert "flash_bwd_dq_convert_kernel" in names and "flash_bwd_dq_kernel" not in names, names
    if IS_SM90:  # the Hopper dK/dV kernel with dQ, where the build has it (sm_90a)
        expected = {"": fused_backward_kernel(64), "wide": fused_backward_kernel(64, wide=True),
                    CPASYNC_PARTS: "flash_bwd_dkdv_sm90_kernel<__nv_bfloat16, 64, true, true, true>"}[atomic_dq]
        assert expected in names, names
        assert "flash_bwd_dq_sm90_kernel" not in names, names
    monkeypatch.delenv("CUFLASH_BWD_DQ")  # deterministic: ordered adds in the fused kernel, else the pair
    names = cuda_kernels(lambda: torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    if IS_SM90 and atomic_dq != CPASYNC_PARTS:
        assert fused_backward_kernel(64, wide=atomic_dq == "wide", ordered=True) in names, names
    else:
        dq_kernel = any(f"{kernel}<" in names for kernel in ("flash_bwd_dq_kernel", "flash_bwd_dq_sm90_kernel"))
        assert dq_kernel and "flash_bwd_dq_convert_kernel" not in names, names


@pytest.mark.skipif(not IS_SM90, reason="the fused warp-specialized kernel is sm_90a's")
@pytest.mark.parametrize("switch,n,wide", [("", 1000, False), ("", 1024, True), ("narrow", 4096, False),
                                           ("wide", 100, True)])
def test_fused_steps_by_length(switch, n, wide, monkeypatch, atomic_dq):
    """The fused head-dim-64 kernel takes 128-query steps from 1024 keys a middle row
    (fused_wide_steps_pay), 64 below; CUFLASH_BWD_FUSED_TILE picks one at every length."""
    if atomic_dq != "":
        pytest.skip("the defaults' kernel; the mode sets its own switches")
    monkeypatch.setenv("CUFLASH_BWD_FUSED_TILE", switch)
    q, k, v = (torch.randn(1, 1, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out, _ = torch.ops.cuflash_attn.fwd(q, k, v, None, False, False)
    names = cuda_kernels(lambda: torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    assert fused_backward_kernel(64, wide=wide) in names, names
