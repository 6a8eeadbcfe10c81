#!/usr/bin/env python3
"""Speed of packed sequences (cu_seqlens, flash_attn_varlen_func's inputs) on each Hopper forward.

    python3 benchmarks/bench_varlen.py [--head-dims 64,128,256] [--lengths "2048x8;512,1024,3000,4096"]
                                       [--backward]

For every set of sequence lengths (a "LxN" item is N sequences of L tokens; 16384 tokens in the
default sets) and head dim, our forward on the packed batch under each CUFLASH_SM90 value in
--variants: by default the default parts less "varlen" (packed sequences on the cp.async Hopper
forward) and the defaults (the TMA forward, persistent where a dense batch of the longest
sequence would be); and, where every sequence has one length, the
same tokens as a dense batch under the defaults, in the [B, H, N, D] layout (the TMA forward's own
speed, the ceiling for the packed path) and in [B, N, H, D] (a packed tensor's row strides: what
the layout alone costs). bf16, heads = 2048 / D (GQA off), causal and not; TFLOP/s counts
each sequence's own FLOPs. --backward times the backward alone instead (each cell's forward run
once first, under the defaults). The cells of a shape are timed in --rounds interleaved rounds
(bench_attention.interleaved_timings), each figure their median."""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402

# csrc/cuda/run_switches.h's default parts less "varlen" (packed sequences on the cp.async forward)
LESS_VARLEN = "tma,bwd,bwdws,features,persistent,kvcache"


def parse_lengths(text):
    """'2048x8;512,1024' -> [[2048] * 8, [512, 1024]]."""
    sets = []
    for item in text.split(";"):
        lengths = []
        for part in item.split(","):
            length, _, count = part.partition("x")
            lengths += [int(length)] * int(count or 1)
        sets.append(lengths)
    return sets


def timed_pass(q, k, v, causal, backward, **packed):
    """The call a cell times: our forward, or (backward) our backward alone, on the forward's out
    and lse and a random dout."""
    ops = torch.ops.cuflash_attn
    if not backward:
        return lambda: ops.fwd(q, k, v, None, causal, False, **packed)
    out, lse = ops.fwd(q, k, v, None, causal, False, **packed)
    dout = torch.randn_like(out)
    return lambda: ops.bwd(dout, q, k, v, out, lse, None, None, causal, False, **packed)


def packed_call(lengths, heads, d, causal, backward=False):
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    longest = max(lengths)
    return timed_pass(q, k, v, causal, backward, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                      max_seqlen_k=longest)


def dense_call(length, batch, heads, d, causal, layout="bhnd", backward=False):
    shape = (batch, heads, length, d) if layout == "bhnd" else (batch, length, heads, d)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return timed_pass(q, k, v, causal, backward)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=lambda s: bench.parse_list(s, int), default=[64, 128])
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("2048x8;512x32;300,1000,3000,700,5000,6384"),
                   help="';'-separated sets of sequence lengths, LxN for N of length L")
    p.add_argument("--variants", type=lambda s: s.split(";"), default=[LESS_VARLEN, ""],
                   help="CUFLASH_SM90 values, ';'-separated, the first the ratios' base (default: the "
                        "default parts less varlen; the defaults); a value may set other switches after "
                        "'+', e.g. 'tma,persistent,varlen+CUFLASH_FWD_TILE=narrow'")
    p.add_argument("--backward", action="store_true",
                   help="time the backward (deterministic, the default) instead of the forward: 2.5x its FLOPs")
    bench.add_timing_arguments(p)
    args, timer = bench.parse_timed_command_line(p, argv)
    short_names = {"": "defaults", LESS_VARLEN: "less varlen"}
    names = [short_names.get(v, v) for v in args.variants]
    pass_name = "backward" if args.backward else "forward"
    print(f"{bench.env_line(bench.environment())}; {pass_name}, packed sequences\n")
    header = ["D", "causal", "lengths"] + [f"{n} TFLOP/s" for n in names] + ["dense TFLOP/s", "dense bnhd TFLOP/s"]
    header += [f"{n} / {names[0]}" for n in names[1:]] + [f"{names[-1]} / dense", f"{names[-1]} / dense bnhd"]
    print(bench.markdown_header(header))
    for d in args.head_dims:
        heads = 2048 // d
        for lengths in args.lengths:
            described = ",".join(f"{n}x{lengths.count(n)}" for n in sorted(set(lengths)))
            for causal in (False, True):
                flops = sum(bench.fwd_flops(1, heads, n, n, d, causal) for n in lengths)
                flops *= 2.5 if args.backward else 1
                steps = {f"@CUFLASH_SM90={v}" if v else "defaults":
                         (packed_call(lengths, heads, d, causal, args.backward),) for v in args.variants}
                if len(set(lengths)) == 1:
                    for layout in ("bhnd", "bnhd"):
                        name = "dense" if layout == "bhnd" else "dense bnhd"
                        steps[name] = (dense_call(lengths[0], len(lengths), heads, d, causal, layout,
                                                  args.backward),)
                samples = bench.interleaved_timings(steps, timer, args.rounds)
                tf = {}
                for name, rounds in samples.items():
                    tf[name] = bench.tflops(flops, statistics.median(rounds[0])) if isinstance(rounds, tuple) else None
                packed = [tf[f"@CUFLASH_SM90={v}" if v else "defaults"] for v in args.variants]
                dense = [tf.get("dense"), tf.get("dense bnhd")]
                cells = packed + dense
                ratios = [a / packed[0] if a and packed[0] else None for a in packed[1:]]
                ratios += [packed[-1] / c if packed[-1] and c else None for c in dense]
                text = [f"{c:.0f}" if c else "-" for c in cells] + [f"{r:.2f}x" if r else "-" for r in ratios]
                print(f"| {d} | {'yes' if causal else 'no'} | {described} | " + " | ".join(text) + " |", flush=True)


if __name__ == "__main__":
    main()
