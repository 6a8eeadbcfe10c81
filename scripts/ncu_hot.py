"""Each kernel's hottest SASS instructions from Nsight Compute's source page
(`ncu -i R --page source --csv --print-source sass`, gzipped), by warp stall samples: the
instructions where warps wait most, with their leading stall reasons, the samples summed by
opcode and by execution count (prologue, loop, epilogue). Usage: python3 scripts/ncu_hot.py ncu_sass.csv.gz [top]"""
import csv
import gzip
import io
import sys
from collections import Counter


def tables(lines):
    """(title, header, rows) for each kernel: a header row starts a table, a line that does not
    fit the header's width (the kernel's name) ends it and titles the next."""
    title, header, rows = "", None, []
    for fields in csv.reader(lines):
        if any("Address" in f for f in fields) and any(f == "Source" for f in fields):
            if header:
                yield title, header, rows
            header, rows = fields, []
        elif header and len(fields) == len(header):
            rows.append(fields)
        elif fields:
            if header:
                yield title, header, rows
                header, rows = None, []
            title = " ".join(fields)[:400]
    if header:
        yield title, header, rows


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with gzip.open(path, "rt") as f:
        text = f.read()
    printed = set()
    for title, header, rows in tables(io.StringIO(text)):
        if (title, len(rows)) in printed:  # the source page can list a kernel twice
            continue
        printed.add((title, len(rows)))
        samples = next((i for i, h in enumerate(header) if h.startswith("Warp Stall Sampling (All")), None)
        source = header.index("Source")
        if samples is None:
            print(f"== {title}: no stall samples among {header[:12]}")
            continue
        reasons = [i for i, h in enumerate(header) if h.startswith("stall_") and not h.endswith("(Not Issued)")]
        total = sum(number(r[samples]) for r in rows) or 1.0
        print(f"== {title}\n{len(rows)} instructions, {total:.0f} samples")
        by_op, by_reason = Counter(), Counter()
        for r in rows:
            words = [w for w in r[source].split() if not w.startswith("@")]  # no predicate
            by_op[words[0].split(".")[0] if words else "?"] += number(r[samples])
            for i in reasons:
                by_reason[header[i]] += number(r[i])
        print("by opcode: " + ", ".join(f"{op} {100 * s / total:.1f}%" for op, s in by_op.most_common(14)))
        print("by reason: " + ", ".join(f"{why} {100 * s / total:.1f}%" for why, s in by_reason.most_common(8)))
        # Where the time goes by how often code runs: each execution count (a loop body runs its
        # trip count times the prologue's count), and runs of consecutive instructions sharing
        # one (a tile's prologue, the loop, the epilogue), in address order.
        executed = header.index("Instructions Executed") if "Instructions Executed" in header else None
        if executed is not None:
            by_count, instructions = Counter(), Counter()
            for r in rows:
                by_count[number(r[executed])] += number(r[samples])
                instructions[number(r[executed])] += 1
            print("by execution count: " + ", ".join(f"{c:.0f} x {instructions[c]} instructions {100 * s / total:.1f}%"
                                                    for c, s in by_count.most_common(6)))
            runs = []
            for r in rows:
                count = number(r[executed])
                if runs and runs[-1][0] == count:
                    runs[-1][2] += number(r[samples])
                    runs[-1][3] += 1
                    runs[-1][4] = r[0]
                else:
                    runs.append([count, r[0], number(r[samples]), 1, r[0]])
            print("runs of one execution count holding >= 0.5% of the samples (first-last address):")
            for count, first, s, n, last in runs:
                if s / total >= 0.005:
                    print(f"  {first[-5:]:>5}-{last[-5:]:<5} {n:4d} instructions x {count:.0f}: {100 * s / total:5.1f}%")
        for r in sorted(rows, key=lambda r: -number(r[samples]))[:top]:
            lead = sorted(((number(r[i]), header[i]) for i in reasons), reverse=True)[:3]
            why = ", ".join(f"{name} {100 * s / max(number(r[samples]), 1):.0f}%" for s, name in lead if s > 0)
            print(f"{100 * number(r[samples]) / total:5.1f}%  {r[0][-5:]:>5}  {r[source].strip()[:64]:64}  {why}")
        print()


if __name__ == "__main__":
    main()
