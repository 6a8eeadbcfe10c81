#!/usr/bin/env bash
# Nsight Compute's summary sections for the Hopper backward kernels of one bf16 backward, run
# twice: with the defaults (the warp-specialized dQ and dK/dV kernels) and with
# CUFLASH_BWD_DQ=atomic (the fused one). Where the time goes: throughput against peak, warp
# stall reasons, issue slots. Needs the extension built (scripts/setup.sh).
#   NCU_SHAPE="2,16,8192,128"   batch, heads, seqlen, head dim
#   NCU_CAUSAL=0                1: a causal mask
#   NCU_KERNELS="bwd_.*sm90"    regex of the kernels to profile
# Output: $OUT/ncu_backward.txt (default ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
ncu --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section SchedulerStats --section WarpStateStats --section LaunchStats \
  -k "regex:${NCU_KERNELS:-bwd_.*sm90}" python3 - > "$OUT/ncu_backward.txt" 2>&1 <<EOF
import os
import torch
import cuflash_attn  # noqa: F401  (registers torch.ops.cuflash_attn)

b, h, n, d = (int(x) for x in "${NCU_SHAPE:-2,16,8192,128}".split(","))
causal = "${NCU_CAUSAL:-0}" == "1"
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
for atomic in (False, True):
    if atomic:
        os.environ["CUFLASH_BWD_DQ"] = "atomic"
    out, _ = torch.ops.cuflash_attn.fwd(q, k, v, None, causal, False)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.cuda.synchronize()
EOF
status=$?
grep -E "^\s+[a-z_:]+.*sm90|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Stall|L2 Cache Throughput" \
  "$OUT/ncu_backward.txt" | head -n 120
exit $status
