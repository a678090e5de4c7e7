#!/usr/bin/env python3
"""Affinity benchmark: a follow-up question about a page, with the balancer's document affinity on and off
(openai_frontend/balancer.py, issue 27).

Two tritonservers (CPU config, float32, the same tiny random checkpoint; ``--engine-threads`` each) and two
frontends over both of them, started here on free ports: one with ``BALANCER_AFFINITY=true``, one with ``false``
(otherwise alike). Per page (``--pages``, a different synthetic 1344x1344 document page each, as
benchmarks/serving.py draws them, never sent to both frontends) and per frontend, two streaming requests in turn:

* the first question: [system, user(page, question 1)];
* the follow-up: [system, user(page, question 1), assistant(the first answer), user(question 2)]: same image, same
  leading messages, another last question, as a chat client sends it.

The frontends alternate page by page (which one goes first alternates too), one request at a time with
``--pause`` seconds between requests, so both see the same machine. Figures per request: TTFT (sent -> first
content delta, client side), the server it went to (the frontend's /health/ready per-server counts) and the
prefix-cache hit tokens there (Triton's ``minicpmv_prefix_cache_hits_total``). Reported per mode: median TTFT of
first questions and of follow-ups, the median over pages of follow-up TTFT / first-question TTFT, and how many
follow-ups went to the first question's server. With affinity the follow-up finds the page in that server's vision
cache and its tokens in the prefix cache; without, the least-loaded choice alternates idle servers, so it goes to
the other one and starts from nothing.

    .venv/bin/python benchmarks/affinity.py [--pages 8] [--out benchmarks/results] [--label cpu]

Results: ``benchmarks/results/affinity_<label>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_OUT = ROOT / "benchmarks" / "results"
MODEL = "minicpm_v_2_6"
SYSTEM = "You read scanned business documents and answer questions about them precisely."
FIRST = "What is this page about? Give its title and the main figures."
FOLLOW_UPS = ("Which region reports the largest figure?", "What is the total in the last row of the table?",
              "List every number in the table.", "Summarise the numbered lines in two sentences.")  # fmt: skip
HITS = "minicpmv_prefix_cache_hits_total"
MODES = ("on", "off")


# ---------------------------------------------------------------- the stack


@contextlib.contextmanager
def stack(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[dict[str, str], list[str]]]:
    """Two tritonservers and two frontends over both. Yields {mode: frontend base URL} and the servers' metrics
    URLs (in the frontends' endpoint order)."""
    from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint
    from minicpmv_triton.launcher import TritonServer
    from openai_frontend.launcher import FrontendProcess

    checkpoint = write_tiny_checkpoint(workdir / "tiny", seed=0)
    env = {f"MINICPMV_CHECKPOINT_{MODEL.upper()}": str(checkpoint), "MINICPMV_DEVICE": "cpu",
           "MINICPMV_DTYPE": "float32", "OMP_NUM_THREADS": str(args.engine_threads)}  # fmt: skip
    with contextlib.ExitStack() as stop:
        servers = []
        for k in range(2):
            triton = TritonServer(ROOT / "model_repository", models=[MODEL], extra_env=env, address="127.0.0.1",
                                  extra_args=["--model-config-name=cpu"], exit_timeout=10,
                                  log_path=workdir / f"tritonserver-{k}.log")  # fmt: skip
            servers.append(stop.enter_context(triton))
        for triton in servers:
            triton.wait_ready(timeout=args.startup_timeout)
        grpc, http = (",".join(getattr(t, attr) for t in servers) for attr in ("grpc_url", "http_url"))
        frontends = {}
        for mode in MODES:
            fe = FrontendProcess(grpc, http, models=MODEL, balancer_affinity=str(mode == "on").lower(),
                                 balancer_load_factor=args.load_factor).start(ready=True, timeout=120)  # fmt: skip
            stop.callback(fe.stop)
            frontends[mode] = fe.base_url
        yield frontends, [t.metrics_url for t in servers]


# ---------------------------------------------------------------- requests


def page_url(index: int) -> str:
    from serving import data_url, document_page

    return data_url(document_page(index))


def conversation(page: str, answer: str | None, follow_up: str) -> list[dict[str, Any]]:
    first = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": page}},
                                         {"type": "text", "text": FIRST}]}  # fmt: skip
    messages = [{"role": "system", "content": SYSTEM}, first]
    if answer is not None:
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
    return messages


def stream_chat(http: httpx.Client, base_url: str, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """One streaming request read to its end: TTFT (sent -> first non-empty content delta), the answer, usage."""
    body = {"model": MODEL, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "repetition_penalty": 1.0}  # fmt: skip
    start, first, text, usage = time.perf_counter(), None, [], {}
    with http.stream("POST", base_url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            delta = event["choices"][0]["delta"].get("content") if event.get("choices") else None
            if delta:
                first = first or time.perf_counter()
                text.append(delta)
            usage = event.get("usage") or usage
    if first is None:
        raise RuntimeError("the stream had no content")
    return {"ttft_s": first - start, "answer": "".join(text), "prompt_tokens": usage.get("prompt_tokens")}


def served(http: httpx.Client, base_url: str) -> dict[str, int]:
    """Requests each Triton server has taken from this frontend (its /health/ready)."""
    body = http.get(base_url + "/health/ready", timeout=30).json()
    return {e["endpoint"]: e["requests"] for e in body.get("triton", [])}


def prefix_hits(http: httpx.Client, metrics_url: str) -> float:
    total = 0.0
    for line in http.get(metrics_url, timeout=30).text.splitlines():
        if line.startswith(HITS + "{") or line.startswith(HITS + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def measured(http: httpx.Client, base_url: str, metrics: list[str], messages, max_tokens: int) -> dict[str, Any]:
    """One request between two looks at where requests went and at the servers' prefix-cache hits."""
    before, hits = served(http, base_url), [prefix_hits(http, m) for m in metrics]
    row = stream_chat(http, base_url, messages, max_tokens)
    time.sleep(0.3)  # the engines' counters reach Triton's metrics every 50 ms
    after = served(http, base_url)
    (row["server"],) = [name for name in after if after[name] != before.get(name, 0)]
    row["prefix_cache_hit_tokens"] = int(sum(prefix_hits(http, m) for m in metrics) - sum(hits))
    return row


def run_page(http, base_url: str, metrics: list[str], index: int, args) -> dict[str, Any]:
    page = page_url(index)
    first = measured(http, base_url, metrics, conversation(page, None, ""), args.max_tokens)
    time.sleep(args.pause)
    question = FOLLOW_UPS[index % len(FOLLOW_UPS)]
    follow = measured(http, base_url, metrics, conversation(page, first.pop("answer"), question), args.max_tokens)
    follow.pop("answer")
    return {"page": index, "first": first, "follow_up": follow, "ratio": follow["ttft_s"] / first["ttft_s"],
            "same_server": follow["server"] == first["server"]}


# ---------------------------------------------------------------- reports


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    med = statistics.median
    return {"pages": len(rows), "first_ttft_s": med(r["first"]["ttft_s"] for r in rows),
            "follow_up_ttft_s": med(r["follow_up"]["ttft_s"] for r in rows),
            "ratio_median": med(r["ratio"] for r in rows), "ratio_min": min(r["ratio"] for r in rows),
            "ratio_max": max(r["ratio"] for r in rows),
            "follow_ups_on_first_server": sum(r["same_server"] for r in rows),
            "first_prompt_tokens": med(r["first"]["prompt_tokens"] for r in rows),
            "follow_up_prompt_tokens": med(r["follow_up"]["prompt_tokens"] for r in rows),
            "follow_up_prefix_cache_hit_tokens": med(r["follow_up"]["prefix_cache_hit_tokens"] for r in rows),
            }  # fmt: skip


def table(report: dict[str, Any]) -> str:
    lines = ["| affinity | pages | first TTFT s | follow-up TTFT s | follow-up / first (median, min-max) "
             "| follow-ups on the first's server | prompt tokens first / follow-up | follow-up prefix-cache hits |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode in MODES:
        s = report["summary"][mode]
        lines.append(f"| {mode} | {s['pages']} | {s['first_ttft_s']:.3f} | {s['follow_up_ttft_s']:.3f} "
                     f"| **{s['ratio_median']:.2f}** ({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) "
                     f"| {s['follow_ups_on_first_server']}/{s['pages']} | {s['first_prompt_tokens']:.0f} / "
                     f"{s['follow_up_prompt_tokens']:.0f} | {s['follow_up_prefix_cache_hit_tokens']:.0f} |")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    return "\n".join([
        f"# Affinity benchmark ({report['label']}, {report['date']})", "",
        f"Command: `{report['command']}`. Runtime {report['runtime_s']} s. Hardware: {hw['cpu_model']}, "
        f"{hw['usable_cores']} usable cores. Load average (1, 5, 15 min) at the start / end: "
        + " / ".join(", ".join(f"{x:.1f}" for x in load) for load in report["load_average_start_end"]) + ".", "",
        f"{report['setup']}", "", table(report), "",
    ])  # fmt: skip


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--pages", type=int, default=8, help="pages per mode (default: 8)")
    add("--max-tokens", type=int, default=8, help="output tokens of each answer (default: 8)")
    add("--pause", type=float, default=0.5, help="seconds between requests (default: 0.5)")
    add("--engine-threads", type=int, default=1, help="OMP_NUM_THREADS of each tritonserver (default: 1)")
    add("--load-factor", type=float, default=1.25, help="BALANCER_LOAD_FACTOR of both frontends")
    add("--startup-timeout", type=float, default=900.0)
    add("--out", type=Path, default=DEFAULT_OUT)
    add("--label", default="cpu", help="names the result files affinity_<label> (default: cpu)")
    args = parser.parse_args(argv)
    if args.pages < 1 or args.max_tokens < 1:
        parser.error("--pages and --max-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from serving import hardware

    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()
    rows: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="minicpmv-affinity-bench-") as tmp:
        print("starting two tritonservers and two frontends ...", flush=True)
        with stack(args, Path(tmp)) as (frontends, metrics), httpx.Client(timeout=httpx.Timeout(600.0)) as http:
            print(f"stack ready after {time.perf_counter() - started:.1f} s; warming up", flush=True)
            for k, mode in enumerate(MODES):  # both servers through both frontends: first-request costs
                for j in range(2):
                    run_page(http, frontends[mode], metrics, 9000 + 2 * k + j, args)
            for i in range(args.pages):
                order = MODES if i % 2 == 0 else MODES[::-1]
                for mode in order:
                    time.sleep(args.pause)
                    index = i if mode == "on" else 1000 + i  # no page is sent to both frontends
                    row = run_page(http, frontends[mode], metrics, index, args)
                    rows[mode].append(row)
                    print(f"  page {i} affinity {mode:3s}: first TTFT {row['first']['ttft_s']:.3f} s on "
                          f"{row['first']['server']}, follow-up {row['follow_up']['ttft_s']:.3f} s on "
                          f"{row['follow_up']['server']} (ratio {row['ratio']:.2f}, prefix-cache hits "
                          f"{row['follow_up']['prefix_cache_hit_tokens']})", flush=True)
    runtime = time.perf_counter() - started
    report = {
        "benchmark": "affinity", "label": args.label,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/affinity.py", *(sys.argv[1:] if argv is None else argv)]),
        "hardware": hardware(),
        "load_average_start_end": [[round(x, 2) for x in load] for load in (load_start, os.getloadavg())],
        "setup": f"Two tritonservers (CPU config, float32, tiny random checkpoint, OMP_NUM_THREADS="
                 f"{args.engine_threads} each) behind two frontends over both (affinity on / off, load factor "
                 f"{args.load_factor}); per page a first question [system, user(page, question)] and a follow-up "
                 f"[system, user(page, question), assistant(answer), user(another question)], {args.max_tokens} "
                 f"output tokens each, temperature 0, one request at a time, {args.pause} s apart; synthetic "
                 "1344x1344 pages (benchmarks/serving.py), a different one for every request pair.",
        "settings": {"pages": args.pages, "max_tokens": args.max_tokens, "pause_s": args.pause,
                     "engine_threads": args.engine_threads, "load_factor": args.load_factor, "model": MODEL},
        "runtime_s": round(runtime, 1),
        "summary": {mode: summary(rows[mode]) for mode in MODES}, "rows": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"affinity_{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    print("\n" + table(report))
    print(f"\ntotal runtime {runtime:.1f} s; wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
