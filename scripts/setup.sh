#!/usr/bin/env bash
# Create .venv and install what the project needs; quick when nothing changed. Prints the venv's python.
# Usage: scripts/setup.sh [--serve | --dev]
#   (none)   the engine: requirements.txt
#   --serve  + tritonserver and the OpenAI frontend: requirements-triton.txt, requirements-frontend.txt,
#            and the Qwen2 vocabulary of serve.sh --demo's tiny checkpoints: requirements-tiny.txt
#   --dev    everything --serve installs, plus the test tools: requirements-dev.txt
# Environment: PYTHON (default python3), MINICPMV_VENV (default .venv), MINICPMV_TORCH_INDEX_URL,
# MINICPMV_CPU_TORCH_VERSION.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MINICPMV_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

mode=base
case "${1:-}" in
  "") ;;
  --serve) mode=serve ;;
  --dev) mode=dev ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "setup: unknown option ${1} (try --help)" >&2; exit 2 ;;
esac
case "$mode" in
  base) reqs=("$ROOT/requirements.txt") ;;
  serve) reqs=("$ROOT/requirements.txt" "$ROOT/requirements-triton.txt" "$ROOT/requirements-frontend.txt"
               "$ROOT/requirements-tiny.txt") ;;
  dev) reqs=("$ROOT/requirements-dev.txt") ;;
esac

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup: Python >= 3.10 is required ($PYTHON is $("$PYTHON" --version 2>&1))" >&2; exit 1
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating virtual environment $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# One stamp per mode, holding a hash of every requirements file and pyproject.toml. A mode is up to date
# when its own stamp or that of a mode installing more (dev > serve > base) matches.
stamp() { if [[ "$1" == base ]]; then echo "$VENV/.minicpmv-installed"; else echo "$VENV/.minicpmv-installed-$1"; fi; }
case "$mode" in
  base) covering=(base serve dev) ;;
  serve) covering=(serve dev) ;;
  dev) covering=(dev) ;;
esac
want="$(cat "$ROOT"/requirements*.txt "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
for m in "${covering[@]}"; do
  if [[ -f "$(stamp "$m")" && "$(cat "$(stamp "$m")")" == "$want" ]]; then
    echo "$PY"
    exit 0
  fi
done

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
echo "setup: installing requirements ($(for r in "${reqs[@]}"; do basename "$r"; done | paste -sd' '))" >&2
"$PY" -m pip install --quiet "${reqs[@]/#/--requirement=}" >&2
"$PY" -m pip install --quiet --no-deps -e "$ROOT" >&2
echo "$want" > "$(stamp "$mode")"
echo "$PY"
