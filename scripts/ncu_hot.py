"""Each kernel's hottest SASS instructions from Nsight Compute's source page
(`ncu -i R --page source --csv --print-source sass`, gzipped), by warp stall samples: the
instructions where warps wait most, with their leading stall reasons, and the samples summed by
opcode. Usage: python3 scripts/ncu_hot.py ncu_sass.csv.gz [top]"""
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
        # The main loop: the instructions sharing the most common execution count (the loop body
        # runs once a warp-step), where the warps doing the work spend their time.
        executed = header.index("Instructions Executed") if "Instructions Executed" in header else None
        counts = Counter(number(r[executed]) for r in rows) if executed is not None else Counter()
        body_count = max((c for c, n in counts.items() if c > 0 and n > 100), key=lambda c: counts[c], default=None)
        if body_count is not None:
            body = [r for r in rows if number(r[executed]) == body_count]
            body_total = sum(number(r[samples]) for r in body) or 1.0
            body_reasons = Counter()
            for r in body:
                for i in reasons:
                    body_reasons[header[i]] += number(r[i])
            print(f"loop: {len(body)} instructions run {body_count:.0f} times, {100 * body_total / total:.0f}% of "
                  "the samples; by reason: " +
                  ", ".join(f"{why} {100 * s / body_total:.1f}%" for why, s in body_reasons.most_common(8)))
        for r in sorted(rows, key=lambda r: -number(r[samples]))[:top]:
            lead = sorted(((number(r[i]), header[i]) for i in reasons), reverse=True)[:3]
            why = ", ".join(f"{name} {100 * s / max(number(r[samples]), 1):.0f}%" for s, name in lead if s > 0)
            print(f"{100 * number(r[samples]) / total:5.1f}%  {r[0][-5:]:>5}  {r[source].strip()[:64]:64}  {why}")
        print()


if __name__ == "__main__":
    main()
