#!/usr/bin/env bash
# One device call for the host's side of a call (benchmarks/NOTES.md, "The host's time a forward
# + backward at 512 keys"): our two autograd wirings, ops.py's Python one and CUFLASH_AUTOGRAD=cpp
# (csrc/torch_ops.cpp's C++ one), read when the library loads, so each in processes of its own,
# alternated (python cpp python cpp):
#   - the GPU tests of the wiring's own file under cpp (tests/test_ops.py: CUDA graphs, streams,
#     torch.compile, gradcheck, opcheck), which the suite runs under python
#   - benchmarks/host_overhead.py --parts (each piece's host-only time) and its table with the
#     backward's timeline across threads
#   - bench_attention.py's short rows (HOST_BENCH), ours against cuDNN
# Builds every head dim (sm_90a; the tests take head dims of every bucket) first (about 75 s on
# 16 cores); about 460 s in all.
# Output: $OUT/host.md (the tables), $OUT/logs.tar.gz (each step's log and the benchmark JSONs).
# shellcheck source=scripts/device_call_env.sh
source "$(dirname "$0")/device_call_env.sh"
SHAPE=${HOST_SHAPE:-32,16,512,128}
BENCH=${HOST_BENCH:---dtypes bf16 --head-dims 64,128 --seqlens 512,1024 --impls cuflash_attn,sdpa_cudnn}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
bash scripts/setup.sh > "$OUT/setup.log" 2>&1 || { tail -n 40 "$OUT/setup.log"; archive_logs; exit 1; }
echo "build: $(elapsed) s"
status=0
# (its CUDA cases: CI runs the CPU ones under cpp)
CUFLASH_AUTOGRAD=cpp python3 -m pytest -q -p no:cacheprovider tests/test_ops.py -k "cuda or stream or reduce_overhead" \
  > "$OUT/tests_cpp.log" 2>&1 || status=1
echo "tests/test_ops.py under CUFLASH_AUTOGRAD=cpp: $(tail -n 1 "$OUT/tests_cpp.log") ($(elapsed) s)"
for round in 1 2; do
  for wiring in python cpp; do
    # shellcheck disable=SC2086  # BENCH is a list of arguments
    CUFLASH_AUTOGRAD=$wiring python3 benchmarks/host_overhead.py --shape "$SHAPE" --parts > "$OUT/parts_${wiring}_$round.log" 2>&1 || status=1
    if (( round == 1 )); then
      CUFLASH_AUTOGRAD=$wiring python3 benchmarks/host_overhead.py --shape "$SHAPE" --impls cuflash_attn,sdpa_cudnn \
        --profile none > "$OUT/table_${wiring}.log" 2>&1 || status=1
    fi
    # shellcheck disable=SC2086
    CUFLASH_AUTOGRAD=$wiring python3 benchmarks/bench_attention.py $BENCH --out "$OUT" --tag "$wiring$round" \
      > "$OUT/bench_${wiring}_$round.log" 2>&1 || status=1
    echo "round $round, $wiring: $(elapsed) s"
  done
done
{
  for f in "$OUT"/parts_*.log "$OUT"/table_*.log; do
    echo "## $(basename "$f" .log)"; echo; grep -E '^(#|\|)' "$f"; echo
  done
  for f in "$OUT"/*.md; do
    [ "$(basename "$f")" = host.md ] && continue
    echo "## $(basename "$f" .md)"; echo; grep -E '^\| (64|128) ' "$f"; echo
  done
} > "$OUT/host.md"
cat "$OUT/host.md"
archive_logs "*.log *.json"
rm -f "$OUT"/nvidia*.md
echo "total: $(elapsed) s"
exit $status
