#!/usr/bin/env python3
"""Speed of the CPU kernels (csrc/cpu/flash_cpu.cpp) against torch's CPU scaled_dot_product_attention,
forward and forward + backward, in one process.

    python3 benchmarks/bench_cpu.py [--dtypes fp32,bf16] [--isas avx512bf16,avx512,avx2,base] [--threads N]
                                    [--masks none,causal]
                                    [--shapes "1,8,1024,64;1,8,2048,128;2,16,512,64"]
    python3 benchmarks/bench_cpu.py --decode [--num-splits N] [--shapes "1,32,8,1,4096,128;1,32,8,4,4096,128"]

Each shape (batch, heads, seqlen, head_dim) runs under each of --masks; ours under each CUFLASH_CPU_ISA
value of --isas (those above what the CPU has run its best), torch's under its own dispatch. The
figure is the fastest of --repeats calls (the CPU's timings are steady; the fastest is the one
least disturbed), in ms; the ratio is torch's time over ours (above 1: ours is faster).
--decode: the forward of a few query rows over a longer cache (shapes batch, heads_q, heads_kv,
seqlen_q, seqlen_k, head_dim; no mask; GQA through torch's enable_gqa; ours with --num-splits)."""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cuflash_attn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import switches_set  # noqa: E402  (run-time switches in a block)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SHAPES = "1,8,1024,64;1,8,2048,128;2,16,512,64;1,4,4096,64"
DECODE_SHAPES = ("1,32,32,1,4096,128;1,32,8,1,4096,128;4,32,8,1,2048,128;1,32,8,4,4096,128;1,32,8,16,4096,128;"
                 "1,8,1,4,8192,128;1,16,2,2,8192,128")


def fastest_ms(step, repeats):
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--isas", default="avx512bf16,avx512,avx2,base", help="CUFLASH_CPU_ISA values for ours")
    p.add_argument("--shapes", default=None, help=f"default: {SHAPES}; with --decode {DECODE_SHAPES}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--masks", default="none,causal",
                   help="none, causal (is_causal), bool or float (a causal mask as an attn_mask tensor, as models "
                        "with padding pass it)")
    p.add_argument("--decode", action="store_true", help="few query rows over a long cache, forward only")
    p.add_argument("--num-splits", type=int, default=0,
                   help="--decode: ours' split-KV (0, flash_attn_with_kvcache's default: chosen; 1: never)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decode:
        return decode(args, args.shapes or DECODE_SHAPES)
    isas = args.isas.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, torch's CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    header = ["dtype", "shape", "mask"] + [f"ours {i} fwd / fwd+bwd ms" for i in isas]
    header += ["torch fwd / fwd+bwd ms", f"torch / ours {isas[0]} fwd", f"torch / ours {isas[0]} fwd+bwd"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    torch.manual_seed(0)
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for shape in (args.shapes or SHAPES).split(";"):
            b, h, n, d = (int(x) for x in shape.split(","))
            for mask in args.masks.split(","):
                q, k, v = (torch.randn(b, h, n, d, dtype=dtype, requires_grad=True) for _ in range(3))
                dout = torch.randn(b, h, n, d, dtype=dtype)
                causal = mask == "causal"
                shows = torch.ones(n, n, dtype=torch.bool).tril() if mask in ("bool", "float") else None
                attn_mask = (shows if mask == "bool" else
                             torch.zeros(n, n, dtype=dtype).masked_fill(~shows, float("-inf")) if mask == "float"
                             else None)
                ours = lambda: cuflash_attn.flash_attention(q, k, v, causal=causal, attn_mask=attn_mask)  # noqa: E731
                theirs = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal,  # noqa: E731
                                                                attn_mask=attn_mask)

                def both(f):
                    def step():
                        torch.autograd.grad(f(), (q, k, v), dout)
                    return step

                cells, first = [], None
                for isa in isas:
                    with switches_set({"CUFLASH_CPU_ISA": isa}), torch.no_grad():
                        fwd = fastest_ms(ours, args.repeats)
                    with switches_set({"CUFLASH_CPU_ISA": isa}):
                        fwdbwd = fastest_ms(both(ours), max(2, args.repeats // 2))
                    first = first or (fwd, fwdbwd)
                    cells.append(f"{fwd:.1f} / {fwdbwd:.1f}")
                with torch.no_grad():
                    t_fwd = fastest_ms(theirs, args.repeats)
                t_fwdbwd = fastest_ms(both(theirs), max(2, args.repeats // 2))
                cells += [f"{t_fwd:.1f} / {t_fwdbwd:.1f}", f"{t_fwd / first[0]:.2f}x", f"{t_fwdbwd / first[1]:.2f}x"]
                row = [dtype_name, shape, mask] + cells
                print("| " + " | ".join(row) + " |", flush=True)


def decode(args, shapes):
    isas = args.isas.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward, no mask\n")
    header = ["dtype", "B,Hq,Hkv,Nq,Nk,D"] + [f"ours {i} ms" for i in isas] + ["torch ms", f"torch / ours {isas[0]}"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    torch.manual_seed(0)
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for shape in shapes.split(";"):
            b, hq, hk, nq, nk, d = (int(x) for x in shape.split(","))
            q = torch.randn(b, hq, nq, d, dtype=dtype)
            k, v = (torch.randn(b, hk, nk, d, dtype=dtype) for _ in range(2))
            cells = []
            for isa in isas:
                with switches_set({"CUFLASH_CPU_ISA": isa}):
                    cells.append(fastest_ms(lambda: cuflash_attn.flash_attention(q, k, v, num_splits=args.num_splits),
                                            args.repeats))
            theirs = fastest_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hk), args.repeats)
            row = [dtype_name, shape] + [f"{c:.2f}" for c in cells] + [f"{theirs:.2f}", f"{theirs / cells[0]:.2f}x"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
