#!/usr/bin/env bash
# One device call for the three checks of a tree (issue 7): the whole test suite
# (scripts/gpu_check.sh), the sanitizers (scripts/sanitize.sh) and the C++ tests
# (scripts/cpp_test.sh), overlapped so that they fit one call (about 6 minutes on an H100-class
# machine of 16 cores): the extension and the C++ tests build side by side, then the suite runs
# beside the sanitizers (the suite's timings are not measured). Logs: $OUT/logs.tar.gz (the
# three parts' output), $OUT/check/logs.tar.gz (the suite's), $OUT/san.tar.gz (each tool's).
#   VERIFY_LIMIT_S=560   seconds for the whole call; each part gets what is left
#   GPU_CHECK_PROCS, GPU_CHECK_SWEEP_SHARDS, SANITIZE_TOOLS ... pass through
#   NVCC_APPEND_FLAGS="-DSOME_EXPERIMENT=1"   (read by nvcc itself) checks an experiment's build
#                        whole; on a fresh machine only: ninja does not rebuild objects for a
#                        changed environment
# shellcheck source=scripts/device_call_env.sh
source "$(dirname "$0")/device_call_env.sh"
limit=${VERIFY_LIMIT_S:-560}
start=$(date +%s)
left() { echo $(( limit - ($(date +%s) - start) )); }
# GoogleTest's sources, where carried (.googletest), build with the C++ tests; their head dims
# (VERIFY_CPP_HEAD_DIMS, default 64,128: the extension's own tests cover the others).
CUFLASH_HEAD_DIMS=${VERIFY_CPP_HEAD_DIMS:-64,128} timeout "$(left)" bash scripts/cpp_test.sh > "$OUT/cpp.log" 2>&1 &
cpp_pid=$!
GPU_CHECK_BENCH="" GPU_CHECK_PROCS=${GPU_CHECK_PROCS:-5} GPU_CHECK_SWEEP_SHARDS=${GPU_CHECK_SWEEP_SHARDS:-3} \
  OUT="$OUT/check" timeout "$(left)" bash scripts/gpu_check.sh > "$OUT/check.log" 2>&1 &
check_pid=$!
# The sanitizers start once gpu_check.sh's build is in place (setup.sh rewrites the extension's
# file, which a running process has mapped).
until grep -q '^build:' "$OUT/check.log" 2>/dev/null; do
  kill -0 "$check_pid" 2>/dev/null || { cat "$OUT/check.log"; archive_logs; exit 1; }
  sleep 2
done
echo "extension built: $(( $(date +%s) - start )) s"
status=0
# The tools one after another: two at a time beside the suite each ran 1.5-7x slower and the
# suite 245 -> 401 s (H100, 2026-12-06; benchmarks/NOTES.md): they share one GPU.
OUT="$OUT/san" SANITIZE_SKIP_BUILD=1 SANITIZE_BUDGET_S=$(( $(left) - 10 )) bash scripts/sanitize.sh > "$OUT/san.log" 2>&1 \
  || status=1
tar czf "$OUT/san.tar.gz" -C "$OUT" san && rm -rf "$OUT/san"
echo "sanitizers ($(( $(date +%s) - start )) s):"; grep -vE '^=========|^Version|^logs:' "$OUT/san.log" | tail -n 8
wait "$cpp_pid" || status=1
summary=$(grep -E 'tests passed|tests failed' "$OUT/cpp.log" | tail -n 1)
echo "C++ tests ($(( $(date +%s) - start )) s): ${summary:-no ctest summary (a build error?):}"
[ -n "$summary" ] || { grep -m 5 -E 'error' "$OUT/cpp.log"; tail -n 3 "$OUT/cpp.log"; }
grep -E '\(Failed\)|\(SEGFAULT\)|\(Timeout\)' "$OUT/cpp.log" | head -n 10
wait "$check_pid" || status=1
# Stopped by its time limit, gpu_check.sh leaves its logs (one a test file) unpacked: packed here,
# or the device would bring back only the first few.
if compgen -G "$OUT/check/*.log" > /dev/null; then OUT="$OUT/check" archive_logs "*.log" "*.txt"; fi
echo "suite ($(( $(date +%s) - start )) s):"; cat "$OUT/check.log"
archive_logs "*.log"
exit $status
