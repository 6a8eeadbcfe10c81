#!/usr/bin/env python3
"""The host's time per call, for ours and the peers: over back-to-back calls (the host's time or
the GPU's, whichever is longer; a tiny problem by default, where it is the host's), and the
host's own time with the GPU kept busy by a sleep kernel (at any --shape); and where ours spends
it (torch.profiler's CPU ops, the GPU kept busy too, so that a launch's wait for the GPU does not
show as that launch's cost). Where a call's kernels take less than the host's time, the GPU waits
for the host and a benchmark's timings are the host's.

    python3 benchmarks/host_overhead.py --impls cuflash_attn,cuflash_attn_nondet,sdpa_cudnn,sdpa_flash
    python3 benchmarks/host_overhead.py --shape 32,16,512,128 --impls cuflash_attn,sdpa_cudnn
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402  (the implementations, the inputs)

SLEEP_CYCLES = 1_000_000_000  # host_only_us's sleep kernel: about 0.5 s at Hopper's clocks


def host_only_us(step, calls):
    """The host's own time per call, at any problem size: the calls are issued behind a sleep
    kernel long enough that the GPU never catches up, so no launch waits for it. None where the
    issue outlasted the sleep: a call waited for the GPU (a synchronization inside it, or a full
    launch queue), and the time would be the GPU's."""
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(SLEEP_CYCLES)
    end.record()
    began = time.perf_counter()
    for _ in range(calls):
        step()
    host_s = time.perf_counter() - began
    torch.cuda.synchronize()
    return host_s / calls * 1e6 if host_s < 0.8 * start.elapsed_time(end) / 1e3 else None


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
    print("fwd us, fwd+bwd us: the wall time a call over back-to-back calls (the host's or the GPU's, whichever\n"
          "is longer); host-only: the host's own time a call, the GPU kept busy (\"waits\": a call waited for\n"
          "the GPU)\n")
    print("| impl | causal | fwd us | fwd+bwd us | host-only fwd us | host-only fwd+bwd us |\n|---|---|---|---|---|---|")
    for name, make in impls.items():
        if isinstance(make, str):
            print(f"| {name} | - | {make} | |")
            continue
        with bench.environment_of(name):
            for causal in (False, True):
                fn = make(causal)
                fwd = per_call_us(bench.fwd_step(fn, q, k, v), args.calls)
                both = per_call_us(bench.fwdbwd_step(fn, q, k, v, dout), args.calls)
                host = [host_only_us(step, min(args.calls, 50)) for step in
                        (bench.fwd_step(fn, q, k, v), bench.fwdbwd_step(fn, q, k, v, dout))]
                host = ["waits" if t is None else f"{t:.1f}" for t in host]
                print(f"| {name} | {'yes' if causal else 'no'} | {fwd:.1f} | {both:.1f} | {host[0]} | {host[1]} |")
    make = impls.get(args.profile)
    if make is None or isinstance(make, str):
        return
    step = bench.fwdbwd_step(make(False), q, k, v, dout)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.cuda._sleep(SLEEP_CYCLES)  # the calls' launches never wait for the GPU
        for _ in range(50):
            step()
        torch.cuda.synchronize()
    print(f"\n{args.profile}'s CPU ops over 50 forward + backward calls:\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
