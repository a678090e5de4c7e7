#!/usr/bin/env bash
# Container entry point: get the weights of each model in MINICPMV_MODELS (comma-separated Triton model names),
# then run tritonserver through scripts/launch_triton.py (as ./scripts/serve.sh does outside containers).
# Fetching first gives a clear error and keeps a long download out of the models' loading time.
set -euo pipefail
cd "${MINICPMV_HOME:-/opt/minicpmv}"  # where the Dockerfile puts scripts/ and model_repository/
checkpoint_args=()
IFS=, read -r -a models <<< "${MINICPMV_MODELS:?set MINICPMV_MODELS, e.g. minicpm_v_2_6_int4}"
for model in "${models[@]}"; do
  model="${model// /}"
  case "$model" in
    minicpm_v_2_6) kind=full given="${MINICPMV_CHECKPOINT_MINICPM_V_2_6:-}" ;;
    minicpm_v_2_6_int4) kind=int4 given="${MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4:-}" ;;
    *) echo "entrypoint: unknown model '$model' (minicpm_v_2_6, minicpm_v_2_6_int4)" >&2; exit 2 ;;
  esac
  if [[ -n "$given" && -d "$given" ]]; then
    path="$(python3 scripts/download_weights.py --quiet --check-only "$given" --model "$kind")"
  else
    path="$(python3 scripts/download_weights.py --model "$kind" ${given:+--repo-id "$given"})"
  fi
  checkpoint_args+=("--checkpoint-$kind" "$path")
done
exec python3 scripts/launch_triton.py --models "$MINICPMV_MODELS" --ready-timeout 1800 "${checkpoint_args[@]}" "$@"
