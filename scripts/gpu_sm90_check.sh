#!/usr/bin/env bash
# One device call for the Hopper kernels (CUFLASH_SM90 parts: tma, bwd, bwdws, features,
# persistent, kvcache, splits, cpasync): build (sm_90a, every head dim), the wgmma/TMA probe, then their tests in parallel processes,
# each under a time limit (a wrong mbarrier phase hangs a kernel, it does not fail it), then
# the benchmark of the variants beside the default kernels and the SDPA peers.
#   GPU_SM90_BENCH="..."   bench_attention.py arguments ("" skips the benchmark)
#   GPU_SM90_BENCH_FEATURES="..."   bench_features.py arguments (unset or "" skips it)
#   GPU_SM90_BENCH_VARLEN="..."   bench_varlen.py arguments ("-" for its defaults; unset or "" skips it)
#   GPU_SM90_LIMIT_S=300   seconds each test process may run
#   GPU_SM90_GROUPS="forward,bad_input"   run only the test groups named (default: all of them)
#   GPU_SM90_K="256"     a pytest -k expression every group's tests must match too (e.g. the head dim
#                        of a CUFLASH_HEAD_DIMS=256 build)
#   GPU_SM90_BREAKDOWN="..."   benchmarks/kernel_breakdown.py arguments: each kernel's time in a
#                        forward + backward (unset: none)
#   GPU_SM90_HOST="..."   benchmarks/host_overhead.py arguments ("-" for its defaults): host time
#                        per call (unset: none)
#   GPU_SM90_DECODE="..."   benchmarks/bench_decode.py arguments ("-" for its defaults): decoding
#                        against a KV cache, contiguous and paged (unset: none)
#   GPU_SM90_SANITIZE="memcheck synccheck"   scripts/sanitize.sh's tools over the extension as built,
#                        after the tests (unset: none); its logs join logs.tar.gz
#   GPU_SM90_NCU="..."   scripts/ncu_profile.sh's cases (e.g. "bwd:2,32,8192,64:0 fwd:16,16,1024,128:1")
#                        to profile at the end (unset: no profile)
# Logs come back as $OUT/logs.tar.gz, results as $OUT/*.md/json.
# shellcheck source=scripts/device_call_env.sh
source "$(dirname "$0")/device_call_env.sh"
LIMIT=${GPU_SM90_LIMIT_S:-300}
start=$(date +%s)
if ! ls cuflash_attn/_C*.so >/dev/null 2>&1; then
  bash scripts/setup.sh > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 1; }
fi
echo "build: $(( $(date +%s) - start )) s"
status=0
# A benchmark's arguments: "-" stands for none (its defaults).
args_of() { [ "$1" = - ] || printf '%s' "$1"; }
timeout --kill-after=5 120 python3 -m pytest -s -q -p no:cacheprovider tests/test_sm90_probe.py > "$OUT/probe.log" 2>&1 \
  || status=1
grep -vE '^\s*$' "$OUT/probe.log" | tail -n 30
# name|CUFLASH_SM90|test files|-k expression. test_sm90_forward, test_sm90_backward,
# test_sm90_backward_packed, test_sm90_backward_features, test_bwd_atomic_dq and test_deterministic set CUFLASH_SM90 themselves
# (their modes); the others run under the listed value (none: the defaults).
runs=(
  "forward||tests/test_sm90_forward.py|"
  "backward|bwd|tests/test_sm90_backward.py|"
  "backward_packed||tests/test_sm90_backward_packed.py|"
  "backward_features||tests/test_sm90_backward_features.py|"
  "atomic_dq||tests/test_bwd_atomic_dq.py|"
  "deterministic||tests/test_deterministic.py|"
  "features_defaults||tests/test_features.py tests/test_attn_mask.py|cuda"
  "features|features|tests/test_features.py tests/test_attn_mask.py|cuda"
  "tma_features|tma,features|tests/test_features.py tests/test_attn_mask.py|cuda"
  "sm80_features|0|tests/test_features.py tests/test_attn_mask.py|cuda"
  "debug||tests/test_ops.py|debug"
  "defaults||tests/test_accuracy.py|cuda and not test_random_sweep"
  "fp32||tests/test_fp32_paths.py|"
  "edge_cases||tests/test_edge_cases.py|cuda"
  "outputs_written||tests/test_outputs_written.py|"
  "bad_input||tests/test_bad_input.py tests/test_ops.py|not debug"
  "kvcache||tests/test_kvcache.py tests/test_paged_kv.py tests/test_split_kv.py tests/test_pack_gqa.py|"
)
if [ -n "${GPU_SM90_GROUPS-}" ]; then
  chosen=()
  for run in "${runs[@]}"; do
    [[ ",$GPU_SM90_GROUPS," == *",${run%%|*},"* ]] && chosen+=("$run")
  done
  (( ${#chosen[@]} > 0 )) || { echo "GPU_SM90_GROUPS=$GPU_SM90_GROUPS names no test group" >&2; exit 2; }
  runs=("${chosen[@]}")
fi
pids=()
for run in "${runs[@]}"; do
  IFS='|' read -r name value files kexpr <<< "$run"
  if [ -n "${GPU_SM90_K-}" ]; then kexpr="${kexpr:+($kexpr) and }($GPU_SM90_K)"; fi
  (
    if [ -n "$value" ]; then export CUFLASH_SM90=$value; fi
    # shellcheck disable=SC2086  # files is a list
    timeout --kill-after=5 "$LIMIT" python3 -m pytest $files -k "${kexpr}" -q -rfE --maxfail=20 \
      -p no:cacheprovider > "$OUT/$name.log" 2>&1
  ) &
  pids+=($!)
done
for ((i = 0; i < ${#runs[@]}; i++)); do
  wait "${pids[$i]}"; rc=$?
  name=${runs[$i]%%|*}
  # Under GPU_SM90_K a group may select no test (pytest's exit status 5): not a failure.
  if (( rc == 5 )) && [ -n "${GPU_SM90_K-}" ]; then rc=0; fi
  (( rc != 0 )) && status=1
  echo "$name (exit $rc$( (( rc == 124 || rc == 137 )) && echo ', TIMED OUT')): $(tail -n 1 "$OUT/$name.log")"
  grep -E '^(FAILED|ERROR)' "$OUT/$name.log" | head -n 15
done
echo "tests: $(( $(date +%s) - start )) s"
if [ -n "${GPU_SM90_BENCH-}" ]; then
  # shellcheck disable=SC2086  # the arguments are a list
  timeout --kill-after=5 "${GPU_SM90_BENCH_LIMIT_S:-200}" python3 benchmarks/bench_attention.py $GPU_SM90_BENCH \
    --out "$OUT" > "$OUT/bench.log" 2>&1
  echo "bench exit $?"; tail -n 60 "$OUT/bench.log"
fi
if [ -n "${GPU_SM90_BENCH_FEATURES-}" ]; then
  # shellcheck disable=SC2086  # the arguments are a list
  timeout --kill-after=5 "${GPU_SM90_BENCH_LIMIT_S:-200}" python3 benchmarks/bench_features.py $GPU_SM90_BENCH_FEATURES \
    > "$OUT/bench_features.md" 2> "$OUT/bench_features.log"
  echo "bench_features exit $?"; cat "$OUT/bench_features.md"
fi
if [ -n "${GPU_SM90_BENCH_VARLEN-}" ]; then
  # shellcheck disable=SC2046  # the arguments are a list
  timeout --kill-after=5 "${GPU_SM90_BENCH_LIMIT_S:-200}" python3 benchmarks/bench_varlen.py \
    $(args_of "$GPU_SM90_BENCH_VARLEN") > "$OUT/bench_varlen.md" 2> "$OUT/bench_varlen.log"
  echo "bench_varlen exit $?"; cat "$OUT/bench_varlen.md"
fi
if [ -n "${GPU_SM90_BREAKDOWN-}" ]; then
  # shellcheck disable=SC2086  # the arguments are a list
  timeout --kill-after=5 150 python3 benchmarks/kernel_breakdown.py $GPU_SM90_BREAKDOWN \
    > "$OUT/kernel_breakdown.md" 2> "$OUT/kernel_breakdown.log"
  echo "kernel_breakdown exit $?"; cat "$OUT/kernel_breakdown.md"
fi
if [ -n "${GPU_SM90_HOST-}" ]; then
  # shellcheck disable=SC2046  # the arguments are a list
  timeout --kill-after=5 150 python3 benchmarks/host_overhead.py $(args_of "$GPU_SM90_HOST") \
    > "$OUT/host_overhead.md" 2> "$OUT/host_overhead.log"
  echo "host_overhead exit $?"; head -n 20 "$OUT/host_overhead.md"
fi
if [ -n "${GPU_SM90_DECODE-}" ]; then
  # shellcheck disable=SC2046  # the arguments are a list
  timeout --kill-after=5 150 python3 benchmarks/bench_decode.py $(args_of "$GPU_SM90_DECODE") \
    > "$OUT/decode.md" 2> "$OUT/decode.log"
  echo "decode exit $?"; cat "$OUT/decode.md"
fi
if [ -n "${GPU_SM90_SANITIZE-}" ]; then
  # Its own folder: sanitize.sh writes <tool>.log, which must not overwrite a test group's log.
  OUT="$OUT/sanitize" SANITIZE_SKIP_BUILD=1 SANITIZE_TOOLS="$GPU_SM90_SANITIZE" bash scripts/sanitize.sh \
    > "$OUT/sanitize.log" 2>&1 || status=1
  grep -E "errors|cases|not run" "$OUT/sanitize.log"
  for f in "$OUT"/sanitize/*.log; do [ -e "$f" ] && mv "$f" "$OUT/sanitize_$(basename "$f")"; done
  rmdir "$OUT/sanitize" 2>/dev/null
fi
if [ -n "${GPU_SM90_NCU-}" ]; then
  NCU_CASES="$GPU_SM90_NCU" OUT="$OUT" timeout --kill-after=5 240 bash scripts/ncu_profile.sh > "$OUT/ncu.log" 2>&1
  echo "ncu exit $?"; tail -n 80 "$OUT/ncu.log"
fi
archive_logs
echo "total: $(( $(date +%s) - start )) s"
exit $status
