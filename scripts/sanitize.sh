#!/usr/bin/env bash
# Runs compute-sanitizer's memcheck, synccheck, initcheck and racecheck, one run each, over the
# reduced sweep of tests/sanitize_driver.py (every CUDA kernel family, forward and backward,
# checked against float64), with the caching allocator off so that out-of-bounds accesses reach
# the sanitizer. Prints "<tool>: N errors" per tool, writes each tool's log to $OUT/<tool>.log
# and exits non-zero on any sanitizer report, any failed case, or a tool that did not finish.
#
#   OUT=dir                        logs (default ./sanitize_logs)
#   SANITIZE_TOOLS="memcheck ..."  the tools to run, in order (default: all four, slowest last)
#   SANITIZE_KERNEL_FILTER=...     compute-sanitizer --kernel-name filter (default kns=cuflash: only
#                                  cuflash's kernels, whose names all hold the namespace cuflash::,
#                                  are checked, so torch's own kernels neither slow the run down
#                                  nor report; "" checks every kernel)
#   SANITIZE_BUDGET_S=540          seconds for the whole script, build included; each tool gets
#                                  what is left (a tool cut short counts as a failure)
#   SANITIZE_DRIVER_ARGS="--only fp16"  arguments for the driver (e.g. a subset of cases)
#   SANITIZE_EACH_CASE=1           one sanitizer process per case (slower: a process and a CUDA
#                                  context each), so that a case that stops the tool does not hide
#                                  the others, and the cases that fail are named
#   SANITIZE_TOOL_ARGS="--racecheck-report all"   more compute-sanitizer options, for every
#                                  tool run (split on spaces)
#   SANITIZE_SKIP_BUILD=1          use the extension as built; otherwise scripts/setup.sh builds it
#                                  (incremental; CUFLASH_HEAD_DIMS=64,128,256 is all the sweep needs,
#                                  and new objects get -lineinfo so reports name source lines)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-sanitize_logs}
TOOLS=${SANITIZE_TOOLS:-memcheck synccheck initcheck racecheck}
FILTER=${SANITIZE_KERNEL_FILTER-kns=cuflash}
BUDGET=${SANITIZE_BUDGET_S:-540}
deadline=$(( $(date +%s) + BUDGET ))
mkdir -p "$OUT"

SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [ ! -x "$SANITIZER" ]; then
  echo "compute-sanitizer not found (on PATH, or set COMPUTE_SANITIZER)" >&2
  exit 2
fi
"$SANITIZER" --version | tail -n 1

if [ "${SANITIZE_SKIP_BUILD:-0}" != 1 ]; then
  export CUFLASH_CUDA_ARCHS=${CUFLASH_CUDA_ARCHS:-9.0a}
  export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-lineinfo"
  start=$(date +%s)
  bash scripts/setup.sh > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 2; }
  echo "build: $(( $(date +%s) - start )) s"
fi

export PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONUNBUFFERED=1
filter_args=()
[ -n "$FILTER" ] && filter_args=(--kernel-name "$FILTER")
status=0
for tool in $TOOLS; do
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -le 10 ]; then
    echo "$tool: not run (SANITIZE_BUDGET_S=$BUDGET spent)"; status=1; continue
  fi
  log="$OUT/$tool.log"
  start=$(date +%s)
  # initcheck must watch every kernel: with a filter it does not see the writes of torch's own
  # kernels (randn, the padding copy) and reports our reads of that memory as uninitialized.
  # Nor does it check cudaMemcpy/cudaMemset (--check-api-memory-access no): those are torch's
  # own copies (the float64 reference's clones, of memory whose writes initcheck did not see).
  # Nor does it see TMA's bulk stores: on a Hopper GPU our forward's output, written so, was
  # reported 47,428 times as read uninitialized (H200, 2026-12-03: by our delta kernel and by
  # torch's copies), so initcheck runs the driver --without-tma (the sm_80-class kernels, every
  # store a generic one; memcheck and tests/test_outputs_written.py, which fills every output
  # with NaN first, cover the TMA kernels' writes) and every report counts.
  tool_filter=("${filter_args[@]+"${filter_args[@]}"}")
  tool_driver_args=()
  if [ "$tool" = initcheck ]; then
    tool_filter=(--check-api-memory-access no --show-backtrace no)
    tool_driver_args=(--without-tma)
  fi
  run_tool() {  # the driver's arguments; the time left to the deadline
    # shellcheck disable=SC2086  # SANITIZE_TOOL_ARGS is split on purpose
    timeout --signal=INT --kill-after=30 "$(( deadline - $(date +%s) ))" "$SANITIZER" --tool "$tool" \
      --error-exitcode 1 ${tool_filter[@]+"${tool_filter[@]}"} ${SANITIZE_TOOL_ARGS:-} python3 tests/sanitize_driver.py \
      ${tool_driver_args[@]+"${tool_driver_args[@]}"} "$@"
  }
  failed_cases=()
  processes=1
  if [ "${SANITIZE_EACH_CASE:-0}" = 1 ]; then
    processes=0
    : > "$log"
    rc=0
    # shellcheck disable=SC2086  # SANITIZE_DRIVER_ARGS is split on purpose
    while IFS= read -r case_name; do
      if [ $(( deadline - $(date +%s) )) -le 5 ]; then rc=124; break; fi
      echo "=== $case_name" >> "$log"
      processes=$(( processes + 1 ))
      run_tool ${SANITIZE_DRIVER_ARGS:-} --case "$case_name" >> "$log" 2>&1 || { rc=$?; failed_cases+=("$case_name"); }
    done < <(python3 tests/sanitize_driver.py --list ${SANITIZE_DRIVER_ARGS:-})
  else
    # shellcheck disable=SC2086
    run_tool ${SANITIZE_DRIVER_ARGS:-} > "$log" 2>&1
    rc=$?
  fi
  secs=$(( $(date +%s) - start ))
  # memcheck, initcheck, synccheck: "ERROR SUMMARY: N errors";
  # racecheck: "RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)", warnings count too.
  # (Summed over the processes of SANITIZE_EACH_CASE.)
  errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+ errors?$' "$log" | grep -Eo '[0-9]+' | awk '{ s += $1 } END { if (NR) print s }')
  race=$(grep -Eo 'RACECHECK SUMMARY: .*' "$log" | tail -n 1)
  warnings=""
  if [ -n "$race" ]; then
    e=$(grep -Eo 'RACECHECK SUMMARY: .*' "$log" | grep -Eo '[0-9]+ errors?' | awk '{ s += $1 } END { print s + 0 }')
    w=$(grep -Eo 'RACECHECK SUMMARY: .*' "$log" | grep -Eo '[0-9]+ warnings?' | awk '{ s += $1 } END { print s + 0 }')
    errors=$(( ${errors:-0} > e ? ${errors:-0} : e ))
    warnings=", $w warnings"
    if [ "$w" -gt 0 ] && [ "$rc" -eq 0 ]; then rc=1; fi
  fi
  driver=$(grep -E '^sanitize_driver:' "$log" | tail -n 1)
  if [ "$rc" -ne 0 ] && [ ${#failed_cases[@]} -gt 0 ]; then
    driver="cases that failed under $tool: $(printf '%s; ' "${failed_cases[@]}")"
  fi
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "$tool: did not finish in ${left} s (see $log)"
  elif [ -z "$errors" ]; then
    echo "$tool: no error summary, exit $rc, ${secs} s (see $log)"
  else
    echo "$tool: $errors errors$warnings, exit $rc, ${secs} s; ${driver:-the driver printed no summary}"
  fi
  if [ "$rc" -ne 0 ] || [ "${errors:-1}" != 0 ]; then
    status=1
    grep -E '^=========|FAILED' "$log" | grep -vE 'COMPUTE-SANITIZER|SUMMARY' | head -n 20
  fi
done
echo "logs: $OUT"
exit $status
