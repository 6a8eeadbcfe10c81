#!/usr/bin/env python3
"""A model of the fused Hopper dK/dV kernel's tile walk under a causal mask: which share of the
SMs' time the tiles fill, from their lengths alone (no GPU).

    python3 benchmarks/model_dkdv_walk.py [--head-dims 64,128,256] [--seqlens 1024,2048,8192]
        [--query-heads-per-kv 8] [--splits 1,2,4,8]

A tile is a key block of a (K/V head, sequence) pair; its steps are (query head of the group,
query block) pairs, every query head of the group in turn (DkvTile in flash_bwd_sm90_tma.cuh), one
time unit each. Persistent CTAs, one an SM, take the tiles in the order of ordered_tile (the
deterministic walk: within a group of heads whose q, dO and dq_accum fit in 24 MiB, the last key
block of every head, then the one before, ...); the dQ add of (query head, query block) by key
block n waits for key block n + 1's. --splits models tiles that each take a share of the group's
query heads (their partial dK/dV then summed: not built). Prints the work over the SMs (the
ideal), the modelled end, and their ratio: the walk's efficiency. Standard shapes as
bench_attention.py's: batch * seqlen = 16384, heads = 2048 / D."""
import argparse
import heapq
import sys

SMS = 132
L2_GROUP_BYTES = 24 << 20  # ordered_tile's budget for a group of heads


def tile_geometry(head_dim):
    """(resident keys a tile, streamed queries a step) of the fused dK/dV kernel (K::kBlockN,
    K::kBlockM: head dim 64's wide steps take 128 queries; head dim 256's kernel,
    flash_bwd_sm90_fused256.cuh, 80 keys and 64 queries)."""
    if head_dim == 256:
        return 80, 64
    return 128, (128 if head_dim == 64 else 64)


def walk_end(order, steps_of, sms=SMS):
    """When the last tile ends: CTAs take tiles in queue order as they free up; a step waits for
    the key block after it (its dQ turn), which precedes it in the queue."""
    finished = {}
    free = [(0.0, sm) for sm in range(sms)]
    end = 0.0
    for head, n in order:
        t, sm = heapq.heappop(free)
        for step in steps_of(n):
            t = max(t, finished.get((head, n + 1, step), 0.0)) + 1.0
            finished[(head, n, step)] = t
        end = max(end, t)
        heapq.heappush(free, (t, sm))
    return end


def efficiency(head_dim, seqlen, query_heads_per_kv, splits):
    block_n, block_m = tile_geometry(head_dim)
    batch, heads_q = max(1, 16384 // seqlen), 2048 // head_dim
    group = query_heads_per_kv // splits  # query heads a tile
    heads = heads_q // query_heads_per_kv * batch * splits  # walk "heads": (K/V head, sequence, split)
    key_blocks, query_blocks = -(-seqlen // block_n), -(-seqlen // block_m)

    def steps_of(n):  # causal: the query blocks from the key block's first row
        return [(j, m) for j in range(group) for m in range(n * block_n // block_m, query_blocks)]
    work = heads * sum(len(steps_of(n)) for n in range(key_blocks))
    group_heads = max(1, min(heads, L2_GROUP_BYTES // (group * seqlen * head_dim * (2 + 2 + 4))))
    order = [(h, key_blocks - 1 - level)
             for first in range(0, heads, group_heads)
             for level in range(key_blocks)
             for h in range(first, min(first + group_heads, heads))]
    ideal = work / SMS
    return ideal, walk_end(order, steps_of), max(len(steps_of(0)), 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--head-dims", type=ints, default=[64, 128, 256])
    p.add_argument("--seqlens", type=ints, default=[1024, 2048, 8192])
    p.add_argument("--query-heads-per-kv", type=int, default=8)
    p.add_argument("--splits", type=ints, default=[1])
    args = p.parse_args(argv)
    print("| D | N | query heads a K/V head | splits | longest tile (steps) | ideal (steps) | modelled end "
          "| efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    for d in args.head_dims:
        for n in args.seqlens:
            for s in args.splits:
                if args.query_heads_per_kv % s:
                    continue
                ideal, end, longest = efficiency(d, n, args.query_heads_per_kv, s)
                print(f"| {d} | {n} | {args.query_heads_per_kv} | {s} | {longest} | {ideal:.0f} | {end:.0f} "
                      f"| {ideal / end:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
