#!/usr/bin/env python3
"""Plot a results JSON of benchmarks/bench_attention.py.

    python3 benchmarks/plot.py [RESULTS.json]     # default: the newest in benchmarks/results

Writes next to the JSON, with its stem: <stem>-fwd.png and <stem>-bwd.png (TFLOP/s against
seqlen, one panel per (head_dim, causal), one line per impl, ours bold) for bfloat16/bhnd (or
the first dtype/layout present), <stem>-<dtype>-<layout>-fwd.png / -bwd.png for any other
dtype/layout, and <stem>-memory.png when the JSON has memory_rows.
"""
import argparse
import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
OURS = "cuflash_attn"
IMPL_ORDER = (OURS, "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "cuflash_attn_nondet")
PASSES = {"fwd": ("fwd_tflops", "forward"), "bwd": ("bwd_tflops", "backward")}


def newest_json(directory):
    files = sorted((p for p in Path(directory).glob("*.json") if not p.name.endswith("-io.json")),
                   key=lambda p: p.stat().st_mtime)  # -io.json: analyze_io.py's, no timings
    if not files:
        sys.exit(f"no results JSON in {directory}; pass one as an argument")
    return files[-1]


def ordered_impls(rows):
    present = {r["impl"] for r in rows}
    return [i for i in IMPL_ORDER if i in present] + sorted(present - set(IMPL_ORDER))


def line_style(impl):
    """One fixed colour per impl (the same in every panel), ours bold."""
    known = list(IMPL_ORDER)
    color = f"C{known.index(impl)}" if impl in known else f"C{5 + sum(map(ord, impl)) % 5}"
    if impl == OURS:
        return {"color": color, "linewidth": 3.0, "marker": "o", "markersize": 6, "zorder": 3}
    return {"color": color, "linewidth": 1.3, "marker": ".", "markersize": 6, "alpha": 0.85}


def log2_axis(ax, xs, label):
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x // 1024}k" if x >= 1024 else str(x) for x in xs])
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)


def env_title(env):
    return (f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
            f"cuDNN {env.get('cudnn', '?')}, {env.get('date', '?')}")


def plot_tflops(plt, env, rows, field, what, path):
    """One panel per (head_dim, causal): TFLOP/s against seqlen, one line per impl."""
    panels = sorted({(r["head_dim"], r["causal"]) for r in rows})
    causals = sorted({c for _, c in panels})
    head_dims = sorted({d for d, _ in panels})
    fig, axes = plt.subplots(len(head_dims), len(causals), squeeze=False, sharex=True,
                             figsize=(5.5 * len(causals), 3.6 * len(head_dims)))
    seqlens = sorted({r["seqlen_q"] for r in rows})
    for (d, causal) in panels:
        ax = axes[head_dims.index(d)][causals.index(causal)]
        for impl in ordered_impls(rows):
            pts = sorted((r["seqlen_q"], r[field]) for r in rows
                         if r["impl"] == impl and r["head_dim"] == d and r["causal"] == causal
                         and "error" not in r and r.get(field) is not None)
            if pts:
                ax.plot(*zip(*pts), label=impl, **line_style(impl))
        ax.set_title(f"D={d}, {'causal' if causal else 'non-causal'}")
        ax.set_ylabel(f"{what} TFLOP/s")
        ax.set_ylim(bottom=0)
        log2_axis(ax, seqlens, "seqlen (batch * seqlen = 16k tokens)")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    labels = [i for i in ordered_impls(rows) if i in handles]
    fig.legend([handles[lab] for lab in labels], labels, loc="upper center",
               ncol=len(labels), bbox_to_anchor=(0.5, 0.985), frameon=False)
    r0 = rows[0]
    fig.suptitle(f"{what}, {r0['dtype']}, {r0['layout']}: {env_title(env)}", y=0.995, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_memory(plt, env, rows, path):
    rows = [r for r in rows if "error" not in r]
    seqlens = sorted({r["seqlen"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, (field, what) in zip(axes[0], (("fwd_peak_mib", "forward"),
                                           ("fwdbwd_peak_mib", "forward + backward"))):
        for impl in ordered_impls(rows):
            pts = sorted((r["seqlen"], r[field]) for r in rows if r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), label=impl, **line_style(impl))
        ax.set_yscale("log")
        ax.set_ylabel("peak MiB beyond the inputs")
        ax.set_title(what)
        log2_axis(ax, seqlens, "seqlen")
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"peak memory, {r0.get('dtype', '')} B={r0.get('batch')} H={r0.get('heads')} "
                 f"D={r0.get('head_dim')}: {env_title(env)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def groups(rows):
    """(dtype, layout) pairs, bfloat16/bhnd (the standard table) first."""
    return sorted({(r["dtype"], r["layout"]) for r in rows},
                  key=lambda g: (g[0] != "bfloat16", g[0], g[1] != "bhnd", g[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot TFLOP/s and memory from a bench_attention.py JSON.")
    p.add_argument("json", nargs="?", type=Path, default=None,
                   help=f"results JSON (default: the newest in {RESULTS_DIR})")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 1
    path = args.json or newest_json(RESULTS_DIR)
    results = json.loads(path.read_text())
    env, rows = results.get("env", {}), results.get("rows", [])
    stem = path.with_suffix("")
    written = []
    for i, (dtype, layout) in enumerate(groups(rows)):
        sub = [r for r in rows if r["dtype"] == dtype and r["layout"] == layout]
        if not any("error" not in r for r in sub):
            continue
        prefix = f"{stem}" if i == 0 else f"{stem}-{dtype}-{layout}"
        for name, (field, what) in PASSES.items():
            written.append(plot_tflops(plt, env, sub, field, what, Path(f"{prefix}-{name}.png")))
    memory_rows = results.get("memory_rows", [])
    if any("error" not in r for r in memory_rows):
        written.append(plot_memory(plt, env, memory_rows, Path(f"{stem}-memory.png")))
    if not written:
        print(f"nothing to plot in {path}", file=sys.stderr)
        return 1
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
