#!/usr/bin/env bash
# Builds the C++ library (CMake), its GoogleTest tests and the examples with every core, and runs
# them with ctest. The argument checks run anywhere; tests that need a GPU skip without one.
#   CUFLASH_CUDA_ARCHS        CUDA targets, default "80;90a" (setup.py's "8.0;9.0a" form works too)
#   CUFLASH_HEAD_DIMS         compile only these head-dim buckets, e.g. "64,128" (default: all)
#   CUFLASH_GTEST_SOURCE_DIR  a googletest source tree, built when no installed GoogleTest is found.
#                             Default: ./.googletest if it exists (ignored by git). For a machine
#                             without network or libgtest-dev, copy the sources there from a
#                             machine that has them and carry the folder along:
#                               cp -r /usr/src/googletest .googletest   # Debian/Ubuntu: libgtest-dev
#   CUFLASH_BUILD_DIR         build folder, default build-cmake
#   CUFLASH_BUILD_EXAMPLES    ON (default) or OFF; the LibTorch example builds where python3 imports torch
#   CUFLASH_WERROR            ON turns compiler warnings into errors (CI), default OFF
# Arguments go to ctest, e.g. -L validation (argument checks), -L accuracy, -R Accuracy.*bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cmake >/dev/null || { echo "cmake not found (3.24 or later is needed)" >&2; exit 1; }
BUILD_DIR=${CUFLASH_BUILD_DIR:-build-cmake}
JOBS=$(nproc)

gtest_dir=${CUFLASH_GTEST_SOURCE_DIR:-}
[ -z "$gtest_dir" ] && [ -f .googletest/CMakeLists.txt ] && gtest_dir=.googletest
[ -n "$gtest_dir" ] && gtest_dir=$(cd "$gtest_dir" && pwd)

args=(-DCUFLASH_CUDA_ARCHS="${CUFLASH_CUDA_ARCHS:-80;90a}" -DCUFLASH_HEAD_DIMS="${CUFLASH_HEAD_DIMS:-}"
      -DBUILD_TESTS=ON -DBUILD_EXAMPLES="${CUFLASH_BUILD_EXAMPLES:-ON}" -DCUFLASH_WERROR="${CUFLASH_WERROR:-OFF}"
      -DCUFLASH_GTEST_SOURCE_DIR="$gtest_dir")
torch_prefix=$("${PYTHON:-python3}" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)
[ -n "$torch_prefix" ] && args+=(-DCMAKE_PREFIX_PATH="$torch_prefix")
# Ninja where there is one (a build folder keeps the generator it was made with).
[ ! -f "$BUILD_DIR/CMakeCache.txt" ] && command -v ninja >/dev/null && args+=(-G Ninja)

cmake -S . -B "$BUILD_DIR" "${args[@]}"
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" -j "$JOBS" --output-on-failure "$@"
