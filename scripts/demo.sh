#!/usr/bin/env bash
# The project's main job on this machine: builds or reuses the environment (scripts/env.sh), then runs
# `python -m megatron_bpd.demo` with the given arguments (default output folder: runs/demo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh "${MEGATRON_BPD_STACK:-newest}" >/dev/null
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
if [ $# -eq 0 ]; then set -- --out runs/demo; fi
exec python -m megatron_bpd.demo "$@"
