"""softcap, ALiBi, attn_mask and dropout on the fused warp-specialized Hopper backward: CUFLASH_SM90's
"bwdfeatures" part, a default (the kFeatures kernels of flash_bwd_sm90_tma.cuh, 64-query
steps at head-dim buckets 64 and 128, and of flash_bwd_sm90_fused256.cuh at 256: dK, dV and dQ in
one kernel, dQ added in order or not). Each feature and all of them together against the float64
reference (GQA, windows, both causal alignments, sequence tails, packed sequences); the ordered
dQ bitwise reproducible; the kernels the profiler shows; and where the part does not reach
(without it, attn_mask's gradient) the sm_80-class backward as before."""
import pytest
import torch

from conftest import IS_SM90, SM90_DEFAULT_PARTS, cuda_kernels, fused_backward_kernel, sm90_parts_without
from reference import LOW_PRECISION, LOW_PRECISION_IDS
from test_features import check_dense, check_varlen, make_mask

pytestmark = pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")

PARTS = SM90_DEFAULT_PARTS
WITHOUT_THE_PART = sm90_parts_without("bwdfeatures")

# The feature sets by name: check_dense's keyword options ("float_mask": a float [B, 1, Nq, Nk]
# mask without its gradient, made by the test).
FEATURES = {
    "softcap": dict(softcap=20.0),
    "alibi": dict(alibi="batch", causal=True, bottom_right=True),
    "dropout": dict(dropout_p=0.2),
    "bool_mask": dict(attn_mask=("bool", "B1LS")),
    "float_mask": dict(),
    "all": dict(causal=True, bottom_right=True, window=(50, -1), softcap=15.0, alibi="heads", dropout_p=0.15),
}


@pytest.fixture(params=["ordered", "atomic"])
def route(request, monkeypatch):
    """The part on and the route of the dQ adds (CUFLASH_BWD_DQ): the fused kernel's two orders."""
    monkeypatch.setenv("CUFLASH_SM90", PARTS)
    monkeypatch.setenv("CUFLASH_BWD_DQ", request.param)
    return request.param


def backward_kernels(d, **options):
    """The kernels of a bf16 backward with these fwd options (2 x 4 heads over 2 KV heads, 150
    queries, 300 keys)."""
    q = torch.randn(2, 4, 150, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 300, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out, _ = torch.ops.cuflash_attn.fwd(q, k, v, **options)
    return cuda_kernels(lambda: torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))


@pytest.mark.parametrize("d", [40, 64, 100, 128, 256])
@pytest.mark.parametrize("feature", ["softcap", "dropout"])
def test_path_taken(d, feature, route):
    options = dict(softcap=20.0) if feature == "softcap" else \
        dict(dropout_p=0.1, rng_state=torch.tensor([5, 0], dtype=torch.int64, device="cuda"))
    names = backward_kernels(d, **options)
    bucket = 64 if d <= 64 else 128 if d <= 128 else 256
    assert fused_backward_kernel(bucket, ordered=route == "ordered", features=True) in names, names
    assert "flash_bwd_dkdv_kernel<" not in names and "flash_bwd_dq_kernel<" not in names, names


@pytest.mark.parametrize("parts,d,grad_mask", [(WITHOUT_THE_PART, 64, False), (WITHOUT_THE_PART, 256, False),
                                               (PARTS, 128, True), (PARTS, 256, True)],
                         ids=["without-the-part-64", "without-the-part-256", "mask-gradient-128", "mask-gradient-256"])
def test_sm80_elsewhere(parts, d, grad_mask, monkeypatch):
    """Without the part, and with attn_mask's gradient (written by the sm_80-class dQ kernel): the
    sm_80-class backward, as before the part."""
    monkeypatch.setenv("CUFLASH_SM90", parts)
    if grad_mask:
        mask = make_mask("float", (2, 1, 150, 300), "cuda", torch.bfloat16, requires_grad=True)
        q = torch.randn(2, 4, 150, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(2, 4, 300, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        out, _ = torch.ops.cuflash_attn.fwd(q, k, v, attn_mask=mask)
        names = cuda_kernels(lambda: torch.autograd.grad(out, (q, k, v, mask), torch.ones_like(out)))
    else:
        names = backward_kernels(d, softcap=20.0)
    assert "flash_bwd_dkdv_kernel<" in names, names
    assert "flash_bwd_dkdv_sm90_tma_kernel" not in names and "flash_bwd_fused_sm90_tma_kernel" not in names, names


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("nq,nk", [(150, 300), (301, 129)])
def test_matches_reference(dtype, d, feature, nq, nk, route):
    options = dict(FEATURES[feature])
    if feature == "float_mask":
        options["attn_mask"] = make_mask("float", (2, 1, nq, nk), "cuda", dtype)
    check_dense("cuda", dtype, 2, 4, 2, nq, nk, d, deterministic=route == "ordered", **options)


@pytest.mark.parametrize("d", [40, 100, 232])
def test_head_dims_inside_the_buckets(d, route):
    check_dense("cuda", torch.bfloat16, 2, 4, 2, 150, 300, d, deterministic=route == "ordered", **FEATURES["all"])


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_sequences(d, causal, route):
    """Packed sequences: tails inside and on a box's edge, empty ones (on the packed kernels of the
    "bwdvarlen" part beside it)."""
    check_varlen("cuda", torch.bfloat16, [70, 0, 129, 300], [90, 12, 0, 257], 4, 2, d, causal=causal,
                 bottom_right=causal, softcap=10.0, alibi="batch", dropout_p=0.1)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_ordered_is_bitwise_reproducible(d, monkeypatch):
    monkeypatch.setenv("CUFLASH_SM90", PARTS)
    torch.manual_seed(0)
    q = torch.randn(4, 8, 700, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(4, 4, 700, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)
    rng_state = torch.tensor([3, 0], dtype=torch.int64, device="cuda")

    def grads():
        out, _ = torch.ops.cuflash_attn.fwd(q, k, v, is_causal=True, softcap=30.0, dropout_p=0.1,
                                            rng_state=rng_state, deterministic=True)
        return torch.autograd.grad(out, (q, k, v), dout)

    names = cuda_kernels(grads)
    assert fused_backward_kernel(d, ordered=True, features=True) in names, names
    first = grads()
    for _ in range(4):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))
