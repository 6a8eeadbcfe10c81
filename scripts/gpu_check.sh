#!/usr/bin/env bash
# One device call: build for the GPU at hand with every core, run the whole test suite, the
# main job and the benchmark, and leave logs and results under $OUT (default ./gpu_out).
#   GPU_CHECK_TESTS="tests/test_ops.py"  run a subset of the tests
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
python3 -m pytest ${GPU_CHECK_TESTS:-tests} -q --maxfail=${GPU_CHECK_MAXFAIL:-25} -p no:cacheprovider --durations=15 > "$OUT/pytest.log" 2>&1
status=$?
echo "pytest (exit $status): $(( $(date +%s) - start )) s"; tail -n 25 "$OUT/pytest.log"
python3 benchmarks/peak_memory.py | tee "$OUT/peak_memory.txt"
python3 -m cuflash_attn > "$OUT/main_job.log" 2>&1; tail -n 30 "$OUT/main_job.log"
if [ -n "${GPU_CHECK_BENCH-}" ]; then
  python3 benchmarks/bench_attention.py $GPU_CHECK_BENCH --out "$OUT" > "$OUT/bench.log" 2>&1
  tail -n 60 "$OUT/bench.log"
fi
exit $status
