"""The launcher against a real tritonserver (from the nvidia-pytriton wheel here) and a trivial echo model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient

from minicpmv_triton.launcher import (
    TritonServer,
    TritonStartupError,
    find_tritonserver,
    free_port,
)
from tests.child_processes import dies_with_us

pytestmark = pytest.mark.slow

ECHO_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

ECHO_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Returns INPUT0 unchanged as OUTPUT0."""

    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)]))
        return responses
'''


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting for a reaper do not count)."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except ProcessLookupError:
            continue
    return False


def write_echo_model(repository: Path, name: str) -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(ECHO_CONFIG)
    (repository / name / "1" / "model.py").write_text(ECHO_MODEL)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    write_echo_model(repo, "echo")
    write_echo_model(repo, "echo_unloaded")
    return repo


@pytest.fixture(scope="module")
def echo_server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    log_path = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonServer(repository, models=["echo"], exit_timeout=10, address="127.0.0.1", log_path=log_path,
                      die_with_parent=True) as server:
        server.wait_ready(timeout=60)
        yield server


def test_find_tritonserver_assembles_python_backend() -> None:
    install = find_tritonserver()
    assert install.executable.is_file()
    if install.backend_directory is not None:  # the wheel, not the NGC container
        python_backend = install.backend_directory / "python"
        for name in ("libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"):
            assert (python_backend / name).exists(), name
        assert install.env["PATH"].split(":")[0].endswith("bin")
        assert "nvidia_pytriton.libs" in install.env["LD_LIBRARY_PATH"]
        assert find_tritonserver().backend_directory == install.backend_directory  # idempotent


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_http_infer_echoes(echo_server: TritonServer) -> None:
    data = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    client = httpclient.InferenceServerClient(echo_server.http_url)
    try:
        tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        result = client.infer("echo", [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    finally:
        # An open keep-alive connection makes the server wait its whole exit timeout on shutdown.
        client.close()


def test_explicit_model_control_loads_only_named_models(echo_server: TritonServer) -> None:
    client = httpclient.InferenceServerClient(echo_server.http_url)
    try:
        assert client.is_model_ready("echo")
        assert not client.is_model_ready("echo_unloaded")
        states = {entry["name"]: entry.get("state") for entry in client.get_model_repository_index()}
        assert states == {"echo": "READY", "echo_unloaded": None}
    finally:
        client.close()


def test_metrics_port_serves(echo_server: TritonServer) -> None:
    with urllib.request.urlopen(echo_server.metrics_url, timeout=5) as response:
        assert b"nv_inference_request_success" in response.read()


def test_stop_ends_the_server_gracefully(repository: Path, tmp_path: Path) -> None:
    server = TritonServer(
        repository, models=["echo"], exit_timeout=10, address="127.0.0.1", log_path=tmp_path / "server.log",
        die_with_parent=True,
    )
    server.start()
    server.wait_ready(timeout=60)
    code = server.stop(timeout=15)  # past 15 s it would SIGKILL: the status would be -9, not 0
    assert code == 0
    deadline = time.monotonic() + 10  # nothing of its process group is left (backend stubs included)
    while group_alive(server.process.pid):
        assert time.monotonic() < deadline, "processes of the server's group outlived stop()"
        time.sleep(0.05)
    assert server.returncode == 0
    assert "successfully unloaded 'echo'" in server.log_tail()
    assert server.stop() == 0  # idempotent


def test_missing_model_raises_with_log_tail(repository: Path, tmp_path: Path) -> None:
    server = TritonServer(
        repository, models=["no_such_model"], exit_timeout=5, address="127.0.0.1", log_path=tmp_path / "server.log",
        die_with_parent=True,
    )
    try:
        server.start()
        with pytest.raises(TritonStartupError) as excinfo:
            server.wait_ready(timeout=30)
    finally:
        server.stop(timeout=10)
    message = str(excinfo.value)
    assert "last log lines" in message
    assert "no_such_model" in message


def test_launch_script_serves_all_models_and_stops_on_sigint(repository: Path, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "launch_triton.py"
    ports = [str(free_port()) for _ in range(3)]
    stdout = tmp_path / "stdout.txt"
    with open(stdout, "wb") as out, open(tmp_path / "stderr.txt", "wb") as err:
        process = subprocess.Popen(
            [sys.executable, str(script), "--model-repository", str(repository), "--address", "127.0.0.1",
             "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
             "--ready-timeout", "60", "--exit-timeout", "10", "--quiet", "--device", "cpu"],
            stdout=out, stderr=err, preexec_fn=dies_with_us(signal.SIGTERM),  # SIGTERM: it stops its server
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "models" not in stdout.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "models  echo, echo_unloaded (device cpu)" in stdout.read_text(), (tmp_path / "stderr.txt").read_text()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:  # SIGTERM lets the launcher stop its server (a SIGKILL would orphan it)
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
