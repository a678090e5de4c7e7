"""The frontend as users run it (``python -m openai_frontend``, a subprocess on a free port) in front of the
real tritonserver of tests/conftest.py, and the official ``openai`` client pointed at it."""

from __future__ import annotations

import contextlib
import select
import socket
import threading

import openai
import pytest

from minicpmv_triton.launcher import free_port
from openai_frontend.launcher import FrontendProcess
from tests.child_processes import dies_with_us
from tests.conftest import _release


class Frontend(FrontendProcess):
    def preexec(self):
        return dies_with_us()  # killed with the test run, even when pytest is killed with SIGKILL

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             timeout=kwargs.pop("timeout", 120.0), **kwargs)  # fmt: skip


class TCPProxy:
    """Forwards a local port to Triton; ``down()`` refuses and drops connections as a dead server would."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
                self._listener.close()
                self._listener = None
            for s in self._connections:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        sockets = [a, b]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 1.0)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            for s in sockets:
                with contextlib.suppress(OSError):
                    s.close()


@pytest.fixture(scope="session")
def frontend(server):
    fe = Frontend(server.grpc_url, server.http_url).start(ready=True, timeout=60)
    _release["frontend"] = fe.stop  # after the last test that uses it (tests/conftest.py)
    yield fe
    _release.pop("frontend", None)
    fe.stop()


@pytest.fixture(scope="session")
def client(frontend) -> openai.OpenAI:
    return frontend.client()


@pytest.fixture
def make_frontend(server):
    """Start extra frontends with other settings (stopped after the test)."""
    started: list[Frontend] = []

    def make(grpc_url: str | None = None, http_url: str | None = None, **settings) -> Frontend:
        fe = Frontend(grpc_url or server.grpc_url, http_url or server.http_url, **settings)
        started.append(fe)
        return fe.start()

    yield make
    for fe in started:
        fe.stop()
