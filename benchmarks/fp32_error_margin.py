"""How close each float32 CUDA path comes to the accuracy rule (tests/reference.py's
accuracy_bound: 1e-5 x max|reference|): max|got - ref| / bound for out and the gradients, over seeds, at inputs
of unit scale and 3x (scores up to ~40, where an absolute error in S is a relative error of P).
A ratio above 1 fails the rule. Paths: CUFLASH_FP32 values (run-time switches, read at each call).

  python3 benchmarks/fp32_error_margin.py [--seeds 8] [--head-dim 64] [--paths ,3xtf32]"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import cuflash_attn  # noqa: E402,F401  (registers the ops)
from bench_attention import switches_set  # noqa: E402
from reference import float32_error_ratios  # noqa: E402


def ratios(path, seed, scale, d):
    def attend(q, k, v, dout):
        got_in = [t.cuda().float().requires_grad_() for t in (q, k, v)]
        with switches_set({"CUFLASH_FP32": path}):
            out, _ = torch.ops.cuflash_attn.fwd(*got_in, None, False, False)
            return (out, *torch.autograd.grad(out, got_in, dout.cuda().float()))
    return float32_error_ratios(attend, seed, scale, d)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--paths", default=",3xtf32", help="comma-separated CUFLASH_FP32 values ('' the default)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, head dim {args.head_dim}, 200 x 300, {args.seeds} seeds: "
          "max over seeds of error / bound")
    print(f"{'CUFLASH_FP32':>12} {'scale':>5} {'out':>6} {'dq':>6} {'dk':>6} {'dv':>6}")
    for path in args.paths.split(","):
        for scale in (1.0, 3.0):
            worst = [max(col) for col in zip(*(ratios(path, s, scale, args.head_dim) for s in range(args.seeds)))]
            print(f"{path or '(default)':>12} {scale:>5} " + " ".join(f"{w:6.3f}" for w in worst))


if __name__ == "__main__":
    main()
