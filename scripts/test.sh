#!/usr/bin/env bash
# Sets up, builds and runs the whole test suite (GPU tests skip without a GPU): the Python tests,
# then the C++ API's (scripts/cpp_test.sh) where cmake is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
CUFLASH_PTXAS_VERBOSE=${CUFLASH_PTXAS_VERBOSE:-1} bash scripts/setup.sh  # and no serialized wgmma
status=0
"${PYTHON:-python3}" -m pytest tests -q -p no:cacheprovider "$@" || status=$?
# One CUDA target and one head-dim bucket keep the CMake build short (about 1.5 minutes on 2
# cores, examples included); scripts/cpp_test.sh alone builds every bucket.
if command -v cmake >/dev/null; then
  CUFLASH_CUDA_ARCHS=${CUFLASH_CPP_TEST_ARCHS:-80} CUFLASH_HEAD_DIMS=${CUFLASH_CPP_TEST_HEAD_DIMS:-64} \
    CUFLASH_BUILD_DIR=${CUFLASH_BUILD_DIR:-build/cmake-test} CUFLASH_WERROR=${CUFLASH_WERROR:-ON} \
    bash scripts/cpp_test.sh || status=$?
else
  echo "cmake not found: skipping the C++ API tests (scripts/cpp_test.sh)" >&2
fi
exit $status
