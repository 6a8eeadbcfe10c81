#!/usr/bin/env bash
# One device call: build for the GPU at hand with every core, run the whole test suite, the
# main job and the benchmark, and leave logs and results under $OUT (default ./gpu_out).
#   GPU_CHECK_TESTS="tests/test_ops.py"  run these test files only (space-separated; no separate sweep)
#   GPU_CHECK_SWEEP_SHARDS=3             processes for the random sweep, beside the suite
#   GPU_CHECK_PROCS=4                    processes for the rest of the suite (a file each at a time)
#   GPU_CHECK_BENCH="--quick"            benchmark arguments ("" skips the benchmark)
# shellcheck source=scripts/device_call_env.sh
source "$(dirname "$0")/device_call_env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.txt"
start=$(date +%s)
bash scripts/setup.sh > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
start=$(date +%s)
# The random sweep (2000 CUDA cases, about 7 minutes in one process) runs beside the rest of the
# suite in GPU_CHECK_SWEEP_SHARDS processes (CUFLASH_SWEEP_SHARD), each with its own log.
pids=()
shards=${GPU_CHECK_SWEEP_SHARDS:-3}
# Each process's CPU threads (the float64 references of CPU cases, torch's ops): a share of the
# cores each, rather than every process taking all of them.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / (shards + ${GPU_CHECK_PROCS:-4}) > 1 ? $(nproc) / (shards + ${GPU_CHECK_PROCS:-4}) : 1 ))}
if [ -z "${GPU_CHECK_TESTS-}" ]; then
  for ((i = 0; i < shards; i++)); do
    CUFLASH_SWEEP_SHARD=$i/$shards python3 -m pytest tests/test_accuracy.py -k test_random_sweep -q -rf --tb=line \
      -p no:cacheprovider > "$OUT/sweep$i.log" 2>&1 &
    pids+=($!)
  done
fi
# The rest of the suite: each test file a pytest process of its own, largest first, taken by
# GPU_CHECK_PROCS workers as they come free. (Files dealt out in fixed groups left one group with
# twice the others' work once test_sm90_forward.py grew past the next file: the fiftieth
# session's verify ran out of time.) A file whose tests are all deselected (pytest's exit 5) passes.
procs=${GPU_CHECK_PROCS:-4}
if [ -n "${GPU_CHECK_TESTS-}" ]; then
  # shellcheck disable=SC2206  # GPU_CHECK_TESTS is split on purpose
  files=(${GPU_CHECK_TESTS})
else
  mapfile -t files < <(ls -S tests/test_*.py)
fi
test_log() { echo "$OUT/pytest-$(basename "$1" .py).log"; }
# shellcheck disable=SC2317  # called by xargs's shells
run_test_file() {
  python3 -m pytest "$1" -k "not test_random_sweep" -q -rfE --maxfail="${GPU_CHECK_MAXFAIL:-25}" \
    -p no:cacheprovider --durations=5 > "$(test_log "$1")" 2>&1
  local rc=$?
  (( rc == 5 )) && rc=0
  return "$rc"
}
export -f test_log run_test_file
export OUT
status=0
# shellcheck disable=SC2016  # $0 is the file xargs passes to each shell
printf '%s\0' "${files[@]}" | xargs -0 -n 1 -P "$procs" bash -c 'run_test_file "$0"' || status=1
for f in "${files[@]}"; do
  echo "pytest $f: $(tail -n 1 "$(test_log "$f")")"
  grep -E '^(FAILED|ERROR)' "$(test_log "$f")" | head -n 25
done
echo "pytest: $(( $(date +%s) - start )) s"
for ((i = 0; i < ${#pids[@]}; i++)); do
  wait "${pids[$i]}" || status=1
  echo "sweep shard $i/$shards: $(tail -n 1 "$OUT/sweep$i.log")"; grep -E '^FAILED' "$OUT/sweep$i.log" | head -n 40
done
echo "pytest and sweep: $(( $(date +%s) - start )) s"
python3 benchmarks/peak_memory.py | tee "$OUT/peak_memory.txt"
python3 -m cuflash_attn > "$OUT/main_job.log" 2>&1; tail -n 30 "$OUT/main_job.log"
if [ -n "${GPU_CHECK_BENCH-}" ]; then
  python3 benchmarks/bench_attention.py $GPU_CHECK_BENCH --out "$OUT" > "$OUT/bench.log" 2>&1
  tail -n 60 "$OUT/bench.log"
fi
archive_logs "*.log" "*.txt"
exit $status
