#!/usr/bin/env bash
# The CPU kernels and the op glue under AddressSanitizer and UndefinedBehaviorSanitizer: builds a
# copy of the committed tree (CUFLASH_CPU_SANITIZE=1; one head-dim bucket and sm_80 only, since
# the CUDA kernels do not run here) in a temporary directory and runs the CPU tests on it, the
# sanitizers' runtimes preloaded into Python. Exits non-zero at the first report.
#   bash scripts/cpu_sanitize.sh [pytest arguments]   (default: the CPU kernels' and features' tests)
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q . "$work/tree"
cd "$work/tree"
"${PYTHON:-python3}" tools/generate_kernels.py > /dev/null
CUFLASH_CPU_SANITIZE=1 CUFLASH_HEAD_DIMS=64 CUFLASH_CUDA_ARCHS="8.0" "${PYTHON:-python3}" setup.py build_ext --inplace \
  > "$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if [ "$#" -eq 0 ]; then
  set -- tests/test_cpu_kernels.py tests/test_features.py tests/test_edge_cases.py tests/test_pack_gqa.py \
    tests/test_attn_mask.py tests/test_kvcache.py tests/test_paged_kv.py tests/test_split_kv.py tests/test_accuracy.py \
    tests/test_layouts.py
fi
"${PYTHON:-python3}" -m pytest -q -p no:cacheprovider -x "$@"
