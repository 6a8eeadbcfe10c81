"""Tensors of more than 2^31 elements (4 GiB in bf16, which long contexts at a large batch reach):
the kernels address rows by 64-bit offsets, so rows past element 2^31 are read and written where
they lie. GPU only, with ~40 GiB free (4 GiB each for q, out, dout, dq and the k and v buffer; 8 for
a float32 dQ buffer)."""
import pytest
import torch

import cuflash_attn
from conftest import DEVICES, requires_cuda
from reference import assert_close_to_reference, assert_lse_close, reference_results

GIB = 2**30


def check_rows_past(elements, device):
    """q, out, dout and dq of `elements` + 192 rows' elements, k and v at a batch stride of
    `elements`: the first rows of (batch 0, head 0) and the last of (batch 1, head 1), past element
    `elements` in every tensor, match float64. dout is zero on every other row, so that dq is
    exactly zero there and dk and dv are the two slices' own."""
    dtype, b, h, d, nk, rows = torch.bfloat16, 2, 2, 128, 128, 192
    nq = elements // (b * h * d) + rows  # the last `rows` rows of (1, 1) lie past `elements`
    checked = [(0, 0, slice(0, rows)), (1, 1, slice(nq - rows, nq))]
    torch.manual_seed(0)
    q = torch.randn(b, h, nq, d, device=device, dtype=dtype, requires_grad=True)
    # k and v: views of one buffer whose second batch starts at element `elements`.
    kv_size = h * nk * d
    buffer = torch.randn(elements + 2 * kv_size, device=device, dtype=dtype)
    k, v = (buffer.as_strided((b, h, nk, d), (elements, nk * d, d, 1), offset).detach().requires_grad_()
            for offset in (0, kv_size))
    out, lse = cuflash_attn.flash_attention(q, k, v, return_lse=True)
    dout = torch.zeros_like(out)
    for bi, hi, r in checked:
        dout[bi, hi, r] = torch.randn(rows, d, device=device, dtype=dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)

    def at(t, bi, hi, r=slice(None)):
        return t[bi, hi, r][None, None].detach().cpu().clone()

    # (q, dout, out, lse, dq) at the checked rows, (k, v, dk, dv) whole
    slices = [(bi, hi, [at(t, bi, hi, r) for t in (q, dout, out, lse, dq)] + [at(t, bi, hi) for t in (k, v, dk, dv)])
              for bi, hi, r in checked]
    dq_elsewhere = dq.count_nonzero().item() - sum(s[2][4].count_nonzero().item() for s in slices)
    assert dq_elsewhere == 0, f"{dq_elsewhere} nonzero dq elements on rows whose dout is 0"
    for bi in range(b):
        for hi in range(h):
            if (bi, hi) not in [(s[0], s[1]) for s in slices]:
                assert dk[bi, hi].count_nonzero() == 0 and dv[bi, hi].count_nonzero() == 0, (bi, hi)
    for bi, hi, (q_s, dout_s, out_s, lse_s, dq_s, k_s, v_s, dk_s, dv_s) in slices:
        ref = reference_results(q_s, k_s, v_s, dout_s)
        pt = reference_results(q_s, k_s, v_s, dout_s, dtype=dtype)
        where = f"batch {bi}, head {hi}"
        assert_close_to_reference(f"out ({where})", out_s, ref[0], pt[0], dtype, factor=2)
        assert_lse_close(lse_s, ref[1], dtype)
        for name, got, r, p in zip(("dq", "dk", "dv"), (dq_s, dk_s, dv_s), ref[2:], pt[2:]):
            assert_close_to_reference(f"{name} ({where})", got, r, p, dtype, factor=3)


@requires_cuda
@pytest.mark.parametrize("kernels", ["default", "sm80_class"])
def test_rows_past_2_31_elements(monkeypatch, kernels):
    if kernels == "sm80_class":
        monkeypatch.setenv("CUFLASH_SM90", "0")  # read at every call: the sm_80-class kernels on Hopper
    if torch.cuda.mem_get_info()[0] < 40 * GIB:
        pytest.skip("needs ~40 GiB of free GPU memory")
    check_rows_past(2**31, "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_rows_past_a_small_stride(device):
    """The same check at a size any device holds (the check's own logic, on the CPU too)."""
    check_rows_past(2**16, device)
