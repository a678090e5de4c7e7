"""scripts/serve.sh up to the point where it would start servers: options, checkpoint checks, no Hub access.

The script runs with MINICPMV_SKIP_SETUP=1 on the interpreter running the tests, the Hub endpoint is a closed
loopback port and the ports are free ones, so nothing here installs, downloads or collides with a running
server. (The whole stack with --demo is tested end to end with the frontend's tests.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from minicpmv_triton.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "serve.sh"
CLOSED_ENDPOINT = "http://127.0.0.1:9"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def ports() -> list[str]:
    chosen: set[int] = set()
    while len(chosen) < 4:
        chosen.add(free_port())
    port, http, grpc, metrics = (str(p) for p in chosen)
    return ["--port", port, "--triton-http-port", http, "--triton-grpc-port", grpc, "--triton-metrics-port", metrics]


def run_serve(*args: str, tmp_path: Path, timeout: float = 90, **extra_env: str) -> subprocess.CompletedProcess[str]:
    if not (Path(sys.prefix) / "bin" / "python").exists():
        pytest.skip("the tests' interpreter is not in a virtual environment serve.sh could use")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in PROXY_VARIABLES and not k.startswith(("HF_", "MINICPMV_CHECKPOINT"))
    }
    env.update(
        MINICPMV_SKIP_SETUP="1",
        MINICPMV_VENV=sys.prefix,
        MINICPMV_SERVE_LOG_DIR=str(tmp_path / "logs"),
        MINICPMV_DEMO_DIR=str(tmp_path / "demo"),
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=CLOSED_ENDPOINT,
        **extra_env,
    )
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_help(tmp_path):
    result = run_serve("--help", tmp_path=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: ./scripts/serve.sh")
    for option in ("--model", "--demo", "--checkpoint-int4", "--device", "--triton-grpc-port", "MINICPMV_SKIP_SETUP"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown argument: --bogus"),
        (["--model", "big"], "--model must be full, int4 or both"),
        (["--model"], "--model needs a value"),
        (["--device=tpu"], "--device must be auto, cpu or gpu"),
        (["--port", "http"], "not a port number"),
        (["--port", "8000"], "the four ports must differ"),
        (["--demo", "--checkpoint-int4", "/tmp"], "--demo makes its own checkpoints"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, message):
    result = run_serve(*args, tmp_path=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "--help" in result.stderr


def test_without_hub_access_fails_fast_and_suggests_the_demo(tmp_path):
    result = run_serve(*ports(), tmp_path=tmp_path, timeout=60)  # "fast": a hang or endless retries time out
    assert result.returncode == 1
    assert "openbmb/MiniCPM-V-2_6-int4" in result.stderr and "could not be reached" in result.stderr
    assert "./scripts/serve.sh --demo" in result.stderr
    assert "starting tritonserver" not in result.stderr


def test_a_local_checkpoint_of_the_wrong_kind_is_refused(tiny_full, tmp_path):
    result = run_serve("--model", "int4", "--checkpoint-int4", str(tiny_full), *ports(), tmp_path=tmp_path)
    assert result.returncode == 1
    assert "is a full checkpoint" in result.stderr and "no usable int4 checkpoint" in result.stderr
    assert "starting tritonserver" not in result.stderr


def test_the_checkpoint_variable_is_the_default_for_the_flag(tiny_full, tmp_path):
    result = run_serve(*ports(), tmp_path=tmp_path, MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4=str(tiny_full))
    assert result.returncode == 1
    assert f"checking the int4 checkpoint {tiny_full}" in result.stderr and "is a full checkpoint" in result.stderr


def test_a_missing_local_checkpoint_is_refused(tmp_path):
    result = run_serve("--checkpoint-full", str(tmp_path / "nope"), "--model", "full", *ports(), tmp_path=tmp_path)
    assert result.returncode == 1
    assert "is not a directory" in result.stderr


def test_a_port_in_use_is_reported_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        args = ports()
        args[1] = port
        result = run_serve("--host", "127.0.0.1", *args, tmp_path=tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1: port {port} (Address already in use)" in result.stderr


def test_setup_script_modes():
    setup = ROOT / "scripts" / "setup.sh"
    usage = subprocess.run(["bash", str(setup), "--help"], capture_output=True, text=True, check=False)
    assert usage.returncode == 0 and "--serve" in usage.stdout and "--dev" in usage.stdout
    wrong = subprocess.run(["bash", str(setup), "--prod"], capture_output=True, text=True, check=False)
    assert wrong.returncode == 2 and "unknown option --prod" in wrong.stderr


# --- the watchdog (scripts/serve_watchdog.py), with sleep processes standing in for the servers -------------


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_watchdog_stops_what_its_parent_started_once_the_parent_is_killed(tmp_path):
    """As serve.sh uses it: a parent starts the watchdog and two children in process groups of their own (one of
    them ignores SIGTERM, so only the SIGKILL stops it) and is then killed with SIGKILL. The watchdog stops both
    children and leaves alone the process in the parent's own group (a caller's group must never be hit)."""
    watchdog = ROOT / "scripts" / "serve_watchdog.py"
    script = f"""
set -m
"{sys.executable}" "{watchdog}" $$ --second-term 1 --kill 2 --verbose 2>"{tmp_path}/watchdog.log" &
sleep 1000 & echo $!
(trap '' TERM; exec sleep 1000) & echo $!
set +m
exec 1>&-
sleep 1000; true  # (not the last command: bash would exec it in its place)
"""
    (tmp_path / "watchdog.log").touch()
    parent = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    children = [int(parent.stdout.readline()), int(parent.stdout.readline())]
    bystander: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 30
        while str(sorted(children)) not in (tmp_path / "watchdog.log").read_text():  # it knows both groups
            assert time.monotonic() < deadline, (tmp_path / "watchdog.log").read_text()
            time.sleep(0.05)
        bystander = [p for p in psutil.Process(parent.pid).children() if p.pid not in children and p.name() == "sleep"]
        assert len(bystander) == 1
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in children):
            assert time.monotonic() < deadline, "the watchdog left the children running"
            time.sleep(0.05)
        assert _running(bystander[0].pid)  # the parent's own group: not the watchdog's
    finally:
        parent.kill()
        parent.wait()
        for pid in [*children, *(p.pid for p in bystander)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
