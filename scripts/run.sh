#!/usr/bin/env bash
# Sets up, builds and runs the main job: environment, a check against float64, a timing table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m cuflash_attn "$@"
