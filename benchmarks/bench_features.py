#!/usr/bin/env python3
"""Speed of each feature issue 9 names (softcap, ALiBi, dropout, GQA, a window, an attn_mask,
packed sequences) on each kernel that runs it.

    python3 benchmarks/bench_features.py [--head-dims 64,128,256] [--seqlens 2048,8192] [--backward]
        [--features plain,softcap,...]

For every shape and feature set, our forward under each CUFLASH_SM90 value in --variants (read at
every call, csrc/cuda/run_switches.h): by default "" (the defaults: features on the TMA forward),
"0" (the sm_80-class forward) and "bwd,features" (the cp.async Hopper forward, which varlen takes).
Prints a markdown table of TFLOP/s, each variant against the first, and each feature set
against plain attention under the same variant (issue 9 asks features to cost at most 10%).
A shape's feature sets and variants are timed in --rounds interleaved rounds (the order rotated),
each figure the median of its rounds (bench_attention.interleaved_timings).
Standard shapes as bench_attention.py's (batch * seqlen = 16384, heads = 2048 / D, bf16). The
features (FEATURES): softcap 30; ALiBi slopes per head; dropout 0.1; GQA with 8 query heads a K/V
head (fewer K/V heads where 8 does not divide the query heads); a window of N/8 keys each side
(causal: before only), its FLOPs those of the keys it shows; a float attn_mask [B, 1, N, N] (no
gradient), a bool one (bool_mask: 90% of the scores kept) and a bool key-padding mask [B, 1, 1, N]
(key_padding: the last N/8 keys hidden; ours only, the FLOPs all keys'); the batch as packed
sequences (cu_seqlens) of N tokens each (varlen), and so with GQA's K/V heads (gqa_varlen).
--backward times forward + backward instead (3.5x the forward's FLOPs), the backward being the
fused TMA backward with the features under the defaults (the "bwdfeatures" part) and the
sm_80-class kernels' under a variant without that part. --breakdown N then prints, for each shape
and feature set under the first variant, each kernel's time over N calls (kernel_breakdown.py's
report): which kernel a feature's loss sits in. --peers then prints torch SDPA's cuDNN and
memory-efficient backends on the same calls (plain, the attn_mask, GQA, dropout) against the first
variant, and --flex FlexAttention's (torch.compile'd Triton kernels: plain, softcap, ALiBi, GQA, the
window, the attn_mask; a first call per shape and feature set compiles, untimed)."""
import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402
import kernel_breakdown  # noqa: E402

FEATURES = {
    "plain": {},
    "softcap": {"softcap": 30.0},
    "alibi": {"alibi": True},
    "dropout": {"dropout_p": 0.1},
    "gqa": {"query_heads_per_kv": 8},
    "window": {"window_eighths": 1},
    "attn_mask": {"attn_mask": "float"},
    "bool_mask": {"attn_mask": "bool"},
    "key_padding": {"attn_mask": "key_padding"},
    "varlen": {"packed": True},
    "gqa_varlen": {"query_heads_per_kv": 8, "packed": True},
}
# The peers (--peers: torch's SDPA backends; --flex: FlexAttention) and the feature sets each takes
# as ours does: SDPA the plain call, the float attn_mask (added to the scaled scores, as ours), GQA
# (enable_gqa) and dropout (its own draws: the same work, another mask); FlexAttention softcap,
# ALiBi and the attn_mask as a score_mod, the causal mask and the window as a block mask (whose
# wholly hidden blocks it skips, as ours does), GQA.
SDPA_PEERS = ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
FLEX = "FLEX_ATTENTION"
PEER_FEATURES = {"CUDNN_ATTENTION": ("plain", "attn_mask", "gqa", "dropout"),
                 "EFFICIENT_ATTENTION": ("plain", "attn_mask", "gqa", "dropout"),
                 FLEX: ("plain", "softcap", "alibi", "gqa", "window", "attn_mask")}


def window_of(options, n, causal):
    """(left, right) of the feature's window for rows of n keys, (-1, -1) without one."""
    w = n * options.get("window_eighths", 0) // 8
    return (w, 0 if causal else w) if w else (-1, -1)


def feature_flops(batch, heads, n, d, causal, options):
    """The forward's FLOPs: bench_attention's, or with a window 4 d per visible (query, key)."""
    left, right = window_of(options, n, causal)
    if left < 0:
        return bench.fwd_flops(batch, heads, n, n, d, causal)
    pairs = sum(min(n - 1, i + right) - max(0, i - left) + 1 for i in range(n))
    return 4 * batch * heads * pairs * d


def op_call(q, k, v, causal, options):
    """(q, k, v, keyword arguments) of our op for the feature on dense [B, H, N, D] inputs: ALiBi
    slopes for the query heads, dropout's rng_state, the first 1/g of the K/V heads, the window, a
    mask, or the batch packed (q, k, v as [B N, H, D] and cu_seqlens)."""
    batch, heads, n, _ = q.shape
    kw = {key: options[key] for key in ("softcap", "dropout_p") if key in options}
    if options.get("alibi"):
        kw["alibi_slopes"] = torch.rand(heads, device=q.device, dtype=torch.float32)
    if kw.get("dropout_p", 0.0) > 0.0:
        kw["rng_state"] = torch.tensor([0, 0], device=q.device, dtype=torch.int64)  # [seed, offset]
    kv_heads = max(1, heads // options.get("query_heads_per_kv", 1))
    while heads % kv_heads:  # a divisor of the query heads (heads = 2048 / D need not divide by 8)
        kv_heads -= 1
    k, v = k[:, :kv_heads].contiguous(), v[:, :kv_heads].contiguous()
    kw["window_left"], kw["window_right"] = window_of(options, n, causal)
    mask = options.get("attn_mask")
    if mask == "float":
        kw["attn_mask"] = torch.randn(batch, 1, n, n, device=q.device, dtype=q.dtype)
    elif mask == "bool":
        kw["attn_mask"] = torch.rand(batch, 1, n, n, device=q.device) < 0.9
    elif mask == "key_padding":
        kw["attn_mask"] = (torch.arange(n, device=q.device) < n - n // 8).expand(batch, 1, 1, n).contiguous()
    if options.get("packed"):
        q, k, v = (t.transpose(1, 2).reshape(batch * n, t.shape[1], t.shape[3]).contiguous() for t in (q, k, v))
        cu = torch.arange(0, (batch + 1) * n, n, device=q.device, dtype=torch.int32)
        kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n)
    return q, k, v, kw


_compiled_flex = None


def flex_call(q, k, v, causal, kw, compiled=True):
    """FlexAttention's forward (a function of no arguments) for our op's call on dense [B, H, N, D]
    q, k, v with op_call's keyword arguments kw: softcap, ALiBi (s - slope |i - j|) and the attn_mask
    (s + mask) as a score_mod on the scaled score, the causal mask and the window (our rule: key j
    visible to query i iff i - left <= j <= i + right, right 0 under causal) as a block mask, GQA.
    compiled=False runs FlexAttention's eager reference (tests: the same attention as ours)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if compiled and _compiled_flex is None:
        # One compile per (feature, causal, shape): twelve and more, past dynamo's default of 8, after which
        # it runs flex_attention unfused (2-7 TFLOP/s, H100 2026-12-07).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    softcap, slopes, mask = kw.get("softcap", 0.0), kw.get("alibi_slopes"), kw.get("attn_mask")

    def score_mod(score, b, h, i, j):
        if softcap > 0:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score - slopes[h] * (i - j).abs()
        if mask is not None:
            score = score + mask[b, 0, i, j]
        return score
    left, right = kw.get("window_left", -1), 0 if causal else kw.get("window_right", -1)

    def visible(b, h, i, j):
        shown = i >= 0  # every key, as a tensor
        if left >= 0:
            shown = shown & (j >= i - left)
        if right >= 0:
            shown = shown & (j <= i + right)
        return shown
    n_q, n_k = q.shape[2], k.shape[2]
    block_mask = create_block_mask(visible, None, None, n_q, n_k, device=q.device) \
        if left >= 0 or right >= 0 else None
    plain = softcap <= 0 and slopes is None and mask is None
    attend = _compiled_flex if compiled else flex_attention
    return lambda: attend(q, k, v, score_mod=None if plain else score_mod, block_mask=block_mask,
                          enable_gqa=k.shape[1] != q.shape[1])


def peer_step(q, k, v, causal, options, backward, peer):
    """The same call through a peer (a feature set of PEER_FEATURES[peer]): torch's SDPA under one
    backend, or FlexAttention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v, kw = op_call(q, k, v, causal, options)
    if backward:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if peer == FLEX:
        forward = flex_call(q, k, v, causal, kw)
    else:
        mask = kw.get("attn_mask")
        if mask is not None and causal:  # SDPA takes a mask or is_causal: the causal part goes into the mask
            n = q.shape[2]
            mask = mask.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        sdpa_kw = {"attn_mask": mask, "is_causal": causal and mask is None, "enable_gqa": k.shape[1] != q.shape[1],
                   "dropout_p": kw.get("dropout_p", 0.0)}

        def forward():
            with sdpa_kernel(getattr(SDPBackend, peer)):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, **sdpa_kw)
    if not backward:
        return forward
    dout = torch.randn_like(q)
    return lambda: torch.autograd.grad(forward(), (q, k, v), dout)


def step(q, k, v, causal, options, backward):
    """One forward (or forward + backward) of our op with the feature options."""
    q, k, v, kw = op_call(q, k, v, causal, options)
    if not backward:
        return lambda: torch.ops.cuflash_attn.fwd(q, k, v, None, causal, False, **kw)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)

    def forward_backward():
        out, _ = torch.ops.cuflash_attn.fwd(qg, kg, vg, None, causal, False, **kw)
        torch.autograd.grad(out, (qg, kg, vg), dout)
    return forward_backward


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=lambda s: bench.parse_list(s, int), default=[64, 128, 256])
    p.add_argument("--seqlens", type=lambda s: bench.parse_list(s, int), default=[2048, 8192])
    p.add_argument("--variants", type=lambda s: s.split(";"), default=["", "0", "bwd,features"],
                   help="CUFLASH_SM90 values, ';'-separated (default: ';0;bwd,features'); a value may set "
                        "other switches after '+', e.g. '+CUFLASH_FWD_TILE=wide' (the defaults, the wide tile)")
    bench.add_timing_arguments(p)
    p.add_argument("--features", type=bench.parse_list, default=list(FEATURES),
                   help=f"FEATURES to time, plain first (default: {','.join(FEATURES)})")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--peers", action="store_true",
                   help=f"then torch SDPA's {', '.join(SDPA_PEERS)} on "
                        f"{', '.join(PEER_FEATURES[SDPA_PEERS[0]])}, against the first variant")
    p.add_argument("--flex", action="store_true",
                   help=f"then FlexAttention (torch.compile) on {', '.join(PEER_FEATURES[FLEX])}, against the "
                        "first variant")
    p.add_argument("--breakdown", type=int, default=0, metavar="N",
                   help="then each kernel's time over N calls, per feature set, under the first variant")
    args, timer = bench.parse_timed_command_line(p, argv)
    unknown = [f for f in args.features if f not in FEATURES]
    if unknown or args.features[:1] != ["plain"]:
        p.error(f"--features: names from {', '.join(FEATURES)}, plain first (got {','.join(args.features)})")
    features = {name: FEATURES[name] for name in args.features}
    names = [v or "unset" for v in args.variants]
    print(f"{bench.env_line(bench.environment())}; {'forward + backward' if args.backward else 'forward'}\n")
    header = ["D", "causal", "N", "features"] + [f"{n} TFLOP/s" for n in names]
    header += [f"{n} / {names[0]}" for n in names[1:]] + [f"{n}: / plain" for n in names]
    print(bench.markdown_header(header))
    breakdowns = []  # (d, n, causal, q, k, v) of each shape, for --breakdown
    peer_rows = []  # (d, causal, n, feature, ours, {peer: TFLOP/s}), for --peers
    active_peers = (SDPA_PEERS if args.peers else ()) + ((FLEX,) if args.flex else ())
    peers = [(f, b) for f in features for b in active_peers if f in PEER_FEATURES[b]]
    for d in args.head_dims:
        for n in args.seqlens:
            batch, heads = max(1, 16384 // n), 2048 // d
            q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for causal in (False, True):
                flops = {feature: feature_flops(batch, heads, n, d, causal, options) * (3.5 if args.backward else 1.0)
                         for feature, options in features.items()}
                cells = {(feature, variant): (step(q, k, v, causal, options, args.backward),)
                         for feature, options in features.items() for variant in args.variants}
                cells.update({(feature, backend): (peer_step(q, k, v, causal, features[feature], args.backward,
                                                             backend),)
                              for feature, backend in peers})
                for feature, peer in peers:  # FlexAttention's compilation, untimed
                    if peer == FLEX:
                        run_once(cells[(feature, peer)][0])
                samples = bench.interleaved_timings(
                    cells, timer, args.rounds,
                    environment=lambda cell: (contextlib.nullcontext() if cell[1] in PEER_FEATURES
                                              else bench.switches_set(variant_switches(cell[1]))))
                speeds = {cell: bench.tflops(flops[cell[0]], statistics.median(got[0])) if isinstance(got, tuple)
                          else None for cell, got in samples.items()}
                for feature in features:
                    row = [str(d), "yes" if causal else "no", str(n), feature]
                    mine = [speeds[(feature, v)] for v in args.variants]
                    plain = [speeds[("plain", v)] for v in args.variants]
                    row += [f"{s:.0f}" if s else "error" for s in mine]
                    row += [ratio(s, mine[0]) for s in mine[1:]] + [ratio(s, b) for s, b in zip(mine, plain)]
                    print("| " + " | ".join(row) + " |", flush=True)
                for feature in dict.fromkeys(f for f, _ in peers):
                    peer_rows.append((d, causal, n, feature, speeds[(feature, args.variants[0])],
                                      {b: speeds.get((feature, b)) for b in active_peers}))
                if args.breakdown:
                    breakdowns.append((d, n, causal, q, k, v))
    if peer_rows:
        if any(causal and feature == "attn_mask" for _, causal, _, feature, _, _ in peer_rows):
            print("\nCausal attn_mask rows: torch's SDPA takes an attn_mask or is_causal, so its backends are given "
                  "the mask with the causal part merged in and compute every key block, where ours skips the blocks "
                  "above the diagonal; their TFLOP/s count the causal FLOPs, as ours do: the ratio is the time a "
                  "user's call takes on each, not a kernel-to-kernel comparison.")
        print("\n" + bench.markdown_header(["D", "causal", "N", "features", f"{names[0]} TFLOP/s"]
                                           + [f"{b} TFLOP/s" for b in active_peers]
                                           + [f"{names[0]} / {b}" for b in active_peers]))
        for d, causal, n, feature, ours, theirs in peer_rows:
            row = [str(d), "yes" if causal else "no", str(n), feature, f"{ours:.0f}" if ours else "error"]
            row += [peer_cell(feature, b, theirs[b]) for b in active_peers]
            row += [ratio(ours, theirs[b]) for b in active_peers]
            print("| " + " | ".join(row) + " |", flush=True)
    with bench.switches_set(variant_switches(args.variants[0])):
        for d, n, causal, q, k, v in breakdowns:
            print(f"\nD={d} N={n} causal={causal}, CUFLASH_SM90={args.variants[0]!r}:")
            for feature, options in features.items():
                totals = kernel_breakdown.kernel_times(step(q, k, v, causal, options, args.backward), args.breakdown)
                kernel_breakdown.report(feature, totals, args.breakdown,
                                        "forward + backward" if args.backward else "forward")
    return 0


def variant_switches(variant):
    """The switches a --variants value sets: CUFLASH_SM90 (the value up to a '+'; "" the defaults)
    and any NAME=value after a '+' (bench_attention.split_variant's syntax)."""
    return bench.split_variant(f"@CUFLASH_SM90={variant}")[1]


def ratio(mine, base):
    return f"{mine / base:.2f}x" if mine and base else "-"


def peer_cell(feature, peer, tflops):
    """A peer's TFLOP/s, "error" where its call failed, "-" where it takes no such call."""
    if feature not in PEER_FEATURES[peer]:
        return "-"
    return f"{tflops:.0f}" if tflops else "error"


def run_once(fn):
    """fn() once (its compilation), its failure left for the timed rounds to record."""
    try:
        fn()
    except Exception:  # noqa: BLE001 (interleaved_timings records the error line)
        pass


if __name__ == "__main__":
    sys.exit(main())
