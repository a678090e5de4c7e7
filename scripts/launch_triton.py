#!/usr/bin/env python3
"""Start tritonserver on the project's model repository and keep it running until SIGINT/SIGTERM.

Uses `tritonserver` from PATH (NGC container) or the one in the nvidia-pytriton wheel (see
minicpmv_triton/launcher.py). Waits for readiness, prints the endpoints, forwards SIGINT/SIGTERM to the
server and exits with its exit status. Arguments for tritonserver itself: --server-arg=--flag=value.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from minicpmv.engine.config import parse_modules
from minicpmv_triton.launcher import TritonNotFoundError, TritonServer, TritonStartupError
from minicpmv_triton.parameters import ENGINES_PER_GPU_ENV

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_ENV = {
    "checkpoint_full": "MINICPMV_CHECKPOINT_MINICPM_V_2_6",
    "checkpoint_int4": "MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4",
}
DEVICE_ENV = "MINICPMV_DEVICE"
LORA_MODULES_ENV = "MINICPMV_LORA_MODULES"  # the models' lora_modules parameter (minicpmv_triton/parameters.py)
LORA_DIR_ENV = "MINICPMV_LORA_DIR"

logger = logging.getLogger("launch_triton")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository", help="default: %(default)s")
    parser.add_argument(
        "--models", help="comma-separated models to load (explicit model control); default: every model directory"
    )
    parser.add_argument("--address", help="bind address of all endpoints, e.g. 127.0.0.1 (default: 0.0.0.0)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for readiness")
    parser.add_argument("--exit-timeout", type=int, default=30, help="tritonserver --exit-timeout-secs")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument("--log-file", type=Path, help="server log file (default: a new temporary file)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the server log to stderr")
    parser.add_argument(
        "--checkpoint-full", metavar="PATH_OR_ID", help=f"sets {CHECKPOINT_ENV['checkpoint_full']} for the server"
    )
    parser.add_argument(
        "--checkpoint-int4", metavar="PATH_OR_ID", help=f"sets {CHECKPOINT_ENV['checkpoint_int4']} for the server"
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help=f"sets {DEVICE_ENV} for the server; cpu also selects each model's configs/cpu.pbtxt "
        "(--model-config-name=cpu). auto: gpu when nvidia-smi is on PATH, else cpu",
    )
    parser.add_argument(
        "--lora-modules", metavar="NAME=PATH[,NAME=PATH...]",
        help=f"LoRA adapters every model serves from start-up (vLLM's flag; sets {LORA_MODULES_ENV})",
    )  # fmt: skip
    parser.add_argument(
        "--lora-dir", metavar="DIR", help=f"directory adapters may be loaded from at runtime (sets {LORA_DIR_ENV})"
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], metavar="ARG", help="extra tritonserver argument (repeatable)"
    )
    return parser.parse_args(argv)


def model_names(repository: Path, models: str | None) -> list[str]:
    """The models to load: the ``--models`` list, else every directory of the repository holding a model."""
    if models:
        return [name.strip() for name in models.split(",") if name.strip()]
    return sorted(
        entry.name
        for entry in repository.iterdir()
        if entry.is_dir()
        and not entry.name.startswith((".", "_"))
        and ((entry / "config.pbtxt").is_file() or any(child.name.isdigit() for child in entry.iterdir()))
    )


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "gpu" if shutil.which("nvidia-smi") else "cpu"


def lora_modules(text: str, models: list[str]) -> str:
    """``--lora-modules`` checked ("name=path,...": each path a PEFT adapter directory, names unique and none a
    model's) and with absolute paths (the server's working directory is not the caller's). Raises ValueError."""
    modules: dict[str, str] = {}
    for name, path in parse_modules(text, "--lora-modules").items():  # the engine's own reading of the list
        if any(c.isspace() for c in name):
            raise ValueError(f"--lora-modules: the name {name!r} has white space")
        if name in models:
            raise ValueError(f"--lora-modules: {name!r} is the name of a model; give the adapter another")
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise ValueError(f"--lora-modules: {name}: {path} is not a directory")
        if not (directory / "adapter_config.json").is_file():
            raise ValueError(f"--lora-modules: {name}: {path} has no adapter_config.json (not a PEFT adapter)")
        modules[name] = str(directory.resolve())
    if not modules:
        raise ValueError("--lora-modules: no name=path given")
    return ",".join(f"{name}={path}" for name, path in modules.items())


def lora_dir(path: str) -> str:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"--lora-dir: {path} is not a directory")
    return str(directory.resolve())


def server_env(args: argparse.Namespace, device: str, models: list[str], environ=None) -> dict[str, str]:
    """The variables set for the server on top of ``environ`` (default ``os.environ``).

    On GPUs every model has one instance on each GPU (the configs' ``instance_group``, ``count: 1 kind:
    KIND_GPU``), so all loaded models share each GPU: MINICPMV_ENGINES_PER_GPU tells each instance how many
    there are, and ``gpu_memory_utilization`` "auto" becomes an even share (minicpmv_triton/parameters.py). A
    value already in ``environ`` (an operator's) is kept. ``--lora-modules`` / ``--lora-dir``, checked (ValueError),
    become every model's ``lora_modules`` / ``lora_dir``.
    """
    environ = os.environ if environ is None else environ
    env = {name: getattr(args, key) for key, name in CHECKPOINT_ENV.items() if getattr(args, key)}
    env[DEVICE_ENV] = device
    if device == "gpu" and not environ.get(ENGINES_PER_GPU_ENV):
        env[ENGINES_PER_GPU_ENV] = str(len(models))
    if args.lora_modules:
        env[LORA_MODULES_ENV] = lora_modules(args.lora_modules, models)
    if args.lora_dir:
        env[LORA_DIR_ENV] = lora_dir(args.lora_dir)
    return env


def server_args(args: argparse.Namespace, device: str) -> list[str]:
    # config.pbtxt asks for KIND_GPU instances; configs/cpu.pbtxt is the same model on KIND_CPU. A model
    # without a configs/cpu.pbtxt falls back to its config.pbtxt.
    extra = ["--model-config-name=cpu"] if device == "cpu" else []
    return extra + list(args.server_arg)


def exit_status(code: int) -> int:
    # A server killed by a signal reports -N; a shell reports that as 128 + N.
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    repository = args.model_repository.resolve()
    if not repository.is_dir():
        logger.error("model repository not found: %s", repository)
        return 2
    models = model_names(repository, args.models)
    if not models:
        logger.error("no model directories in %s", repository)
        return 2
    device = resolve_device(args.device)
    try:
        env = server_env(args, device, models)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    log_file = args.log_file or Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
    server = TritonServer(
        repository,
        models=models,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        extra_env=env,
        extra_args=server_args(args, device),
        exit_timeout=args.exit_timeout,
        address=args.address,
        log_path=log_file,
        echo=not args.quiet,
    )
    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        # First signal: graceful stop (tritonserver drains for --exit-timeout). A second one: kill.
        received.append(signum)
        server.send_signal(signal.SIGTERM if len(received) == 1 else signal.SIGKILL)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        server.start()
    except (TritonNotFoundError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    if received:  # a signal that came before there was a process to forward it to
        server.send_signal(signal.SIGTERM)
    try:
        server.wait_ready(args.ready_timeout)
    except TritonStartupError as exc:
        server.stop()
        if received:
            logger.info("stopped during startup by signal %d", received[0])
            return 0
        logger.error("%s", exc)
        return 1
    print(
        f"tritonserver ready (log: {server.log_path})\n"
        f"  HTTP    http://127.0.0.1:{server.http_port}\n"
        f"  gRPC    127.0.0.1:{server.grpc_port}\n"
        f"  metrics {server.metrics_url}\n"
        f"  models  {', '.join(models)} (device {device})",
        flush=True,
    )
    while server.returncode is None:
        time.sleep(0.2)
    code = server.stop()
    code = 0 if code is None else code
    if not received and code != 0:
        logger.error("tritonserver exited with status %d; last log lines:\n%s", code, server.log_tail())
    return exit_status(code)


if __name__ == "__main__":
    sys.exit(main())
