#!/usr/bin/env bash
# Create .venv and install what the project needs; quick when nothing changed.
# Usage: scripts/setup.sh [--dev]    (sourced or run; prints the venv's python on success)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MINICPMV_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
REQS="$ROOT/requirements.txt"
[[ "${1:-}" == "--dev" ]] && REQS="$ROOT/requirements-dev.txt"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,3p' "$0"; exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup: Python >= 3.10 is required ($PYTHON is $("$PYTHON" --version 2>&1))" >&2; exit 1
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating virtual environment $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

stamp="$VENV/.minicpmv-installed"
want="$(cat "$ROOT"/requirements*.txt "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

"$PY" -m pip install --quiet --upgrade pip >&2
if ! "$PY" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: installing torch (CUDA build)" >&2
    "$PY" -m pip install --quiet "torch>=2.5" >&2
  else
    # No GPU: the CPU build. Pinned so pip takes the local CPU wheel on machines that have one
    # instead of the newest CUDA build with several GB of CUDA packages.
    echo "setup: installing torch (CPU build)" >&2
    "$PY" -m pip install --quiet "torch==${MINICPMV_CPU_TORCH_VERSION:-2.13.0}" \
      ${MINICPMV_TORCH_INDEX_URL:+--index-url "$MINICPMV_TORCH_INDEX_URL"} >&2
  fi
fi
echo "setup: installing requirements ($(basename "$REQS"))" >&2
"$PY" -m pip install --quiet -r "$REQS" >&2
"$PY" -m pip install --quiet --no-deps -e "$ROOT" >&2
echo "$want" > "$stamp"
