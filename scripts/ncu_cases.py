"""The calls scripts/ncu_profile.sh profiles: NCU_CASES, each
pass:batch,heads,seqlen,head_dim:causal[:det][:softcap|:alibi|:dropout][:NAME=VALUE...] (bf16; the
features as bench_features.py's, a run-time switch set for that case alone; pass fwd, bwd, or
cudnn_fwd, cudnn_bwd: torch
SDPA's cuDNN backend on the same shape; fwd_bnhd: the forward on [B, N, H, D] tensors; fwd_packed:
the forward on the same tokens packed, batch sequences of seqlen tokens in cu_seqlens), or
dec:batch,heads_q,cache_keys,head_dim:heads_kv[:tokens[:packed|unpacked]]
(one decoding step of flash_attn_with_kvcache, causal for several tokens, split-KV chosen as by
default, grouped heads packed as rows by default or as named: CUFLASH_PACK_GQA 1 or 0). Only the
pass named runs inside the NVTX range "profiled", which ncu filters on."""
import os
import sys
from pathlib import Path

import torch

import cuflash_attn  # noqa: F401  (registers torch.ops.cuflash_attn)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_attention as bench  # noqa: E402  (switches_set)
import bench_features  # noqa: E402  (FEATURES, op_call)

ops = torch.ops.cuflash_attn


def profile_attention(which, b, h, n, d, causal, det, options):
    """One case but a decoding step: its pass inside the NVTX range "profiled" (options: a feature
    of bench_features.FEATURES, or several merged)."""
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if which in ("fwd_bnhd", "fwd_packed"):  # rows H * D apart, as a packed tensor's
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        packed = {}
        if which == "fwd_packed":
            q, k, v = (t.view(b * n, h, d) for t in (q, k, v))
            cu = torch.arange(0, (b + 1) * n, n, device="cuda", dtype=torch.int32)
            packed = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        for profiled in (False, True):  # the first call loads the kernels
            if profiled:
                torch.cuda.nvtx.range_push("profiled")
            ops.fwd(q, k, v, None, causal, False, **packed)
            if profiled:
                torch.cuda.nvtx.range_pop()
        return
    if which in ("cudnn_fwd", "cudnn_bwd"):  # the peer on the same inputs (its kernels' names hold "sm90")
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q, k, v = (t.requires_grad_(which == "cudnn_bwd") for t in (q, k, v))
        dout = torch.randn_like(q)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            for profiled in (False, True):  # the first call plans and loads the kernels
                if profiled and which == "cudnn_fwd":
                    torch.cuda.nvtx.range_push("profiled")
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                if profiled and which == "cudnn_fwd":
                    torch.cuda.nvtx.range_pop()
                if which == "cudnn_bwd":
                    if profiled:  # autograd runs the backward on a thread of its own: the range there
                        def push(_grad_outputs):
                            torch.cuda.nvtx.range_push("profiled")

                        def pop(_grads):
                            torch.cuda.nvtx.range_pop()
                        out.grad_fn.register_prehook(push)
                        torch.autograd.graph.register_multi_grad_hook((q, k, v), pop)
                    out.backward(dout)
                    q.grad = k.grad = v.grad = None
        return
    q, k, v, kw = bench_features.op_call(q, k, v, causal, options)
    if which == "fwd":
        torch.cuda.nvtx.range_push("profiled")
    out, lse = ops.fwd(q, k, v, None, causal, False, deterministic=det, **kw)
    if which == "fwd":
        torch.cuda.nvtx.range_pop()
    else:
        dout = torch.randn_like(q)
        torch.cuda.nvtx.range_push("profiled")
        ops.bwd(dout, q, k, v, out, lse, None, None, causal, False, deterministic=det, **kw)
        torch.cuda.nvtx.range_pop()


for case in os.environ["NCU_CASES"].split():
    fields = case.split(":")
    which = fields[0]
    b, h, n, d = (int(x) for x in fields[1].split(","))
    if which == "dec":
        from cuflash_attn.flash_attn_interface import flash_attn_with_kvcache
        heads_kv = int(fields[2])
        tokens = int(fields[3]) if len(fields) > 3 else 1
        os.environ.pop("CUFLASH_PACK_GQA", None)
        if len(fields) > 4:
            os.environ["CUFLASH_PACK_GQA"] = {"packed": "1", "unpacked": "0"}[fields[4]]
        q = torch.randn(b, tokens, h, d, device="cuda", dtype=torch.bfloat16)
        k_cache, v_cache = (torch.randn(b, n, heads_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lengths = torch.full((b,), n, dtype=torch.int32, device="cuda")
        for profiled in (False, True):  # the first call loads the kernels
            if profiled:
                torch.cuda.nvtx.range_push("profiled")
            flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=tokens > 1)
            if profiled:
                torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print(case, "ran", flush=True)
        continue
    causal, flags = fields[2] == "1", fields[3:]
    det = "det" in flags
    options = {}
    for flag in flags:
        options.update(bench_features.FEATURES.get(flag, {}))
    switches = dict(flag.split("=", 1) for flag in flags if "=" in flag)
    with bench.switches_set(switches):
        profile_attention(which, b, h, n, d, causal, det, options)
        torch.cuda.synchronize()
    print(case, "ran", flush=True)
