"""The Hopper backward, on by default (CUFLASH_SM90 unset, or a list naming bwd) for plain 16-bit
attention at head-dim buckets 64, 128 and 256 on a compute capability 9.0 GPU of an sm_90a
build: the pair of wgmma kernels (dQ; dK and dV), warp-specialized with TMA loads where TMA can
address the inputs (flash_bwd_sm90_tma.cuh, the default part bwdws), with cp.async loads otherwise
or without bwdws (flash_bwd_sm90.cuh; dK and dV in two launches at D=256). The fused one-kernel
backward, the default where it is faster, has its tests in test_deterministic.py and
test_bwd_atomic_dq.py. The same accuracy rule as every
path over the shapes that stress its tiles, the masks, GQA (dK/dV summed over a group's query
heads) and varlen; bitwise reproducible; the profiler shows which kernels ran."""
import pytest
import torch

from conftest import IS_SM90, cuda_kernels, dkdv_tma_kernel, skip_outside_head_dim_bucket
from reference import LOW_PRECISION, LOW_PRECISION_IDS
from test_features import check_dense, check_varlen, compare, reference_grads
from test_sm90_forward import straddling_inputs

pytestmark = pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")


@pytest.fixture(params=["bwd", "", "narrow"], ids=["cpasync", "ws", "narrow"], autouse=True)
def hopper_backward(request, monkeypatch):
    """Every test under the cp.async kernels ("bwd" alone), the defaults, which take the
    warp-specialized TMA ones (bwdws; 128-query steps in the dK/dV kernel at head dim 64), and
    those with CUFLASH_BWD_TILE=narrow (64-query steps there too). The pair of kernels each time
    (CUFLASH_BWD_DQ=separate): test_deterministic.py and test_bwd_atomic_dq.py cover the fused one."""
    monkeypatch.setenv("CUFLASH_SM90", "" if request.param == "narrow" else request.param)  # read at every call
    monkeypatch.setenv("CUFLASH_BWD_DQ", "separate")
    if request.param == "narrow":
        skip_outside_head_dim_bucket(request, 64, "the steps differ at head dim 64 only (the ws mode covers the others)")
        monkeypatch.setenv("CUFLASH_BWD_TILE", "narrow")
    return request.param


def backward_kernels(d, **kw):
    q, k, v = (torch.randn(1, 2, 100, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out, _ = torch.ops.cuflash_attn.fwd(q, k, v, None, False, False, **kw)
    return cuda_kernels(lambda: torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))


@pytest.mark.parametrize("d", [40, 64, 100, 128, 240, 256])
def test_path_taken(d, hopper_backward):
    names = backward_kernels(d)
    ws = hopper_backward != "bwd"
    dq = "flash_bwd_dq_sm90_tma_kernel" if ws else "flash_bwd_dq_sm90_kernel"
    assert f"{dq}<" in names, names
    bucket = 64 if d <= 64 else 128 if d <= 128 else 256
    launches = ((True, False), (False, True)) if d > 128 else ((True, True),)  # dK and dV in two at 256
    # The warp-specialized kernel: 128-query steps at head dim 64, unless narrow.
    wide = hopper_backward != "narrow" and bucket == 64
    expected = [dkdv_tma_kernel(bucket, dk=dk, dv=dv, wide=wide) if ws else
                f"flash_bwd_dkdv_sm90_kernel<__nv_bfloat16, {bucket}, false, {str(dk).lower()}, {str(dv).lower()}>"
                for dk, dv in launches]
    assert all(name in names for name in expected), names


def test_other_cases_keep_the_sm80_kernels():
    for d, kw in [(32, {}), (160, {}), (64, {"softcap": 30.0})]:
        names = backward_kernels(d, **kw)
        assert "sm90" not in names and "flash_bwd_dq_kernel" in names, (d, kw, names)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [40, 64, 100, 128, 240, 256])
@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 300), (77, 200), (200, 77), (128, 128), (257, 513)])
@pytest.mark.parametrize("causal,bottom_right", [(False, False), (True, False), (True, True)],
                         ids=["none", "top_left", "bottom_right"])
def test_matches_reference(dtype, d, nq, nk, causal, bottom_right):
    check_dense("cuda", dtype, 2, 2, 2, nq, nk, d, causal=causal, bottom_right=bottom_right)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gqa_and_window(dtype, d):
    check_dense("cuda", dtype, 2, 8, 2, 300, 700, d, causal=True, bottom_right=True, window=(130, -1))
    check_dense("cuda", dtype, 1, 4, 1, 500, 260, d, window=(40, 70))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_varlen(dtype, d):
    check_varlen("cuda", dtype, [70, 0, 129, 300], [90, 12, 0, 257], 4, 2, d, causal=True, bottom_right=True)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_scores_straddling_2_to_the_8(dtype, d):
    """Row maxima of about 240-277 in log2 units (test_sm90_forward.straddling_inputs), where
    the forward folds the scale into the exponent's argument in some rows and rounds the scaled
    score first in others: the backward's recomputed probabilities (rounded first throughout)
    agree with either."""
    scale = 0.5
    q, k, v, dout = straddling_inputs(dtype, d, scale)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.cuflash_attn.fwd(qg, kg, vg, scale, False)
    grads = torch.autograd.grad(out, (qg, kg, vg), dout)
    options = {"scale": scale}
    ref = reference_grads(q, k, v, dout, torch.float64, options, None)
    pt = reference_grads(q, k, v, dout, dtype, options, None)
    compare(dtype, (out, lse, *grads), ref, pt)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_bitwise_reproducible_and_close_to_sm80(d, monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1500, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def grads():
        o, _ = torch.ops.cuflash_attn.fwd(q, k, v, None, True, False)
        return torch.autograd.grad(o, (q, k, v), dout)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    monkeypatch.setenv("CUFLASH_SM90", "cpasync")  # the Hopper forward, the sm_80-class backward
    sm80 = grads()
    for name, a, b in zip("qkv", first, sm80):
        assert (a.float() - b.float()).abs().max().item() < 5e-2 * b.float().abs().max().item(), name
