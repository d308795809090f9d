#!/usr/bin/env bash
# The whole test suite on one supported stack: builds or reuses its environment (scripts/env.sh), installs the
# checkout with its C++ extension, then runs pytest. MEGATRON_BPD_STACK=newest (default: Python 3.12,
# torch 2.14, megatron-core 0.19) or floor (Python 3.11, torch 2.13, megatron-core 0.16.1). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stack="${MEGATRON_BPD_STACK:-newest}"
source scripts/env.sh "$stack" >/dev/null
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
python -c "import sys, torch, megatron.core as mc; from megatron_bpd import ops; \
print(f'[test] stack={sys.argv[1]} python {sys.version.split()[0]} torch {torch.__version__} megatron-core {mc.__version__} extension={ops.extension_available()}')" "$stack"
if [ "${MEGATRON_BPD_NO_EXTENSION:-0}" != 1 ] && ! python -c "from megatron_bpd import ops; assert ops.extension_available()"; then
  echo "[test] the C++ extension megatron_bpd._C did not build (see the pip output above); set MEGATRON_BPD_NO_EXTENSION=1 to test the reference backend alone" >&2
  exit 1
fi
python -m pytest "$@"
