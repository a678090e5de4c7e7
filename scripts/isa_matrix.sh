#!/usr/bin/env bash
# Run test files under the x86 instruction sets torch's CPU kernels can be held to, one pytest per variant, and
# print which variant failed: a tolerance or an exact comparison that holds only on this machine's ISA shows up.
# Usage: ./scripts/isa_matrix.sh [--variants native,avx2,...] [pytest arguments...]   (default: the unit files
# with float tolerances or exact cross-path comparisons; variants: native avx2 avx512 mkl-compat avx2-mkl-compat,
# and sse as an extra: pre-AVX2 kernels, which also change torch.randn and so the tiny checkpoints' weights)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,6p' "$0"; exit 0
fi
variants="native,avx2,avx512,mkl-compat,avx2-mkl-compat"
if [[ "${1:-}" == "--variants" ]]; then
  variants="$2"; shift 2
fi
args=("$@")
if (( ${#args[@]} == 0 )); then
  args=(tests/unit/test_model_golden.py tests/unit/test_architecture.py tests/unit/test_attention.py
        tests/unit/test_cuda_graphs.py tests/unit/test_graph_check.py tests/unit/test_engine.py
        tests/unit/test_engine_core.py tests/unit/test_seeds.py tests/unit/test_sampler.py
        tests/unit/test_loading.py tests/unit/test_logprobs.py tests/unit/test_cuda_path.py)
fi

# What each knob changes (torch 2.13 CPU wheel, measured on an AMD EPYC): ATEN_CPU_CAPABILITY torch's own
# vectorized kernels (SDPA, softmax, norms, activations; "default" also changes torch.randn); ONEDNN_MAX_CPU_ISA
# oneDNN, which runs the bf16 matmuls (a large bf16 linear changed; the tiny models' did not);
# MKL_ENABLE_INSTRUCTIONS MKL's float32 sgemm on Intel CPUs (on AMD, MKL runs one code path whatever it says);
# MKL_CBWR=COMPATIBLE another sgemm summation order on any CPU, standing in for an Intel AVX512 sgemm. 1 or 2
# threads gave the same bits.
# bitsandbytes picks its 4-bit CPU kernel by CPUID (AVX512-BF16), which no variable here changes.
AVX2="ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
env_of() {
  case "$1" in
    native) echo "" ;;
    avx2) echo "$AVX2" ;;
    avx512) echo "ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE MKL_ENABLE_INSTRUCTIONS=AVX512" ;;
    mkl-compat) echo "MKL_CBWR=COMPATIBLE" ;;
    avx2-mkl-compat) echo "$AVX2 MKL_CBWR=COMPATIBLE" ;;
    sse) echo "ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE" ;;
    *) echo "unknown variant '$1' (native avx2 avx512 mkl-compat avx2-mkl-compat sse)" >&2; return 1 ;;
  esac
}

cd "$ROOT"
failed=()
IFS=',' read -r -a names <<< "$variants"
for name in "${names[@]}"; do
  settings="$(env_of "$name")" || exit 2
  # shellcheck disable=SC2086  # the settings are words on purpose
  capability="$(env $settings "$PY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')"
  echo "=== $name: ${settings:-no restriction} (ATen kernels: $capability)"
  # shellcheck disable=SC2086
  if env $settings "$PY" -m pytest -q -p no:cacheprovider "${args[@]}"; then
    echo "=== $name: passed"
  else
    echo "=== $name: FAILED"
    failed+=("$name")
  fi
done
if (( ${#failed[@]} )); then
  echo "failed under: ${failed[*]}"
  exit 1
fi
echo "passed under: ${names[*]}"
