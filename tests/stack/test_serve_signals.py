"""``serve.sh --demo`` leaves nothing behind however it ends: killed with SIGKILL (its watchdog stops the servers),
SIGINT when a script started it in the background (where bash starts it with SIGINT ignored), SIGTERM while the
models are still loading. The checks poll until every process serve.sh had started is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.child_processes import dies_with_us, dying_with_parent
from tests.unit.test_serve_script import ports

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "serve.sh"
GONE_WITHIN_S = 60  # serve.sh promises 30 s; the rest is slack for a loaded machine


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-checkpoints")  # written by the first start, reused by the others


class Serve:
    """One ``serve.sh --demo --model int4`` on free ports; ``pid`` is serve.sh's own."""

    def __init__(self, tmp: Path, demo_dir: Path, background: bool):
        self.args = [*ports(), "--host", "127.0.0.1"]
        self.base = f"http://127.0.0.1:{self.args[1]}"
        self.log = tmp / "serve.log"
        env = {**os.environ, "MINICPMV_SKIP_SETUP": "1", "MINICPMV_VENV": sys.prefix, "OMP_NUM_THREADS": "2",
               "MINICPMV_DEMO_DIR": str(demo_dir), "MINICPMV_SERVE_LOG_DIR": str(tmp / "logs")}  # fmt: skip
        command = [str(SCRIPT), "--demo", "--model", "int4", *self.args]
        # Everything dies with the test run, even if pytest is killed (tests/child_processes.py): serve.sh, killed,
        # takes its servers along (its watchdog).
        if background:  # as a script does it: `serve.sh &` in a non-interactive shell (SIGINT ignored in it)
            script = '"$@" >"$LOG" 2>&1 & echo $!; wait $!'  # $! is serve.sh's pid: the shim execs it
            self.outer = subprocess.Popen(["bash", "-c", script, "bash", *dying_with_parent(command)],
                                          env={**env, "LOG": str(self.log)}, stdout=subprocess.PIPE, text=True,
                                          start_new_session=True, preexec_fn=dies_with_us())  # fmt: skip
            self.pid = int(self.outer.stdout.readline())
        else:
            with open(self.log, "w") as log:
                self.outer = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True, preexec_fn=dies_with_us())  # fmt: skip
            self.pid = self.outer.pid
        self.seen: list[psutil.Process] = []

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def processes(self) -> list[psutil.Process]:
        """serve.sh's descendants now (also remembered for the cleanup)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            found = psutil.Process(self.pid).children(recursive=True)
            self.seen += [p for p in found if p not in self.seen]
            return found
        return []

    def wait_for(self, condition, what: str, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.outer.poll() is None, f"serve.sh exited before {what}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"not {what} in {timeout} s:\n{self.tail()}"
            time.sleep(0.5)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def cleanup(self) -> None:
        """Whatever a failed test left running."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        for process in running(self.seen):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.outer.wait(timeout=10)


@pytest.fixture
def start(tmp_path, demo_dir):
    started: list[Serve] = []

    def make(background: bool = False) -> Serve:
        serve = Serve(tmp_path, demo_dir, background)
        started.append(serve)
        return serve

    yield make
    for serve in started:
        serve.cleanup()


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def named(processes: list[psutil.Process], name: str) -> list[psutil.Process]:
    """The executable ``name`` (tritonserver), or a Python running the module ``name`` (openai_frontend)."""
    found = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.name() == name or name in p.cmdline():
                found.append(p)
    return found


def assert_all_gone(processes: list[psutil.Process], serve: Serve) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    while left := running(processes):
        assert time.monotonic() < deadline, f"left running: {[(p.pid, p.name()) for p in left]}\n{serve.tail()}"
        time.sleep(0.2)


def test_sigkill_of_serve_sh_leaves_no_process_behind(start):
    serve = start()
    serve.wait_for(serve.ready, "ready")
    processes = serve.processes()
    assert named(processes, "tritonserver") and named(processes, "openai_frontend"), processes
    os.kill(serve.pid, signal.SIGKILL)
    assert serve.outer.wait(timeout=10) == -signal.SIGKILL
    assert_all_gone(processes, serve)


def test_sigint_stops_a_serve_sh_started_in_the_background_by_a_script(start):
    serve = start(background=True)
    serve.wait_for(serve.ready, "ready")
    processes = serve.processes()
    assert named(processes, "tritonserver") and named(processes, "openai_frontend"), processes
    os.kill(serve.pid, signal.SIGINT)  # serve.sh alone, not its group: as `kill -INT $pid` from the script
    assert_all_gone([psutil.Process(serve.pid), *processes], serve)
    assert serve.outer.wait(timeout=10) == 0  # the script's `wait` hands on serve.sh's exit status
    assert "interrupted: stopping the frontend and tritonserver" in serve.tail()


def test_sigterm_while_the_models_load_stops_everything(start):
    serve = start()
    serve.wait_for(lambda: named(serve.processes(), "tritonserver"), "loading")
    processes = serve.processes()
    os.kill(serve.pid, signal.SIGTERM)
    assert_all_gone(processes, serve)
    assert serve.outer.wait(timeout=10) == 0
    assert "terminated: stopping the frontend and tritonserver" in serve.tail()
