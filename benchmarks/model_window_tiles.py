#!/usr/bin/env python3
"""The share of a tiled forward's computed scores that a window or a causal mask leaves visible
(no GPU): the ceiling a tiling puts on a masked call's TFLOP/s counted over its visible pairs, as
bench_features.py counts the window's.

    python3 benchmarks/model_window_tiles.py [--seqlens 2048,8192] [--tiles 128x128,64x64,128x176]

A tile of block_m query rows computes every key block (of block_n keys, aligned at 0) that holds a
key one of its rows sees, whole; the window is bench_features.py's: N/8 keys each side, before only
under causal (our rule: key j visible to query i iff i - left <= j <= i + right). Prints, for each
tiling and length, the visible share for the window and for plain causal, and the window's ceiling
against plain's own (1 without a mask), non-causal and causal."""
import argparse
import sys


def visible_share(n, left, right, block_m, block_n):
    """Visible (query, key) pairs over the pairs the tiles compute; left or right < 0: unbounded."""
    visible = computed = 0
    for m0 in range(0, n, block_m):
        rows = range(m0, min(n, m0 + block_m))
        first = max(0, m0 - left) if left >= 0 else 0
        last = min(n - 1, rows[-1] + right) if right >= 0 else n - 1
        computed += (last // block_n - first // block_n + 1) * block_n * len(rows)
        for i in rows:
            lo = max(0, i - left) if left >= 0 else 0
            hi = min(n - 1, i + right) if right >= 0 else n - 1
            visible += hi - lo + 1
    return visible / computed


def ceilings(n, block_m, block_n):
    """(window non-causal, window causal) shares against plain's own: plain non-causal computes no
    hidden pair (1), plain causal its diagonal blocks' hidden halves."""
    w = n // 8
    causal_plain = visible_share(n, -1, 0, block_m, block_n)
    return visible_share(n, w, w, block_m, block_n), visible_share(n, w, 0, block_m, block_n) / causal_plain


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    p.add_argument("--tiles", type=lambda s: [tuple(int(x) for x in t.split("x")) for t in s.split(",")],
                   default=[(128, 128), (64, 64), (128, 176)], help="block_m x block_n, comma-separated")
    args = p.parse_args(argv)
    print("| tile | N | window share | window causal share | plain causal share | "
          "ceiling vs plain | ceiling vs plain, causal |")
    print("|---|---|---|---|---|---|---|")
    for block_m, block_n in args.tiles:
        for n in args.seqlens:
            w = n // 8
            shares = [visible_share(n, w, w, block_m, block_n), visible_share(n, w, 0, block_m, block_n),
                      visible_share(n, -1, 0, block_m, block_n)]
            full, causal = ceilings(n, block_m, block_n)
            print(f"| {block_m}x{block_n} | {n} | " + " | ".join(f"{x:.3f}" for x in shares)
                  + f" | {full:.2f}x | {causal:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
