"""A model, on the CPU, of how float32 attention fares when every matmul runs on 16-bit-input
tensor cores with its operands split in two: the 3xTF32 split the float32 kernels use (x = big +
small, both TF32, six m16n8k8 products a k16 step) against fp16 pairs (x * 2^e = hi + lo 2^-11,
both fp16, three m16n8k16 products a k16 step; e a power of two that puts the largest |x| in
[2^14, 2^15), so that neither part overflows and the small ones keep their bits: as
csrc/cuda/fp32_pairs.h takes them, one a row for the inputs, one a 16-row tile for the computed P
and dS, whose columns first take the 2^-e of the input rows they multiply).

The tensor cores are modelled as the float32 kernels' comments describe them: each product of the
inputs exact, each instruction's sum (its products and the accumulator it adds to) rounded toward
zero to float32; each k16 step's products go into a fresh sum that is added to the running one
rounded to nearest. The softmax runs in float32. Errors are reported as tests/reference.py's rule
does: max|got - ref| / (1e-5 max|ref|), the float64 reference; a ratio above 1 fails the rule.

  python3 benchmarks/fp32_split_model.py [--seeds 4] [--head-dim 64]"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference import float32_error_ratios  # noqa: E402


def round_toward_zero(x64):
    """float64 -> float32, truncated (the tensor cores' rounding of an instruction's sum)."""
    r = x64.float()
    over = r.double().abs() > x64.abs()
    return torch.where(over, torch.nextafter(r, torch.zeros_like(r)), r)


def tf32_split(x):
    """The kernels' split_tf32: big rounded half away from zero to TF32, small = x - big, each as
    the tensor cores read it (low 13 bits dropped)."""
    def truncated(t):
        return (t.view(torch.int32) & ~0x1FFF).view(torch.float32)
    big = truncated((x.view(torch.int32) + 0x1000).view(torch.float32))
    return big, truncated(x - big)


def fp16_split(x, exponent):
    """x * 2^exponent = hi + lo 2^-11, both fp16 (exponent broadcast against x; lo the rest times
    2^11, as split_half2 takes it)."""
    xs = x * torch.exp2(exponent)
    hi = xs.half().float()
    return hi, ((xs - hi) * 2048).half().float()


def exponent_of(amax):
    """The power of two that puts amax in [2^14, 2^15) (pair_exponent)."""
    return (14 - torch.floor(torch.log2(amax.clamp_min(torch.finfo(torch.float32).tiny)))).float()


def row_exponents(x):
    """Each row's (last dimension's) exponent: the pre-pass's."""
    return exponent_of(x.abs().amax(dim=-1, keepdim=True))


def tile_exponents(x, rows=16):
    """Each 16-row tile's exponent (a warp's, pair_split_of's), broadcast to its rows."""
    m = x.shape[-2]
    padded = torch.nn.functional.pad(x.abs(), (0, 0, 0, (-m) % rows))
    tops = padded.unflatten(-2, (-1, rows)).amax(dim=(-2, -1), keepdim=True)
    return exponent_of(tops).expand(*tops.shape[:-2], rows, 1).flatten(-3, -2)[..., :m, :]


def tensor_core_matmul(products, k_step, k_width, small_scale=1.0):
    """sum over k of a b, given as the (a_part, b_part) products to issue (small ones first, the
    big one last; the sum scaled by small_scale before the last: the pairs' 2^-11);
    k_width the instruction's k (8 TF32, 16 fp16), k_step the kernels' fresh-sum width (16)."""
    a0, b0 = products[0]
    k = a0.shape[-1]
    out = torch.zeros(*a0.shape[:-1], b0.shape[-1], dtype=torch.float32)
    for k0 in range(0, k, k_step):
        t = torch.zeros_like(out)
        for k1 in range(k0, min(k0 + k_step, k), k_width):
            for i, (a, b) in enumerate(products):
                if i == len(products) - 1:
                    t = t * small_scale
                sl = slice(k1, min(k1 + k_width, k))
                t = round_toward_zero(t.double() + a[..., sl].double() @ b[..., sl, :].double())
        out = out + t
    return out


def matmul(kind, a, b, computed=False):
    """a @ b (float32) as the kind's kernels would compute it. fp16 pairs: a and b inputs (q, k, v,
    dout), each row of a and column of b at its own scale, the product scaled back after; or a
    computed (P, dS): b's rows (the k index) at their own scales, whose 2^-e multiply a's columns
    before a is split at its 16-row tiles' scales, undone in each k16 step's add."""
    if kind == "3xtf32":
        (ab, as_), (bb, bs) = tf32_split(a), tf32_split(b)
        return tensor_core_matmul([(as_, bb), (ab, bs), (ab, bb)], 16, 8)
    if not computed:
        ea, eb = row_exponents(a), row_exponents(b.transpose(-2, -1)).transpose(-2, -1)
        (ah, al), (bh, bl) = fp16_split(a, ea), fp16_split(b, eb)
        return tensor_core_matmul([(al, bh), (ah, bl), (ah, bh)], 16, 16, 2.0**-11) * torch.exp2(-ea) * torch.exp2(-eb)
    eb = row_exponents(b)
    a = a * torch.exp2(-eb).transpose(-2, -1)
    ea = tile_exponents(a)
    (ah, al), (bh, bl) = fp16_split(a, ea), fp16_split(b, eb)
    return tensor_core_matmul([(al, bh), (ah, bl), (ah, bh)], 16, 16, 2.0**-11) * torch.exp2(-ea)


def attention(kind, q, k, v, dout):
    """Forward and backward as the kernels order them; the softmax and its sums in float32."""
    scale = q.shape[-1] ** -0.5
    s = matmul(kind, q, k.transpose(-2, -1)) * scale
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse)
    out = matmul(kind, p, v, computed=True)
    dp = matmul(kind, dout, v.transpose(-2, -1))
    delta = (dout * out).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = matmul(kind, ds, k, computed=True) * scale
    dk = matmul(kind, ds.transpose(-2, -1), q, computed=True) * scale
    dv = matmul(kind, p.transpose(-2, -1), dout, computed=True)
    return out, dq, dk, dv


def ratios(kind, seed, scale, d):
    return float32_error_ratios(lambda *inputs: attention(kind, *(t.float() for t in inputs)), seed, scale, d)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    print(f"model, head dim {args.head_dim}, 200 x 300, {args.seeds} seeds: max over seeds of error / bound")
    print(f"{'split':>8} {'scale':>5} {'out':>6} {'dq':>6} {'dk':>6} {'dv':>6}")
    for kind in ("3xtf32", "fp16pair"):
        for scale in (1.0, 3.0, 1e-4):
            worst = [max(c) for c in zip(*(ratios(kind, s, scale, args.head_dim) for s in range(args.seeds)))]
            print(f"{kind:>8} {scale:>5g} " + " ".join(f"{w:6.3f}" for w in worst))


if __name__ == "__main__":
    main()
