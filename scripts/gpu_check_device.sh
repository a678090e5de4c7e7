#!/usr/bin/env bash
# The GPU check as the lent GPU machine runs it: the device call's command (docs/benchmarks.md, "Running the
# GPU check") is `bash scripts/gpu_check_device.sh --out $OUT`.
#
# 1. installs the carried wheels (.whl/, made by scripts/gpu_wheels.sh) into a folder of their own, emptied
#    first, so that exactly the carried wheels are there (a warm machine keeps /tmp between calls);
# 2. puts that folder and the project first on PYTHONPATH (ahead of the image's own packages);
# 3. runs benchmarks/gpu_check.py with the arguments given, which runs its pre-flight (benchmarks/preflight.py:
#    imports, tokenizer files, GPU, free memory, in seconds) before any stage.
#
# The CPU rehearsal (minicpmv/devtools/rehearsal.py, tests/stack/test_device_rehearsal.py) runs this same
# script in an environment made of the GPU image's packages plus the wheels, pointing it there with:
#   WHEELS  folder of the wheels to install (default .whl)
#   SITE    where they are installed (default /tmp/site)
#   PYTHON  the interpreter (default python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/site}"
PYTHON="${PYTHON:-python3}"

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
  echo "gpu_check_device: no wheels in $WHEELS: run scripts/gpu_wheels.sh on the CPU machine and carry .whl" >&2
  exit 2
fi
started=$SECONDS
rm -rf "$SITE"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}"
echo "gpu_check_device: ${#wheels[@]} wheels installed into $SITE in $((SECONDS - started)) s"
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
