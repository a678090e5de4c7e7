#!/usr/bin/env bash
# Sweep concurrency against a Triton model with perf_analyzer over gRPC streaming; write a CSV.
# Usage: scripts/perf_analyzer.sh [--model NAME] [--url HOST:PORT] [--input-data FILE] [--concurrency A:B:STEP]
#          [--measurement-interval MS] [--out CSV] [--install-only] [-- more perf_analyzer arguments]
#
# perf_analyzer comes from PATH (NGC SDK container) or is installed once into .venv/perf_analyzer/: the
# binary from the tritonclient==2.50.0 manylinux1 wheel (later wheels need glibc 2.38 or lack it), Debian's
# libb64-0d, and libcudart.so.12 from PyPI's nvidia-cuda-runtime-cu12. .venv/perf_analyzer/bin/perf_analyzer
# is a wrapper that sets LD_LIBRARY_PATH; call it directly for other runs.
# Decoupled models: the CSV's latencies run to the LAST response; for per-response timestamps (time to first
# token, inter-token latency) add: -- --profile-export-file FILE.json (it repeats every request's inputs, and
# with page.json holds raw PNG bytes: read it with bytes.decode("utf-8", "replace") before json.loads).
#
# Defaults: --model minicpm_v_2_6 --url localhost:8001 --input-data perf/inputs/text.json
#           --concurrency 1:4:1 --measurement-interval 10000 (ms)
#           --out benchmarks/results/perf_analyzer_<model>_<input name>.csv
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MINICPMV_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
PA_DIR="$VENV/perf_analyzer"
PA_WHEEL="tritonclient==2.50.0"
PA_MEMBER="tritonclient-2.50.0.data/data/bin/perf_analyzer"

MODEL="minicpm_v_2_6"
URL="localhost:8001"
INPUT_DATA="$ROOT/perf/inputs/text.json"
CONCURRENCY="1:4:1"
INTERVAL_MS="10000"
OUT=""
INSTALL_ONLY=0
EXTRA=()

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "perf_analyzer.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --model) MODEL="$2"; shift 2 ;;
    --url) URL="$2"; shift 2 ;;
    --input-data) INPUT_DATA="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --measurement-interval) INTERVAL_MS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

have_lib() {
  # Captured first: with pipefail, `ldconfig -p | grep -q` can fail on SIGPIPE even when grep matched.
  local cache
  cache="$({ command -v ldconfig >/dev/null && ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null || true)"
  grep -q "$1" <<<"$cache"
}

install_libb64() {
  have_lib 'libb64\.so\.0d' && return 0
  if [[ "$(id -u)" != 0 ]]; then
    die "perf_analyzer needs libb64.so.0d: install Debian/Ubuntu's libb64-0d (sudo apt-get install -y libb64-0d)"
  fi
  echo "perf_analyzer.sh: installing libb64-0d" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >&2
}

# The directory holding libcudart.so.12 from the venv's nvidia-cuda-runtime-cu12 (installed if missing).
cudart_dir() {
  local find='import importlib.util as u, pathlib as p
s = u.find_spec("nvidia.cuda_runtime")
print(next(p.Path(d, "lib") for d in s.submodule_search_locations) if s else "")'
  local dir
  dir="$("$PY" -c "$find" 2>/dev/null || true)"
  if [[ -z "$dir" || ! -e "$dir/libcudart.so.12" ]]; then
    echo "perf_analyzer.sh: installing nvidia-cuda-runtime-cu12 (libcudart.so.12) into $VENV" >&2
    "$PY" -m pip install --quiet "nvidia-cuda-runtime-cu12>=12,<13" >&2
    dir="$("$PY" -c "$find")"
  fi
  [[ -e "$dir/libcudart.so.12" ]] || die "libcudart.so.12 not found under $dir"
  echo "$dir"
}

install_perf_analyzer() {
  [[ -x "$PY" ]] || die "no virtual environment at $VENV (run scripts/setup.sh first)"
  install_libb64
  local tmp libdir
  tmp="$(mktemp -d)"
  echo "perf_analyzer.sh: downloading $PA_WHEEL (manylinux1_x86_64) for its perf_analyzer binary" >&2
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
    --dest "$tmp" "$PA_WHEEL" >&2
  mkdir -p "$PA_DIR/bin"
  "$PY" - "$tmp" "$PA_MEMBER" "$PA_DIR/perf_analyzer" <<'EOF'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("tritonclient-*.whl"))
target = pathlib.Path(sys.argv[3])
target.write_bytes(zipfile.ZipFile(wheel).read(sys.argv[2]))
target.chmod(0o755)
EOF
  libdir="$(cudart_dir)"
  cat > "$PA_DIR/bin/perf_analyzer" <<EOF
#!/usr/bin/env bash
# Written by scripts/perf_analyzer.sh: perf_analyzer from $PA_WHEEL with libcudart.so.12 from the venv.
export LD_LIBRARY_PATH="$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$PA_DIR/perf_analyzer" "\$@"
EOF
  chmod +x "$PA_DIR/bin/perf_analyzer"
  rm -rf "$tmp"
  echo "perf_analyzer.sh: installed $PA_DIR/bin/perf_analyzer" >&2
}

if command -v perf_analyzer >/dev/null 2>&1; then
  PA="$(command -v perf_analyzer)"
else
  PA="$PA_DIR/bin/perf_analyzer"
  if [[ ! -x "$PA" ]] || ! "$PA" --version >/dev/null 2>&1; then
    install_perf_analyzer
  fi
  "$PA" --version >/dev/null 2>&1 || die "$PA does not run: $("$PA" --version 2>&1 | tail -1)"
fi

if [[ "$INSTALL_ONLY" == 1 ]]; then
  echo "$PA"
  exit 0
fi

[[ -f "$INPUT_DATA" ]] || die "input data not found: $INPUT_DATA (generate with: $PY perf/make_inputs.py)"
if [[ -z "$OUT" ]]; then
  OUT="$ROOT/benchmarks/results/perf_analyzer_${MODEL}_$(basename "${INPUT_DATA%.json}").csv"
fi
mkdir -p "$(dirname "$OUT")"

cmd=("$PA" -m "$MODEL" -i grpc --streaming -u "$URL" --input-data "$INPUT_DATA"
     --concurrency-range "$CONCURRENCY" --measurement-interval "$INTERVAL_MS" -f "$OUT" ${EXTRA[@]+"${EXTRA[@]}"})
echo "perf_analyzer.sh: ${cmd[*]}" >&2
"${cmd[@]}"
echo "perf_analyzer.sh: wrote $OUT" >&2
