#!/usr/bin/env bash
# Create (or reuse) a virtual environment with megatron-bpd installed and its extension built.
#   source scripts/env.sh [newest|floor]   -> activates it; prints its path.
# The environment lives in ~/.cache/megatron-bpd/venvs/<stack>-<hash>, keyed by a hash of everything that decides
# its contents, so reruns on the same machine reuse it and a fresh machine builds it from scratch.
set -euo pipefail
stack="${1:-newest}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "$stack" in
  newest) py_version=3.12.1 ;;
  floor) py_version=3.11.7 ;;
  *) echo "env.sh: unknown stack '$stack' (newest|floor)" >&2; return 2 2>/dev/null || exit 2 ;;
esac
python_bin="$(PYENV_VERSION=$py_version pyenv which python 2>/dev/null || command -v python${py_version%.*})"
key="$(cat "$root/requirements/$stack.txt" "$root/requirements/base.txt" "$root/requirements/test.txt" | sha256sum | cut -c1-12)"
venv="${MEGATRON_BPD_VENV_ROOT:-$HOME/.cache/megatron-bpd/venvs}/$stack-$key"
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"  # one builder at a time: concurrent runs (CI legs, several shells) wait here
flock 9
if [ ! -f "$venv/.ready" ]; then
  echo "[env] building $stack environment in $venv (python $py_version)" >&2
  rm -rf "$venv"
  "$python_bin" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel ninja >&2
  "$venv/bin/python" -m pip install -q -r "$root/requirements/$stack.txt" -r "$root/requirements/base.txt" \
    -r "$root/requirements/test.txt" -c "$root/requirements/$stack.txt" >&2
  touch "$venv/.ready"
fi
# The checkout itself goes in editable (no dependency resolution: the environment already has them), which also
# builds the C++ extension in place; a failed build leaves the pure-PyTorch reference backend in use. The install is
# skipped when this checkout was installed last with the same build inputs (setup.py, pyproject.toml, csrc/, the
# extension switches) and its built extension is still there: Python sources need no reinstall (editable).
stamp="$(cd "$root" && { echo "$root ${MEGATRON_BPD_NO_EXTENSION:-0} ${MEGATRON_BPD_FORCE_CUDA:-0}"; \
  cat setup.py pyproject.toml; find csrc -type f | LC_ALL=C sort | xargs cat; } | sha256sum | cut -c1-16)"
built() { [ "${MEGATRON_BPD_NO_EXTENSION:-0}" = 1 ] || compgen -G "$root/megatron_bpd/_C*.so" >/dev/null; }
if [ "$(cat "$venv/.installed" 2>/dev/null)" = "$stamp" ] && built; then
  echo "[env] the checkout is installed with its extension (build inputs unchanged): not reinstalling" >&2
elif "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" >&2; then
  echo "$stamp" > "$venv/.installed"
else
  rm -f "$venv/.installed"
  echo "[env] installing the checkout failed" >&2
fi
flock -u 9
export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
echo "$venv"
