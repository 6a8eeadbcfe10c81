#!/usr/bin/env python3
"""Decoding against a KV cache: a few query tokens a sequence over cache_seqlens keys, the shape
of incremental generation, where the K/V reads are the work (memory bound). For each cache
length: ours through flash_attn_with_kvcache over a contiguous cache, over a paged one (blocks of
256 in a shuffled order), with cache_batch_idx, and unsplit (num_splits=1; the others choose their
split-KV), the unsplit step without CUFLASH_SM90's "kvcache" part (the cp.async forward in place
of the TMA one) and the split step under its "splits" part (on the TMA forward), with
several tokens a step also with grouped heads packed as rows and not (CUFLASH_PACK_GQA=1 and 0),
beside torch SDPA over the same keys (GQA expanded by SDPA's enable_gqa). Reports
microseconds a call replayed from a CUDA graph (the GPU's time, as a serving loop that captures
its steps sees it) with the K/V bytes read a second, and the eager call's microseconds (host
time included where it exceeds the GPU's).

    python3 benchmarks/bench_decode.py --batch 8 --heads 32,8 --head-dim 128 --seqlens 1024,4096,16384
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as bench  # noqa: E402  (the timer, the environment line)

PAGE = 256


def with_env(env, fn):
    """fn run with the environment variables env set (the kernel switches are read at each call)."""
    def run():
        with bench.switches_set(env):
            return fn()
    return run


def cases(batch, heads_q, heads_kv, head_dim, seqlen, seqlen_q, dtype, dev="cuda"):
    """name -> a function running one decoding step; all read the same keys."""
    from cuflash_attn.flash_attn_interface import flash_attn_with_kvcache
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device=dev, dtype=dtype)
    k_cache, v_cache = (torch.randn(batch, seqlen, heads_kv, head_dim, device=dev, dtype=dtype) for _ in range(2))
    lengths = torch.full((batch,), seqlen, dtype=torch.int32, device=dev)
    pages = seqlen // PAGE
    order = torch.randperm(batch * pages, device=dev)
    block_table = order.reshape(batch, pages).to(torch.int32)
    k_paged, v_paged = (t.reshape(batch * pages, PAGE, heads_kv, head_dim)[order.argsort()]
                        for t in (k_cache, v_cache))
    batch_idx = torch.randperm(batch, device=dev).to(torch.int32)
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    causal = seqlen_q > 1
    steps = {
        "ours contiguous": lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=causal),
        "ours unsplit": lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=causal,
                                                        num_splits=1),
        # The same on the sm_80-class kernel (the split one's; on Hopper the unsplit step runs the
        # TMA forward): which of the two a decoding step should take.
        "ours unsplit sm80": with_env({"CUFLASH_SM90": "0"}, lambda: flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=lengths, causal=causal, num_splits=1)),
        "ours paged": lambda: flash_attn_with_kvcache(q, k_paged, v_paged, cache_seqlens=lengths,
                                                      block_table=block_table, causal=causal),
        "ours cache_batch_idx": lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                                                cache_batch_idx=batch_idx, causal=causal),
        # SDPA's causal mask is top-left: for seqlen_q > 1 it is not the decoding mask, so none.
        "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
    }
    # The Hopper alternatives to the defaults: the unsplit step on the cp.async forward (without
    # the "kvcache" part), the split step on the TMA forward (the "splits" part, not a default).
    plain_parts = "tma,bwd,bwdws,features,persistent"
    steps["ours unsplit cpasync"] = with_env({"CUFLASH_SM90": plain_parts}, steps["ours unsplit"])
    steps["ours tma splits"] = with_env({"CUFLASH_SM90": plain_parts + ",kvcache,splits"}, steps["ours contiguous"])
    if seqlen_q > 1:  # grouped heads packed as rows or not (the default packs a few tokens)
        steps["ours packed"] = with_env({"CUFLASH_PACK_GQA": "1"}, steps["ours contiguous"])
        steps["ours unpacked"] = with_env({"CUFLASH_PACK_GQA": "0"}, steps["ours contiguous"])
    return steps


def graphed(fn):
    """fn captured in a CUDA graph (after one eager call, which loads the kernels): its replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", default="32,8", help="heads_q,heads_kv")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlens", default="1024,4096,16384", help="cache lengths (multiples of 256)")
    parser.add_argument("--seqlen-q", type=int, default=1, help="query tokens a step")
    parser.add_argument("--warmup-ms", type=float, default=25)
    parser.add_argument("--rep-ms", type=float, default=100)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU")
    bench.import_cuflash_attn()
    heads_q, heads_kv = (int(x) for x in args.heads.split(","))
    timer = bench.make_timer(args.warmup_ms, args.rep_ms)
    print(f"# Decoding against a KV cache\n\n{bench.env_line(bench.environment())}\n")
    print(f"bf16, batch {args.batch}, heads {heads_q} (q) / {heads_kv} (kv), head_dim {args.head_dim}, "
          f"{args.seqlen_q} query token(s) a step; us a call replayed from a CUDA graph (K/V bytes read "
          f"a second) / us an eager call\n")
    names = None
    for seqlen in bench.parse_list(args.seqlens, int):
        torch.manual_seed(0)
        steps = cases(args.batch, heads_q, heads_kv, args.head_dim, seqlen, args.seqlen_q, torch.bfloat16)
        if names is None:
            names = list(steps)
            print("| cache keys | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        kv_bytes = 2 * args.batch * seqlen * heads_kv * args.head_dim * 2
        cells = []
        for name in names:
            try:
                ms_eager = timer(steps[name])
                ms = timer(graphed(steps[name]))
                cells.append(f"{ms * 1e3:.1f} ({kv_bytes / (ms * 1e-3) / 1e12:.2f} TB/s) / {ms_eager * 1e3:.1f}")
            except Exception as exc:  # a peer that cannot run the shape
                cells.append(f"error: {bench.first_line(exc)}")
        print(f"| {seqlen} | " + " | ".join(cells) + " |")
        del steps
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
