"""A test run killed with SIGKILL leaves no server behind: tritonserver, its Python-backend stubs and the frontend
die with it (PR_SET_PDEATHSIG, tests/child_processes.py).

A child Python stands in for pytest: it starts tritonserver (one tiny model) and a frontend the way the session
fixtures do (``TritonServer(..., die_with_parent=True)``, the frontend tests' ``Frontend``), says it is ready and
waits. The test SIGKILLs it and polls until nothing of that run is left. Everything the child starts carries a marker
(a temporary directory: in the environment of all of them, and in tritonserver's and the stubs' command lines, which
name the model repository inside it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
READY_WITHIN_S = 300
GONE_WITHIN_S = 30

CHILD = """
import sys, time
from pathlib import Path
from minicpmv_triton.launcher import TritonServer
from tests.conftest import serving_repository
from tests.frontend.conftest import Frontend

marker, checkpoint = Path(sys.argv[1]), sys.argv[2]
repository = serving_repository(marker / "model_repository", models=["minicpm_v_2_6"])
env = {"MINICPMV_CHECKPOINT_MINICPM_V_2_6": checkpoint, "MINICPMV_DTYPE": "float32", "OMP_NUM_THREADS": "1"}
triton = TritonServer(repository, models=["minicpm_v_2_6"], extra_env=env, extra_args=["--model-config-name=cpu"],
                      exit_timeout=5, address="127.0.0.1", log_path=marker / "tritonserver.log", die_with_parent=True)
triton.start()
triton.wait_ready(timeout=float(sys.argv[3]))
frontend = Frontend(triton.grpc_url, triton.http_url).start(ready=True, timeout=60)
print("ready", triton.process.pid, frontend.process.pid, flush=True)
time.sleep(3600)
"""


def marked(marker: str) -> dict[int, str]:
    """pid -> command line of the live (not zombie) processes whose environment or command line holds ``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except (OSError, IndexError):
            continue
        if state != b"Z" and (marker.encode() in cmdline or marker.encode() in environ):
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:300]
    return found


def test_a_killed_test_run_leaves_no_server_behind(tiny_full, tmp_path):
    marker = tmp_path / "orphan-check"
    marker.mkdir()
    env = {**os.environ, "MINICPMV_ORPHAN_CHECK": str(marker)}
    with open(marker / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), str(tiny_full), str(READY_WITHIN_S)],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    try:
        line = child.stdout.readline()  # the child's own wait_ready bounds this
        assert line.startswith("ready"), (marker / "child.log").read_text()[-3000:]
        triton_pid, frontend_pid = map(int, line.split()[1:])
        before = marked(str(marker))
        stubs = [pid for pid, cmd in before.items() if "triton_python_backend_stub" in cmd]
        assert {child.pid, triton_pid, frontend_pid} <= before.keys() and stubs, before

        child.kill()
        child.wait()
        deadline = time.monotonic() + GONE_WITHIN_S
        while left := marked(str(marker)):
            assert time.monotonic() < deadline, f"outlived the killed run by {GONE_WITHIN_S} s: {left}"
            time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
        for pid in marked(str(marker)):  # what a failure left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
