"""The parts of benchmarks/soak.py that deal with processes: the demo stack it starts (with a tritonserver it can
kill and start again), the resident memory of process trees, Triton's metrics."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(pid: int | None) -> int | None:
    """Resident bytes of ``pid`` and all its descendants (None when it is gone)."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def listening_pid(url: str) -> int | None:
    port = int(re.search(r":(\d+)", url.split("//", 1)[-1]).group(1))
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def scrape(metrics_url: str | None) -> dict[str, float]:
    """Triton's pending requests and the engines' waiting / running requests, summed over models."""
    names = ("nv_inference_pending_request_count", "minicpmv_waiting_requests", "minicpmv_running_sequences")
    found = dict.fromkeys(names, 0.0)
    if not metrics_url:
        return {}
    body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for line in body.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in found:
            found[name] += float(line.rsplit(" ", 1)[1])
    return found


class LocalStack:
    """The demo stack as serve.sh --demo runs it, with a tritonserver that can be killed and started again."""

    def __init__(self, models: list[str], workdir: Path):
        from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint

        self.env = {"MINICPMV_DTYPE": "float32", "OMP_NUM_THREADS": str(os.cpu_count() or 2)}
        for model in models:
            path = write_tiny_checkpoint(workdir / model, seed=0, int4=model.endswith("int4"))
            self.env[f"MINICPMV_CHECKPOINT_{model.upper()}"] = str(path)
        self.models, self.workdir, self.generation = models, workdir, 0
        self.triton = self._triton()
        from openai_frontend.launcher import FrontendProcess

        try:
            self.frontend = FrontendProcess(self.triton.grpc_url, self.triton.http_url).start(ready=True, timeout=120)
        except BaseException:
            self.triton.stop()
            raise

    def _triton(self, ports: dict | None = None):
        from minicpmv_triton.launcher import TritonServer

        self.generation += 1
        triton = TritonServer(ROOT / "model_repository", models=self.models, extra_env=self.env, exit_timeout=10,
                              extra_args=["--model-config-name=cpu"], address="127.0.0.1",
                              log_path=self.workdir / f"tritonserver-{self.generation}.log",
                              **(ports or {}))  # fmt: skip
        triton.start()
        triton.wait_ready(timeout=600)
        return triton

    def kill_and_restart_triton(self) -> None:
        old = self.triton
        os.killpg(old.process.pid, signal.SIGKILL)
        old.stop(timeout=10)
        ports = {"http_port": old.http_port, "grpc_port": old.grpc_port, "metrics_port": old.metrics_port}
        self.triton = self._triton(ports)

    def stop(self) -> None:
        self.frontend.stop()
        self.triton.stop()


def frontend_ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url + "/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
