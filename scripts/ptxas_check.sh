#!/usr/bin/env bash
# One instantiation compiled for sm_90a as setup.py builds it, without torch or a GPU: ptxas's
# registers and spills per kernel, and a failure where it serialized wgmmas (which setup.sh
# refuses too, after the whole build). For checking a compile-time experiment before a device
# call:
#   bash scripts/ptxas_check.sh csrc/cuda/instantiations/flash_bwd_hdim256_bf16_sm80.cu -DSOME_KNOB=1
# The cubin is left at ${PTXAS_CHECK_OUT:-/tmp/ptxas_check}/<file>.cubin (cuobjdump -sass reads it).
set -euo pipefail
source_file=${1:?the .cu file to compile}
shift
out_dir=${PTXAS_CHECK_OUT:-/tmp/ptxas_check}
mkdir -p "$out_dir"
name=$(basename "$source_file" .cu)
log="$out_dir/$name.log"
cd "$(dirname "$0")/.."
# setup.py's nvcc flags for sm_90a (gencode_flags, the half/bfloat16 operator defines of torch's
# extension build), with ptxas's report.
nvcc -gencode=arch=compute_90a,code=sm_90a -cubin -Xptxas -v -DCUFLASH_SM90A_BUILT -O3 -std=c++17 \
  --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -I csrc "$@" -o "$out_dir/$name.cubin" "$source_file" > "$log" 2>&1 \
  || { tail -n 30 "$log"; exit 1; }
# Each kernel's name (demangled by c++filt where present), then its spill and register lines.
grep -E "Compiling entry function|spill|Used [0-9]+ registers" "$log" |
  sed -E "s/.*Compiling entry function '([^']+)'.*/\1/" | { c++filt 2>/dev/null || cat; } |
  sed -E 's/^(ptxas info *: *)?/  /'
if grep -q "serialized" "$log"; then
  grep "serialized" "$log" | sort -u >&2
  echo "ptxas serialized wgmma instructions ($log)" >&2
  exit 1
fi
