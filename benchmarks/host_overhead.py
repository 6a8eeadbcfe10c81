#!/usr/bin/env python3
"""The host's time per call, for ours and the peers: over back-to-back calls (the host's time or
the GPU's, whichever is longer; a tiny problem by default, where it is the host's), and the
host's own time with the GPU kept busy by a sleep kernel (at any --shape); and where ours spends
it (torch.profiler's CPU ops, the GPU kept busy too, so that a launch's wait for the GPU does not
show as that launch's cost). Where a call's kernels take less than the host's time, the GPU waits
for the host and a benchmark's timings are the host's.

    python3 benchmarks/host_overhead.py --impls cuflash_attn,cuflash_attn_nondet,sdpa_cudnn,sdpa_flash
    python3 benchmarks/host_overhead.py --shape 32,16,512,128 --impls cuflash_attn,sdpa_cudnn
    python3 benchmarks/host_overhead.py --shape 32,16,512,128 --parts   # each piece's host time
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402  (the implementations, the inputs)

SLEEP_CYCLES = 1_000_000_000  # host_only_us's sleep kernel: about 0.5 s at Hopper's clocks


def host_only_us(step, calls, windows=5):
    """The host's own time per call, at any problem size: the calls are issued behind a sleep
    kernel long enough that the GPU never catches up, so no launch waits for it; the median of
    `windows` such windows (one window's figure moves by a third between windows on a shared
    host). None where the issue outlasted a sleep: a call waited for the GPU (a synchronization
    inside it, or a full launch queue), and the time would be the GPU's."""
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(windows):
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
        if host_s >= 0.8 * start.elapsed_time(end) / 1e3:
            return None
        times.append(host_s / calls * 1e6)
    return statistics.median(times)


def parts(q, k, v, dout, calls):
    """Where a forward + backward's host time goes, ours against cuDNN's (causal=False): each
    piece's host-only time."""
    cuflash_attn = bench.import_cuflash_attn()
    ops = torch.ops.cuflash_attn
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = ops.fwd.default(qd, kd, vd)

    def below_autograd(fn):
        def step():
            with torch._C._AutoDispatchBelowAutograd():
                fn()
        return step

    sdpa = bench.IMPL_FACTORIES["sdpa_cudnn"]()(False)
    view = q.view_as(q)

    class PassThrough(torch.autograd.Function):  # a Python node, as ours, that does nothing
        @staticmethod
        def forward(ctx, q):
            return q.view_as(q)

        @staticmethod
        def backward(ctx, grad):
            return grad

    class BwdOnly(torch.autograd.Function):  # a Python node whose backward runs only the bwd op
        @staticmethod
        def forward(ctx, q, k, v):
            return out.view_as(out)

        @staticmethod
        def backward(ctx, grad):
            with torch._C._AutoDispatchBelowAutograd():
                return ops.bwd.default(grad, qd, kd, vd, out, lse)[:3]

    passed, bwd_only = PassThrough.apply(q), BwdOnly.apply(q, k, v)
    pieces = {
        "ours: the fwd op (C++, no autograd)": below_autograd(lambda: ops.fwd.default(qd, kd, vd)),
        "ours: the bwd op (C++, no autograd)": below_autograd(lambda: ops.bwd.default(dout, qd, kd, vd, out, lse)),
        "ours: flash_attention, no grad": lambda: cuflash_attn.flash_attention(qd, kd, vd),
        "ours: flash_attention, its graph recorded": lambda: cuflash_attn.flash_attention(q, k, v),
        "ours: flash_attention + autograd.grad": bench.fwdbwd_step(cuflash_attn.flash_attention, q, k, v, dout),
        "cuDNN: SDPA, no grad": lambda: sdpa(qd, kd, vd),
        "cuDNN: SDPA, its graph recorded": lambda: sdpa(q, k, v),
        "cuDNN: SDPA + autograd.grad": bench.fwdbwd_step(sdpa, q, k, v, dout),
        "autograd.grad over a view (the engine alone)": lambda: torch.autograd.grad(view, (q,), dout),
        "autograd.grad over a Python node that passes the gradient": lambda: torch.autograd.grad(passed, (q,), dout),
        "autograd.grad over a Python node that runs the bwd op": lambda: torch.autograd.grad(bwd_only, (q, k, v), dout),
    }
    print("| piece | host-only us |\n|---|---|")
    for name, step in pieces.items():
        t = host_only_us(step, calls)
        print(f"| {name} | {'waits' if t is None else f'{t:.1f}'} |")


def per_call_us(step, calls):
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def top_ops(event):
    """The outermost ops (cuflash_attn::bwd, aten::...) under a profiler event, not the engine's
    or a Python function's own events."""
    for child in event.cpu_children:
        if "::" in child.name and not child.name.startswith("autograd::"):
            yield child
        else:
            yield from top_ops(child)


def backward_timeline(fn, q, k, v, dout, calls=50):
    """Where a forward + backward's host time goes, across threads: torch.autograd.grad hands a
    graph's CUDA nodes to the engine's thread for the device and waits. From torch.profiler's CPU
    events (the GPU kept busy; the profiler adds a few us to each op it records, so the spans are
    upper bounds, the hand-offs less so), the median over `calls` of each span in us."""
    def step():
        with torch.profiler.record_function("step: forward"):
            out = fn(q, k, v)
        with torch.profiler.record_function("step: autograd.grad"):
            torch.autograd.grad(out, (q, k, v), dout)

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.cuda._sleep(SLEEP_CYCLES)
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    spans = {name: [] for name in ("forward", "autograd.grad", "to the node", "the node", "its ops",
                                   "back from the node")}
    threads = set()  # the thread the node ran on: "another" for a CUDA graph (the device's)
    for fwd, grad in zip(*(([e for e in events if e.name == f"step: {n}"]) for n in ("forward", "autograd.grad"))):
        nodes = [e for e in events if grad.time_range.start <= e.time_range.start and
                 e.time_range.end <= grad.time_range.end and e.name.startswith("autograd::engine::evaluate_function:")]
        if not nodes:
            continue
        first, last = min(nodes, key=lambda e: e.time_range.start), max(nodes, key=lambda e: e.time_range.end)
        node = max(nodes, key=lambda e: e.time_range.elapsed_us())
        ops = list(top_ops(node))
        threads.add("the caller's" if node.thread == grad.thread else "another")
        spans["forward"].append(fwd.time_range.elapsed_us())
        spans["autograd.grad"].append(grad.time_range.elapsed_us())
        spans["to the node"].append(first.time_range.start - grad.time_range.start)
        spans["the node"].append(node.time_range.elapsed_us())
        spans["its ops"].append(sum(e.time_range.elapsed_us() for e in ops))
        spans["back from the node"].append(grad.time_range.end - last.time_range.end)
        spans.setdefault("node", node.name.split(": ", 1)[-1])
    if not spans["forward"]:
        return None
    name = spans.pop("node")
    return f"{name} ({'/'.join(sorted(threads))} thread)", {k: statistics.median(v) for k, v in spans.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="cuflash_attn,cuflash_attn_nondet,sdpa_cudnn,sdpa_flash")
    parser.add_argument("--shape", default="1,2,128,64", help="batch,heads,seqlen,head_dim")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile", default="cuflash_attn", help="the implementation whose CPU ops are listed")
    parser.add_argument("--parts", action="store_true",
                        help="only the host-only time of each piece of a forward + backward, ours and cuDNN's")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("host_overhead.py needs a CUDA GPU")
    batch, heads, seqlen, head_dim = (int(x) for x in args.shape.split(","))
    q, k, v, dout = bench.make_inputs(batch, heads, seqlen, head_dim, torch.bfloat16, "bhnd")
    if args.parts:
        print(f"# Host-only time of each piece, {torch.cuda.get_device_name()}, bf16 B={batch} H={heads} "
              f"N={seqlen} D={head_dim}, the median of 5 windows of 50 calls\n")
        parts(q, k, v, dout, 50)
        return
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
    print("\nThe backward's hand-offs (causal=False; torch.profiler's CPU events, the median of 50 calls, us: "
          "the forward; torch.autograd.grad; within it, from its start to the backward node's start (on the "
          "device's thread for a CUDA graph), the node, the ops it called, and from the node's end to autograd.grad's return)\n")
    print("| impl | node | forward | autograd.grad | to the node | the node | its ops | back from the node |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, make in impls.items():
        if isinstance(make, str):
            continue
        with bench.environment_of(name):
            found = backward_timeline(make(False), q, k, v, dout)
        if found is None:
            print(f"| {name} | (no backward node seen) | | | | | | |")
            continue
        node, t = found
        print(f"| {name} | {node} | " + " | ".join(f"{x:.1f}" for x in t.values()) + " |")
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
