#!/usr/bin/env python3
"""Soak test: N minutes of C concurrent clients against the OpenAI frontend, with the faults a server meets.

Each client loops until the time is up, picking for every request: a bad input (``--bad``, 5%: a broken image,
a prompt over the context length, an unknown field, an unknown model, each with the status it must get), a
stream the client leaves after a few chunks (``--disconnect``, 10%), else a stream or a non-stream (half each;
some with a small page image, some non-streams with n=2). Unless ``--no-restart``, tritonserver is killed
(SIGKILL) at ``--restart-at`` of the run and started again on the same ports; the frontend must reconnect.

Every request ends in one of: completed; disconnected (left on purpose after its chunks); expected failure
(a bad input with its status, or any failure of a request that overlapped the outage: from the kill to
``--grace`` s after the frontend is ready again); unexpected failure (anything else). After a failure (not a bad
input) a client waits 0.5 s before its next request, as a client would. Reported: those counts,
p50/p99 latency of completed requests (and time to first token of streams), the resident memory (RSS) of the
frontend's and Triton's process trees (tritonserver with its Python-backend stubs) at the start, every 15 s
and at the end, and Triton's pending requests plus the engines' waiting and running requests at the end.

Without ``--base-url`` it starts the demo stack itself, as ``scripts/serve.sh --demo`` runs it: tiny
random-weight checkpoints of both models, tritonserver (CPU config, float32) and the frontend on free ports.
(serve.sh itself stops everything when tritonserver dies, so the restart needs the parts started here.) With
``--base-url`` (and ``--triton-metrics-url``) it soaks a running stack, without the restart.

    .venv/bin/python benchmarks/soak.py --minutes 3 --concurrency 8        # writes benchmarks/results/soak_cpu.*
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_stack import LocalStack, frontend_ready, listening_pid, scrape, tree_rss  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
MODELS = ("minicpm_v_2_6", "minicpm_v_2_6_int4")
CATEGORIES = ("completed", "disconnected", "expected_failure", "unexpected_failure")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the clients run (default 10)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--disconnect", type=float, default=0.10, help="share of requests left mid-stream (0.10)")
    p.add_argument("--bad", type=float, default=0.05, help="share of bad inputs (0.05)")
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens per answer (default 32)")
    p.add_argument("--restart-at", type=float, default=0.5, help="when to kill tritonserver, a share of the run")
    p.add_argument("--no-restart", action="store_true", help="do not kill and restart tritonserver")
    p.add_argument("--grace", type=float, default=10.0, help="seconds after recovery still counted as outage")
    p.add_argument("--base-url", help="a running frontend, e.g. http://127.0.0.1:9000 (default: start the stack)")
    p.add_argument("--triton-metrics-url", help="with --base-url: Triton's metrics, e.g. http://127.0.0.1:8002/metrics")
    p.add_argument("--models", default=",".join(MODELS), help="models to send requests to (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="cpu", help="results file suffix (default cpu)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.max_tokens < 4:
        p.error("--minutes must be > 0, --concurrency >= 1, --max-tokens >= 4")
    if not (0 <= args.disconnect <= 1 and 0 <= args.bad <= 1 and args.disconnect + args.bad <= 1):
        p.error("--disconnect and --bad are shares between 0 and 1 that add up to at most 1")
    if not 0 < args.restart_at < 1:
        p.error("--restart-at is a share of the run between 0 and 1")
    if args.base_url:
        args.no_restart = True  # only a stack started here can be restarted here
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


# --- accounting ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # stream, nonstream, disconnect, bad
    started: float  # time.monotonic()
    ended: float
    ok: bool  # a full answer; for disconnect: the chunks it waited for; for bad: never
    status: int | None = None  # HTTP status (None: no response)
    expected_status: int | None = None  # for bad inputs
    error: str = ""
    ttft: float | None = None

    @property
    def latency(self) -> float:
        return self.ended - self.started


def classify(o: Outcome, outages: list[tuple[float, float]]) -> str:
    if o.kind == "bad" and o.status is not None and o.status == o.expected_status:
        return "expected_failure"
    if o.ok and o.kind != "bad":
        return "disconnected" if o.kind == "disconnect" else "completed"
    if any(o.started <= end and o.ended >= start for start, end in outages):
        return "expected_failure"  # it overlapped the outage
    return "unexpected_failure"


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    unexpected: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, outcomes: list[Outcome], outages: list[tuple[float, float]]) -> Tally:
        tally = cls()
        for o in outcomes:
            category = classify(o, outages)
            tally.counts[category] += 1
            kind = tally.by_kind.setdefault(o.kind, dict.fromkeys(CATEGORIES, 0))
            kind[category] += 1
            if category == "completed":
                tally.latencies.append(o.latency)
                if o.ttft is not None:
                    tally.ttfts.append(o.ttft)
            if category == "unexpected_failure" and len(tally.unexpected) < 20:
                tally.unexpected.append({"kind": o.kind, "status": o.status, "error": o.error[:300]})
        return tally

    def summary(self) -> dict:
        ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
        return {"requests": sum(self.counts.values()), **self.counts, "by_kind": self.by_kind,
                "latency_ms": {"p50": ms(percentile(self.latencies, 50)), "p99": ms(percentile(self.latencies, 99))},
                "ttft_ms": {"p50": ms(percentile(self.ttfts, 50)), "p99": ms(percentile(self.ttfts, 99))},
                "unexpected_examples": self.unexpected}  # fmt: skip


# --- the workload ----------------------------------------------------------------------------------------


def page_url() -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 200), "white")
    draw = ImageDraw.Draw(image)
    for i in range(6):
        draw.text((10, 10 + 30 * i), f"Item {i}   qty {i + 1}   {9.5 * i:.2f}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(rng: random.Random, models: list[str], max_tokens: int, image: str, i: int) -> dict:
    content: list[dict] = [{"type": "text", "text": f"Soak request {i}: what does item {rng.randint(0, 99)} cost?"}]
    if rng.random() < 0.15:
        content.insert(0, {"type": "image_url", "image_url": {"url": image, "detail": "low"}})
    return {"model": rng.choice(models), "messages": [{"role": "user", "content": content}],
            "max_tokens": rng.randint(max(4, max_tokens // 4), max_tokens), "ignore_eos": True,
            "temperature": 0.7, "seed": i}  # fmt: skip


BAD_INPUTS = (  # (what, change to a good body, the status it must get)
    ("broken image", lambda b: {**b, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}, 400),  # fmt: skip
    ("over the context length", lambda b: {**b, "max_tokens": 10**6}, 400),
    ("unknown field", lambda b: {**b, "no_such_field": 1}, 400),
    ("unknown model", lambda b: {**b, "model": "no-such-model"}, 404),
)


async def read_stream(response: httpx.Response, o: Outcome, leave_after: int | None) -> None:
    chunks, finished = 0, False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            o.ok = finished
            return
        event = json.loads(data)
        if "error" in event:
            o.error = f"error event: {event['error'].get('message', '')}"
            return
        for choice in event.get("choices", []):
            if choice.get("delta", {}).get("content"):
                chunks += 1
                if o.ttft is None:
                    o.ttft = time.monotonic() - o.started
            finished = finished or choice.get("finish_reason") is not None
        if leave_after is not None and chunks >= leave_after:
            o.ok = True
            return  # closing the response drops the connection: the server must cancel the request
    o.error = o.error or "the stream ended without [DONE]"


async def one_request(http: httpx.AsyncClient, rng: random.Random, args: argparse.Namespace, image: str,
                      i: int) -> Outcome:  # fmt: skip
    body = request_body(rng, args.models, args.max_tokens, image, i)
    roll = rng.random()
    if roll < args.bad:
        what, change, expected = BAD_INPUTS[i % len(BAD_INPUTS)]
        o = Outcome("bad", time.monotonic(), 0.0, False, expected_status=expected, error=what)
        body = change(body)
    elif roll < args.bad + args.disconnect:
        o = Outcome("disconnect", time.monotonic(), 0.0, False)
    else:
        o = Outcome("stream" if rng.random() < 0.5 else "nonstream", time.monotonic(), 0.0, False)
        if o.kind == "nonstream" and rng.random() < 0.1:
            body["n"] = 2
    stream = o.kind in ("stream", "disconnect") or (o.kind == "bad" and i % 2 == 0)
    try:
        if stream:
            async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                o.status = response.status_code
                if response.status_code == 200:
                    await read_stream(response, o, rng.randint(1, 3) if o.kind == "disconnect" else None)
                else:
                    o.error = (await response.aread()).decode(errors="replace")[:300]
        else:
            response = await http.post("/v1/chat/completions", json=body)
            o.status = response.status_code
            answer = response.json() if response.status_code == 200 else {}
            o.ok = response.status_code == 200 and all(c["message"]["content"] for c in answer["choices"])
            o.error = "" if o.ok else response.text[:300]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        o.error = f"{type(e).__name__}: {e}"
    o.ended = time.monotonic()
    return o


async def soak(args: argparse.Namespace, base_url: str, pids, metrics_url, restart) -> dict:
    """Runs the clients (and the restart); returns the raw results."""
    image = page_url()
    outcomes: list[Outcome] = []
    outages: list[tuple[float, float]] = []
    rss: list[dict] = []
    started = time.monotonic()
    deadline = started + args.minutes * 60

    def sample(tag: str) -> None:
        frontend, triton = pids()
        rss.append({"t_s": round(time.monotonic() - started, 1), "tag": tag,
                    "frontend_bytes": tree_rss(frontend), "triton_bytes": tree_rss(triton)})  # fmt: skip

    async def client(c: int) -> None:
        rng = random.Random(args.seed * 1000 + c)
        limits = httpx.Limits(max_connections=4)
        async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(180.0), limits=limits) as http:
            i = c
            while time.monotonic() < deadline:
                outcome = await one_request(http, rng, args, image, i)
                outcomes.append(outcome)
                i += args.concurrency
                if not outcome.ok and outcome.kind != "bad":
                    await asyncio.sleep(0.5)  # as a client does: no tight loop of retries while the server is down

    async def sampler() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(15)
            sample("during")

    async def fault() -> None:
        await asyncio.sleep(args.minutes * 60 * args.restart_at)
        down = time.monotonic()
        await asyncio.to_thread(restart)
        while not frontend_ready(base_url):
            await asyncio.sleep(0.2)
        outages.append((down, time.monotonic() + args.grace))

    sample("start")
    tasks = [client(c) for c in range(args.concurrency)] + [sampler()] + ([] if args.no_restart else [fault()])
    await asyncio.gather(*tasks)
    load_s = time.monotonic() - started
    settle_deadline = time.monotonic() + 30  # what the server still holds once the clients are done
    end_metrics = scrape(metrics_url)
    while any(end_metrics.values()) and time.monotonic() < settle_deadline:
        await asyncio.sleep(0.5)
        end_metrics = scrape(metrics_url)
    sample("end")
    return {"outcomes": outcomes, "outages": [(a - started, b - started) for a, b in outages], "rss": rss,
            "load_s": load_s, "end_metrics": end_metrics, "tally": Tally.of(outcomes, outages)}  # fmt: skip


def growth(rss: list[dict], key: str) -> float | None:
    first, last = rss[0][key], rss[-1][key]
    return None if not first or not last else round(100 * (last - first) / first, 1)


def report(args: argparse.Namespace, raw: dict) -> dict:
    summary = raw["tally"].summary()
    mb = lambda v: None if v is None else round(v / 2**20)  # noqa: E731
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "setup": {"minutes": args.minutes, "concurrency": args.concurrency, "disconnect": args.disconnect,
                  "bad": args.bad, "max_tokens": args.max_tokens, "models": args.models,
                  "stack": args.base_url or "started here (tiny random-weight checkpoints, CPU, float32)",
                  "cpus": os.cpu_count(), "restart": None if args.no_restart else args.restart_at},  # fmt: skip
        "load_seconds": round(raw["load_s"], 1),
        "outages_s": [[round(a, 1), round(b, 1)] for a, b in raw["outages"]],
        **summary,
        "rss_mb": [{**s, "frontend_bytes": mb(s["frontend_bytes"]), "triton_bytes": mb(s["triton_bytes"])}
                   for s in raw["rss"]],  # fmt: skip
        "rss_growth_percent": {"frontend": growth(raw["rss"], "frontend_bytes"),
                               "triton": growth(raw["rss"], "triton_bytes")},  # fmt: skip
        # From the first sample under load (15 s in) to the end: what is left once the caches are warm.
        "rss_growth_after_warmup_percent": {"frontend": growth(raw["rss"][1:], "frontend_bytes"),
                                            "triton": growth(raw["rss"][1:], "triton_bytes")},  # fmt: skip
        "end": raw["end_metrics"],
    }


def markdown(r: dict) -> str:
    rss, grown, warm = r["rss_mb"], r["rss_growth_percent"], r["rss_growth_after_warmup_percent"]
    pct = lambda v: "n/a" if v is None else f"{v}%"  # noqa: E731
    lines = [f"# Soak, {r['date']}", "", f"Setup: {json.dumps(r['setup'])}", "",
             "| requests | completed | disconnected | expected failures | unexpected failures | p50 ms | p99 ms "
             "| TTFT p50 ms | TTFT p99 ms |", "|---|---|---|---|---|---|---|---|---|",
             f"| {r['requests']} | {r['completed']} | {r['disconnected']} | {r['expected_failure']} "
             f"| {r['unexpected_failure']} | {r['latency_ms']['p50']} | {r['latency_ms']['p99']} "
             f"| {r['ttft_ms']['p50']} | {r['ttft_ms']['p99']} |", "",
             f"Outage (tritonserver killed, s from the start): {r['outages_s'] or 'none'}", "",
             "| RSS (MB) | start | end | growth | growth after warm-up |", "|---|---|---|---|---|",
             f"| frontend | {rss[0]['frontend_bytes']} | {rss[-1]['frontend_bytes']} "
             f"| {pct(grown['frontend'])} | {pct(warm['frontend'])} |",
             f"| Triton (tritonserver + stubs) | {rss[0]['triton_bytes']} | {rss[-1]['triton_bytes']} "
             f"| {pct(grown['triton'])} | {pct(warm['triton'])} |", "",
             "(After a restart, Triton's end figure is the new server's.)", "",
             f"At the end: {json.dumps(r['end'])}", ""]  # fmt: skip
    if r["unexpected_examples"]:
        lines += ["Unexpected failures (first ones):", ""] + [f"- {json.dumps(e)}" for e in r["unexpected_examples"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stack = None
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        try:
            if args.base_url:
                base_url, metrics_url = args.base_url.rstrip("/"), args.triton_metrics_url
                fixed = (listening_pid(base_url), listening_pid(metrics_url) if metrics_url else None)
                pids, restart = (lambda: fixed), None
            else:
                print("starting the demo stack (tiny checkpoints, tritonserver, frontend)...", file=sys.stderr)
                stack = LocalStack(args.models, Path(workdir))
                base_url, metrics_url = stack.frontend.base_url, stack.triton.metrics_url
                pids = lambda: (stack.frontend.process.pid, stack.triton.process.pid)  # noqa: E731
                restart = stack.kill_and_restart_triton
            print(f"soaking {base_url} for {args.minutes:g} min at {args.concurrency} clients...", file=sys.stderr)
            raw = asyncio.run(soak(args, base_url, pids, metrics_url, restart))
        finally:
            if stack is not None:
                stack.stop()
    result = report(args, raw)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"soak_{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"soak_{args.label}.md").write_text(markdown(result))
    print(markdown(result))
    return 1 if result["unexpected_failure"] else 0


if __name__ == "__main__":
    sys.exit(main())
