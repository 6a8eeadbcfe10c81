#!/usr/bin/env python3
"""The host's time per call: a tiny problem (the GPU's share negligible), timed on the CPU over
many calls, for ours and the peers; and where ours spends it (torch.profiler's CPU ops). Where
a call's kernels take less than this, the GPU waits for the host and a benchmark's timings are
the host's.

    python3 benchmarks/host_overhead.py --impls cuflash_attn,cuflash_attn_nondet,sdpa_cudnn,sdpa_flash
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402  (the implementations, the inputs)


def per_call_us(step, calls):
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="cuflash_attn,cuflash_attn_nondet,sdpa_cudnn,sdpa_flash")
    parser.add_argument("--shape", default="1,2,128,64", help="batch,heads,seqlen,head_dim")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile", default="cuflash_attn", help="the implementation whose CPU ops are listed")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("host_overhead.py needs a CUDA GPU")
    batch, heads, seqlen, head_dim = (int(x) for x in args.shape.split(","))
    q, k, v, dout = bench.make_inputs(batch, heads, seqlen, head_dim, torch.bfloat16, "bhnd")
    impls = bench.load_impls(bench.parse_impls(args.impls))
    print(f"# Host time per call, {torch.cuda.get_device_name()}, bf16 B={batch} H={heads} N={seqlen} "
          f"D={head_dim}, {args.calls} calls\n")
    print("| impl | causal | fwd us | fwd+bwd us |\n|---|---|---|---|")
    for name, make in impls.items():
        if isinstance(make, str):
            print(f"| {name} | - | {make} | |")
            continue
        with bench.environment_of(name):
            for causal in (False, True):
                fn = make(causal)
                fwd = per_call_us(bench.fwd_step(fn, q, k, v), args.calls)
                both = per_call_us(bench.fwdbwd_step(fn, q, k, v, dout), args.calls)
                print(f"| {name} | {'yes' if causal else 'no'} | {fwd:.1f} | {both:.1f} |")
    make = impls.get(args.profile)
    if make is None or isinstance(make, str):
        return
    step = bench.fwdbwd_step(make(False), q, k, v, dout)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            step()
        torch.cuda.synchronize()
    print(f"\n{args.profile}'s CPU ops over 50 forward + backward calls:\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
