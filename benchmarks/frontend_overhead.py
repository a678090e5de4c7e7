#!/usr/bin/env python3
"""Frontend overhead: the same requests through the OpenAI frontend and straight to Triton, in one run.

Each request asks for one output token (so the model's share is small and the same on both paths), text only
and with one document page. The two paths alternate request by request, so that machine noise hits both
alike: ``frontend`` is an HTTP POST /v1/chat/completions (non-streaming, keep-alive connection); ``direct``
is the same messages and image sent to Triton's gRPC stream with tritonclient. Reported: p50 / p90 latency
of each and the p50 difference, the frontend's overhead. By default the script starts tritonserver and the
frontend itself on free ports with the tiny random checkpoint (CPU); give ``--base-url`` and ``--triton-grpc-url``
to measure a running stack instead. Results go to stdout and ``<out>/frontend_overhead_<device>.{json,md}``.

    .venv/bin/python benchmarks/frontend_overhead.py --requests 200
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import http.client
import io
import json
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = b'{"max_tokens": 1, "ignore_eos": true}'


def page_png(size=(1000, 750)) -> bytes:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for row in range(size[1] // 30):
        line = f"Item {row:02d}   quantity {row % 7 + 1}   price {12.5 * row:9.2f}"
        draw.text((40, 20 + 30 * row), line, fill="black")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


class Direct:
    """Triton's gRPC stream, kept open; one request at a time."""

    def __init__(self, url: str, model: str):
        self.model = model
        self.client = grpcclient.InferenceServerClient(url)
        self.results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    @staticmethod
    def _tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    def __call__(self, messages: list, images: list[bytes]) -> None:
        inputs = [
            self._tensor("messages", np.array([[json.dumps(messages).encode()]], dtype=np.object_), "BYTES"),
            self._tensor("sampling_parameters", np.array([[SAMPLING]], dtype=np.object_), "BYTES"),
            self._tensor("exclude_input_in_output", np.array([[True]]), "BOOL"),
        ]
        if images:
            inputs.append(self._tensor("image", np.array([images], dtype=np.object_), "BYTES"))
        self.client.async_stream_infer(self.model, inputs)
        result, error = self.results.get(timeout=120)
        if error is not None:
            raise RuntimeError(error)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


class ViaFrontend:
    """POST /v1/chat/completions on one keep-alive connection (http.client: a lean client, so that the figure
    is the server's cost rather than the client library's; httpx adds about 1 ms per request here)."""

    def __init__(self, base_url: str, model: str):
        self.model = model
        url = urlsplit(base_url)
        self.http = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=120)

    def __call__(self, messages: list, images: list[bytes]) -> None:
        content = []
        for part in messages[0]["content"]:
            if part["type"] == "image":
                data = images[len([p for p in content if p["type"] == "image_url"])]
                url = "data:image/png;base64," + base64.b64encode(data).decode()
                content.append({"type": "image_url", "image_url": {"url": url}})
            else:
                content.append(part)
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
                "ignore_eos": True}  # fmt: skip
        self.http.request("POST", "/v1/chat/completions", body=json.dumps(body),
                          headers={"Content-Type": "application/json"})  # fmt: skip
        response = self.http.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")

    def close(self) -> None:
        self.http.close()


def measure(paths: dict, workload: tuple[list, list[bytes]], requests: int, warmup: int) -> dict[str, list[float]]:
    messages, images = workload
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(warmup + requests):
        order = list(paths.items()) if i % 2 == 0 else list(reversed(paths.items()))
        for name, send in order:
            start = time.perf_counter()
            send(messages, images)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times)
    return {"p50_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "mean_ms": statistics.fmean(ms)}


@contextlib.contextmanager
def local_stack(model: str):
    """tritonserver (CPU config, tiny random checkpoint) and the frontend on free ports."""
    from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint
    from minicpmv_triton.launcher import TritonServer
    from openai_frontend.launcher import FrontendProcess as Frontend

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0, int4=model.endswith("int4"))
        env = {f"MINICPMV_CHECKPOINT_{model.upper()}": str(checkpoint), "MINICPMV_DTYPE": "float32",
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        triton = TritonServer(ROOT / "model_repository", models=[model], extra_env=env, address="127.0.0.1",
                              extra_args=["--model-config-name=cpu"], exit_timeout=10)  # fmt: skip
        triton.start()
        try:
            triton.wait_ready(timeout=300)
            frontend = Frontend(triton.grpc_url, triton.http_url).start(ready=True, timeout=60)
            try:
                yield frontend.base_url, triton.grpc_url
            finally:
                frontend.stop()
        finally:
            triton.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="measured requests per path and workload")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--model", default="minicpm_v_2_6")
    parser.add_argument("--base-url", help="a running frontend, e.g. http://localhost:9000 (with --triton-grpc-url)")
    parser.add_argument("--triton-grpc-url", help="the Triton behind it, e.g. localhost:8001")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--device-label", default="cpu", help="names the result files")
    args = parser.parse_args(argv)
    if bool(args.base_url) != bool(args.triton_grpc_url):
        parser.error("--base-url and --triton-grpc-url go together")

    from engine_throughput import hardware  # the sibling script (benchmarks/ is on sys.path)

    workloads = {
        "text": ([{"role": "user", "content": [{"type": "text", "text": "What is the total amount due?"}]}], []),
        "page": ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the total?"}]}],
                 [page_png()]),
    }  # fmt: skip
    stack = contextlib.nullcontext((args.base_url, args.triton_grpc_url)) if args.base_url else local_stack(args.model)
    results = {}
    with stack as (base_url, grpc_url):
        paths = {"frontend": ViaFrontend(base_url, args.model), "direct": Direct(grpc_url, args.model)}
        try:
            for name, workload in workloads.items():
                times = measure(paths, workload, args.requests, args.warmup)
                stats = {path: summarize(t) for path, t in times.items()}
                stats["overhead_p50_ms"] = stats["frontend"]["p50_ms"] - stats["direct"]["p50_ms"]
                results[name] = stats
                front, direct = stats["frontend"]["p50_ms"], stats["direct"]["p50_ms"]
                print(f"{name:5s} frontend p50 {front:7.2f} ms   direct p50 {direct:7.2f} ms   "
                      f"overhead p50 {front - direct:+.2f} ms")
        finally:
            for path in paths.values():
                path.close()

    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "hardware": hardware(),
              "model": args.model, "requests": args.requests, "max_tokens": 1, "results": results,
              "stack": "given" if args.base_url else "local tiny checkpoint, CPU"}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"frontend_overhead_{args.device_label}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Frontend overhead, {report['date']}, {report['hardware']['cpu_model']}, model {args.model}, "
             f"{args.requests} requests per path, 1 output token", "",
             "| workload | frontend p50 (ms) | direct p50 (ms) | overhead p50 (ms) | frontend p90 | direct p90 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in results.items():
        f, d = s["frontend"], s["direct"]
        lines.append(f"| {name} | {f['p50_ms']:.2f} | {d['p50_ms']:.2f} | {s['overhead_p50_ms']:+.2f} | "
                     f"{f['p90_ms']:.2f} | {d['p90_ms']:.2f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
