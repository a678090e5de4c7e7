#!/usr/bin/env python3
"""Serving benchmark: the OpenAI endpoint (tritonserver + openai_frontend) next to a one-at-a-time baseline.

The same client drives two OpenAI-compatible servers with the same streaming ``/v1/chat/completions``
requests at the same concurrency levels, one server after the other:

* ours: ``python -m openai_frontend`` in front of ``tritonserver`` running model_repository/ (the engine's
  continuous batching inside the Python backend);
* baseline: benchmarks/baseline_server.py, the same checkpoint answering strictly one request at a time with
  the plain greedy loop of ``MiniCPMV.generate_greedy`` (a queue in front of one worker thread).

Workloads: ``text`` (a short instruction) and ``image`` (one synthetic 1344x1344 document page, about 1.8 MP,
with text lines and a table, plus a question). Every request decodes exactly ``--max-tokens`` tokens
(``ignore_eos``, ``min_tokens`` = ``max_tokens``, temperature 0). At concurrency C, C client tasks each send
a request, read its stream to the end and send the next (closed loop) until the level's requests are done.
Per level and server: output tokens/s, requests/s, time to first token (TTFT: request sent -> first
non-empty content delta), inter-token latency (ITL: first -> last content delta / (tokens - 1)), p50/p99
latency, and the CPU seconds each process used. ``x baseline`` = our output tokens/s / the baseline's.

By default the script writes a tiny random checkpoint into a temporary directory and starts everything on
free ports: tritonserver (CPU config ``--model-config-name=cpu``, float32), the frontend and the baseline.
``--checkpoint`` uses a real checkpoint instead; ``--base-url`` measures a frontend already running (the
baseline then needs ``--checkpoint`` or ``--baseline-url``). Results: ``<out>/<name>.json``, ``.md`` and a
``.png`` plot (needs matplotlib: requirements-bench.txt). On a 2-core CPU the defaults take about 5 minutes.

    .venv/bin/python benchmarks/serving.py                     # CPU, tiny checkpoint, everything started here
    .venv/bin/python benchmarks/serving.py --device gpu --checkpoint /models/MiniCPM-V-2_6 --concurrency 1,16,64
    .venv/bin/python benchmarks/serving.py --device gpu --full-size-random      # real size, random weights
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
MODELS = ("minicpm_v_2_6", "minicpm_v_2_6_int4")
TOPICS = ("quarterly revenue", "shipping delays", "customer complaints", "battery safety", "hiring plan",
          "energy usage", "server outages", "tax changes", "warehouse audit", "product recall")  # fmt: skip
QUESTIONS = ("What is the total in the last row of the table?", "Summarise this page in three bullet points.",
             "Which region reports the largest figure?", "List every number in the table.")  # fmt: skip


# ---------------------------------------------------------------- workloads


def document_page(index: int, size: tuple[int, int] = (1344, 1344)) -> Image.Image:
    """A synthetic scanned page, different for every ``index``: a title, numbered text lines and a table."""
    width, height = size
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    font, title = ImageFont.load_default(size=22), ImageFont.load_default(size=40)
    draw.text((80, 60), f"REPORT {index:04d}: {TOPICS[index % len(TOPICS)].upper()}", font=title, fill="black")
    y = 140
    for line in range(int((height - 560) / 32)):
        words = ", ".join(TOPICS[(index + line + k) % len(TOPICS)] for k in range(3))
        draw.text((80, y), f"{line + 1:2d}. {words}: {index * 37 + line * 11} units in region {line % 7}",
                  font=font, fill=(25, 25, 25))  # fmt: skip
        y += 32
    cell_w = (width - 160) // 4
    for row in range(9):
        for col in range(4):
            x0, y0 = 80 + col * cell_w, y + 30 + row * 40
            draw.rectangle((x0, y0, x0 + cell_w, y0 + 40), outline="black", width=2 if row == 0 else 1)
            text = ("Item", "Region", "Units", "Change")[col] if row == 0 else f"{(index * 7 + row * (col + 3)) % 997}"
            draw.text((x0 + 12, y0 + 9), text, font=font, fill="black")
    return page


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def make_bodies(workload: str, indices: range, model: str, max_tokens: int,
                sampling: str = "greedy") -> list[dict[str, Any]]:  # fmt: skip
    """Streaming chat requests with a fixed output length; distinct text (and page) for every index. ``sampling``
    "greedy" (temperature 0, no repetition penalty) or "default" (nothing set: the model's own temperature 0.7,
    top_p 0.8, top_k 100, repetition_penalty 1.05, what a request that sets nothing gets)."""
    bodies = []
    for i in indices:
        if workload == "text":
            text = f"Document {i}. Summarise the section about {TOPICS[i % len(TOPICS)]} in {3 + i % 5} points."
            content: Any = text
        else:
            page = {"type": "image_url", "image_url": {"url": data_url(document_page(i))}}
            content = [page, {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
        body = {
            "model": model, "messages": [{"role": "user", "content": content}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            # extensions (both servers): fixed-length output
            "min_tokens": max_tokens, "ignore_eos": True,
        }  # fmt: skip
        if sampling == "greedy":  # plain greedy (the engine's default penalty is 1.05)
            body |= {"temperature": 0, "repetition_penalty": 1.0}
        bodies.append(body)
    return bodies


# ---------------------------------------------------------------- the client


@dataclass
class Timing:
    """One streamed request; time.perf_counter() seconds."""

    start: float
    end: float = 0.0
    first_content: float | None = None
    last_content: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> Timing:
    """POST one streaming request and read it to ``[DONE]``. Raises RuntimeError on any error."""
    timing = Timing(time.perf_counter())
    async with client.stream("POST", "/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                timing.last_content = time.perf_counter()
                timing.first_content = timing.first_content or timing.last_content
            if event.get("usage"):
                timing.prompt_tokens = event["usage"]["prompt_tokens"]
                timing.completion_tokens = event["usage"]["completion_tokens"]
    timing.end = time.perf_counter()
    return timing


async def run_level(base_url: str, bodies: list[dict[str, Any]], concurrency: int) -> tuple[list[Timing], float]:
    """Closed loop: ``concurrency`` tasks, each streaming one request at a time. Returns timings and wall s."""
    pending = iter(enumerate(bodies))
    timings: dict[int, Timing] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url + "/v1", timeout=httpx.Timeout(1800.0), limits=limits) as client:

        async def worker() -> None:
            for index, body in pending:
                timings[index] = await stream_chat(client, body)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    ordered = [timings[i] for i in range(len(bodies))]
    return ordered, max(t.end for t in ordered) - min(t.start for t in ordered)


# ---------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarise(timings: list[Timing], wall_s: float) -> dict[str, Any]:
    """Throughput and latency figures of one level (times in the units their names say)."""
    tokens = sum(t.completion_tokens for t in timings)
    ttft = [1000 * (t.first_content - t.start) for t in timings if t.first_content is not None]
    itl = [
        1000 * (t.last_content - t.first_content) / (t.completion_tokens - 1)
        for t in timings
        if t.first_content is not None and t.last_content is not None and t.completion_tokens > 1
    ]
    latency = [t.end - t.start for t in timings]

    def stat(values: list[float], q: float | None = None, digits: int = 1) -> float | None:
        if not values:
            return None
        return round(sum(values) / len(values) if q is None else percentile(values, q), digits)

    return {
        "requests": len(timings),
        "mean_prompt_tokens": stat([float(t.prompt_tokens) for t in timings]),
        "output_tokens": tokens,
        "wall_s": round(wall_s, 3),
        "output_tokens_per_s": round(tokens / wall_s, 2),
        "requests_per_s": round(len(timings) / wall_s, 3),
        "ttft_ms_mean": stat(ttft),
        "ttft_ms_p50": stat(ttft, 50),
        "ttft_ms_p99": stat(ttft, 99),
        "itl_ms_mean": stat(itl, digits=2),
        "latency_s_p50": stat(latency, 50, 3),
        "latency_s_p99": stat(latency, 99, 3),
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``x_baseline`` on our rows: our output tokens/s over the baseline's at the same workload and level."""
    baseline = {(r["workload"], r["concurrency"]): r for r in rows if r["server"] == "baseline"}
    for row in rows:
        base = baseline.get((row["workload"], row["concurrency"]))
        if row["server"] == "ours" and base is not None:
            row["x_baseline"] = round(row["output_tokens_per_s"] / base["output_tokens_per_s"], 2)


# ---------------------------------------------------------------- processes


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of ``pid`` and all its descendants (None without psutil or pid)."""
    if pid is None:
        return None
    try:
        import psutil

        root = psutil.Process(pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total
    except Exception:  # noqa: BLE001 - a missing figure (no psutil, process gone), not a failed benchmark
        return None


def gpu_memory_mib(pid: int | None) -> int | None:
    """GPU memory (MiB) held by ``pid`` and its descendants, from nvidia-smi (None when unavailable)."""
    if pid is None:
        return None
    try:
        import psutil

        pids = {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
    except Exception:  # noqa: BLE001 - no psutil or nvidia-smi: a missing figure
        return None
    return sum(int(mem) for p, mem in (line.split(",") for line in out.strip().splitlines()) if int(p) in pids)


def wait_ready(url: str, process: subprocess.Popen | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} during startup")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")


def stop_process(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Endpoint:
    """An OpenAI-compatible server under test and the processes whose CPU time is counted for it."""

    name: str
    base_url: str
    server_pid: int | None = None  # the model's process (tritonserver with its Python stub, or the baseline)
    frontend_pid: int | None = None


@contextlib.contextmanager
def our_stack(args: argparse.Namespace, checkpoint: str, workdir: Path) -> Iterator[Endpoint]:
    """tritonserver (only ``args.model``) + ``python -m openai_frontend`` on free ports."""
    from minicpmv_triton.launcher import TritonServer
    from openai_frontend.launcher import FrontendProcess

    env = {f"MINICPMV_CHECKPOINT_{args.model.upper()}": checkpoint, "MINICPMV_DTYPE": args.dtype}
    extra = []
    if args.device == "cpu":
        env |= {"MINICPMV_DEVICE": "cpu", "OMP_NUM_THREADS": str(args.engine_threads)}
        extra.append("--model-config-name=cpu")
    triton = TritonServer(args.model_repository, models=[args.model], extra_env=env, extra_args=extra,
                          exit_timeout=10, address="127.0.0.1", log_path=workdir / "tritonserver.log")  # fmt: skip
    frontend = None
    try:
        triton.start()
        triton.wait_ready(timeout=args.startup_timeout)
        frontend = FrontendProcess(triton.grpc_url, triton.http_url, models=args.model).start(ready=True, timeout=120)
        yield Endpoint("ours", frontend.base_url, triton.process.pid if triton.process else None, frontend.process.pid)
    finally:
        if frontend is not None:
            frontend.stop()
        triton.stop()


@contextlib.contextmanager
def baseline_stack(args: argparse.Namespace, checkpoint: str, workdir: Path) -> Iterator[Endpoint]:
    """benchmarks/baseline_server.py on a free port."""
    from minicpmv_triton.launcher import free_port

    port = free_port()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "baseline_server.py"), "--checkpoint", checkpoint,
           "--model-name", args.model, "--port", str(port), "--dtype", args.dtype,
           "--device", "cuda" if args.device == "gpu" else "cpu"]  # fmt: skip
    if args.device == "cpu":
        cmd += ["--threads", str(args.baseline_threads)]
    with open(workdir / "baseline.log", "wb") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            base_url = f"http://127.0.0.1:{port}"
            wait_ready(base_url + "/health", process, args.startup_timeout, "the baseline server")
            yield Endpoint("baseline", base_url, process.pid)
        finally:
            stop_process(process)


# ---------------------------------------------------------------- the run


@dataclass
class Measurement:
    rows: list[dict[str, Any]] = field(default_factory=list)
    gpu_memory_mib: dict[str, int | None] = field(default_factory=dict)


def measure(endpoint: Endpoint, workload: str, level: int, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """One level against one server, with the CPU seconds each process spent on it."""
    pids = {"server": endpoint.server_pid, "frontend": endpoint.frontend_pid}
    cpu_before = {k: process_cpu_s(p) for k, p in pids.items()}
    client_before, load_before = time.process_time(), os.getloadavg()[0]
    timings, wall = asyncio.run(run_level(endpoint.base_url, bodies, level))
    want = bodies[0]["max_tokens"]
    short = [t.completion_tokens for t in timings if t.completion_tokens != want]
    if short:
        raise RuntimeError(f"{endpoint.name}: {len(short)} requests did not produce {want} tokens: {short[:5]}")
    row = {"workload": workload, "concurrency": level, "server": endpoint.name, **summarise(timings, wall)}
    for key, pid in pids.items():
        after = process_cpu_s(pid)
        before = cpu_before[key]
        row[f"{key}_cpu_s"] = None if after is None or before is None else round(after - before, 2)
    row["client_cpu_s"] = round(time.process_time() - client_before, 2)
    row["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return row


def run_benchmark(args: argparse.Namespace, endpoints: list[Endpoint]) -> Measurement:
    """Per workload and level, the same requests against each endpoint in turn (never at the same time)."""
    result = Measurement()
    next_index = 0
    for workload in args.workloads:
        print(f"{workload}: preparing requests and warming up", flush=True)
        warmup = make_bodies(workload, range(100_000, 100_002), args.model, args.max_tokens, args.sampling)
        for endpoint in endpoints:
            asyncio.run(run_level(endpoint.base_url, warmup, 2))
        for level in args.concurrency:
            count = args.requests_per_level or max(2 * level, 4)
            bodies = make_bodies(workload, range(next_index, next_index + count), args.model, args.max_tokens,
                                 args.sampling)  # fmt: skip
            next_index += count  # distinct pages everywhere: the engine's vision cache never hits
            for endpoint in endpoints:
                row = measure(endpoint, workload, level, bodies)
                result.rows.append(row)
                print(f"  {workload:5s} C={level:<3d} {endpoint.name:8s} {row['output_tokens_per_s']:8.1f} out tok/s "
                      f"{row['requests_per_s']:6.2f} req/s  TTFT p50 {row['ttft_ms_p50']} ms  ITL "
                      f"{row['itl_ms_mean']} ms  p99 lat {row['latency_s_p99']} s  (cpu s server "
                      f"{row['server_cpu_s']}, frontend {row['frontend_cpu_s']}, client {row['client_cpu_s']})",
                      flush=True)  # fmt: skip
    if args.device == "gpu":
        result.gpu_memory_mib = {e.name: gpu_memory_mib(e.server_pid) for e in endpoints}
    add_ratios(result.rows)
    return result


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip() or None  # fmt: skip
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    system = f"{platform.system()} {platform.release()}"
    return {"cpu_model": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable, "memory_gib": memory,
            "gpu": gpu, "os": system, "python": platform.python_version()}  # fmt: skip


# ---------------------------------------------------------------- reports


COLUMNS = (("workload", "workload"), ("concurrency", "C"), ("server", "server"), ("requests", "requests"),
           ("mean_prompt_tokens", "prompt tok"), ("output_tokens", "out tok"), ("wall_s", "wall s"),
           ("output_tokens_per_s", "out tok/s"), ("x_baseline", "x baseline"), ("requests_per_s", "req/s"),
           ("ttft_ms_p50", "TTFT p50 ms"), ("ttft_ms_p99", "TTFT p99 ms"), ("itl_ms_mean", "ITL ms"),
           ("latency_s_p50", "lat p50 s"), ("latency_s_p99", "lat p99 s"), ("server_cpu_s", "CPU s server"),
           ("frontend_cpu_s", "CPU s frontend"), ("client_cpu_s", "CPU s client"))  # fmt: skip


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ("-" if row.get(key) is None else str(row[key]) for key, _ in COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_summary(rows: list[dict[str, Any]]) -> str:
    """One line per workload: the x baseline at each level."""
    out = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        ratios = [f"C={r['concurrency']}: {r['x_baseline']}x" for r in rows
                  if r["workload"] == workload and r.get("x_baseline") is not None]  # fmt: skip
        if ratios:
            out.append(f"- {workload}: " + ", ".join(ratios))
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    s, hw = report["settings"], report["hardware"]
    memory = report.get("gpu_memory_mib") or {}
    loads = (report["results"][0]["load_1min"][0], report["results"][-1]["load_1min"][1])
    lines = [
        f"# Serving benchmark ({s['device']})", "",
        f"Date: {report['date']}. Runtime {report['runtime_s']} s (startup included). 1-minute load average "
        f"{loads[0]} at the first level, {loads[1]} at the last (other work on the machine skews the figures).", "",
        f"Hardware: {hw['cpu_model']}, {hw['usable_cores']} usable of {hw['logical_cores']} logical cores, "
        f"{hw['memory_gib']} GiB" + (f", GPU {hw['gpu']}" if hw["gpu"] else "") + f"; {hw['os']}, "
        f"Python {hw['python']}.", "",
        f"Settings: model {s['model']}, checkpoint {s['checkpoint']}, dtype {s['dtype']}, "
        f"{s['max_tokens']} output tokens per request (ignore_eos, temperature 0), requests per level "
        f"{s['requests_per_level']}, workloads {', '.join(s['workloads'])}"
        + (f", engine threads {s['engine_threads']}, baseline threads {s['baseline_threads']}"
           if s["device"] == "cpu" else "") + ".", "",
        "Servers: `ours` = openai_frontend -> tritonserver -> engine (continuous batching); `baseline` = "
        "benchmarks/baseline_server.py, the same checkpoint answering one request at a time with the plain greedy "
        "loop. Same client, same requests, one server after the other. `x baseline` = our output tokens/s / the "
        "baseline's at that level. TTFT = request sent -> first content delta; ITL = (last - first content "
        "delta) / (tokens - 1). CPU s = CPU seconds the process (with its children) used during the level.", "",
        "Ours / baseline, output tokens/s:", "", ratio_summary(report["results"]), "",
        markdown_table(report["results"]), "",
    ]  # fmt: skip
    if memory:
        lines += [f"GPU memory after the run (MiB): {', '.join(f'{k} {v}' for k, v in memory.items())}.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Output tokens/s vs concurrency, ours and the baseline, one panel per workload. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["results"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        for server, label, style in (("ours", "ours (frontend + Triton, continuous batching)", "o-"),
                                     ("baseline", "baseline (one request at a time)", "s--")):  # fmt: skip
            points = [r for r in rows if r["workload"] == workload and r["server"] == server]
            if not points:
                continue
            xs, ys = [r["concurrency"] for r in points], [r["output_tokens_per_s"] for r in points]
            ax.plot(xs, ys, style, label=label)
            for r in points:
                if r.get("x_baseline") is not None:
                    ax.annotate(f"{r['x_baseline']}x", (r["concurrency"], r["output_tokens_per_s"]),
                                textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)  # fmt: skip
        ax.set_xscale("log", base=2)
        levels = sorted({r["concurrency"] for r in rows})
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.1)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{workload} ({report['settings']['max_tokens']} output tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    s = report["settings"]
    fig.suptitle(f"{s['model']} on {s['device']} ({s['checkpoint']}), {report['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from e
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels must be >= 1")
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", choices=["cpu", "gpu"], default="cpu", help="where the model runs (default: cpu)")
    add("--model", choices=MODELS, default=MODELS[0], help="Triton model to serve and request (default: %(default)s)")
    add("--checkpoint", help="checkpoint directory or Hub id (default: a tiny random one in a temp dir)")
    add("--full-size-random", action="store_true",
        help="write a real-size checkpoint with random weights (~16 GB of disk; int4 with --model *_int4)")  # fmt: skip
    add("--model-repository", type=Path, default=ROOT / "model_repository",
        help="Triton model repository (default: model_repository/; e.g. a copy with another max_num_seqs)")  # fmt: skip
    add("--base-url", help="measure this running frontend (e.g. http://127.0.0.1:9000) instead of starting one")
    add("--baseline-url", help="a running baseline_server.py to compare with (default: started here)")
    add("--no-baseline", action="store_true", help="measure our server only")
    add("--concurrency", type=parse_levels, metavar="C1,C2,...", help="levels (default: 1,4,16 on cpu; 1,16,64 gpu)")
    add("--requests-per-level", type=int, metavar="N", help="requests per level (default: max(2C, 4))")
    add("--max-tokens", type=int, default=64, help="output tokens per request (default: 64)")
    add("--workloads", default="text,image", help="comma-separated: text, image (default: text,image)")
    add("--sampling", choices=("greedy", "default"), default="greedy",
        help="greedy, or the model's default sampling (nothing set; ours only: the baseline is greedy)")
    add("--dtype", help="model dtype (default: float32 on cpu, auto = bf16 on gpu)")
    add("--engine-threads", type=int, default=2, help="cpu: OMP_NUM_THREADS of tritonserver (default: 2)")
    add("--baseline-threads", type=int, default=2, help="cpu: torch threads of the baseline (default: 2)")
    add("--startup-timeout", type=float, default=900.0, help="seconds to wait for each server (default: 900)")
    add("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: benchmarks/results)")
    add("--name", help="file name stem of the results (default: serving_<device>)")
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - {"text", "image"}:
        parser.error("--workloads takes text and/or image")
    if args.max_tokens < 1 or (args.requests_per_level is not None and args.requests_per_level < 1):
        parser.error("--max-tokens and --requests-per-level must be >= 1")
    if args.full_size_random and args.checkpoint:
        parser.error("--full-size-random and --checkpoint exclude each other")
    args.concurrency = args.concurrency or ([1, 4, 16] if args.device == "cpu" else [1, 16, 64])
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "auto")
    args.name = args.name or f"serving_{args.device}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minicpmv-serving-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        checkpoint, described = args.checkpoint, args.checkpoint
        if checkpoint is not None and not Path(checkpoint).is_dir():
            from minicpmv.weights import resolve_checkpoint

            checkpoint = str(resolve_checkpoint(checkpoint))  # a Hub id: the baseline needs a directory
        needs_checkpoint = not args.base_url or not (args.no_baseline or args.baseline_url)
        if checkpoint is None and needs_checkpoint:
            int4 = args.model.endswith("_int4")
            if args.full_size_random:
                from minicpmv.devtools.random_weights import write_random_checkpoint
                from minicpmv.devtools.reference_config import full_config

                print("writing a full-size random checkpoint (takes a few minutes) ...", flush=True)
                device = "cuda" if args.device == "gpu" else "cpu"
                checkpoint = str(write_random_checkpoint(workdir / "full", full_config(), int4=int4, device=device))
                described = f"full-size random weights{' (nf4)' if int4 else ''}"
            else:
                from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint

                checkpoint = str(write_tiny_checkpoint(workdir / "tiny", int4=int4, seed=0))
                described = f"tiny random (write_tiny_checkpoint seed 0{', int4' if int4 else ''})"
            print(f"wrote {described} checkpoint in {time.perf_counter() - started:.1f} s", flush=True)
        endpoints = []
        if args.base_url:
            endpoints.append(Endpoint("ours", args.base_url.rstrip("/").removesuffix("/v1")))
        else:
            print("starting tritonserver and the frontend ...", flush=True)
            endpoints.append(stack.enter_context(our_stack(args, checkpoint, workdir)))
        if args.baseline_url:
            endpoints.append(Endpoint("baseline", args.baseline_url.rstrip("/").removesuffix("/v1")))
        elif not args.no_baseline:
            print("starting the baseline server ...", flush=True)
            endpoints.append(stack.enter_context(baseline_stack(args, checkpoint, workdir)))
        print(f"servers ready after {time.perf_counter() - started:.1f} s; measuring", flush=True)
        result = run_benchmark(args, endpoints)
    runtime = time.perf_counter() - started
    report = {
        "benchmark": "serving",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/serving.py", *(sys.argv[1:] if argv is None else argv)]),
        "hardware": hardware(),
        "settings": {
            "device": args.device,
            "model": args.model,
            "checkpoint": described or "(the running server's)",
            "dtype": args.dtype,
            "max_tokens": args.max_tokens,
            "concurrency_levels": args.concurrency,
            "requests_per_level": args.requests_per_level or "max(2C, 4)",
            "workloads": args.workloads,
            "sampling": args.sampling,
            "image": "one synthetic 1344x1344 document page (PNG data URL) per request",
            "engine_threads": args.engine_threads,
            "baseline_threads": args.baseline_threads,
        },
        "runtime_s": round(runtime, 1),
        "gpu_memory_mib": result.gpu_memory_mib,
        "results": result.rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    plotted = plot(report, stem.with_suffix(".png"))
    print("\n" + markdown_table(result.rows) + "\n\n" + ratio_summary(result.rows))
    print(f"\ntotal runtime {runtime:.1f} s; wrote {stem}.json, .md" + (", .png" if plotted else
          " (no plot: pip install -r requirements-bench.txt)"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
