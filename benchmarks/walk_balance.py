"""How evenly the persistent TMA forward's walk spreads a mask's unequal tiles over the SMs (a model,
no GPU): the busiest CTA's work against the mean, for the static walk (CTA c takes tiles c, c + G,
c + 2G, ... of TileWalk's order: L2 sections of heads, the longest query block first) and for a
dynamic one (each tile to the CTA that is free first, as a counter hands them out). A tile costs
its key blocks plus `--tile-cost` blocks of per-tile work. Standard table shapes (batch * seqlen =
16384, heads = 2048 / D), causal top-left. benchmarks/NOTES.md ("a dynamic walk under a mask"):
the dynamic walk it favoured measured 0-2% faster at D=128 where it predicted 12-14% less
imbalance, and was removed; the model's tile cost overstates the real spread, or the walk's own
costs ate the gain. Since the nineteenth session the launcher rates the static walk's sections by
this model itself (csrc/cuda/sm90/tile_walk.h's walk_section_heads) and takes the best; this
script still shows the 32 MB sections of before."""
import argparse
import heapq

L2_BYTES = 32 << 20  # tile_walk.h's kWalkL2Bytes


def tile_lengths(seqlen, head_dim, block_m, block_n, causal):
    heads_batches = (16384 // seqlen) * (2048 // head_dim)
    m_blocks = -(-seqlen // block_m)
    section = max(1, min(heads_batches, L2_BYTES // (2 * seqlen * head_dim * 2)))
    lengths = []
    for index in range(m_blocks * heads_batches):  # TileWalk::tile's order
        sec, local = divmod(index, m_blocks * section)
        here = min(section, heads_batches - sec * section)
        m_block = m_blocks - 1 - local // here
        keys = min((m_block + 1) * block_m, seqlen) if causal else seqlen
        lengths.append(-(-keys // block_n))
    return lengths


def balance(lengths, sms, tile_cost):
    costs = [n + tile_cost for n in lengths]
    grid = min(sms, len(costs))
    static = [0.0] * grid
    for i, c in enumerate(costs):
        static[i % grid] += c
    free = [(0.0, c) for c in range(grid)]
    for c in costs:
        load, cta = heapq.heappop(free)
        heapq.heappush(free, (load + c, cta))
    mean = sum(costs) / grid
    return max(static) / mean, max(load for load, _ in free) / mean


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--tile-cost", type=float, default=1.0)
    args = parser.parse_args()
    print("| D | tile | N | static / mean | dynamic / mean |\n|---|---|---|---|---|")
    for head_dim, block_m, block_n in ((64, 128, 128), (64, 192, 128), (128, 128, 128)):
        for seqlen in (512, 1024, 2048):
            static, dynamic = balance(tile_lengths(seqlen, head_dim, block_m, block_n, True), args.sms, args.tile_cost)
            print(f"| {head_dim} | {block_m}x{block_n} | {seqlen} | {static:.3f} | {dynamic:.3f} |")


if __name__ == "__main__":
    main()
