"""attn_mask through the op: torch's boolean masks (True takes part) and float masks (added to
the scores), of every shape that broadcasts to [batch, heads, seqlen_q, seqlen_k], read in place
by every kernel family; forward, backward and the float mask's gradient against the float64
reference under shared/TESTING.md's rule; fully masked rows; bad masks."""
import pytest
import torch

import cuflash_attn
from conftest import HAS_CUDA
from reference import LOW_PRECISION, assert_close_to_reference
from test_features import DEVICES, DTYPE_IDS, DTYPES, MASK_SHAPES, check_dense, make_mask

ops = torch.ops.cuflash_attn
fwd = ops.fwd

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
def test_mask_shapes(device, dtype, kind, shape):
    check_dense(device, dtype, 2, 3, 3, 77, 130, 64, attn_mask=(kind, shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_with_transposed_strides(device, dtype, kind):
    mask = make_mask(kind, (2, 1, 90, 70), device, dtype, transposed=True, requires_grad=kind == "float")
    check_dense(device, dtype, 2, 2, 2, 90, 70, 64, attn_mask=mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mask_with_padded_rows(device, dtype, kind, causal):
    """A mask sliced from a wider one (rows of 320 elements, 300 keys, keys contiguous): tiles
    inside the sequence read it through its row stride (ScoreMod::with_mask_inside, both tile
    orientations), tiles at its edges element by element; 200 x 300 has both in each direction."""
    wide = make_mask(kind, (2, 1, 200, 320), device, dtype)
    mask = wide[..., :300].detach().requires_grad_(kind == "float")
    check_dense(device, dtype, 2, 2, 2, 200, 300, 64, attn_mask=mask, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_with_gqa_causal_and_dropout(device, dtype, kind):
    """A mask with the other options: GQA 4/2, causal (top-left, as SDPA aligns it), dropout."""
    mask = make_mask(kind, (2, 4, 100, 160), device, dtype, requires_grad=kind == "float")
    check_dense(device, dtype, 2, 4, 2, 100, 160, 64, attn_mask=mask, causal=True, dropout_p=0.2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("d", [32, 128, 256])
def test_mask_head_dims(device, dtype, d):
    mask = make_mask("float", (1, 1, 65, 150), device, dtype, requires_grad=True)
    check_dense(device, dtype, 1, 2, 2, 65, 150, d, attn_mask=mask, softcap=30.0, alibi="heads")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zero(device, dtype, kind):
    """Rows whose every key is masked out: output 0, lse -inf, zero gradients everywhere (torch's
    math backend gives 0 too), and the rows beside them unaffected."""
    b, h, nq, nk, d = 1, 2, 40, 90, 64
    mask = make_mask(kind, (b, h, nq, nk), device, dtype)
    hidden = False if kind == "bool" else float("-inf")
    mask[:, :, 5] = hidden
    mask[:, 1, 20:30] = hidden
    mask.requires_grad_(kind == "float")
    check_dense(device, dtype, b, h, h, nq, nk, d, attn_mask=mask)
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for n in (nq, nk, nk))
    out, lse = fwd(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert torch.all(out[:, :, 5] == 0) and torch.all(out[:, 1, 20:30] == 0)
    assert torch.all(torch.isneginf(lse[:, :, 5]))
    assert torch.all(q.grad[:, :, 5] == 0) and torch.all(q.grad[:, 1, 20:30] == 0)
    if kind == "float":
        assert torch.all(mask.grad[:, :, 5] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ["LS", "B11S", "H11"])
def test_float_mask_gradcheck(device, shape):
    """torch.autograd.gradcheck in float64 over q, k, v and a broadcast float mask."""
    b, h, nq, nk, d = 2, 2, 9, 13, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
               for n in (nq, nk, nk))
    mask = torch.randn(MASK_SHAPES[shape](b, h, nq, nk), generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, m: fwd(q, k, v, attn_mask=m)[0], (q, k, v, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_mask_is_not_modified_and_needs_no_grad(device):
    mask = make_mask("float", (1, 1, 30, 40), device, torch.float32)
    before = mask.clone()
    q, k, v = (torch.randn(1, 2, n, 16, device=device, requires_grad=True) for n in (30, 40, 40))
    fwd(q, k, v, attn_mask=mask)[0].sum().backward()
    assert torch.equal(mask, before) and mask.grad is None
    # A bool mask equals the float mask that is 0 where True and -inf where False.
    bool_mask = make_mask("bool", (1, 1, 30, 40), device, torch.float32)
    as_float = torch.zeros(bool_mask.shape, device=device).masked_fill(~bool_mask, float("-inf"))
    assert torch.equal(fwd(q, k, v, attn_mask=bool_mask)[0], fwd(q, k, v, attn_mask=as_float)[0])


MASK_ENTRY_POINTS = {
    "fwd": lambda q, k, v, mask: fwd(q, k, v, attn_mask=mask),
    # q for dout and out, zeros for lse: valid, so the mask is what bwd rejects.
    "bwd": lambda q, k, v, mask: ops.bwd(q, q, k, v, q, q.new_zeros(q.shape[:3]), attn_mask=mask),
    "flash_attention": lambda q, k, v, mask: cuflash_attn.flash_attention(q, k, v, attn_mask=mask),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", list(MASK_ENTRY_POINTS))
def test_bad_masks(device, entry):
    attend = MASK_ENTRY_POINTS[entry]
    q, k, v = (torch.randn(2, 3, n, 16, device=device) for n in (10, 12, 12))
    with pytest.raises(TypeError, match="attn_mask must be boolean or have q's dtype"):
        attend(q, k, v, torch.zeros(10, 12, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="attn_mask must be boolean or have q's dtype"):
        attend(q, k, v, torch.zeros(10, 12, dtype=torch.float64, device=device))
    for bad in [(10, 11), (2, 3, 10, 12, 1), (3, 3, 10, 12), (11, 12)]:
        with pytest.raises(ValueError, match=r"attn_mask must broadcast to \[batch, heads_q, seqlen_q, seqlen_k\]"):
            attend(q, k, v, torch.zeros(bad, device=device))
    other = "cpu" if device == "cuda" else ("cuda" if HAS_CUDA else None)
    if other:
        with pytest.raises(ValueError, match="attn_mask must be on the same device as q"):
            attend(q, k, v, torch.zeros(10, 12, device=other))
    # The ops' schema rejects a list (torch's dispatcher raises a RuntimeError naming attn_mask).
    exc, pattern = (TypeError, "attn_mask must be a") if entry == "flash_attention" else (RuntimeError, "'attn_mask'")
    with pytest.raises(exc, match=pattern):
        attend(q, k, v, torch.ones(10, 12, dtype=torch.bool).tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_mask_options(device):
    q, k, v = (torch.randn(2, 3, n, 16, device=device) for n in (10, 12, 12))
    qp, kp, vp = (torch.randn(10, 3, 16, device=device) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="attn_mask is not supported with cu_seqlens"):
        fwd(qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_k=cu, attn_mask=torch.zeros(10, 10, device=device))
    out, lse = fwd(q, k, v)
    with pytest.raises(ValueError, match="attn_mask_grad needs a floating-point attn_mask"):
        torch.ops.cuflash_attn.bwd(out, q, k, v, out, lse, attn_mask=torch.ones(10, 12, dtype=torch.bool,
                                                                                device=device), attn_mask_grad=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_opcheck_with_mask(device, kind):
    """torch.library.opcheck of fwd (autograd through the float mask included) and bwd."""
    q, k, v = (torch.randn(2, 4, n, 32, device=device, requires_grad=True) for n in (33, 47, 47))
    mask = make_mask(kind, (2, 1, 33, 47), device, torch.float32, requires_grad=kind == "float")
    options = {"attn_mask": mask, "is_causal": True}
    torch.library.opcheck(ops.fwd.default, (q, k, v), options)
    q, k, v, mask = (t.detach() for t in (q, k, v, mask))
    out, lse = ops.fwd(q, k, v, attn_mask=mask)
    torch.library.opcheck(ops.bwd.default, (torch.randn_like(out), q, k, v, out, lse, None),
                          {"attn_mask": mask, "attn_mask_grad": kind == "float"})


# ---- through cuflash_attn.scaled_dot_product_attention, against torch's math backend ----

def _torch_math(q, k, v, mask, dtype, **kwargs):
    """torch's math SDPA in dtype, with the gradients of q, k, v and a float mask that requires grad."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    m = mask
    if mask.is_floating_point() and mask.requires_grad:
        m = mask.detach().to(dtype).requires_grad_()
        leaves.append(m)
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(*leaves[:3], attn_mask=m, **kwargs)
    return out, leaves


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("lead,mask_shape", [((2, 3), (1, 1, 1, 50)), ((3,), (40, 50)), ((2, 3), (2, 3, 40, 50)),
                                             ((2, 2, 3), (2, 1, 3, 40, 50)), ((2, 3), (3, 1, 50))],
                         ids=["key_padding", "3d_LS", "full", "5d", "H1S"])
def test_sdpa_matches_torch_math(device, dtype, kind, lead, mask_shape):
    """Masks of every kind and shape through the SDPA drop-in, inputs of 3 to 5 dimensions, GQA
    (enable_gqa) on 4-d ones, a fully masked query row; the rule of TESTING.md against torch's math
    backend in float64 (reference) and in dtype (baseline)."""
    torch.manual_seed(0)
    cuflash_attn.reset_sdpa_stats()
    nq, nk, d = 40, 50, 32
    gqa = len(lead) == 2
    q = torch.randn(*lead, nq, d, dtype=torch.float64).to(device, dtype)
    kv_lead = (lead[0], 1) if gqa else lead
    k, v = (torch.randn(*kv_lead, nk, d, dtype=torch.float64).to(device, dtype) for _ in range(2))
    dout = torch.randn_like(q)
    grad = kind == "float" and mask_shape[-1] != 1
    mask = make_mask(kind, mask_shape, device, dtype)
    if mask.shape[-2:] == (nq, nk):  # a row no key is visible to: output 0, as torch's math backend
        mask[..., 7, :] = False if kind == "bool" else float("-inf")
    mask.requires_grad_(grad)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([mask] if grad else [])
    out = cuflash_attn.scaled_dot_product_attention(*leaves[:3], attn_mask=mask, enable_gqa=gqa)
    got = torch.autograd.grad(out, leaves, dout)
    results = {}
    for name, dt in (("ref", torch.float64), ("pt", dtype)):
        o, inputs = _torch_math(q, k, v, mask, dt, enable_gqa=gqa)
        results[name] = (o, *torch.autograd.grad(o, inputs, dout.to(dt)))
    if dtype not in LOW_PRECISION:
        results["pt"] = results["ref"]
    names = ("out", "dq", "dk", "dv", "dattn_mask")
    for name, g, r, p in zip(names, (out, *got), results["ref"], results["pt"]):
        assert_close_to_reference(name, g, r, p, dtype, factor=2 if name == "out" else 3)
    assert cuflash_attn.sdpa_stats() == {"cuflash_attn": 1, "fallback": {}}  # the kernels ran
