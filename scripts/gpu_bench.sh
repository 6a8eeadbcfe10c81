#!/usr/bin/env bash
# One device call for the benchmark results (bash scripts/gpu_bench.sh): builds if needed
# (sm_90a, head dims 64,128,256), then runs, in this order (step 7 right after step 1: it is
# cheap, and a fresh machine's budget would skip it at the end), each step whose estimate fits in
# what is left of the budget (step 1 always runs):
#   1. bf16 standard table, [B, H, N, D]: all of PERF.md's shapes, every SDPA peer,
#      ours with deterministic=False too, three interleaved rounds                    ~340 s
#   2. peak memory against seqlen                                                     ~25 s
#   3. analyze_io.py --measure: Nsight Compute DRAM bytes, D 64,128 x N 2048,8192     ~30 s
#   4. fp16 spot check: D 64,128,256 x N 1024,4096, causal and not                    ~75 s
#   5. bf16 [B, N, H, D] views (bnhd) beside [B, H, N, D] in the same rounds, the same
#      subset, into <gpu>-<date>-layouts.json/.md (its bnhd / bhnd table: issue 6's 3%) ~120 s
#   6. fp32: D 64,128 x N 1024,4096, non-causal; ours, efficient, math (flash and
#      cuDNN refuse fp32)                                                             ~35 s
#   7. whether each backward is bitwise reproducible (peer_determinism.py: ours, ours
#      nondet, flash, cuDNN, efficient), into <gpu>-<date>-peer-determinism.md       ~20 s
#   then the plots, the README table and the IO table printed (~15 s).
# The estimates are the 2026-12-05 H100 run's times (build 79 s; step 5 then bnhd alone, 60 s,
# doubled; step 7 took 9 s on an H200, 2026-12-06), step 1's the 2026-12-07 H100 run's (340 s
# since 84cd054's training forward and re-timing of slow steps); the log prints each step's real
# time: correct them here after a run. Step 1 leaves ~150 s of a call: steps 4-6 want a second
# call (GPU_BENCH_STEPS="4 5 6").
# Tables go into one <gpu>-<date>.json/.md (bench_attention.py --merge), the IO analysis into
# <gpu>-<date>-io.json/.md, logs into logs/<gpu>-<date>-<step>.log. $OUT gets results.tar.gz
# (refreshed after every step, so a run stopped at the time limit returns what finished), the
# standard table's .md (the others are in the archive) and gpu_bench.log: three files, since the
# device brings back 8 in name order and results.tar.gz sorts after <gpu>-*. To commit the results:
#   tar -xzf results.tar.gz -C benchmarks/results && python3 benchmarks/readme_table.py
# Knobs: GPU_BENCH_BUDGET_S=540 (seconds for the whole script, build included; the device's
# limit is 600), GPU_BENCH_STEPS="1 2 3" (run only these).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_BENCH_BUDGET_S:-540}
RESERVE=25  # plots, tarball
STEPS=${GPU_BENCH_STEPS:-1 2 3 4 5 6 7}
OUT=${OUT:-gpu_out}
WORK=${GPU_BENCH_WORK:-/tmp/cuflash_gpu_bench}
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK/logs"
exec > >(tee "$OUT/gpu_bench.log") 2>&1
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUFLASH_CUDA_ARCHS=${CUFLASH_CUDA_ARCHS:-9.0a} CUFLASH_HEAD_DIMS=${CUFLASH_HEAD_DIMS:-64,128,256}

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) - RESERVE )); }
SUMMARY=()
pack() {
  tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
  local table="$WORK/$LOGPREFIX.md"
  if [ -e "$table" ]; then cp "$table" "$OUT/"; fi
}
# step NUMBER NAME ESTIMATE_S COMMAND...: runs COMMAND if it fits; its log: logs/<prefix>-NAME.log
step() {
  local num=$1 name=$2 estimate=$3; shift 3
  if [[ " $STEPS " != *" $num "* ]]; then return; fi
  if (( num != 1 && estimate > $(left) )); then  # step 1, the standard table, always runs
    SUMMARY+=("$num $name: skipped (estimate ${estimate}s, $(left)s left)"); echo "== ${SUMMARY[-1]}"; return
  fi
  echo "== step $num $name (estimate ${estimate}s, $(left)s left) at $(elapsed)s"
  local t0=$(date +%s) rc
  local limit=$(left); (( limit < 60 )) && limit=60
  timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$LOGPREFIX-$name.log" 2>&1
  rc=$?
  (( num == 1 )) && STATUS=$rc
  SUMMARY+=("$num $name: exit $rc in $(( $(date +%s) - t0 ))s (estimate ${estimate}s)")
  echo "== ${SUMMARY[-1]}"; tail -n 4 "$WORK/logs/$LOGPREFIX-$name.log"
  pack
}

# Log names like the committed ones: logs/<gpu>-<date>-<step>.log
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
LOGPREFIX="$(echo "${GPU:-gpu}" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')-$(date +%F)"
STATUS=0; [[ " $STEPS " == *" 1 "* ]] && STATUS=1  # step 1's exit status is the script's
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  | tee "$WORK/logs/$LOGPREFIX-env.txt"
if ! ls cuflash_attn/_C*.so >/dev/null 2>&1; then
  echo "== build (CUFLASH_CUDA_ARCHS=$CUFLASH_CUDA_ARCHS CUFLASH_HEAD_DIMS=$CUFLASH_HEAD_DIMS)"
  bash scripts/setup.sh > "$WORK/logs/$LOGPREFIX-build.log" 2>&1 \
    || { tail -n 40 "$WORK/logs/$LOGPREFIX-build.log"; pack; exit 1; }
  SUMMARY+=("0 build: $(elapsed)s")
fi

BENCH="python3 benchmarks/bench_attention.py --out $WORK --merge"
step 1 bench_bf16 340 $BENCH --dtypes bf16
step 7 peer_determinism 20 python3 benchmarks/peer_determinism.py --out "$WORK/$LOGPREFIX-peer-determinism.md"
step 2 memory 25 $BENCH --memory
step 3 io 30 python3 benchmarks/analyze_io.py --measure --out "$WORK" --timeout 240
step 4 bench_fp16 75 $BENCH --dtypes fp16 --head-dims 64,128,256 --seqlens 1024,4096
step 5 bench_layouts 120 python3 benchmarks/bench_attention.py --out "$WORK" --tag layouts --dtypes bf16 \
  --layouts bhnd,bnhd --head-dims 64,128,256 --seqlens 1024,4096
step 6 bench_fp32 35 $BENCH --dtypes fp32 --head-dims 64,128 --seqlens 1024,4096 --causal false \
  --impls cuflash_attn,sdpa_efficient,sdpa_math

RESULTS=$(ls "$WORK"/*.json 2>/dev/null | grep -E -- '-[0-9]{4}-[0-9]{2}-[0-9]{2}\.json$' | head -n 1)  # untagged
if [ -n "$RESULTS" ]; then
  python3 benchmarks/plot.py "$RESULTS" > "$WORK/logs/$LOGPREFIX-plot.log" 2>&1 \
    || tail -n 5 "$WORK/logs/$LOGPREFIX-plot.log"
  echo; python3 benchmarks/readme_table.py --print --json "$RESULTS" | grep -v '^!\['
fi
IO=$(ls "$WORK"/*-io.md 2>/dev/null | head -n 1)
[ -n "$IO" ] && { echo; awk '/^\| D \|/ {p = 1} p && /^$/ {exit} p' "$IO"; }  # its first table
pack
echo; echo "files in results.tar.gz:"; tar -tzf "$OUT/results.tar.gz" | sort
echo; printf '%s\n' "${SUMMARY[@]}"; echo "total $(elapsed)s of a ${BUDGET}s budget"
exit "$STATUS"
