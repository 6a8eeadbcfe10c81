#!/usr/bin/env bash
# Sets up a fresh machine and builds cuflash_attn in place (csrc -> cuflash_attn/_C*.so).
# Installs torch (pinned: its CUDA, 13.0, must match nvcc's) and the test tools only where
# they are missing, so it also runs on machines without network access that already have them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}

missing=()
"$PYTHON" -c "import torch" 2>/dev/null || missing+=("torch==${TORCH_VERSION}")
# transformers: tests/test_transformers_example.py (a HuggingFace model on the switch)
for mod in ninja pytest numpy hypothesis transformers; do
  "$PYTHON" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  "$PYTHON" -m pip install --quiet "${missing[@]}"
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
command -v nvcc >/dev/null || { echo "nvcc not found: install the CUDA toolkit (13.0) and put it on PATH" >&2; exit 1; }
"$PYTHON" tools/generate_kernels.py
mkdir -p build
echo "building cuflash_attn._C (log: build/setup.log)"
"$PYTHON" setup.py build_ext --inplace > build/setup.log 2>&1 || { tail -n 60 build/setup.log; exit 1; }
# A wgmma that ptxas serialized (its C75xx notes, in the log with CUFLASH_PTXAS_VERBOSE=1, which
# scripts/test.sh sets) loses the overlap the Hopper kernels are built on: refuse the build.
serialized="wgmma.mma_async instructions are serialized"
if grep -q "$serialized" build/setup.log; then
  grep "$serialized" build/setup.log | sort -u | head -n 20 >&2
  echo "ptxas serialized wgmma instructions (above; build/setup.log names the kernels)" >&2
  exit 1
fi
