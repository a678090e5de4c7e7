#!/usr/bin/env bash
# Download the wheels that the lent GPU machine lacks (Python 3.12, torch 2.11, no internet) into .whl/
# (git-ignored), for the device tool's `carry`; docs/benchmarks.md "Running the GPU check" shows the whole call.
# Usage: scripts/gpu_wheels.sh [--triton]
#   (none)    the engine: bitsandbytes and xgrammar with what they need beyond the machine's image (~45 MB)
#   --triton  instead: tritonserver (nvidia-pytriton) + tritonclient + the frontend's packages, for the
#             check's triton stage, run as a second call (~57 MB; bitsandbytes does not fit beside it in the
#             64 MiB a call carries, so that call serves the bf16 model only)
# Versions are pinned to this project's .venv where it has them, so the GPU runs what CI tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.whl"
VENV_PY="$ROOT/.venv/bin/python"

engine=(bitsandbytes xgrammar apache-tvm-ffi pydantic pydantic-core annotated-types typing-inspection)
triton=(nvidia-pytriton tritonclient python-rapidjson fastapi starlette annotated-doc opentelemetry-api uvicorn
        pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection pypdfium2
        xgrammar apache-tvm-ffi)
case "${1:-}" in
  "") names=("${engine[@]}") ;;
  --triton) names=("${triton[@]}") ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "gpu_wheels: unknown option $1" >&2; exit 2 ;;
esac

pinned() {  # NAME -> NAME==VERSION from .venv when installed there, else NAME
  local version=""
  if [[ -x "$VENV_PY" ]]; then
    version="$("$VENV_PY" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1")"
  fi
  if [[ -n "$version" ]]; then echo "$1==$version"; else echo "$1"; fi
}

rm -rf "$OUT"
mkdir -p "$OUT"
grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.whl/' >> "$ROOT/.git/info/exclude"
platforms=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for name in "${names[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$OUT" "$(pinned "$name")"
done
du -ch "$OUT"/*.whl | tail -1
echo "wheels in $OUT; carry \".whl\" and start the command with the install line of docs/benchmarks.md"
