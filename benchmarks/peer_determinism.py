"""Whether each attention implementation's backward is bitwise reproducible: the same inputs'
gradients over several runs, compared bit for bit (the max |difference| where they differ).

Issue 9 compares our backward, deterministic by default, with torch's CUDNN_ATTENTION one; this
says which peers pay for reproducibility in the comparison and which do not. Nondeterminism shows
where many CTAs add to one gradient row at once, so the default shapes are large.

    python3 benchmarks/peer_determinism.py [--shapes 4,16,4096,128 16,16,1024,64] [--repeats 5]
        [--impls cuflash_attn,cuflash_attn_nondet,sdpa_flash,sdpa_cudnn,sdpa_efficient]
        [--dtype bf16] [--causal] [--device cuda] [--out FILE.md]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import DTYPES, environment_of, first_line, load_impls, parse_dtype, parse_impls  # noqa: E402

DEFAULT_IMPLS = "cuflash_attn,cuflash_attn_nondet,sdpa_flash,sdpa_cudnn,sdpa_efficient"
DEFAULT_SHAPES = ("4,16,4096,128", "16,16,1024,64")


def gradients(fn, q, k, v, dout):
    """(dq, dk, dv) of one forward + backward of fn on leaves viewing q, k, v (no copies; grad
    accumulates nothing between runs)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, dout)


def bits(t):
    """t's bits as integers of its size (so that NaNs compare by their bits, and -0 with +0 not)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def reproducibility(fn, q, k, v, dout, repeats):
    """{name: (bitwise equal in every repeat, max |difference| from the first run)} for dq, dk, dv."""
    first = gradients(fn, q, k, v, dout)
    result = {name: [True, 0.0] for name in ("dq", "dk", "dv")}
    for _ in range(repeats - 1):
        for name, want, got in zip(result, first, gradients(fn, q, k, v, dout)):
            if not torch.equal(bits(got), bits(want)):
                result[name][0] = False
                result[name][1] = max(result[name][1], (got.double() - want.double()).abs().max().item())
    return {name: tuple(value) for name, value in result.items()}


def parse_shape(text):
    shape = tuple(int(x) for x in text.split(","))
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is batch,heads,seqlen,head_dim, got {text!r}")
    return shape


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        help="batch,heads,seqlen,head_dim each ([B, H, N, D] inputs)")
    parser.add_argument("--repeats", type=int, default=5, help="forward + backward runs compared (at least 2)")
    parser.add_argument("--impls", type=parse_impls, default=parse_impls(DEFAULT_IMPLS))
    parser.add_argument("--dtype", type=parse_dtype, default="bf16", help=f"one of {', '.join(DTYPES)}")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    impls = load_impls(args.impls)
    lines = [f"Backward reproducibility over {args.repeats} runs ({args.dtype}, causal={args.causal}; "
             f"{torch.cuda.get_device_name() if args.device == 'cuda' else args.device}, torch {torch.__version__}):",
             "", "| shape (B, H, N, D) | impl | dq | dk | dv |", "|---|---|---|---|---|"]
    for shape in args.shapes:
        batch, heads, seqlen, head_dim = shape
        generator = torch.Generator(device=args.device).manual_seed(0)
        q, k, v, dout = (torch.randn(batch, heads, seqlen, head_dim, device=args.device, dtype=DTYPES[args.dtype],
                                     generator=generator) for _ in range(4))
        for name, make in impls.items():
            if isinstance(make, str):
                cells = [make] * 3
            else:
                try:
                    with environment_of(name):  # a variant's run-time switches (name@VAR=value)
                        found = reproducibility(make(args.causal), q, k, v, dout, args.repeats)
                    cells = ["bitwise" if same else f"differs (max {diff:.3g})" for same, diff in found.values()]
                except Exception as e:  # a backend that does not take this shape or dtype
                    cells = [f"error: {first_line(e)[:80]}"] * 3
            lines.append(f"| {shape} | {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
