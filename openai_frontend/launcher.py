"""Run the frontend as a subprocess (``python -m openai_frontend``) on a free port and wait until it answers.
Used by the tests and benchmarks; settings go in as MINICPMV_FRONTEND_* variables."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class FrontendProcess:
    """One ``python -m openai_frontend`` process; settings as MINICPMV_FRONTEND_* variables."""

    def __init__(self, grpc_url: str, http_url: str, **settings):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MINICPMV_FRONTEND_HOST": "127.0.0.1", "MINICPMV_FRONTEND_PORT": str(self.port),
                    "MINICPMV_FRONTEND_TRITON_GRPC_URL": grpc_url, "MINICPMV_FRONTEND_TRITON_HTTP_URL": http_url,
                    "MINICPMV_FRONTEND_LOG_LEVEL": "warning"}  # fmt: skip
        self.env.update({f"MINICPMV_FRONTEND_{k.upper()}": str(v) for k, v in settings.items()})
        self.process: subprocess.Popen | None = None

    def preexec(self):
        """What the child runs before ``exec`` (subprocess.Popen's ``preexec_fn``): nothing here. The tests' subclass
        has the frontend die with the test run."""
        return None

    def start(self, ready: bool = False, timeout: float = 30.0) -> FrontendProcess:
        """Start; wait for /health (or /health/ready with ``ready``). Raises RuntimeError / TimeoutError."""
        self.log = tempfile.NamedTemporaryFile("w+", prefix="openai-frontend-", suffix=".log", delete=False)
        self.process = subprocess.Popen([sys.executable, "-m", "openai_frontend"], env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT, preexec_fn=self.preexec())  # fmt: skip
        path = "/health/ready" if ready else "/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the frontend exited: {Path(self.log.name).read_text()[-2000:]}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(self.base_url + path, timeout=2) as response:
                    if response.status == 200:
                        return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the frontend did not answer {path} within {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> FrontendProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
