#!/usr/bin/env python3
"""Several runs of bench_attention.py into one results file (JSON and .md): each row the median
of all its runs' rounds. For timings taken in separate processes, e.g. an A/B's two builds run
alternately (A B A B: scripts/gpu_ab_define.sh), so that a slow spell of the machine between
processes lands on one run of each build rather than on one build.

    python3 benchmarks/combine_runs.py OUT.json RUN1.json RUN2.json ...
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402


def combine(runs):
    """The rows of several runs' results, one per configuration and implementation (in first-seen
    order): the medians over every run's rounds (a run without rounds counts its figure once),
    the largest peak memory, and how many runs it had; an error row where any run failed."""
    groups = {}
    for results in runs:
        for row in results.get("rows", []):
            groups.setdefault(tuple(row.get(k) for k in bench.ROW_KEY), []).append(row)
    rows = []
    for key, group in groups.items():
        failed = next((r for r in group if "error" in r or r.get("fwd_ms") is None), None)
        if failed is not None:
            rows.append({**failed, "runs": len(group)})
            continue
        fwd = [t for r in group for t in r.get("fwd_ms_rounds", [r["fwd_ms"]])]
        fwdbwd = [t for r in group for t in r.get("fwdbwd_ms_rounds", [r["fwdbwd_ms"]])]
        # The training forward where every run timed it (else each backward less its forward)
        train_fwd = [t for r in group for t in r.get("train_fwd_ms_rounds", [])]
        row = dict(zip(bench.ROW_KEY, key))
        shape = (row["batch"], row["heads"], row["seqlen_q"], row["head_dim"])
        train_rounds = train_fwd if len(train_fwd) == len(fwdbwd) else None
        rows.append({**row, **bench.timed_fields(fwd, fwdbwd, shape, row["causal"], train_rounds),
                     "peak_mib": max(r.get("peak_mib", 0.0) for r in group), "runs": len(group)})
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    out, inputs = Path(argv[0]), [Path(a) for a in argv[1:]]
    runs = [json.loads(path.read_text()) for path in inputs]
    env = {**runs[0]["env"], "combined_from": [path.name for path in inputs]}
    bench.write_results(out, env, rows=combine(runs))
    print(f"wrote {out} and {out.with_suffix('.md')} from {len(inputs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
