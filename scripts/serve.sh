#!/usr/bin/env bash
# Serve MiniCPM-V 2.6 behind an OpenAI-compatible API (tritonserver + the frontend) in one command.
# Usage: ./scripts/serve.sh [--model full|int4|both] [--demo] [--port 9000] ...   (--help for all options)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# A script that starts serve.sh in the background (`serve.sh &`) starts it with SIGINT ignored, and bash cannot
# trap a signal that was ignored on entry: in that case start again with SIGINT at its default, so that Ctrl-C
# (or `kill -INT`) stops everything as the trap below says.
if [[ -z "${MINICPMV_SERVE_SIGINT_RESET:-}" && -r "/proc/$$/status" ]]; then
  ignored="$(awk '/^SigIgn:/ {print $2}' "/proc/$$/status")"
  if (( (16#${ignored:-0} >> 1) & 1 )); then  # bit 1 is SIGINT (2)
    export MINICPMV_SERVE_SIGINT_RESET=1
    if env --default-signal=INT true 2>/dev/null; then
      exec env --default-signal=INT "$BASH" "${BASH_SOURCE[0]}" "$@"
    fi
    exec python3 -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])' \
      "$BASH" "${BASH_SOURCE[0]}" "$@"
  fi
fi
unset MINICPMV_SERVE_SIGINT_RESET

usage() {
  cat <<'EOF'
Usage: ./scripts/serve.sh [options]

Serves MiniCPM-V 2.6 behind an OpenAI-compatible API, in one command: sets up .venv (scripts/setup.sh
--serve), fetches the weights from the Hugging Face Hub unless they are given or cached
(scripts/download_weights.py), starts tritonserver (scripts/launch_triton.py) and the OpenAI frontend
(python -m openai_frontend), waits until both are ready, prints where they listen and runs until Ctrl-C,
which stops everything it started.

Options:
  --model full|int4|both        which model(s) to serve (default: int4; with --demo: both)
                                  int4: openbmb/MiniCPM-V-2_6-int4, bitsandbytes nf4, about 6 GB
                                  full: openbmb/MiniCPM-V-2_6, bf16, about 16 GB
                                  both: on one GPU each takes 0.45 of its memory (about 40 GB needed)
  --demo                        tiny random-weight checkpoints made locally, on the CPU: nothing to
                                download, no GPU needed; it tries the whole stack (the answers are noise)
  --checkpoint-full PATH_OR_REPO  a local checkpoint directory (used as it is) or a Hub repository id
  --checkpoint-int4 PATH_OR_REPO  the same for the int4 model
  --device auto|cpu|gpu         where the models run (default: auto, gpu when nvidia-smi is found;
                                with --demo: cpu)
  --host ADDR                   address the frontend and tritonserver listen on (default: 0.0.0.0)
  --port N                      the frontend's port (default: 9000)
  --triton-http-port N          tritonserver's HTTP port (default: 8000)
  --triton-grpc-port N          tritonserver's gRPC port (default: 8001)
  --triton-metrics-port N       tritonserver's metrics port (default: 8002)
  --lora-modules NAME=PATH[,NAME=PATH...]
                                LoRA adapters (PEFT directories, e.g. MiniCPM-V's finetune_lora.sh output) to
                                serve from start-up on every model; clients select one with "model": NAME
  --lora-dir DIR                adapters may be loaded at runtime from under DIR (the frontend's
                                /v1/load_lora_adapter, with MINICPMV_FRONTEND_ENABLE_LORA_RUNTIME_UPDATES=true)
  -h, --help                    this text

Environment:
  MINICPMV_CHECKPOINT_MINICPM_V_2_6, MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4
                                defaults for --checkpoint-full, --checkpoint-int4
  HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE
                                the Hugging Face cache, a mirror, a token, cache-only mode
  MINICPMV_ENGINES_PER_GPU      models sharing each GPU (default: the number served); each takes 0.90 / N
  MINICPMV_LORA_MODULES, MINICPMV_LORA_DIR
                                defaults for --lora-modules, --lora-dir
  MINICPMV_MAX_LORAS, MINICPMV_MAX_LORA_RANK, MINICPMV_LORA_TARGET_MODULES
                                adapters resident at once (4), their largest rank (64), the layers they may
                                target (attention, or all); each also per model, e.g. MINICPMV_MAX_LORAS_MINICPM_V_2_6
  MINICPMV_FRONTEND_*           further frontend settings, e.g. MINICPMV_FRONTEND_API_KEYS
                                (see openai_frontend/settings.py)
  MINICPMV_SKIP_SETUP=1         do not run scripts/setup.sh; use the virtual environment as it is
  MINICPMV_VENV                 the virtual environment (default: .venv)
  MINICPMV_DEMO_DIR             where --demo keeps its checkpoints (default: .cache/demo-checkpoints)
  MINICPMV_SERVE_LOG_DIR        where the tritonserver log goes (default: .cache/serve)
  MINICPMV_READY_TIMEOUT        seconds to wait for the models to load (default: 900)

Stopping: Ctrl-C, SIGINT or SIGTERM (also to a serve.sh started in the background) stops the frontend and
tritonserver within 30 s (tritonserver drains for up to 15 s). Even when serve.sh is killed outright
(SIGKILL), a watchdog (scripts/serve_watchdog.py) stops what it started within 30 s.

Exit status: 0 when Ctrl-C or SIGTERM stopped everything, 1 when something failed (also when tritonserver
or the frontend ended on its own), 2 for a usage error.
EOF
}

say() { echo "serve: $*" >&2; }
fail() { say "$*"; exit 1; }
usage_error() { say "$*"; echo "Try './scripts/serve.sh --help'." >&2; exit 2; }

# --- options ---------------------------------------------------------------------------------------------
MODEL="" DEVICE="" DEMO=0 HOST=0.0.0.0 PORT=9000 HTTP_PORT=8000 GRPC_PORT=8001 METRICS_PORT=8002
CKPT_FULL_FLAG="" CKPT_INT4_FLAG="" LORA_MODULES="${MINICPMV_LORA_MODULES:-}" LORA_DIR="${MINICPMV_LORA_DIR:-}"
while (($#)); do
  opt="$1" val="" inline=0
  if [[ "$opt" == --*=* ]]; then val="${opt#*=}" opt="${opt%%=*}" inline=1; fi
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --demo)
      ((inline == 0)) || usage_error "--demo takes no value"
      DEMO=1; shift; continue ;;
    --model|--device|--host|--port|--triton-http-port|--triton-grpc-port|--triton-metrics-port|\
    --checkpoint-full|--checkpoint-int4|--lora-modules|--lora-dir)
      if ((inline == 0)); then
        (($# >= 2)) || usage_error "$opt needs a value"
        val="$2"; shift
      fi
      shift ;;
    *) usage_error "unknown argument: $1" ;;
  esac
  case "$opt" in
    --model) MODEL="$val" ;;
    --device) DEVICE="$val" ;;
    --host) HOST="$val" ;;
    --port) PORT="$val" ;;
    --triton-http-port) HTTP_PORT="$val" ;;
    --triton-grpc-port) GRPC_PORT="$val" ;;
    --triton-metrics-port) METRICS_PORT="$val" ;;
    --checkpoint-full) CKPT_FULL_FLAG="$val" ;;
    --checkpoint-int4) CKPT_INT4_FLAG="$val" ;;
    --lora-modules) LORA_MODULES="$val" ;;
    --lora-dir) LORA_DIR="$val" ;;
  esac
done

case "$MODEL" in ""|full|int4|both) ;; *) usage_error "--model must be full, int4 or both (not '$MODEL')" ;; esac
case "$DEVICE" in ""|auto|cpu|gpu) ;; *) usage_error "--device must be auto, cpu or gpu (not '$DEVICE')" ;; esac
[[ -n "$HOST" ]] || usage_error "--host needs an address"
for port in "$PORT" "$HTTP_PORT" "$GRPC_PORT" "$METRICS_PORT"; do
  if [[ ! "$port" =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
    usage_error "not a port number: '$port'"
  fi
done
PORT=$((10#$PORT)) HTTP_PORT=$((10#$HTTP_PORT)) GRPC_PORT=$((10#$GRPC_PORT)) METRICS_PORT=$((10#$METRICS_PORT))
if [[ "$(printf '%s\n' "$PORT" "$HTTP_PORT" "$GRPC_PORT" "$METRICS_PORT" | sort -u | wc -l)" -ne 4 ]]; then
  usage_error "the four ports must differ ($PORT, $HTTP_PORT, $GRPC_PORT, $METRICS_PORT)"
fi
if ((DEMO)) && [[ -n "$CKPT_FULL_FLAG$CKPT_INT4_FLAG" ]]; then
  usage_error "--demo makes its own checkpoints; drop --checkpoint-full / --checkpoint-int4"
fi
# LoRA adapters: name=path items, each path a PEFT adapter directory, no name twice nor a model's name or alias
# (the frontend selects adapters and models by the same "model" field). scripts/launch_triton.py checks again.
check_lora_modules() {
  local item name path seen=" " any=0
  local -a items
  IFS=',' read -ra items <<< "$1"
  for item in "${items[@]}"; do
    item="$(echo "$item" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')"
    [[ -n "$item" ]] || continue
    name="$(echo "${item%%=*}" | sed 's/[[:space:]]*$//')" path="$(echo "${item#*=}" | sed 's/^[[:space:]]*//')"
    if [[ "$item" != *=* || -z "$name" || -z "$path" ]]; then usage_error "--lora-modules: '$item' is not name=path"; fi
    [[ "$name" =~ [[:space:]] ]] && usage_error "--lora-modules: the name '$name' has white space"
    [[ "$seen" == *" $name "* ]] && usage_error "--lora-modules: '$name' is given twice"
    case "$name" in
      minicpm_v_2_6|minicpm_v_2_6_int4|MiniCPM-V-2_6|MiniCPM-V-2_6-int4|openbmb/MiniCPM-V-2_6|openbmb/MiniCPM-V-2_6-int4)
        usage_error "--lora-modules: '$name' is the name of a model; give the adapter another" ;;
    esac
    [[ -d "$path" ]] || usage_error "--lora-modules: $name: $path is not a directory"
    [[ -f "$path/adapter_config.json" ]] || usage_error "--lora-modules: $name: $path has no adapter_config.json (not a PEFT adapter)"
    seen+="$name " any=1
  done
  ((any)) || usage_error "--lora-modules: no name=path given"
}
if [[ -n "$LORA_MODULES" ]]; then check_lora_modules "$LORA_MODULES"; fi
if [[ -n "$LORA_DIR" && ! -d "$LORA_DIR" ]]; then usage_error "--lora-dir: $LORA_DIR is not a directory"; fi
if ((DEMO)); then MODEL="${MODEL:-both}" DEVICE="${DEVICE:-cpu}"; else MODEL="${MODEL:-int4}" DEVICE="${DEVICE:-auto}"; fi
case "$MODEL" in both) KINDS=(full int4) ;; *) KINDS=("$MODEL") ;; esac
CKPT_FULL="${CKPT_FULL_FLAG:-${MINICPMV_CHECKPOINT_MINICPM_V_2_6:-}}"
CKPT_INT4="${CKPT_INT4_FLAG:-${MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4:-}}"
READY_TIMEOUT="${MINICPMV_READY_TIMEOUT:-900}"
[[ "$READY_TIMEOUT" =~ ^[0-9]+$ ]] || fail "MINICPMV_READY_TIMEOUT must be a number of seconds"
# Clients here reach the servers on the loopback address when they listen on all interfaces.
case "$HOST" in 0.0.0.0|::|"[::]") LOCAL_HOST=127.0.0.1 ;; *) LOCAL_HOST="$HOST" ;; esac

if ((!DEMO)) && { [[ "$DEVICE" == cpu ]] || { [[ "$DEVICE" == auto ]] && ! command -v nvidia-smi >/dev/null 2>&1; }; }; then
  say "warning: no GPU (nvidia-smi not found or --device cpu): the real model on the CPU is very slow and needs"
  say "         about 17 GB of memory (full, bf16) or 7 GB (int4); ./scripts/serve.sh --demo tries the stack with"
  say "         tiny weights"
fi

model_name() { if [[ "$1" == full ]]; then echo minicpm_v_2_6; else echo minicpm_v_2_6_int4; fi; }

# --- Python environment ----------------------------------------------------------------------------------
VENV="${MINICPMV_VENV:-$ROOT/.venv}"
if [[ "${MINICPMV_SKIP_SETUP:-0}" == 1 ]]; then
  PY="$VENV/bin/python"
  [[ -x "$PY" ]] || fail "MINICPMV_SKIP_SETUP=1 but $PY does not exist: run ./scripts/setup.sh --serve first"
else
  say "checking the Python environment (scripts/setup.sh --serve; the first run installs packages)"
  PY="$("$ROOT/scripts/setup.sh" --serve)" || fail "scripts/setup.sh --serve failed (see above)"
fi

busy="$("$PY" - "$HOST" "$PORT" "$HTTP_PORT" "$GRPC_PORT" "$METRICS_PORT" <<'EOF'
import socket, sys
host = sys.argv[1].strip("[]")
for port in sys.argv[2:]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            sock.bind((host, int(port)))
        except OSError as e:
            print(f"{port} ({e.strerror or e})", end="; ")
EOF
)"
busy="${busy%; }"
[[ -z "$busy" ]] || fail "cannot listen on $HOST: port $busy. Another server running? Choose other ports with --port / --triton-*-port"

# --- checkpoints -----------------------------------------------------------------------------------------
declare -A CKPT_PATH=()

demo_checkpoint() {  # kind -> prints the directory of a tiny checkpoint, made once and kept
  local kind="$1" dir key tmp
  dir="${MINICPMV_DEMO_DIR:-$ROOT/.cache/demo-checkpoints}/$kind"
  # Made again when the code that writes them changes.
  key="$(cat "$ROOT"/minicpmv/devtools/*.py | sha256sum | cut -c1-16)"
  if [[ -f "$dir/.demo-key" && "$(cat "$dir/.demo-key")" == "$key" ]]; then echo "$dir"; return 0; fi
  say "writing the tiny $kind demo checkpoint into $dir"
  mkdir -p "$(dirname "$dir")"
  tmp="$(mktemp -d "$dir.XXXXXX")"
  local int4=()
  [[ "$kind" == int4 ]] && int4=(--int4)
  if ! "$PY" "$ROOT/scripts/make_tiny_checkpoint.py" --out "$tmp" "${int4[@]}" >&2; then
    rm -rf "$tmp"; return 1
  fi
  echo "$key" > "$tmp/.demo-key"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  echo "$dir"
}

real_checkpoint() {  # kind, path-or-repo (may be empty) -> prints the checked checkpoint directory
  local kind="$1" given="$2"
  if [[ -n "$given" && -d "$given" ]]; then
    say "checking the $kind checkpoint $given"
    "$PY" "$ROOT/scripts/download_weights.py" --quiet --check-only "$given" --model "$kind"
  elif [[ -z "$given" ]]; then
    "$PY" "$ROOT/scripts/download_weights.py" --model "$kind"
  elif [[ "$given" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ && ! -e "$given" ]]; then
    "$PY" "$ROOT/scripts/download_weights.py" --model "$kind" --repo-id "$given"
  else
    say "the $kind checkpoint '$given' is not a directory (nor a Hub id of the form owner/name)"
    return 1
  fi
}

for kind in "${KINDS[@]}"; do
  if ((DEMO)); then
    CKPT_PATH[$kind]="$(demo_checkpoint "$kind")" || fail "could not write the tiny $kind checkpoint"
  else
    given="$CKPT_INT4"
    [[ "$kind" == full ]] && given="$CKPT_FULL"
    CKPT_PATH[$kind]="$(real_checkpoint "$kind" "$given")" || fail "no usable $kind checkpoint (see above)"
  fi
done

# --- processes -------------------------------------------------------------------------------------------
TRITON_PID="" FRONTEND_PID="" STOPPING=0
EXIT_TIMEOUT=15  # tritonserver's drain on a stop; the whole stop takes at most 30 s (stop_all below)

alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

signal_children() {
  local pid
  for pid in "$FRONTEND_PID" "$TRITON_PID"; do
    if alive "$pid"; then kill "-$1" -- "-$pid" 2>/dev/null || true; fi
  done
}

wait_children() {  # tenths of a second at most
  local waited=0
  while { alive "$FRONTEND_PID" || alive "$TRITON_PID"; } && ((waited < $1)); do
    sleep 0.1; waited=$((waited + 1))
  done
}

stop_all() {
  # Each child leads its own process group (started under `set -m`): the group gets the signal. SIGTERM lets
  # tritonserver drain (EXIT_TIMEOUT); a second SIGTERM makes launch_triton.py kill it and uvicorn stop waiting
  # for open connections; SIGKILL at 27 s. tritonserver runs in a session of its own (launch_triton.py): were its
  # launcher killed first, the watchdog stops it once this script has exited.
  signal_children TERM
  wait_children 200
  signal_children TERM
  wait_children 70
  if alive "$FRONTEND_PID" || alive "$TRITON_PID"; then say "not stopped in time: killing"; signal_children KILL; fi
  local pid
  for pid in "$FRONTEND_PID" "$TRITON_PID"; do
    if [[ -n "$pid" ]]; then wait "$pid" 2>/dev/null || true; fi
  done
}

# shellcheck disable=SC2329  # called by the traps below
on_signal() {
  ((STOPPING)) && return 0
  STOPPING=1
  trap '' INT TERM
  say "$1: stopping the frontend and tritonserver"
  stop_all
  say "stopped"
  exit 0
}
trap 'on_signal interrupted' INT
trap 'on_signal terminated' TERM
trap '((STOPPING)) || { STOPPING=1; stop_all; }' EXIT

if command -v curl >/dev/null 2>&1; then
  http_ok() { curl --noproxy '*' -fs -o /dev/null --max-time 2 "$1" 2>/dev/null; }
else
  http_ok() {
    "$PY" -c 'import sys, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=2)' \
      "$1" >/dev/null 2>&1
  }
fi

wait_until_ready() {  # name, pid, timeout seconds, url... : 0 when all URLs answer 2xx, 1 when pid died or timeout
  local name="$1" pid="$2" timeout="$3" start="$SECONDS" url
  shift 3
  for url in "$@"; do
    until http_ok "$url"; do
      alive "$pid" || return 1
      if ((SECONDS - start > timeout)); then say "$name not ready after ${timeout} s ($url)"; return 1; fi
      sleep 1
    done
  done
}

# The watchdog (its own process group, so that Ctrl-C in a terminal reaches only this script and the servers):
# once this script is gone, even by SIGKILL, it stops whatever the script started.
set -m
"$PY" "$ROOT/scripts/serve_watchdog.py" "$$" </dev/null >&2 &
set +m

LOG_DIR="${MINICPMV_SERVE_LOG_DIR:-$ROOT/.cache/serve}"
mkdir -p "$LOG_DIR"
TRITON_LOG="$LOG_DIR/tritonserver-$HTTP_PORT.log"
MODELS=()
for kind in "${KINDS[@]}"; do MODELS+=("$(model_name "$kind")"); done
MODELS_CSV="$(IFS=,; echo "${MODELS[*]}")"
triton_args=(
  --models "$MODELS_CSV" --device "$DEVICE" --address "$HOST"
  --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT"
  --ready-timeout "$READY_TIMEOUT" --exit-timeout "$EXIT_TIMEOUT" --log-file "$TRITON_LOG" --quiet
)
[[ -n "${CKPT_PATH[full]:-}" ]] && triton_args+=(--checkpoint-full "${CKPT_PATH[full]}")
[[ -n "${CKPT_PATH[int4]:-}" ]] && triton_args+=(--checkpoint-int4 "${CKPT_PATH[int4]}")
[[ -n "$LORA_MODULES" ]] && triton_args+=(--lora-modules "$LORA_MODULES")
[[ -n "$LORA_DIR" ]] && triton_args+=(--lora-dir "$LORA_DIR")
# The tiny checkpoints are float32 models on the CPU.
((DEMO)) && export MINICPMV_DTYPE=float32

say "starting tritonserver with ${MODELS_CSV} (device ${DEVICE}; log ${TRITON_LOG})"
set -m  # job control: each background child gets its own process group, which Ctrl-C does not reach
"$PY" "$ROOT/scripts/launch_triton.py" "${triton_args[@]}" </dev/null >&2 &
TRITON_PID=$!
set +m
say "waiting for the models to load (up to ${READY_TIMEOUT} s)"
triton_urls=("http://$LOCAL_HOST:$HTTP_PORT/v2/health/ready")
for name in "${MODELS[@]}"; do triton_urls+=("http://$LOCAL_HOST:$HTTP_PORT/v2/models/$name/ready"); done
if ! wait_until_ready tritonserver "$TRITON_PID" "$((READY_TIMEOUT + 30))" "${triton_urls[@]}"; then
  fail "tritonserver did not start (messages above; full log: $TRITON_LOG)"
fi

say "starting the OpenAI frontend on $HOST:$PORT"
set -m
(cd "$ROOT" && exec "$PY" -m openai_frontend --host "$HOST" --port "$PORT" \
  --triton-grpc-url "$LOCAL_HOST:$GRPC_PORT" --triton-http-url "$LOCAL_HOST:$HTTP_PORT") </dev/null &
FRONTEND_PID=$!
set +m
if ! wait_until_ready "the frontend" "$FRONTEND_PID" 120 "http://$LOCAL_HOST:$PORT/health/ready"; then
  fail "the OpenAI frontend did not start (messages above)"
fi

first="${MODELS[0]}"
cat >&2 <<EOF

MiniCPM-V 2.6 is being served: ${MODELS_CSV} (device ${DEVICE}$( ((DEMO)) && echo ", tiny demo weights"))
  OpenAI API       http://$LOCAL_HOST:$PORT/v1        (listening on $HOST:$PORT)
  Triton HTTP      http://$LOCAL_HOST:$HTTP_PORT
  Triton gRPC      $LOCAL_HOST:$GRPC_PORT
  Triton metrics   http://$LOCAL_HOST:$METRICS_PORT/metrics
  tritonserver log $TRITON_LOG

Try:
  curl http://$LOCAL_HOST:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$first", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'

Press Ctrl-C to stop.
EOF

# Runs until a signal (the traps exit) or until one of the two ends on its own. (Not `wait -n`: it misses a
# child that ended before it was called.)
while alive "$TRITON_PID" && alive "$FRONTEND_PID"; do sleep 1; done
if alive "$TRITON_PID"; then who="the OpenAI frontend" pid="$FRONTEND_PID"; else who=tritonserver pid="$TRITON_PID"; fi
status=0
wait "$pid" 2>/dev/null || status=$?
STOPPING=1
trap '' INT TERM
say "$who exited (status $status); stopping the rest"
stop_all
say "stopped"
exit 1
