"""Properties that exact attention has, checked with hypothesis on the real op, on CPU and (when a
GPU is present) on CUDA:

- splitting the keys: the logsumexps of two key halves combine (logaddexp) to the logsumexp of
  all keys, and the halves' outputs weighted by exp(lse_half - lse) to the output: the online
  softmax merge the kernels do between key tiles, done here between calls;
- causality: changing the keys and values a causal row cannot see leaves that row's output, lse
  and dq bitwise unchanged;
- tiling: moving where the key tiles start, or (CUDA) moving to a head-dim bucket with other
  tile shapes, or switching to other tiles or kernels for the same problem (the run-time
  switches of csrc/cuda/run_switches.h), changes the results by no more than the accuracy rule
  allows.

Every test draws CUFLASH_HYPOTHESIS_EXAMPLES examples (default 25) per device. A failure prints
the falsifying example, whose `seed` makes the inputs; `--hypothesis-seed=N` replays a whole run.
"""
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ALL_DTYPES, DEVICES, requires_cuda
from reference import (LOW_PRECISION, accuracy_bound, assert_close_to_reference, assert_lse_close, gradient_scale,
                       max_err, reference_results)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_attention import switches_set  # noqa: E402  (run-time switches in a block)

ops = torch.ops.cuflash_attn

# The autouse TF32 fixture is function-scoped: one setting for all examples of a test is intended.
PROPERTY = settings(max_examples=int(os.environ.get("CUFLASH_HYPOTHESIS_EXAMPLES", "25")), deadline=None,
                    database=None, print_blob=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = st.sampled_from(ALL_DTYPES)
SEEDS = st.integers(0, 2**31 - 1)
SMALL = st.integers(1, 2)  # batch, heads


def make_inputs(device, dtype, seed, batch, heads, nq, nk, d):
    """q, k, v, dout drawn in float64 from `seed` (the same numbers on every device)."""
    g = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    return make(nq), make(nk), make(nk), make(nq)


def run_op(q, k, v, dout, scale, is_causal, bottom_right):
    """(out, lse, dq, dk, dv) of the op through its autograd wiring."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = ops.fwd(q, k, v, scale, is_causal, bottom_right)
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def reference_and_baseline(q, k, v, dout, is_causal, bottom_right, scale):
    """(out, lse[, dq, dk, dv]) of the float64 reference and of the input-precision baseline `pt`."""
    ref = reference_results(q, k, v, dout, is_causal, bottom_right, scale)
    if q.dtype not in LOW_PRECISION:
        return ref, ref
    return ref, reference_results(q, k, v, dout, is_causal, bottom_right, scale, dtype=q.dtype)


# (name, index in (out, lse, dq, dk, dv), the accuracy rule's factor)
COMPARED = (("out", 0, 2), ("dq", 2, 3), ("dk", 3, 3), ("dv", 4, 3))


def assert_within(name, a, b, ref, pt, dtype, factor, zero_ref_scale):
    """Two results of the op for one problem differ by at most twice the accuracy rule's bound
    (each is within the bound of the reference; zero_ref_scale: accuracy_bound's, for gradients
    that cancel exactly, as dq and dk where every row sees one key)."""
    err, bound = max_err(a, b), 2 * accuracy_bound(ref, pt, dtype, factor, zero_ref_scale=zero_ref_scale)
    assert err <= bound, f"{name}: the two results differ by {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY
@given(dtype=DTYPES, seed=SEEDS, batch=SMALL, heads=SMALL, nq=st.integers(1, 150), nk=st.integers(2, 300),
       d=st.integers(1, 160), causal=st.booleans(), data=st.data())
def test_split_keys_merge_to_the_whole(device, dtype, seed, batch, heads, nq, nk, d, causal, data):
    """Keys [0, s) and [s, n) attended separately, then merged with the returned lse, give
    attention over all keys. Causal draws take seqlen_q = seqlen_k = n: the first half is then
    top-left causal, and the second half is bottom-right causal (its offset (n - s) - n = -s
    puts key j' = j - s at the whole's j), whose first s rows see no key (lse -inf, weight 0)."""
    if causal:
        nq = nk
    split = data.draw(st.integers(1, nk - 1), label="split")
    q, k, v, _ = make_inputs(device, dtype, seed, batch, heads, nq, nk, d)
    o1, l1 = ops.fwd(q, k[:, :, :split], v[:, :, :split], None, causal, False)
    o2, l2 = ops.fwd(q, k[:, :, split:], v[:, :, split:], None, causal, True)
    lse = torch.logaddexp(l1.double(), l2.double())
    out = (l1.double() - lse).exp()[..., None] * o1.double() + (l2.double() - lse).exp()[..., None] * o2.double()

    (ref_out, ref_lse), (pt_out, _) = reference_and_baseline(q, k, v, None, causal, False, None)
    assert_lse_close(lse, ref_lse, dtype)
    # Each half is within the rule (factor 2) against its own baseline; the merge is a convex
    # combination of the halves, so factor 4 leaves room for their baselines differing from the
    # whole's. The halves' errors are relative to their own magnitudes, which a whole that cancels
    # to near zero can be far below (seed 224, fp32, d=1, 224 keys split after the first: halves
    # of 0.3 merging to 4e-4): the rule's bound on the weighted halves is added.
    halves = (l1.double() - lse).exp()[..., None] * o1.double().abs() + \
        (l2.double() - lse).exp()[..., None] * o2.double().abs()
    bound = accuracy_bound(ref_out, pt_out, dtype, 4) + accuracy_bound(halves, halves, dtype, 4)
    assert not torch.isnan(out).any(), "merged out: NaN"
    assert max_err(out, ref_out) <= bound, f"merged out: max error {max_err(out, ref_out):.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY
@given(dtype=DTYPES, seed=SEEDS, batch=SMALL, heads=SMALL, nq=st.integers(2, 200), nk=st.integers(2, 300),
       d=st.integers(1, 128), bottom_right=st.booleans(), data=st.data())
def test_causal_rows_ignore_the_keys_they_cannot_see(device, dtype, seed, batch, heads, nq, nk, d, bottom_right, data):
    """Row i sees keys j <= i + offset (offset 0 top-left, seqlen_k - seqlen_q bottom-right).
    Redrawing every key and value after the last key row `row` sees leaves rows 0..row of out,
    lse and dq bitwise equal: a masked score is -inf, its probability exactly 0, and the tiles
    visited do not depend on the values."""
    offset = nk - nq if bottom_right else 0
    row = data.draw(st.integers(0, min(nq - 1, nk - 2 - offset)), label="row")  # some key is unseen
    first_unseen = max(row + offset + 1, 0)
    q, k, v, dout = make_inputs(device, dtype, seed, batch, heads, nq, nk, d)
    k2, v2 = k.clone(), v.clone()
    _, new_k, new_v, _ = make_inputs(device, dtype, seed + 1, batch, heads, 1, nk - first_unseen, d)
    k2[:, :, first_unseen:], v2[:, :, first_unseen:] = new_k, new_v

    before = run_op(q, k, v, dout, None, True, bottom_right)[:3]
    after = run_op(q, k2, v2, dout, None, True, bottom_right)[:3]
    for name, a, b in zip(("out", "lse", "dq"), before, after):
        assert torch.equal(a[:, :, : row + 1], b[:, :, : row + 1]), f"{name} of rows <= {row} changed"


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY
@given(dtype=DTYPES, seed=SEEDS, batch=SMALL, heads=SMALL, nq=st.integers(1, 200), nk=st.integers(1, 300),
       d=st.integers(1, 127), prepend=st.integers(1, 130), causal=st.booleans())
def test_results_do_not_depend_on_where_key_tiles_start(device, dtype, seed, batch, heads, nq, nk, d, prepend,
                                                        causal):
    """Prepends `prepend` keys that get softmax weight exactly 0, which moves every real key to
    another position in the key tiles (CPU forward: tiles of 64 keys; CUDA: 32 to 128 keys per
    tile by head dim, 32 in the float32/float64 kernels) and changes the running max and
    rescaling sequence. The weight-0 keys are an additive mask done with one extra head-dim
    column: q gets a column of 1, the real keys 0, the prepended keys -big (their other columns
    and their values are 0), so their scaled scores are below -5000 and exp gives exactly 0,
    while the real scores are unchanged. Without causal masking, or with bottom-right causal
    masking (its offset grows with the prepended keys), the real keys stay visible exactly
    where they were. The results (out, dq, and dk, dv of the real keys) must agree within the
    accuracy rule; rows that see no real key keep output 0 (their lse is then finite: they see
    the prepended keys)."""
    scale = 1.0 / math.sqrt(d)
    q, k, v, dout = make_inputs(device, dtype, seed, batch, heads, nq, nk, d)
    big = 6e4 if dtype == torch.float16 else 1e6
    col = lambda n, value: torch.full((batch, heads, n, 1), value, device=device, dtype=dtype)  # noqa: E731
    zeros = torch.zeros(batch, heads, prepend, d, device=device, dtype=dtype)
    q1 = torch.cat([q, col(nq, 1.0)], -1)
    k1 = torch.cat([torch.cat([zeros, col(prepend, -big)], -1), torch.cat([k, col(nk, 0.0)], -1)], 2)
    v1 = torch.cat([torch.cat([zeros, col(prepend, 0.0)], -1), torch.cat([v, col(nk, 0.0)], -1)], 2)
    dout1 = torch.cat([dout, col(nq, 0.0)], -1)

    # causal draws are bottom-right: a top-left mask would hide real keys behind the prepended ones.
    plain = run_op(q, k, v, dout, scale, causal, True)
    shifted = run_op(q1, k1, v1, dout1, scale, causal, True)
    out1, lse1, dq1, dk1, dv1 = shifted
    shifted = (out1[..., :d], lse1, dq1[..., :d], dk1[:, :, prepend:, :d], dv1[:, :, prepend:, :d])

    ref, pt = reference_and_baseline(q, k, v, dout, causal, True, scale)
    sees_key = torch.isfinite(ref[1])
    assert_lse_close(lse1[sees_key], ref[1][sees_key], dtype)
    assert torch.all(out1[~sees_key] == 0), "rows that see no real key must output 0"
    for name, i, factor in COMPARED:
        assert_within(name, shifted[i], plain[i], ref[i], pt[i], dtype, factor, gradient_scale(ref[2:]))


@requires_cuda
@PROPERTY
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), seed=SEEDS, batch=SMALL, heads=SMALL,
       nq=st.integers(1, 300), nk=st.integers(1, 300), d=st.integers(1, 128), extra=st.integers(1, 128),
       causal=st.sampled_from(["none", "top_left", "bottom_right"]))
def test_cuda_head_dim_bucket_does_not_change_results(dtype, seed, batch, heads, nq, nk, d, extra, causal):
    """Zero-padding the head dim from d to d + extra (at most 256), with the scale of d kept,
    leaves attention unchanged but moves the input to another head-dim bucket, whose kernels use
    other tiles (csrc/cuda/tile_shapes.h: forward key tiles of 128 up to d 64, 64 up to 128, 32
    above; backward dQ key tiles 64 or 32, dK/dV query tiles 64 or 32, dK and dV in two launches
    above 128; the float32 kernels hold other numbers of columns per lane). The first d columns
    agree within the accuracy rule; the padded columns of out, dq, dk, dv are exactly 0."""
    d2 = min(256, d + extra)
    scale = 1.0 / math.sqrt(d)
    is_causal, bottom_right = causal != "none", causal == "bottom_right"
    q, k, v, dout = make_inputs("cuda", dtype, seed, batch, heads, nq, nk, d)
    pad = lambda t: torch.nn.functional.pad(t, (0, d2 - d))  # noqa: E731
    plain = run_op(q, k, v, dout, scale, is_causal, bottom_right)
    padded = run_op(pad(q), pad(k), pad(v), pad(dout), scale, is_causal, bottom_right)

    ref, pt = reference_and_baseline(q, k, v, dout, is_causal, bottom_right, scale)
    assert_lse_close(padded[1], ref[1], dtype)
    for name, i, factor in COMPARED:
        assert torch.all(padded[i][..., d:] == 0), f"{name}: padded columns are not 0"
        assert_within(name, padded[i][..., :d], plain[i], ref[i], pt[i], dtype, factor, gradient_scale(ref[2:]))


# Run-time switches (csrc/cuda/run_switches.h) that pick other tiles or kernels for the same
# problem: the TMA forward's wide or narrow key tiles, the dK/dV kernels' query steps at head dim
# 64, dQ by its own kernel, the sm_80-class kernels, the cp.async Hopper ones.
KERNEL_SWITCHES = [{"CUFLASH_FWD_TILE": "wide"}, {"CUFLASH_FWD_TILE": "narrow"}, {"CUFLASH_BWD_TILE": "narrow"},
                   {"CUFLASH_BWD_FUSED_TILE": "wide"}, {"CUFLASH_BWD_FUSED_TILE": "narrow"},
                   {"CUFLASH_BWD_DQ": "separate"}, {"CUFLASH_SM90": "0"}, {"CUFLASH_SM90": "cpasync,bwd"}]


@requires_cuda
@PROPERTY
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), seed=SEEDS, batch=SMALL, heads=SMALL,
       nq=st.integers(1, 600), nk=st.integers(1, 600), d=st.sampled_from([40, 64, 128, 256]),
       causal=st.sampled_from(["none", "top_left", "bottom_right"]), switches=st.sampled_from(KERNEL_SWITCHES))
def test_cuda_kernel_switches_do_not_change_results(dtype, seed, batch, heads, nq, nk, d, causal, switches):
    """The same problem with the default kernels and under one switch: both within the accuracy
    rule of the float64 reference, so within twice its bound of each other."""
    is_causal, bottom_right = causal != "none", causal == "bottom_right"
    q, k, v, dout = make_inputs("cuda", dtype, seed, batch, heads, nq, nk, d)
    plain = run_op(q, k, v, dout, None, is_causal, bottom_right)
    with switches_set(switches):
        switched = run_op(q, k, v, dout, None, is_causal, bottom_right)
    ref, pt = reference_and_baseline(q, k, v, dout, is_causal, bottom_right, None)
    assert_lse_close(switched[1], ref[1], dtype)
    for name, i, factor in COMPARED:
        assert_within(name, switched[i], plain[i], ref[i], pt[i], dtype, factor, gradient_scale(ref[2:]))
