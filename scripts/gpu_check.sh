#!/usr/bin/env bash
# One device call: build for the GPU at hand with every core, run the whole test suite, the
# main job and the benchmark, and leave logs and results under $OUT (default ./gpu_out).
#   GPU_CHECK_TESTS="tests/test_ops.py"  run a subset of the tests (and no separate sweep)
#   GPU_CHECK_SWEEP_SHARDS=3             processes for the random sweep, beside the suite
#   GPU_CHECK_BENCH="--quick"            benchmark arguments ("" skips the benchmark)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUFLASH_CUDA_ARCHS=${CUFLASH_CUDA_ARCHS:-9.0a}
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
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / (shards + 1) > 1 ? $(nproc) / (shards + 1) : 1 ))}
if [ -z "${GPU_CHECK_TESTS-}" ]; then
  for ((i = 0; i < shards; i++)); do
    CUFLASH_SWEEP_SHARD=$i/$shards python3 -m pytest tests/test_accuracy.py -k test_random_sweep -q -rf --tb=line \
      -p no:cacheprovider > "$OUT/sweep$i.log" 2>&1 &
    pids+=($!)
  done
fi
tests=(tests -k "not test_random_sweep")
# shellcheck disable=SC2206  # GPU_CHECK_TESTS is split on purpose
[ -n "${GPU_CHECK_TESTS-}" ] && tests=($GPU_CHECK_TESTS)
python3 -m pytest "${tests[@]}" -q -rfE --maxfail=${GPU_CHECK_MAXFAIL:-25} \
  -p no:cacheprovider --durations=15 > "$OUT/pytest.log" 2>&1
status=$?
echo "pytest (exit $status): $(( $(date +%s) - start )) s"; tail -n 25 "$OUT/pytest.log"
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
# The device tool brings back at most 8 files: the logs travel as one archive.
tar czf "$OUT/logs.tar.gz" -C "$OUT" $(cd "$OUT" && ls -- *.log *.txt 2>/dev/null) && (cd "$OUT" && rm -f -- *.log *.txt)
exit $status
