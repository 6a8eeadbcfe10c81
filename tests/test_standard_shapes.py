"""The benchmark's standard table (benchmarks/bench_attention.py: bf16, head dims 64, 128 and 256,
causal or not, 512 to 16384 keys, batch x seqlen = 16384 tokens, 2048 / D heads), each shape
computed once through the path the table times, deterministic and not: the rows of three blocks of
64 queries (first, middle, last) against float64, so that every speed the table reports is of a
correct result. dout is zero on every other row, so that dq is exactly zero there and dk and dv
are the three blocks' own. GPU only."""
import sys
from pathlib import Path

import pytest
import torch

import cuflash_attn
from conftest import requires_cuda
from reference import assert_close_to_reference, assert_lse_close, reference_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_attention as bench  # noqa: E402

SHAPES = bench.standard_shapes([64, 128, 256], [512, 1024, 2048, 4096, 8192, 16384])
ROWS = 64


def _blocks_reference(q, k, v, dout, starts, causal, dtype):
    """out, lse, dq of each block of ROWS queries from `starts`, and dk, dv summed over the blocks,
    in `dtype`: a causal block sees the keys up to its last row (bottom-right alignment)."""
    outs, lses, dqs = [], [], []
    dk, dv = (torch.zeros(t.shape, dtype=dtype, device=t.device) for t in (k, v))
    for r0 in starts:
        keys = r0 + ROWS if causal else k.shape[2]
        rows = slice(r0, r0 + ROWS)
        out, lse, dq, dk_block, dv_block = reference_results(q[:, :, rows], k[:, :, :keys], v[:, :, :keys],
                                                             dout[:, :, rows], causal, bottom_right=True, dtype=dtype)
        outs.append(out.detach()), lses.append(lse.detach()), dqs.append(dq)
        dk[:, :, :keys] += dk_block
        dv[:, :, :keys] += dv_block
    return outs, lses, dqs, dk, dv


@requires_cuda
@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "nondet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"d{d}_n{n}" for _, _, n, d in SHAPES])
def test_standard_table_shape(shape, causal, deterministic):
    batch, heads, n, d = shape
    dtype = torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    starts = [0, n // 2 - ROWS // 2, n - ROWS]
    dout = torch.zeros(batch, heads, n, d, device="cuda", dtype=dtype)
    for r0 in starts:
        dout[:, :, r0:r0 + ROWS] = torch.randn(batch, heads, ROWS, d, device="cuda", dtype=dtype)
    out, lse = cuflash_attn.flash_attention(q, k, v, causal, return_lse=True, deterministic=deterministic)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    # Only the last batch entry is checked against the references (the others ran the same tiles).
    b = slice(batch - 1, batch)
    args = (q[b].detach(), k[b].detach(), v[b].detach(), dout[b])
    ref = _blocks_reference(*args, starts, causal, torch.float64)
    pt = _blocks_reference(*args, starts, causal, dtype)
    for i, r0 in enumerate(starts):
        rows = slice(r0, r0 + ROWS)
        assert_close_to_reference(f"out rows {r0}..", out[b, :, rows], ref[0][i], pt[0][i], dtype, factor=2)
        assert_lse_close(lse[b, :, rows], ref[1][i], dtype)
        assert_close_to_reference(f"dq rows {r0}..", dq[b, :, rows], ref[2][i], pt[2][i], dtype, factor=3)
    assert_close_to_reference("dk", dk[b], ref[3], pt[3], dtype, factor=3)
    assert_close_to_reference("dv", dv[b], ref[4], pt[4], dtype, factor=3)
    outside = dq.count_nonzero().item() - sum(dq[:, :, r0:r0 + ROWS].count_nonzero().item() for r0 in starts)
    assert outside == 0, f"{outside} nonzero dq elements on rows whose dout is 0"
