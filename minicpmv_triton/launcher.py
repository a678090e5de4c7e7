"""Find and run a real ``tritonserver``: from PATH (NGC container) or from the ``nvidia-pytriton`` wheel.

The wheel ships NVIDIA's server binary, the Python backend and one backend stub per Python version, but
not laid out as a usable backend directory. :func:`find_tritonserver` assembles that directory once (in a
cache next to the venv) and computes the environment the server and its Python-backend stubs need:
the interpreter's own ``libpython`` first on ``LD_LIBRARY_PATH`` (otherwise the stub picks the system one
and fails against the venv's stdlib) and the venv's ``bin/`` first on ``PATH`` (the stub finds its
site-packages through the ``python3`` on PATH).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

logger = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.2
_LOG_TAIL_LINES = 50
_PR_SET_PDEATHSIG = 1


class TritonNotFoundError(RuntimeError):
    """Neither a ``tritonserver`` on PATH nor the ``nvidia-pytriton`` wheel is available."""


class TritonStartupError(RuntimeError):
    """The server exited or did not become ready in time; the message carries the log tail."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the server binary is and what it needs to run.

    ``backend_directory`` is None when the server's built-in default applies (NGC container).
    ``env`` holds the variables to set on top of the caller's environment (full values, not suffixes).
    """

    executable: Path
    backend_directory: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for the server process: ``base`` (default ``os.environ``) plus :attr:`env`."""
        merged = dict(os.environ if base is None else base)
        merged.update(self.env)
        return merged


def find_tritonserver(cache_dir: Path | None = None) -> TritonInstall:
    """Locate ``tritonserver``: on PATH as is, else inside the running interpreter's ``nvidia-pytriton``.

    ``cache_dir`` is where the wheel's backend directory is assembled (default: ``<venv>/.triton-backends``,
    or a per-user temporary directory when the venv is not writable). Raises :class:`TritonNotFoundError`.
    """
    on_path = shutil.which("tritonserver")
    if on_path:
        logger.debug("tritonserver on PATH: %s", on_path)
        return TritonInstall(executable=Path(on_path))

    site_root = _pytriton_site_packages()
    server_dir = site_root / "pytriton" / "tritonserver" if site_root else None
    executable = server_dir / "bin" / "tritonserver" if server_dir else None
    if server_dir is None or executable is None or not executable.is_file():
        raise TritonNotFoundError(
            "tritonserver was not found: run inside the NGC container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3) "
            f"or `{sys.executable} -m pip install nvidia-pytriton` into this environment"
        )
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")

    root = _backend_cache_root(cache_dir) / f"pytriton-{_pytriton_version()}-py{version}"
    backend_directory = _assemble_backend_directory(root, server_dir / "backends" / "python", stub)

    lib_dirs = [sysconfig.get_config_var("LIBDIR") or "", str(site_root / "nvidia_pytriton.libs")]
    existing_ld = os.environ.get("LD_LIBRARY_PATH", "")
    env = {
        "LD_LIBRARY_PATH": os.pathsep.join(p for p in [*lib_dirs, existing_ld] if p),
        "PATH": os.pathsep.join(p for p in [str(Path(sys.executable).parent), os.environ.get("PATH", "")] if p),
    }
    logger.debug("tritonserver from nvidia-pytriton: %s (backends %s)", executable, backend_directory)
    return TritonInstall(executable=executable, backend_directory=backend_directory, env=env)


def _pytriton_site_packages() -> Path | None:
    try:
        dist = importlib.metadata.distribution("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(dist.locate_file("")))


def _pytriton_version() -> str:
    return importlib.metadata.version("nvidia-pytriton")


def _backend_cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return cache_dir
    in_venv = sys.prefix != sys.base_prefix
    if in_venv and os.access(sys.prefix, os.W_OK):
        return Path(sys.prefix) / ".triton-backends"
    return Path(tempfile.gettempdir()) / f"minicpmv-triton-backends-{os.getuid()}"


def _assemble_backend_directory(root: Path, python_backend: Path, stub: Path) -> Path:
    """Make ``root/backends/python/`` = the wheel's Python backend + the stub; returns ``root/backends``.

    Symlinks suffice (the server and the stub resolve the backend's files through the link's directory).
    The directory is built beside its final place and renamed in, so concurrent callers never see a half.
    """
    backends = root / "backends"
    target = backends / "python"
    wanted = {p.name: p for p in python_backend.iterdir() if p.is_file()}
    wanted[stub.name] = stub
    if target.is_dir() and all(_links_to(target / name, src) for name, src in wanted.items()):
        return backends
    backends.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".python-", dir=backends))
    staging.chmod(0o755)  # mkdtemp makes it private
    for name, src in wanted.items():
        (staging / name).symlink_to(src)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        # Another process won the race; its directory is equivalent.
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("assembled Triton Python backend directory %s", target)
    return backends


def _links_to(link: Path, src: Path) -> bool:
    return link.is_symlink() and link.resolve() == src.resolve()


def parent_death_signal(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when its parent dies, however it
    dies (SIGKILL included). None where that is not available (not Linux).

    Linux ``prctl(PR_SET_PDEATHSIG)``: it survives ``exec`` but not ``fork`` (the child's own children need
    their own), and "parent" is the thread that started the child: start long-lived children from a thread
    that lives as long as they should (the main thread). If the parent is already gone when the child gets
    there, the child sends itself ``sig`` at once.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: no dlopen between fork and exec
    parent = os.getpid()
    return lambda: _set_parent_death_signal(prctl, sig, parent)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """This process gets ``sig`` when its parent dies (Linux; a no-op elsewhere): for a program started by
    something that cannot pass a ``preexec_fn`` (a shell), before it ``exec``s the real command."""
    if sys.platform.startswith("linux"):
        _set_parent_death_signal(ctypes.CDLL(None, use_errno=True).prctl, sig, os.getppid())


def _set_parent_death_signal(prctl: Callable[..., int], sig: int, parent: int) -> None:
    if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the signal was set
        os.kill(os.getpid(), sig)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class TritonServer:
    """One ``tritonserver`` process: start, wait until ready, stop. Usable as a context manager.

    ``models`` given: explicit model control, only those models are loaded. ``models`` None: every model in
    the repository is loaded. Ports left None are picked free. ``address`` is the bind address of all three
    endpoints (None: tritonserver's default, 0.0.0.0); clients here always use 127.0.0.1. The server runs in
    its own process group; its stdout and stderr go to :attr:`log_path` (and to this process's stderr when
    ``echo`` is true). With ``die_with_parent`` the server and everything in its process group (the Python-backend
    stubs) are killed with SIGKILL when this process dies, however it dies (SIGKILL included), or when this object
    is dropped without :meth:`stop`: tests use it so that a killed test run leaves no server behind. The server
    itself gets :func:`parent_death_signal`; the stubs, which outlive a killed server (they do not notice that it is
    gone), are left to a small watchdog process that waits on a pipe from this process and kills the group when the
    pipe reaches end-of-file without a word from :meth:`stop`.
    """

    def __init__(
        self,
        model_repository: str | Path,
        models: list[str] | None = None,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_verbose: int = 0,
        extra_env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        exit_timeout: int = 30,
        *,
        install: TritonInstall | None = None,
        address: str | None = None,
        log_path: str | Path | None = None,
        echo: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.models = list(models) if models is not None else None
        self.http_port = http_port if http_port is not None else free_port()
        self.grpc_port = grpc_port if grpc_port is not None else free_port()
        self.metrics_port = metrics_port if metrics_port is not None else free_port()
        self.log_verbose = log_verbose
        self.extra_env = dict(extra_env or {})
        self.extra_args = list(extra_args or [])
        self.exit_timeout = exit_timeout
        self.install = install
        self.address = address
        self.echo = echo
        self.die_with_parent = die_with_parent
        self.log_path = Path(log_path) if log_path is not None else None
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._echo_thread: threading.Thread | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended, else None (also before :meth:`start`)."""
        return self.process.poll() if self.process is not None else None

    def command(self) -> list[str]:
        """The full command line :meth:`start` runs."""
        install = self._install()
        cmd = [
            str(install.executable),
            f"--model-repository={self.model_repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.address is not None:
            cmd += [f"--http-address={self.address}", f"--grpc-address={self.address}"]
            cmd.append(f"--metrics-address={self.address}")
        if install.backend_directory is not None:
            cmd.append(f"--backend-directory={install.backend_directory}")
        if self.models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd.extend(f"--load-model={name}" for name in self.models)
        return cmd + self.extra_args

    def start(self) -> TritonServer:
        """Launch the server process (returns at once; see :meth:`wait_ready`)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("this TritonServer is already running")
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository not found: {self.model_repository}")
        cmd = self.command()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")  # closed in stop()
        env = self._install().environ()
        env.update(self.extra_env)
        logger.info("starting tritonserver: %s (log %s)", " ".join(cmd), self.log_path)
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.echo else self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=parent_death_signal() if self.die_with_parent else None,
        )
        if self.die_with_parent:
            self._watchdog = _start_group_watchdog(self.process.pid)
        if self.echo:
            self._echo_thread = threading.Thread(target=self._pump_output, name="tritonserver-log", daemon=True)
            self._echo_thread.start()
        return self

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until the server and each of :attr:`models` report ready over HTTP.

        Raises :class:`TritonStartupError` (with the last log lines) if the process exits or ``timeout``
        seconds pass first.
        """
        if self.process is None:
            raise RuntimeError("start() the server before waiting for it")
        base = f"http://{self.http_url}"
        paths = ["/v2/health/ready"] + [f"/v2/models/{name}/ready" for name in self.models or []]
        deadline = time.monotonic() + timeout
        pending = list(paths)
        while pending:
            code = self.process.poll()
            if code is not None:
                raise TritonStartupError(
                    f"tritonserver exited with status {code} during startup; last log lines:\n{self.log_tail()}"
                )
            if _http_ok(base + pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TritonStartupError(
                    f"tritonserver not ready after {timeout:.0f} s ({pending[0]} not OK); "
                    f"last log lines:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)
        logger.info("tritonserver ready: http %s, grpc %s", self.http_url, self.grpc_url)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the server's process group, wait ``timeout`` s (default exit_timeout + 10), then SIGKILL.

        Returns the server's exit status (None if it was never started). Idempotent.
        """
        process = self.process
        if process is None:
            return None
        wait_s = timeout if timeout is not None else self.exit_timeout + 10
        if process.poll() is None:
            logger.info("stopping tritonserver (pid %d)", process.pid)
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(wait_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not exit within %.0f s; killing it", wait_s)
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        # Backend stubs left behind by a killed server would otherwise linger.
        _signal_group(process.pid, signal.SIGKILL)
        if self._echo_thread is not None:
            self._echo_thread.join(timeout=5)
            self._echo_thread = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._watchdog is not None:
            _dismiss_group_watchdog(self._watchdog)
            self._watchdog = None
        return process.returncode

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the server's process group (no-op when it is not running). Safe in a signal handler."""
        if self.process is not None and self.process.poll() is None:
            _signal_group(self.process.pid, sig)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log ('' before anything was written)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log_file is not None:
            with contextlib.suppress(ValueError):
                self._log_file.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _install(self) -> TritonInstall:
        if self.install is None:
            self.install = find_tritonserver()
        return self.install

    def _pump_output(self) -> None:
        process, log_file = self.process, self._log_file
        if process is None or process.stdout is None or log_file is None:
            return
        for line in iter(process.stdout.readline, b""):
            log_file.write(line)
            log_file.flush()
            sys.stderr.write(line.decode("utf-8", errors="replace"))
        process.stdout.close()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


# Reads one byte from stdin: b"q" (TritonServer.stop) means the group is taken care of; end-of-file (the process
# holding the pipe's other end died or dropped it) means SIGKILL the group. Ignores Ctrl-C (meant for its parent).
_GROUP_WATCHDOG = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
if not sys.stdin.buffer.read(1):
    try:
        os.killpg(int(sys.argv[1]), signal.SIGKILL)
    except OSError:
        pass
"""


def _start_group_watchdog(pgid: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _GROUP_WATCHDOG, str(pgid)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def _dismiss_group_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):  # BrokenPipeError: it is gone already
        assert watchdog.stdin is not None
        watchdog.stdin.write(b"q")
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # The server was started with start_new_session=True, so its pid is its process group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
