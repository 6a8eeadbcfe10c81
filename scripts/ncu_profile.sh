#!/usr/bin/env bash
# Nsight Compute on the Hopper kernels of a few bf16 calls: the summary sections (throughput
# against peak, warp stalls, issue slots) and, per kernel, the SASS with its stall samples
# (where the time goes, instruction by instruction). Needs the extension built (scripts/setup.sh).
#   NCU_CASES="fwd:16,16,1024,128:0 bwd:4,16,4096,128:0:det"
#       each case is pass:batch,heads,seqlen,head_dim:causal[:det][:softcap|:alibi|:dropout][:NAME=VALUE]
#       (features and a case's own run-time switches: scripts/ncu_cases.py) (or dec:batch,heads_q,keys,head_dim:heads_kv[:tokens[:packed|unpacked]],
#       a decoding step: scripts/ncu_cases.py); pass fwd profiles the forward,
#       bwd the backward (deterministic=True with :det, else False); the forward of a bwd case runs
#       unprofiled; cudnn_fwd and cudnn_bwd profile the peer (torch SDPA's cuDNN backend) on the same shape
#   NCU_KERNELS="sm90"   regex of the kernel names to profile
# Output under $OUT (default ./gpu_out): ncu_summary.txt, ncu_sass.csv.gz (the source page of
# every profiled kernel), ncu_hot.txt (each kernel's hottest instructions: scripts/ncu_hot.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
report=/tmp/cuflash_profile
NCU_CASES=${NCU_CASES:-fwd:16,16,1024,128:0 bwd:4,16,4096,128:0:det} \
  ncu --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section SchedulerStats --section WarpStateStats --section LaunchStats --section Occupancy \
  --section SourceCounters --import-source no --nvtx --nvtx-include "profiled/" \
  -k "regex:${NCU_KERNELS:-sm90}" -f -o "$report" env PYTHONPATH="$PWD" python3 scripts/ncu_cases.py > "$OUT/ncu_run.log" 2>&1
status=$?
tail -n 5 "$OUT/ncu_run.log"
ncu -i "$report.ncu-rep" > "$OUT/ncu_summary.txt" 2>&1
ncu -i "$report.ncu-rep" --page source --csv --print-source sass 2> "$OUT/ncu_source.err" | gzip > "$OUT/ncu_sass.csv.gz"
python3 scripts/ncu_hot.py "$OUT/ncu_sass.csv.gz" > "$OUT/ncu_hot.txt" 2>&1
grep -E "^\s+[a-z_:]+.*sm90|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Stall|L2 Cache Throughput" \
  "$OUT/ncu_summary.txt" | head -n 120
exit $status
