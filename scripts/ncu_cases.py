"""The calls scripts/ncu_profile.sh profiles: NCU_CASES, each pass:batch,heads,seqlen,head_dim:causal[:det]
(bf16), or dec:batch,heads_q,cache_keys,head_dim:heads_kv (one decoding step of
flash_attn_with_kvcache, split-KV chosen as by default). Only the pass named runs inside the NVTX
range "profiled", which ncu filters on."""
import os

import torch

import cuflash_attn  # noqa: F401  (registers torch.ops.cuflash_attn)

ops = torch.ops.cuflash_attn
for case in os.environ["NCU_CASES"].split():
    fields = case.split(":")
    which = fields[0]
    b, h, n, d = (int(x) for x in fields[1].split(","))
    if which == "dec":
        from cuflash_attn.flash_attn_interface import flash_attn_with_kvcache
        heads_kv = int(fields[2])
        q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
        k_cache, v_cache = (torch.randn(b, n, heads_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lengths = torch.full((b,), n, dtype=torch.int32, device="cuda")
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)  # loads the kernels
        torch.cuda.nvtx.range_push("profiled")
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print(case, "ran", flush=True)
        continue
    causal, det = fields[2] == "1", fields[3:] == ["det"]
    q, k, v, dout = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    if which == "fwd":
        torch.cuda.nvtx.range_push("profiled")
    out, lse = ops.fwd(q, k, v, None, causal, False, deterministic=det)
    if which == "fwd":
        torch.cuda.nvtx.range_pop()
    else:
        torch.cuda.nvtx.range_push("profiled")
        ops.bwd(dout, q, k, v, out, lse, None, None, causal, False, deterministic=det)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(case, "ran", flush=True)
