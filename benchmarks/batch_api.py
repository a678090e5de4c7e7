#!/usr/bin/env python3
"""Batch API benchmark: a batch's throughput next to the same requests sent concurrently by a client, and the
time to first token (TTFT) of interactive requests while a batch runs next to an idle server's.

1. client: N chat requests (distinct prompts, exactly ``--max-tokens`` tokens each: ``ignore_eos``), sent by
   C client tasks in a closed loop straight to ``/v1/chat/completions``; requests/s over the wall time.
2. batch: the same N requests as one JSONL file, uploaded (``client.files.create``), then a batch created and
   polled every 0.1 s until completed; requests/s from the create call to the first poll that sees
   "completed" (upload time reported apart). The runner's concurrency (``BATCH_CONCURRENCY``) is C too.
   Steps 1 and 2 alternate ``--rounds`` times; the ratio is over the totals. Target: batch / client >= 0.8.
3. TTFT idle: K streaming interactive requests one after the other on the idle server (p50, p90).
4. TTFT during a batch: the same K requests while a batch of ``--busy-lines`` lines runs (cancelled after).
   Target: p50 during / p50 idle <= 2. With ``--no-priority-run`` (default on) step 4 is repeated on a
   second frontend whose runner does not yield to interactive traffic (BATCH_CONCURRENCY_BUSY = C), to show
   what the priority rule buys. Steps 3 and 4 alternate ``--ttft-rounds`` times.

By default it writes a tiny random checkpoint, starts tritonserver (CPU config, float32) and the frontend on
free ports; ``--device gpu --checkpoint DIR`` measures a real model. Results: benchmarks/results/
batch_api_<label>.json and .md; the figures are printed too.

    .venv/bin/python benchmarks/batch_api.py                      # CPU, tiny checkpoint: about 4 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results"


def bodies(n: int, model: str, max_tokens: int, tag: str) -> list[dict]:
    return [{"model": model, "messages": [{"role": "user", "content": f"Request {tag}-{i}: summarise item {i}."}],
             "max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
            for i in range(n)]  # fmt: skip


async def client_run(base_url: str, requests: list[dict], concurrency: int) -> float:
    """Seconds to send all requests with ``concurrency`` closed-loop client tasks."""
    pending = list(requests)
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:

        async def worker() -> None:
            while pending:
                r = await http.post("/v1/chat/completions", json=pending.pop())
                r.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


def jsonl(requests: list[dict], tag: str) -> bytes:
    return "".join(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": body}) + "\n" for i, body in enumerate(requests)).encode()  # fmt: skip


def batch_run(client: openai.OpenAI, requests: list[dict]) -> dict:
    start = time.perf_counter()
    file = client.files.create(file=("bench.jsonl", jsonl(requests, "t")), purpose="batch")
    uploaded = time.perf_counter()
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    done = time.perf_counter()
    assert batch.status == "completed" and batch.request_counts.completed == len(requests), batch
    return {"upload_s": uploaded - start, "run_s": done - uploaded}


async def ttft(base_url: str, body: dict) -> float:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        start = time.perf_counter()
        async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            r.raise_for_status()
            first = None
            async for raw in r.aiter_lines():
                if first is None and raw.startswith("data: {"):
                    delta = json.loads(raw[6:])["choices"]
                    if delta and delta[0]["delta"].get("content"):
                        first = time.perf_counter() - start
        return first


def ttfts(base_url: str, requests: list[dict]) -> list[float]:
    return [asyncio.run(ttft(base_url, body)) for body in requests]


def stats(values: list[float]) -> dict:
    ms = sorted(v * 1000 for v in values)
    return {"p50_ms": round(statistics.median(ms), 1), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1),
            "mean_ms": round(statistics.fmean(ms), 1), "n": len(ms)}  # fmt: skip


def ttft_during_batch(client: openai.OpenAI, base_url: str, lines: list[dict], interactive: list[dict]) -> dict:
    """TTFTs of the interactive requests sent one after the other while a batch runs (cancelled after)."""
    file = client.files.create(file=("busy.jsonl", jsonl(lines, "busy")), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    while client.batches.retrieve(batch.id).request_counts.completed < 2:
        time.sleep(0.05)
    times = ttfts(base_url, interactive)
    still = client.batches.retrieve(batch.id)
    client.batches.cancel(batch.id)
    while client.batches.retrieve(batch.id).status != "cancelled":
        time.sleep(0.1)
    assert still.status == "in_progress", "the batch ended before the interactive requests did: raise --busy-lines"
    return {"times": times, "lines_done": still.request_counts.completed}


@contextlib.contextmanager
def local_triton(args: argparse.Namespace, workdir: Path):
    from minicpmv_triton.launcher import TritonServer

    checkpoint = args.checkpoint
    if checkpoint is None:
        from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint

        checkpoint = write_tiny_checkpoint(workdir / "tiny", seed=0, int4=args.model.endswith("int4"))
    env = {f"MINICPMV_CHECKPOINT_{args.model.upper()}": str(checkpoint), "OMP_NUM_THREADS": str(os.cpu_count())}
    extra = []
    if args.device == "cpu":
        env["MINICPMV_DTYPE"] = "float32"
        extra = ["--model-config-name=cpu"]
    with TritonServer(ROOT / "model_repository", models=[args.model], extra_env=env, address="127.0.0.1",
                      extra_args=extra, exit_timeout=10) as triton:  # fmt: skip
        triton.wait_ready(timeout=600)
        yield triton


def frontend(triton, data_dir: Path, concurrency: int, busy: int):
    from openai_frontend.launcher import FrontendProcess

    return FrontendProcess(triton.grpc_url, triton.http_url, batch_data_dir=data_dir, batch_concurrency=concurrency,
                           batch_concurrency_busy=busy).start(ready=True, timeout=120)  # fmt: skip


def hardware() -> dict:
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu_model": model, "cpu_cores": os.cpu_count(), "python": platform.python_version()}


def _secs(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def render(report: dict) -> str:
    c, t = report["throughput"], report["ttft"]
    lines = [f"# Batch API benchmark ({report['date']}, {report['label']})", "",
             f"{report['setup']}", "",
             "| throughput | requests | seconds | requests/s |", "|---|---|---|---|",
             f"| client, {c['concurrency']} concurrent | {c['requests']} | {c['client_s']:.2f} "
             f"| {c['client_rps']:.2f} |",
             f"| batch (runner concurrency {c['concurrency']}) | {c['requests']} | {c['batch_run_s']:.2f} "
             f"| {c['batch_rps']:.2f} |",
             "", f"batch / client: **{c['ratio']:.2f}x** (target >= 0.8); {c['rounds']} alternating rounds, per round "
             f"client {_secs(c['client_s_per_round'])} s, batch {_secs(c['batch_s_per_round'])} s; uploads took "
             f"{c['upload_s']:.2f} s in all", "",
             "| interactive TTFT | p50 ms | p90 ms | mean ms | n |", "|---|---|---|---|---|"]  # fmt: skip
    for name, row in t["rows"].items():
        lines.append(f"| {name} | {row['p50_ms']} | {row['p90_ms']} | {row['mean_ms']} | {row['n']} |")
    lines += ["", f"during a batch / idle (p50): **{t['ratio']:.2f}x** (target <= 2); {t['rounds']} alternating rounds",
              "", "load average (1, 5, 15 min) before / after: " + " / ".join(
                  ", ".join(f"{x:.1f}" for x in la) for la in report["load_average_before_after"])]
    if "ratio_no_priority" in t:
        lines.append(f"without the runner yielding to interactive requests: {t['ratio_no_priority']:.2f}x")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minicpm_v_2_6")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--checkpoint", help="a real checkpoint directory (default: a tiny random one)")
    parser.add_argument("--requests", type=int, default=96, help="N requests for the throughput comparison")
    parser.add_argument("--rounds", type=int, default=3, help="client and batch runs, alternating")
    parser.add_argument("--concurrency", type=int, default=8, help="client tasks = the runner's concurrency")
    parser.add_argument("--busy", type=int, default=2, help="BATCH_CONCURRENCY_BUSY of the frontend")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--interactive", type=int, default=12, help="K interactive requests per TTFT round")
    parser.add_argument("--ttft-rounds", type=int, default=3, help="rounds of idle / during / without priority")
    parser.add_argument("--busy-lines", type=int, default=2000, help="lines of the batch running during TTFT")
    parser.add_argument("--no-priority-run", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--label", default=None, help="names the result files (default: the device)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    label = args.label or args.device
    C = args.concurrency
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, local_triton(args, Path(tmp)) as triton:
        fe = frontend(triton, Path(tmp) / "data", C, args.busy)
        # The same runner without the priority rule (BATCH_CONCURRENCY_BUSY = C), on the same tritonserver.
        fe_np = frontend(triton, Path(tmp) / "data2", C, C) if args.no_priority_run else None
        try:
            client = openai.OpenAI(base_url=fe.base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
            asyncio.run(client_run(fe.base_url, bodies(8, args.model, args.max_tokens, "warm"), C))  # warm-up
            client_times, batch_times, upload_times = [], [], []
            for r in range(args.rounds):  # alternating, so that load from elsewhere hits both alike
                client_times.append(asyncio.run(client_run(
                    fe.base_url, bodies(args.requests, args.model, args.max_tokens, f"c{r}"), C)))  # fmt: skip
                batch = batch_run(client, bodies(args.requests, args.model, args.max_tokens, f"b{r}"))
                batch_times.append(batch["run_s"])
                upload_times.append(batch["upload_s"])
            interactive = bodies(args.interactive, args.model, args.max_tokens, "i")
            busy_lines = bodies(args.busy_lines, args.model, args.max_tokens, "busy")
            idle, during, no_priority = [], [], []
            for _ in range(args.ttft_rounds):  # idle, during a batch, (without priority): alternating
                idle += ttfts(fe.base_url, interactive)
                during += ttft_during_batch(client, fe.base_url, busy_lines, interactive)["times"]
                if fe_np is not None:
                    client_np = openai.OpenAI(base_url=fe_np.base_url + "/v1", api_key="unused", max_retries=0,
                                              timeout=600)  # fmt: skip
                    no_priority += ttft_during_batch(client_np, fe_np.base_url, busy_lines, interactive)["times"]
        finally:
            fe.stop()
            if fe_np is not None:
                fe_np.stop()
    rows = {"idle": stats(idle), f"during a batch (runner {C}, {args.busy} while interactive)": stats(during)}
    ratio_np = None
    if no_priority:
        rows[f"during a batch, runner not yielding ({C} always)"] = stats(no_priority)
        ratio_np = stats(no_priority)["p50_ms"] / rows["idle"]["p50_ms"]
    client_s, batch_s = sum(client_times), sum(batch_times)
    client_rps, batch_rps = len(client_times) * args.requests / client_s, len(batch_times) * args.requests / batch_s
    report = {
        "date": dt.date.today().isoformat(), "label": label, "hardware": hardware(),
        "args": vars(args) | {"out": str(args.out)},
        "setup": f"{args.model} ({'tiny random-weight checkpoint' if args.checkpoint is None else args.checkpoint}), "
                 f"{args.device}, {os.cpu_count()} cores; text requests of exactly {args.max_tokens} output tokens",
        "throughput": {"requests": args.requests * args.rounds, "concurrency": C, "client_s": client_s,
                       "client_rps": client_rps, "batch_run_s": batch_s, "upload_s": sum(upload_times),
                       "batch_rps": batch_rps, "ratio": batch_rps / client_rps, "rounds": args.rounds,
                       "client_s_per_round": client_times, "batch_s_per_round": batch_times},
        "ttft": {"rows": rows, "ratio": stats(during)["p50_ms"] / rows["idle"]["p50_ms"], "rounds": args.ttft_rounds},
        "load_average_before_after": [load_before, os.getloadavg()],
    }  # fmt: skip
    if ratio_np is not None:
        report["ttft"]["ratio_no_priority"] = ratio_np
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"batch_api_{label}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = render(report)
    (args.out / f"batch_api_{label}.md").write_text(text)
    print(text)
    print(f"written: {args.out / f'batch_api_{label}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
