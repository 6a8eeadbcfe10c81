#!/usr/bin/env python3
"""A model of the head-dim-256 fused backward's dQ box ring (flash_bwd_sm90_fused256.cuh), with
one drain warp or two (the ordered kernel's), run under random interleavings (no GPU).

    python3 benchmarks/model_dq_ring256.py [--drains 1|2] [--runs 3000]

The parties: two consumers, each storing its 4 boxes of a step in order (box b of a step is
consumer b % 2's, slot (8 gs + b) % 3 of the ring), each after a sync on its named barrier
kDqEmpty + c and then an arrive on kDqFull + slot; the drain warps, as the kernel's loop: a
tile's first box frees box 0's slot once all but its two newest bulk groups are read, every box
but a tile's last frees the next box's slot once all but its newest is read, then syncs on the
box's kDqFull and issues its bulk add; with two drains, drain d takes the global steps gs with
gs % 2 == d, waits for the ring (dq_handoff[d]) before its first box and hands it over once its
own boxes are read. A named barrier's phase completes when one consumer and one drain warp have
reached it (each counts 128 and 32 of its 160 threads). Bulk reads complete later, in issue
order per drain. Tiles have 0-4 steps. Checks: no deadlock, no named barrier phase reached by two
parties of one side, no slot stored over before its box is read, every box read once.
`handoff_wait` and `handoff_reads` (the hand-over's wait and its read wait) can be left out to
show that each is needed."""
import argparse
import random
import sys

SLOTS, BOXES = 3, 8


class ProtocolError(AssertionError):
    pass


def run(seed, drains, handoff_wait=True, handoff_reads=True):
    """One random interleaving of a random walk of tiles; the number of steps, or ProtocolError."""
    rnd = random.Random(seed)
    tiles = [rnd.choice([0, 1, 1, 2, 3, 4]) for _ in range(rnd.randint(1, 5))]
    barriers = {}  # (kind, index) -> {"consumer": arrived, "drain": arrived, "phase": completed}

    def barrier(key):
        return barriers.setdefault(key, {"consumer": 0, "drain": 0, "phase": 0})

    def arrive(key, side):
        b = barrier(key)
        if b[side]:
            raise ProtocolError(f"barrier {key}: a second {side} in one phase")
        b[side] = 1
        if b["consumer"] and b["drain"]:
            b["consumer"] = b["drain"] = 0
            b["phase"] += 1

    def sync(key, side):  # arrive, then wait for the phase to complete
        before = barrier(key)["phase"]
        arrive(key, side)
        while barrier(key)["phase"] <= before:
            yield

    slot_box = [None] * SLOTS  # the box stored in each slot and not yet read
    in_flight = {0: [], 1: []}  # each drain's issued bulk adds, (box, slot), not yet read
    read = []
    handoffs = [0, 0]  # completed phases of dq_handoff[d]

    def consumer(c):
        gs = 0
        for steps in tiles:
            for _ in range(steps):
                for k in range(4):
                    box = BOXES * gs + 2 * k + c
                    slot = box % SLOTS
                    yield from sync(("empty", c), "consumer")
                    if slot_box[slot] is not None or any(s == slot for d in in_flight for _, s in in_flight[d]):
                        raise ProtocolError(f"box {box} stored over slot {slot} before its box was read")
                    slot_box[slot] = box
                    yield
                    arrive(("full", slot), "consumer")
                gs += 1

    def reads_done(d, keep):  # bulk_wait_group_read<keep>
        while len(in_flight[d]) > keep:
            yield

    def drain(d):
        g = 0
        for steps in tiles:
            for step in range(steps):
                gs = g + step
                if gs % drains != d:
                    continue
                for _ in range(rnd.randint(0, 3)):  # the turn's wait
                    yield
                if drains == 2 and gs > 0 and handoff_wait:
                    while handoffs[d] <= (gs - 1) // 2:
                        yield
                for b in range(BOXES):
                    slot = (BOXES * gs + b) % SLOTS
                    in_tile = BOXES * step + b
                    if in_tile == 0:
                        yield from reads_done(d, SLOTS - 1)
                        arrive(("empty", 0), "drain")
                    if in_tile + 1 < BOXES * steps:
                        yield from reads_done(d, SLOTS - 2)
                        arrive(("empty", (b + 1) % 2), "drain")
                    yield from sync(("full", slot), "drain")
                    box = BOXES * gs + b
                    if slot_box[slot] != box:
                        raise ProtocolError(f"the drain found box {slot_box[slot]} in slot {slot}, not {box}")
                    in_flight[d].append((box, slot))
                if drains == 2:
                    if handoff_reads:
                        yield from reads_done(d, 0)
                    handoffs[1 - d] += 1
                for _ in range(rnd.randint(0, 3)):  # the adds' completion and the turn's release
                    yield
            g += steps
        yield from reads_done(d, 0)

    def bulk_reads():
        while True:
            for d in (0, 1):
                if in_flight[d] and rnd.random() < 0.3:
                    box, slot = in_flight[d].pop(0)
                    slot_box[slot] = None
                    read.append(box)
            yield

    parties = {("consumer", c): consumer(c) for c in (0, 1)}
    parties.update({("drain", d): drain(d) for d in range(drains)})
    reads = bulk_reads()
    for _ in range(200_000):
        if not parties:
            break
        name = rnd.choice(list(parties))
        try:
            next(parties[name])
        except StopIteration:
            del parties[name]
        next(reads)
    else:
        raise ProtocolError(f"deadlock: {sorted(parties)} still waiting, tiles {tiles}")
    for _ in range(1000):
        next(reads)
    if sorted(read) != list(range(BOXES * sum(tiles))):
        raise ProtocolError(f"boxes read {sorted(read)}, steps {sum(tiles)}")
    return sum(tiles)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drains", type=int, choices=(1, 2), default=2)
    parser.add_argument("--runs", type=int, default=3000)
    args = parser.parse_args(argv)
    steps = 0
    for seed in range(args.runs):
        try:
            steps += run(seed, args.drains)
        except ProtocolError as e:
            print(f"seed {seed}: {e}")
            return 1
    print(f"{args.runs} runs, {steps} steps, {args.drains} drain(s): no deadlock, no slot stored over, "
          "no barrier phase reached twice by one side, every box read once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
