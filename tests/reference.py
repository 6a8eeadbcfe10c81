"""Reference attention and the accuracy rule of shared/TESTING.md."""
import math

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
LOW_PRECISION_IDS = ("fp16", "bf16")  # pytest ids for LOW_PRECISION
# Where attention_reference computes (the float64 reference and the low-precision `pt` baseline);
# None: on the inputs' device. tests/sanitize_driver.py sets "cpu": under compute-sanitizer's
# racecheck, torch's own float16 matmuls on a Hopper GPU (cuBLAS) stop the tool with an internal
# error (H200, 2026-12-03), and initcheck, which must watch every kernel, runs far faster without
# the references' kernels.
REFERENCE_DEVICE = None


def dropout_keep_scale(dropout_p):
    """The kept probabilities' factor, README's rule: dropout_p rounded to a multiple of 2^-16
    (at most 1 - 2^-16), the keep rate's inverse. (The C++ rule is attention_math.h's
    dropout_keep_scale; the float64 tests compare the kernels against this one.)"""
    threshold = min(math.floor(dropout_p * 65536.0 + 0.5), 65535)
    return 65536.0 / (65536.0 - threshold)


def attention_reference(q, k, v, causal=False, scale=None, bottom_right=False, dtype=torch.float64, *,
                        window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_keep=None, dropout_p=0.0,
                        attn_mask=None):
    """Plain attention in `dtype` (float64: the reference; the input dtype: the `pt` baseline,
    with the scale applied to k to show reordering error). q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]
    (GQA: repeated here). Query i faces key i + diagonal (0, or Nk - Nq with bottom_right); key j
    is visible iff -left <= j - i - diagonal <= right (causal: right = 0; -1: unbounded). softcap
    and ALiBi change the scores, then attn_mask (torch's: boolean, True takes part, or added to the
    scores; it broadcasts to [B, Hq, Nq, Nk]); dropout_keep (bool [B, Hq, Nq, Nk]) drops probabilities, the
    kept ones scaled by dropout_keep_scale(dropout_p). Masks are -inf; a query row that sees no key gives
    output 0 and lse -inf, as cuflash_attn documents."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if REFERENCE_DEVICE not in (None, q.device.type):
        device = q.device
        out, lse = attention_reference(*(t.to(REFERENCE_DEVICE) for t in (q, k, v)), causal, scale,
                                       bottom_right, dtype, window=window, softcap=softcap,
                                       alibi_slopes=alibi_slopes, dropout_keep=dropout_keep, dropout_p=dropout_p,
                                       attn_mask=attn_mask)
        return out.to(device), lse.to(device)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ (k * scale).transpose(-1, -2)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    nq, nk = q.shape[-2], k.shape[-2]
    diagonal = nk - nq if bottom_right else 0
    rel = torch.arange(nk, device=q.device)[None, :] - torch.arange(nq, device=q.device)[:, None] - diagonal
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(device=q.device, dtype=dtype)
        slopes = slopes.reshape(-1 if slopes.dim() == 2 else 1, q.shape[1], 1, 1)
        scores = scores - slopes * rel.abs().to(dtype)
    left, right = window
    right = 0 if causal else right
    visible = torch.ones_like(rel, dtype=torch.bool)
    if right >= 0:
        visible &= rel <= right
    if left >= 0:
        visible &= rel >= -left
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask.to(q.device)
    elif attn_mask is not None:
        scores = scores + attn_mask.to(q.device, dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    sees_key = (scores != float("-inf")).any(-1, keepdim=True)
    lse = torch.logsumexp(scores.float() if dtype in LOW_PRECISION else scores, dim=-1)
    # Rows that see no key: softmax over zeros (finite gradients), then multiplied by 0.
    probs = torch.softmax(scores.masked_fill(~sees_key, 0.0), dim=-1) * sees_key
    if dropout_keep is not None:
        probs = probs * dropout_keep.to(q.device) * dropout_keep_scale(dropout_p)
    return probs @ v, lse


def reference_results(q, k, v, dout=None, causal=False, bottom_right=False, scale=None, dtype=torch.float64,
                      dlse=None):
    """attention_reference in `dtype` with its gradients: (out, lse, dq, dk, dv), or (out, lse)
    without dout. dlse, if given, is the gradient of lse too."""
    qr, kr, vr = (t.detach().to(dtype).requires_grad_(dout is not None) for t in (q, k, v))
    out, lse = attention_reference(qr, kr, vr, causal, scale=scale, bottom_right=bottom_right, dtype=dtype)
    if dout is None:
        return out, lse
    # A row that sees no key has lse -inf and a NaN lse gradient, which its all-masked scores zero.
    outs, grads = (out,), (dout.to(dtype),)
    if dlse is not None:
        outs, grads = (out, lse), (dout.to(dtype), dlse.to(lse.dtype))
    return (out, lse, *torch.autograd.grad(outs, (qr, kr, vr), grads))


# Evenly spaced values up to max|ref| that rounding_floor takes beside ref's own.
FLOOR_GRID = 256


def rounding_floor(ref, dtype):
    """2 * max|(r + 0.3 - 0.3) - r| in the input dtype, over r = ref's values and FLOOR_GRID values
    evenly spaced up to max|ref|: the error of one rounding at ref's magnitude. (Over ref's values
    alone, a result of one or a few elements can sit where both roundings are exact: a floor of 0,
    and a bound that two correct roundings of one value miss.)"""
    if not ref.numel():
        return 0.0
    finite = ref[torch.isfinite(ref)]
    top = finite.abs().max().item() if finite.numel() else 0.0
    grid = torch.linspace(0.0, top, FLOOR_GRID, dtype=torch.float64, device=ref.device)
    r = torch.cat([ref.flatten().double(), grid]).to(dtype)
    return 2 * ((r + 0.3) - 0.3 - r).abs().max().item()


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def float32_error_ratios(attend, seed, scale, d, nq=200, nk=300):
    """max|got - ref| / (the float32 rule's bound) for out, dq, dk and dv of attend(q, k, v, dout)
    (float64 [1, 2, n, d] inputs at `scale`, seeded; it returns the four) against float64: how
    close a float32 implementation comes to the rule (1: on it)."""
    torch.manual_seed(seed)
    q, k, v, dout = (scale * torch.randn(1, 2, n, d, dtype=torch.float64) for n in (nq, nk, nk, nq))
    got = attend(q, k, v, dout)
    ref_out, _, *ref_grads = reference_results(q, k, v, dout)
    return [max_err(g.cpu(), r) / accuracy_bound(r, r, torch.float32, factor=1)
            for g, r in zip(got, (ref_out, *ref_grads))]


def accuracy_bound(ref, pt, dtype, factor, tf32=False, lse=None, zero_ref_scale=0.0):
    """The largest max|got - ref| the accuracy rule allows.
    fp16/bf16: factor * max|pt - ref| + floor; fp64: 1e-10 * max|ref|;
    fp32: 1e-5 * max|ref| (1e-3 with TF32), or factor * L * 2^-24 * max|ref| where that is larger,
    L the largest finite |logsumexp| (lse, the float64 one) of the rows. Scores of magnitude L
    (ALiBi's biases at long distances reach hundreds) carry an absolute fp32 rounding error of
    L * 2^-24 in any implementation, and so does the fp32 logsumexp the backward recomputes the
    probabilities from: each probability is off by that much relatively, out and gradients too.
    zero_ref_scale: what max|ref| stands for where ref is exactly zero (the rule cannot hold
    there: dq and dk cancel exactly when every row sees one key, dS = P (dP - delta) with P = 1
    and dP = delta, and an fp32 implementation computing dP and delta by different routes, as
    tensor cores and a row reduction do, leaves their rounding): the largest gradient of the
    same check, so that those gradients are held to 1e-5 of it, normwise over the gradients."""
    if dtype in LOW_PRECISION:
        return factor * max_err(pt, ref) + rounding_floor(ref, dtype)
    rel = {torch.float32: 1e-3 if tf32 else 1e-5, torch.float64: 1e-10}[dtype]
    if dtype == torch.float32 and lse is not None and torch.isfinite(lse).any():
        rel = max(rel, factor * 2.0**-24 * lse[torch.isfinite(lse)].abs().max().item())
    magnitude = ref.abs().max().item() if ref.numel() else 0.0
    return rel * max(magnitude if magnitude > 0 else zero_ref_scale, 1e-30)


def gradient_scale(grads):
    """max|g| over a check's reference gradients: accuracy_bound's zero_ref_scale."""
    return max((g.abs().max().item() for g in grads if g is not None and g.numel()), default=0.0)


def assert_close_to_reference(name, got, ref, pt, dtype, factor, tf32=False, lse=None, zero_ref_scale=0.0):
    """max|got - ref| within accuracy_bound."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the result"
    err = max_err(got, ref)
    bound = accuracy_bound(ref, pt, dtype, factor, tf32, lse, zero_ref_scale)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e}"


def assert_lse_close(lse, ref_lse, dtype):
    assert lse.shape == ref_lse.shape
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse: -inf rows differ"
    if fin.any():
        tol = 1e-3 if dtype in LOW_PRECISION else 1e-5
        rel = ((lse.double() - ref_lse.double()).abs() / ref_lse.double().abs().clamp(min=1.0))[fin]
        assert rel.max().item() <= tol, f"lse: relative error {rel.max().item():.3e} > {tol}"
