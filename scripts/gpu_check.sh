#!/usr/bin/env bash
# The prepared GPU check (issue 14): on a machine with one NVIDIA GPU (H100/H200 class), from a fresh checkout,
#
#   bash scripts/gpu_check.sh OUT_DIR             # set up, build the CUDA kernel, run the GPU tests and the benches
#   bash scripts/gpu_check.sh --dry-run OUT_DIR   # run nothing: every stage is reported as skipped
#   bash scripts/gpu_check.sh --fetch-wheels      # download into .whl/ what a GPU machine without a package index
#                                                 # lacks (megatron-core); run where pip reaches the index
#
# Stages, in order, each under its own timeout and all within GPU_CHECK_BUDGET_S seconds (default 540: one
# 10-minute command; building the venv and trying Transformer Engine can take ~6 min more); a stage that fails is
# recorded and the next one runs:
#   gpu                  nvidia-smi lists a GPU (without one, only env and tests run, and only with GPU_CHECK_PYTHON)
#   env                  the Python to use: $GPU_CHECK_PYTHON if set; else this machine's python3 (with its CUDA
#                        torch) plus the wheels in .whl/ when that folder holds any; else the newest stack's venv
#                        from scripts/env.sh (requirements/newest.txt + base.txt + test.txt, CUDA torch from PyPI)
#   transformer_engine   venv only: pip install transformer-engine[pytorch] (240 s at most); else: is it importable
#   build                the extension in place with its CUDA kernel (TORCH_CUDA_ARCH_LIST 9.0 unless set), then
#                        the kernel's dispatch registration and one call on CUDA tensors against the reference
#   tests                pytest -m gpu: every test marked gpu (tests/conftest.py skips them without CUDA)
#   bench_block_drift    bench/bench_block_drift.py --device cuda (extension vs reference vs a device copy)
#   bench_vocab_parallel bench/bench_vocab_parallel.py --device cuda at TP 1
# OUT_DIR receives flat files only: summary.md and summary.json (scripts/gpu_check_report.py: every stage and test
# as pass/fail/skip with its numbers, versions, GPU, times), gpu_check.log (all output), tests.xml (JUnit),
# bench_block_drift.json, bench_vocab_parallel.json.
set -uo pipefail  # no -e: a failing stage is recorded and the next one runs

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
usage="usage: bash scripts/gpu_check.sh [--dry-run] OUT_DIR | --fetch-wheels"

if [ "${1:-}" = "--fetch-wheels" ]; then
  # What the GPU machine's image lacks (megatron-core needs only torch, numpy and packaging, which it has).
  spec="$(grep '^megatron-core==' requirements/newest.txt)"
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
fi
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
  echo "$usage" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
out="$(cd "$1" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
log="$out/gpu_check.log"
stages="$work/stages.tsv"
budget="${GPU_CHECK_BUDGET_S:-540}"
started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
: >"$log"
: >"$stages"
py=""
env_mode=""

record() {  # record NAME pass|fail|skip SECONDS DETAIL
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$stages"
  echo "[gpu_check] $1: $2 (${3}s)${4:+ - $4}" | tee -a "$log" >&2
}

run_stage() {  # run_stage NAME TIMEOUT_S COMMAND... : COMMAND under min(TIMEOUT_S, budget left), output to the log
  local name="$1" limit="$2" left rc=0 t0="$SECONDS" first last
  shift 2
  left=$((budget - SECONDS))
  if [ "$left" -lt 30 ]; then
    record "$name" skip 0 "out of the time budget (GPU_CHECK_BUDGET_S=$budget)"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "=== $name (timeout ${limit}s): $*" >>"$log"
  first=$(($(wc -l <"$log") + 1))
  timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1 || rc=$?
  last="$(tail -n "+$first" "$log" | grep -v '^[[:space:]]*$' | tail -1 | cut -c1-200)"  # the error, usually
  case "$rc" in
    0) record "$name" pass $((SECONDS - t0)) "" ;;
    124 | 137) record "$name" fail $((SECONDS - t0)) "timed out after ${limit}s" ;;
    127) record "$name" fail $((SECONDS - t0)) "command not found: $1" ;;
    *) record "$name" fail $((SECONDS - t0)) "exit code $rc: ${last//$'\t'/ }" ;;
  esac
  return "$rc"
}

# ------------------------------------------------------------------------------------------------ stage bodies
# Each runs in a child bash under `timeout` (hence exported); results for later stages go to files in $work.
# shellcheck disable=SC2317  # run indirectly: bash -c under timeout
setup_env() {
  if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    echo "GPU_CHECK_PYTHON" >"$work/env_mode"
    echo "$GPU_CHECK_PYTHON" >"$work/python"
  elif [ -n "$(find .whl -maxdepth 1 -name '*.whl' 2>/dev/null)" ]; then
    echo "python3 + .whl" >"$work/env_mode"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
      .whl/*.whl || return
    command -v python3 >"$work/python"
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "venv (scripts/env.sh newest)" >"$work/env_mode"
    local venv
    # the extension is built by the build stage, with its CUDA kernel and a log of its own
    venv="$(MEGATRON_BPD_NO_EXTENSION=1 bash scripts/env.sh newest)" || return
    echo "$venv/bin/python" >"$work/python"
  fi
  "$(cat "$work/python")" -c "import sys, torch, megatron.core; print('torch', torch.__version__, 'CUDA', \
torch.version.cuda, 'megatron-core', megatron.core.__version__); has_gpu = sys.argv[1] == '1'; \
assert torch.cuda.is_available() or not has_gpu, 'nvidia-smi lists a GPU but this torch sees no CUDA device'" \
    "$has_gpu"
}

# shellcheck disable=SC2317  # run indirectly: bash -c under timeout
build_cuda() {
  rm -f megatron_bpd/_C*.so  # a CPU-only library left here must not pass the check below
  # torch derives CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit (no lib64 beside it)
  if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  echo "CUDA_HOME=${CUDA_HOME:-unset (torch looks for nvcc)}; $(nvcc --version | tail -1)"
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MEGATRON_BPD_FORCE_CUDA=1 "$py" setup.py build_ext --inplace \
    --force || return
  "$py" - <<'EOF'
import torch

from megatron_bpd import ops

assert ops.extension_available(), "megatron_bpd._C did not load"
assert ops._has_kernel(torch.device("cuda")), "megatron_bpd._C has no CUDA kernel registered for megatron_bpd ops"
cur = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.25], device="cuda")
args = (cur, cur - torch.tensor([0.5, -0.25, 0.0, 1.0, 0.5], device="cuda"), torch.ones(5, dtype=torch.bool,
        device="cuda"), torch.tensor([0, 2], device="cuda"), torch.tensor([2, 5], device="cuda"))
ops.set_backend("extension")
gates = ops.block_drift_gates(*args)[0]
torch.testing.assert_close(gates, ops.reference_block_drift_gates(*args)[0])
print("CUDA kernel registered; gates on", gates.device, "equal the reference:", gates.tolist())
EOF
}

# shellcheck disable=SC2317  # run indirectly: bash -c under timeout
versions() {  # one JSON object of versions from the chosen Python
  "$py" - <<'EOF'
import json, platform, subprocess
from importlib import metadata

out = {"python": platform.python_version()}
for name in ("torch", "megatron-core", "transformers", "transformer-engine", "transformer_engine_torch", "numpy"):
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out[name] = None
try:
    import torch

    out["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["gpu_count"] = torch.cuda.device_count()
    from megatron_bpd import ops

    out["extension"] = ops.extension_available()
    out["extension_cuda_kernel"] = ops._has_kernel(torch.device("cuda"))
except Exception as e:  # reported, not fatal: the summary says what could be read
    out["error"] = repr(e)
try:
    out["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except (OSError, IndexError):
    out["nvcc"] = None
print(json.dumps(out))
EOF
}
export -f setup_env build_cuda versions
export work has_gpu=0

# ------------------------------------------------------------------------------------------------------ stages
if [ "$dry_run" = 1 ]; then
  for name in gpu env transformer_engine build tests bench_block_drift bench_vocab_parallel; do
    record "$name" skip 0 "dry run: nothing was run"
  done
else
  if run_stage gpu 60 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv; then
    has_gpu=1
  fi
  if [ "$has_gpu" = 0 ] && [ -z "${GPU_CHECK_PYTHON:-}" ]; then
    record env skip 0 "no GPU: nothing to set up (GPU_CHECK_PYTHON=PYTHON runs the tests stage anyway)"
  elif run_stage env 900 bash -c setup_env; then
    py="$(cat "$work/python")"
    [ -d "$work/site" ] && export PYTHONPATH="$work/site"
  fi
  env_mode="$(cat "$work/env_mode" 2>/dev/null)"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  export py

  if [ -z "$py" ] || [ "$has_gpu" = 0 ]; then
    record transformer_engine skip 0 "needs a GPU and the env stage"
  elif [ "$env_mode" = "venv (scripts/env.sh newest)" ]; then
    run_stage transformer_engine 240 "$py" -m pip install --no-build-isolation "transformer-engine[pytorch]" \
      && run_stage transformer_engine_import 60 "$py" -c "import transformer_engine.pytorch"
  elif "$py" -c "import transformer_engine.pytorch" >>"$log" 2>&1; then
    record transformer_engine pass 0 "already installed"
  else
    record transformer_engine skip 0 "not installed, and mode '$env_mode' installs nothing from a package index"
  fi

  if [ -z "$py" ] || [ "$has_gpu" = 0 ]; then
    record build skip 0 "needs a GPU and the env stage"
  else
    run_stage build 400 bash -c build_cuda
  fi

  if [ -z "$py" ]; then
    record tests skip 0 "no Python from the env stage"
  else
    run_stage tests 420 "$py" -m pytest -m gpu tests -v -rfEs -p no:cacheprovider --continue-on-collection-errors \
      -o junit_family=xunit1 -o timeout=300 --junitxml="$out/tests.xml"
  fi

  for bench in bench_block_drift bench_vocab_parallel; do
    if [ -z "$py" ] || [ "$has_gpu" = 0 ]; then
      record "$bench" skip 0 "needs a GPU and the env stage"
    elif [ "$bench" = bench_block_drift ]; then
      run_stage "$bench" 150 "$py" bench/bench_block_drift.py --device cuda --sizes 1e5 1e6 1e7 1e8 --repeats 21 \
        --json "$out/$bench.json"
    else
      run_stage "$bench" 180 "$py" bench/bench_vocab_parallel.py --device cuda \
        --configs 151936:4096:1 8192:32768:1 --repeats 3 --json "$out/$bench.json"
    fi
  done
  if [ -n "$py" ]; then
    timeout 120 bash -c versions >"$work/versions.json" 2>>"$log"
  fi
fi

python3 scripts/gpu_check_report.py --out "$out" --stages "$stages" --versions "$work/versions.json" \
  --started "$started" --seconds "$SECONDS" --budget "$budget" --env-mode "$env_mode" --dry-run "$dry_run"
status=$?
if [ "$status" = 0 ] && cut -f2 "$stages" | grep -qx fail; then
  status=1  # the summary is written; the exit code says that something failed
fi
rm -rf "$work"
exit "$status"
