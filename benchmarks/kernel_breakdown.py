#!/usr/bin/env python3
"""Where a forward + backward's GPU time goes, kernel by kernel (torch.profiler), for ours and
the peers on the standard table's shapes: which part of a gap is the main kernel and which the
small ones around it (the backward's delta, dQ conversion, zero fills).

    python3 benchmarks/kernel_breakdown.py --head-dims 64,128 --seqlens 1024 --causal both \
        --impls cuflash_attn,cuflash_attn_nondet,sdpa_cudnn
"""
import argparse
import collections
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402  (the shapes, the implementations, the inputs)


def short_name(name, width=90):
    """A kernel's name without its namespaces and argument list, its template arguments kept."""
    name = re.sub(r"\(.*\)$", "", name)
    name = re.sub(r"\b(void|cuflash::|sm90::|at::native::|\(anonymous namespace\)::)", "", name).strip()
    return name if len(name) <= width else name[: width - 3] + "..."


def kernel_times(step, iterations):
    """Kernel name -> (launches, total microseconds) over `iterations` calls of step."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            step()
        torch.cuda.synchronize()
    totals = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += 1
            totals[event.name][1] += event.device_time
    return totals


def report(name, totals, iterations, call="forward + backward"):
    total_us = sum(us for _, us in totals.values()) / iterations
    print(f"  {name}: {total_us:.1f} us of kernels a {call}")
    for kernel, (launches, us) in sorted(totals.items(), key=lambda item: -item[1][1]):
        per_step = us / iterations
        print(f"    {per_step:9.1f} us {100 * per_step / total_us:5.1f}%  x{launches / iterations:g}  "
              f"{short_name(kernel)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--seqlens", default="1024")
    parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--impls", default="cuflash_attn,cuflash_attn_nondet,sdpa_cudnn")
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_breakdown.py needs a CUDA GPU")
    dtype = bench.DTYPES[bench.parse_dtype(args.dtype)]
    impls = bench.load_impls(bench.parse_impls(args.impls))
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    shapes = bench.standard_shapes(bench.parse_list(args.head_dims, int), bench.parse_list(args.seqlens, int))
    print(f"# Kernel times, {torch.cuda.get_device_name()}, {args.dtype}, {args.iterations} iterations")
    for batch, heads, seqlen, head_dim in shapes:
        for causal in causals:
            print(f"\nB={batch} H={heads} N={seqlen} D={head_dim} causal={causal}")
            q, k, v, dout = bench.make_inputs(batch, heads, seqlen, head_dim, dtype, "bhnd")
            for name, make in impls.items():
                if isinstance(make, str):
                    print(f"  {name}: {make}")
                    continue
                with bench.environment_of(name):
                    report(name, kernel_times(bench.fwdbwd_step(make(causal), q, k, v, dout), args.iterations),
                           args.iterations)


if __name__ == "__main__":
    main()
