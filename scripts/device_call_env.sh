# Sourced by the scripts that make one device call (gpu_check.sh, gpu_sm90_check.sh,
# gpu_ab_define.sh): the repository root as the working directory, $OUT (default ./gpu_out) for
# what comes back, every core for the build, sm_90a unless CUFLASH_CUDA_ARCHS says otherwise.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUFLASH_CUDA_ARCHS=${CUFLASH_CUDA_ARCHS:-9.0a}

# The device tool brings back at most 8 files: $OUT's files matching the globs (default *.log)
# travel as one archive, $OUT/logs.tar.gz, and leave $OUT.
archive_logs() {
  local globs="${*:-*.log}"
  # shellcheck disable=SC2046,SC2086  # the globs expand inside $OUT
  tar czf "$OUT/logs.tar.gz" -C "$OUT" $(cd "$OUT" && ls -- $globs 2>/dev/null) && (cd "$OUT" && rm -f -- $globs)
}
