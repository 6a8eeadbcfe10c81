#!/usr/bin/env bash
# One device call for a compile-time experiment: build as the tree is (A), benchmark; rebuild the
# files named with an extra nvcc define (B, through nvcc's NVCC_APPEND_FLAGS), run the tests
# named under it, benchmark again. Between the two, optionally the sanitizer over A.
#   AB_DEFINE="-DSOME_KNOB=4"   the B build's extra flags (required; the source reads the macro,
#                        its default defined under #ifndef)
#   AB_FILES="csrc/cuda/instantiations/flash_fwd_hdim64_*_sm80.cu"   the sources B recompiles
#   AB_BENCH="--dtypes bf16 --head-dims 64 ..."   bench_attention.py arguments for both
#   AB_TESTS="tests/test_sm90_forward.py -k persistent"   pytest arguments run under B ("" none;
#                        if they fail, B is not benchmarked)
#   AB_TEST_LIMIT_S=300  seconds the tests under B may run (a wrong mbarrier phase hangs a kernel)
#   AB_SANITIZE_TOOLS="memcheck synccheck"   scripts/sanitize.sh over A first ("" none)
# Results: $OUT/<gpu>-<date>-A.md/json and -B.md/json; logs as $OUT/logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUFLASH_CUDA_ARCHS=${CUFLASH_CUDA_ARCHS:-9.0a}
: "${AB_DEFINE:?AB_DEFINE names the flags of build B}"
status=0
start=$(date +%s)
bash scripts/setup.sh > "$OUT/build_A.log" 2>&1 || { tail -n 40 "$OUT/build_A.log"; exit 1; }
echo "build A: $(( $(date +%s) - start )) s"
# shellcheck disable=SC2086  # AB_BENCH is an argument list
python3 benchmarks/bench_attention.py ${AB_BENCH-} --out "$OUT" --tag A > "$OUT/bench_A.log" 2>&1 || status=1
if [ -n "${AB_SANITIZE_TOOLS-}" ]; then
  OUT="$OUT" SANITIZE_SKIP_BUILD=1 SANITIZE_TOOLS="$AB_SANITIZE_TOOLS" bash scripts/sanitize.sh > "$OUT/sanitize.log" 2>&1 \
    || status=1
  grep -E "errors|cases" "$OUT/sanitize.log"
fi
start=$(date +%s)
# shellcheck disable=SC2086  # AB_FILES is a list of globs
touch ${AB_FILES-}
NVCC_APPEND_FLAGS="$AB_DEFINE" bash scripts/setup.sh > "$OUT/build_B.log" 2>&1 || { tail -n 40 "$OUT/build_B.log"; exit 1; }
echo "build B ($AB_DEFINE): $(( $(date +%s) - start )) s"
if [ -n "${AB_TESTS-}" ]; then
  # shellcheck disable=SC2086  # AB_TESTS is an argument list
  timeout --kill-after=5 "${AB_TEST_LIMIT_S:-300}" python3 -m pytest $AB_TESTS -q -rfE -p no:cacheprovider \
    > "$OUT/tests_B.log" 2>&1 || status=1
  echo "tests under B: $(tail -n 1 "$OUT/tests_B.log")"
  grep -E '^(FAILED|ERROR)' "$OUT/tests_B.log" | head -n 15
fi
if (( status == 0 )); then
  # shellcheck disable=SC2086
  python3 benchmarks/bench_attention.py ${AB_BENCH-} --out "$OUT" --tag B > "$OUT/bench_B.log" 2>&1 || status=1
fi
tail -n 30 "$OUT"/bench_*.log
tar czf "$OUT/logs.tar.gz" -C "$OUT" $(cd "$OUT" && ls -- *.log 2>/dev/null) && (cd "$OUT" && rm -f -- *.log)
exit $status
