#!/usr/bin/env python3
"""Engine-core benchmark on the demo stack (tritonserver + openai_frontend, tiny checkpoint, CPU config).

Two measurements of what the KV pool, the prefix cache and chunked prefill are for:

* follow-up: a question about a 1344x1344 page, then a second turn about the same page (the first
  question, the model's answer, a new question). Time to first token of each, over several pages; the
  ratio second / first (target: at most 0.2), and the prefix-cache hit tokens from Triton's metrics.
* stall: 8 short streaming requests; the gaps between their tokens without, then with, a prompt as long as
  the context allows (~31k tokens) arriving mid-stream. Largest gap with it / median gap without it
  (target: at most 3; a prompt prefilled in one forward froze the streams for seconds).

Every request goes through the OpenAI endpoint with the official streaming protocol; times are taken on the
client (request sent -> content delta). Results: ``<out>/engine_core_cpu.json`` and ``.md``. About 2
minutes on a 2-core CPU.

    .venv/bin/python benchmarks/engine_core.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import platform
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
MODEL = "minicpm_v_2_6"


@contextlib.contextmanager
def demo_stack(workdir: Path, max_model_len: int | None):
    """The demo stack on free ports: tiny checkpoint, tritonserver (CPU config, float32), the frontend."""
    from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint
    from minicpmv_triton.launcher import TritonServer
    from openai_frontend.launcher import FrontendProcess

    checkpoint = write_tiny_checkpoint(workdir / "tiny", seed=0)
    env = {"MINICPMV_CHECKPOINT_MINICPM_V_2_6": str(checkpoint), "MINICPMV_DTYPE": "float32",
           "MINICPMV_DEVICE": "cpu", "OMP_NUM_THREADS": "2"}  # fmt: skip
    with TritonServer(ROOT / "model_repository", models=[MODEL], extra_env=env, exit_timeout=10,
                      extra_args=["--model-config-name=cpu"], address="127.0.0.1",
                      log_path=workdir / "tritonserver.log") as triton:  # fmt: skip
        triton.wait_ready(timeout=300)
        with FrontendProcess(triton.grpc_url, triton.http_url, models=MODEL) as frontend:
            yield frontend.base_url, triton.metrics_url, checkpoint


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf'^{name}{{[^}}]*model="{MODEL}"[^}}]*}} (\S+)$', text, re.M)]
    return sum(values)


async def stream(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, list[float], str]:
    """(send time, arrival times of the chunks that carry tokens, text) of one streamed request. A token whose
    text is held back (part of a UTF-8 character, a possible stop string) comes without content; with
    ``logprobs`` every token's chunk arrives, so the times are per token."""
    sent = time.perf_counter()
    stamps, text = [], []
    async with client.stream("POST", "/chat/completions", json=body | {"stream": True}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            choice = event["choices"][0] if event.get("choices") else {}
            content = choice.get("delta", {}).get("content")
            if content or choice.get("logprobs"):
                stamps.append(time.perf_counter())
                text.append(content or "")
    return sent, stamps, "".join(text)


def page_url(index: int) -> str:
    from serving import data_url, document_page  # the sibling script's synthetic 1344x1344 page

    return data_url(document_page(index))


async def follow_up(base_url: str, metrics_url: str, pages: int) -> dict[str, Any]:
    rows = []
    hits_name, queries_name = "minicpmv_prefix_cache_hits_total", "minicpmv_prefix_cache_queries_total"
    hits0, queries0 = metric(metrics_url, hits_name), metric(metrics_url, queries_name)
    async with httpx.AsyncClient(base_url=base_url + "/v1", timeout=600) as client:
        for index in range(pages):
            image = {"type": "image_url", "image_url": {"url": page_url(100 + index)}}
            first_turn = [{"role": "user", "content": [image, {"type": "text", "text": "What is the total?"}]}]
            body = {"model": MODEL, "max_tokens": 16, "temperature": 0}
            sent, stamps, answer = await stream(client, body | {"messages": first_turn})
            first = stamps[0] - sent
            hits = metric(metrics_url, hits_name)
            second_turn = [*first_turn, {"role": "assistant", "content": answer},
                           {"role": "user", "content": "And which region reports it?"}]  # fmt: skip
            sent, stamps, _ = await stream(client, body | {"messages": second_turn})
            rows.append({"page": index, "ttft_first_ms": round(1000 * first, 1),
                         "ttft_follow_up_ms": round(1000 * (stamps[0] - sent), 1),
                         "follow_up_hit_tokens": metric(metrics_url, hits_name) - hits})  # fmt: skip
    first = statistics.median(r["ttft_first_ms"] for r in rows)
    again = statistics.median(r["ttft_follow_up_ms"] for r in rows)
    return {"pages": rows, "ttft_first_median_ms": first, "ttft_follow_up_median_ms": again,
            "ratio": round(again / first, 3),
            "prefix_cache_hit_tokens": metric(metrics_url, hits_name) - hits0,
            "prefix_cache_query_tokens": metric(metrics_url, queries_name) - queries0}  # fmt: skip


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def long_prompt(checkpoint: Path, tokens: int) -> str:
    """Text of about ``tokens`` tokens for the checkpoint's tokenizer."""
    from minicpmv.tokenizer import load_tokenizer

    unit = "The quarterly report lists revenue, costs and risks. "
    return unit * (tokens // len(load_tokenizer(checkpoint).encode(unit, add_special_tokens=False)))


async def stall(base_url: str, checkpoint: Path, streams: int, long_tokens: int) -> dict[str, Any]:
    long_text = long_prompt(checkpoint, long_tokens)
    limits = httpx.Limits(max_connections=streams + 2)
    async with httpx.AsyncClient(base_url=base_url + "/v1", timeout=900, limits=limits) as client:

        def short(k: int) -> dict[str, Any]:
            return {"model": MODEL, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "logprobs": True,
                    "messages": [{"role": "user", "content": f"Tell story number {k}."}]}  # fmt: skip

        alone = await asyncio.gather(*(stream(client, short(k)) for k in range(streams)))
        baseline = [g for _, stamps, _ in alone for g in gaps(stamps)]

        async def long_request() -> tuple[float, list[float], str]:
            await asyncio.sleep(1.0)  # the short streams are decoding by then
            body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                    "messages": [{"role": "user", "content": long_text}]}  # fmt: skip
            return await stream(client, body)

        *together, (sent, long_stamps, _) = await asyncio.gather(
            *(stream(client, short(streams + k)) for k in range(streams)), long_request())
    during = [g for _, stamps, _ in together for g in gaps(stamps)]
    median = statistics.median(baseline)
    return {"streams": streams, "long_prompt_tokens_target": long_tokens,
            "median_gap_alone_ms": round(1000 * median, 2), "max_gap_alone_ms": round(1000 * max(baseline), 2),
            "median_gap_with_long_ms": round(1000 * statistics.median(during), 2),
            "max_gap_with_long_ms": round(1000 * max(during), 2),
            "ratio_max_with_long_to_median_alone": round(max(during) / median, 2),
            "long_prompt_ttft_s": round(long_stamps[0] - sent, 2)}  # fmt: skip


def engine_stall(checkpoint: Path, streams: int, long_tokens: int) -> dict[str, Any]:
    """The same measurement at engine level (in this process, no Triton, no HTTP), with the CPU config's
    engine settings: what the scheduler controls, without the other processes of the stack competing for
    the same two cores."""
    import threading

    import torch

    from minicpmv.engine.engine import Engine, EngineConfig
    from minicpmv.engine.request import GenerationRequest
    from minicpmv.engine.sampling_params import SamplingParams

    torch.set_num_threads(2)
    engine = Engine.from_pretrained(checkpoint, dtype="float32", config=EngineConfig(
        max_num_batched_tokens=512, max_prefill_attention_pairs=400_000, kv_cache_memory_mb=1024))  # fmt: skip
    long_text = long_prompt(checkpoint, long_tokens)

    def request(text: str, tokens: int) -> GenerationRequest:
        sampling = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        return GenerationRequest(f"stall-{time.monotonic_ns()}", messages=[{"role": "user", "content": text}],
                                 sampling=sampling)  # fmt: skip

    def run(with_long: bool) -> tuple[list[float], float | None]:
        stamps: list[list[float]] = [[] for _ in range(streams)]

        def consume(k: int) -> None:
            for _ in engine.submit(request(f"Tell story number {k}.", 200)):
                stamps[k].append(time.perf_counter())

        threads = [threading.Thread(target=consume, args=(k,)) for k in range(streams)]
        for thread in threads:
            thread.start()
        ttft = None
        if with_long:
            time.sleep(1.0)
            sent = time.perf_counter()
            handle = engine.submit(request(long_text, 4))
            first = next(iter(handle))
            ttft = time.perf_counter() - sent
            assert first.prompt_tokens > long_tokens // 2
            for _ in handle:
                pass
        for thread in threads:
            thread.join()
        return [g for s in stamps for g in gaps(s)], ttft

    try:
        alone, _ = run(False)
        during, ttft = run(True)
    finally:
        engine.shutdown()
    median = statistics.median(alone)
    return {"median_gap_alone_ms": round(1000 * median, 2), "max_gap_alone_ms": round(1000 * max(alone), 2),
            "median_gap_with_long_ms": round(1000 * statistics.median(during), 2),
            "max_gap_with_long_ms": round(1000 * max(during), 2),
            "ratio_max_with_long_to_median_alone": round(max(during) / median, 2),
            "long_prompt_ttft_s": round(ttft, 2)}  # fmt: skip


def render(report: dict[str, Any]) -> str:
    f, s = report["follow_up"], report["stall"]
    lines = [f"# Engine core on the demo stack, {report['date']}", "", report["hardware"], "",
             "## Follow-up question about the same page", "",
             f"Median time to first token: first question {f['ttft_first_median_ms']} ms, follow-up "
             f"{f['ttft_follow_up_median_ms']} ms: **{f['ratio']}x** (target <= 0.2). Prefix cache: "
             f"{f['prefix_cache_hit_tokens']:.0f} of {f['prefix_cache_query_tokens']:.0f} prompt tokens found.", "",
             "| page | TTFT first ms | TTFT follow-up ms | follow-up tokens from the prefix cache |",
             "|---|---|---|---|"]
    lines += [f"| {r['page']} | {r['ttft_first_ms']} | {r['ttft_follow_up_ms']} | {r['follow_up_hit_tokens']:.0f} |"
              for r in f["pages"]]  # fmt: skip
    lines += ["", "## A long prompt arriving while 8 requests stream", "",
              f"Gaps between tokens of the {s['streams']} streams: median {s['median_gap_alone_ms']} ms and largest "
              f"{s['max_gap_alone_ms']} ms alone; median {s['median_gap_with_long_ms']} ms and largest "
              f"{s['max_gap_with_long_ms']} ms while a ~{s['long_prompt_tokens_target']}-token prompt is prefilled "
              f"(its time to first token: {s['long_prompt_ttft_s']} s). Largest gap with it / median without: "
              f"**{s['ratio_max_with_long_to_median_alone']}x** (target <= 3)."]  # fmt: skip
    e = report["stall_engine"]
    lines += ["", f"The same at engine level (no Triton, no HTTP, no other process on the two cores): median gap "
              f"{e['median_gap_alone_ms']} ms alone, largest {e['max_gap_with_long_ms']} ms with the long prompt "
              f"(its time to first token {e['long_prompt_ttft_s']} s): "
              f"**{e['ratio_max_with_long_to_median_alone']}x**."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=31000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="engine-core-bench-") as tmp, demo_stack(Path(tmp), None) as stack:
        base_url, metrics_url, checkpoint = stack
        follow = asyncio.run(follow_up(base_url, metrics_url, args.pages))
        stalls = asyncio.run(stall(base_url, checkpoint, args.streams, args.long_tokens))
        engine_stalls = engine_stall(checkpoint, args.streams, args.long_tokens)
    report = {"benchmark": "engine_core", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "hardware": f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
              "follow_up": follow, "stall": stalls, "stall_engine": engine_stalls}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_core_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    (args.out / "engine_core_cpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
