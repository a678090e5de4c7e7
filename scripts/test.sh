#!/usr/bin/env bash
# Set up everything on a fresh machine (venv, packages) and run the whole test suite.
# Usage: ./scripts/test.sh [pytest arguments...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,3p' "$0"; exit 0
fi
"$ROOT/scripts/setup.sh" --dev >/dev/null
PY="$ROOT/.venv/bin/python"
cd "$ROOT"
"$PY" -m ruff check minicpmv minicpmv_triton openai_frontend docqa_eval scripts benchmarks examples tests
# pytest through run_tests.py: the last line is the run's wall time and the peak memory of pytest and every process it
# started; a whole-suite run whose peak passes MINICPMV_TEST_MAX_RSS_GB (default 8) fails.
exec "$PY" scripts/run_tests.py "$@"
