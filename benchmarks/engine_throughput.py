#!/usr/bin/env python3
"""Engine throughput: output tokens/s at several concurrency levels, next to one-at-a-time baselines.

For each workload (text; with ``--image`` also one synthetic document page per request) and each
concurrency level C, the same N distinct requests (``--requests-per-level``, default max(C, 4)) run
three ways through one loaded model:

* ``engine``: C client threads each submit a request, stream it to the end and take the next one
  (closed loop; with N == C all requests are submitted at once). Continuous batching.
* ``engine-seq``: the same requests through the same engine, one in flight at a time.
* ``plain-loop``: the same requests through ``model.generate_greedy``, the plain one-request loop
  (chat template + processor on the caller's side, then greedy decoding with transformers' cache).

Every request decodes exactly ``--max-tokens`` tokens (temperature 0, ignore_eos, no repetition penalty,
so that the engine's greedy choice is the plain loop's). Wall time runs from the first submit to the last
finish; TTFT is submit -> first streamed token; latency is submit -> last token. The vision cache is off,
so a page is encoded in every mode. Figures go to stdout and to ``<out>/engine_throughput_<device>.json``
and ``.md``. On a 2-core CPU with the defaults it takes about 2 minutes (about 4.5 with ``--image``).

    .venv/bin/python benchmarks/engine_throughput.py --image
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import queue
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from minicpmv.chat import format_chat
from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.request import GenerationRequest
from minicpmv.engine.sampling_params import SamplingParams

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TOPICS = (
    "quarterly revenue",
    "shipping delays",
    "customer complaints",
    "battery safety",
    "hiring plan",
    "energy usage",
    "server outages",
    "tax changes",
    "warehouse audit",
    "product recall",
    "travel policy",
    "data retention",
    "supplier contracts",
    "office move",
    "marketing budget",
    "security review",
)
TASKS = (
    "Summarise the section about {topic} in {n} bullet points.",
    "List every number mentioned next to {topic} and explain each in one sentence.",
    "Write a short email to the team about {topic}; keep it under {n} sentences.",
    "What are the {n} main risks related to {topic}? Answer briefly.",
)


@dataclass
class RequestSpec:
    """One benchmark request: the user text and, for the image workload, its page."""

    text: str
    image: Image.Image | None = None

    def messages(self) -> list[dict[str, Any]]:
        if self.image is None:
            return [{"role": "user", "content": self.text}]
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.text}]}]

    def request(self, request_id: str, params: SamplingParams) -> GenerationRequest:
        images = [self.image] if self.image is not None else []
        return GenerationRequest(request_id, messages=self.messages(), images=images, sampling=params)


@dataclass
class Timing:
    """One finished request; times are time.perf_counter() seconds."""

    submit: float
    end: float
    token_ids: list[int]
    first_token: float | None = None


@dataclass
class ModeResult:
    mode: str
    wall_s: float
    timings: list[Timing] = field(default_factory=list)
    decode_steps: int | None = None


def document_page(index: int, size: tuple[int, int] = (1000, 750)) -> Image.Image:
    """A synthetic scanned page: a title, ruled text lines and a small table, different per ``index``."""
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    width, height = size
    draw.text((60, 40), f"REPORT {index:04d} - {TOPICS[index % len(TOPICS)].upper()}", fill="black")
    y = 90
    line = 0
    while y < height - 220:
        words = " ".join(TOPICS[(index + line + k) % len(TOPICS)] for k in range(4))
        draw.text((60, y), f"{line + 1:2d}. {words} {index * 37 + line * 11} units", fill=(20, 20, 20))
        y += 24
        line += 1
    for row in range(5):
        top = height - 200 + row * 30
        draw.rectangle((60, top, width - 60, top + 30), outline="black")
        draw.text(
            (70, top + 8), f"item {row}   {index * 3 + row:5d}   {(index + row) % 97:3d}%", fill="black"
        )
    return page


def make_specs(count: int, first_index: int, with_image: bool) -> list[RequestSpec]:
    specs = []
    for i in range(first_index, first_index + count):
        task = TASKS[i % len(TASKS)].format(topic=TOPICS[i % len(TOPICS)], n=3 + i % 5)
        text = f"Document {i}. {task}"
        specs.append(RequestSpec(text, document_page(i) if with_image else None))
    return specs


def run_engine(
    engine: Engine, specs: list[RequestSpec], concurrency: int, params: SamplingParams, tag: str, mode: str
) -> ModeResult:
    """Closed loop: ``concurrency`` client threads, each streaming one request at a time to the end."""
    todo: queue.Queue[tuple[int, RequestSpec]] = queue.Queue()
    for item in enumerate(specs):
        todo.put(item)
    timings: dict[int, Timing] = {}
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while True:
                try:
                    index, spec = todo.get_nowait()
                except queue.Empty:
                    return
                submit = time.perf_counter()
                handle = engine.submit(spec.request(f"{tag}-{index}", params))
                first, token_ids = None, []
                for delta in handle:
                    if delta.error:
                        raise RuntimeError(f"request {handle.request_id} failed: {delta.error}")
                    if delta.token_ids and first is None:
                        first = time.perf_counter()
                    token_ids += delta.token_ids
                timings[index] = Timing(submit, time.perf_counter(), token_ids, first)
        except BaseException as e:  # surfaced on the main thread below
            errors.append(e)

    steps_before = engine.num_steps
    threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    ordered = [timings[i] for i in range(len(specs))]
    wall = max(t.end for t in ordered) - min(t.submit for t in ordered)
    return ModeResult(mode, wall, ordered, engine.num_steps - steps_before)


def run_plain_loop(engine: Engine, specs: list[RequestSpec], max_tokens: int) -> ModeResult:
    """The same requests through ``model.generate_greedy``, one after the other (no streaming: no TTFT)."""
    timings = []
    for spec in specs:
        submit = time.perf_counter()
        images = [spec.image] if spec.image is not None else []
        prompt = format_chat(spec.messages(), engine.tokenizer, images).prompt
        batch = engine.processor([prompt], [images])
        image_inputs = {}
        if images:
            image_inputs = {
                "pixel_values": batch.pixel_values,
                "tgt_sizes": batch.tgt_sizes,
                "image_bounds": batch.image_bounds,
            }
        tokens = engine.model.generate_greedy(
            batch.input_ids, batch.attention_mask, max_tokens, **image_inputs
        )
        timings.append(Timing(submit, time.perf_counter(), tokens[0]))
    return ModeResult("plain-loop", timings[-1].end - timings[0].submit, timings)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarise(
    result: ModeResult, workload: str, concurrency: int, prompt_tokens: list[int]
) -> dict[str, Any]:
    tokens = sum(len(t.token_ids) for t in result.timings)
    latencies = [t.end - t.submit for t in result.timings]
    ttfts = [t.first_token - t.submit for t in result.timings if t.first_token is not None]
    return {
        "workload": workload,
        "concurrency": concurrency if result.mode == "engine" else 1,
        "level": concurrency,
        "mode": result.mode,
        "requests": len(result.timings),
        "mean_prompt_tokens": round(sum(prompt_tokens) / len(prompt_tokens), 1),
        "output_tokens": tokens,
        "wall_s": round(result.wall_s, 3),
        "output_tokens_per_s": round(tokens / result.wall_s, 2),
        "mean_ttft_ms": round(1000 * sum(ttfts) / len(ttfts), 1) if ttfts else None,
        "p50_latency_s": round(percentile(latencies, 50), 3),
        "p99_latency_s": round(percentile(latencies, 99), 3),
        # Each request's first token comes from its prefill, the others from batched decode steps.
        "mean_decode_batch": (
            round((tokens - len(result.timings)) / result.decode_steps, 2) if result.decode_steps else None
        ),
    }


def hardware() -> dict[str, Any]:
    """What the figures ran on, without the host's name."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| workload | level C | mode | requests | prompt tok | out tok | wall s | out tok/s | x engine-seq "
        "| x plain-loop | mean TTFT ms | p50 lat s | p99 lat s | decode batch |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                cell(v)
                for v in (
                    r["workload"],
                    r["level"],
                    r["mode"],
                    r["requests"],
                    r["mean_prompt_tokens"],
                    r["output_tokens"],
                    r["wall_s"],
                    r["output_tokens_per_s"],
                    r.get("ratio_vs_engine_seq"),
                    r.get("ratio_vs_plain_loop"),
                    r["mean_ttft_ms"],
                    r["p50_latency_s"],
                    r["p99_latency_s"],
                    r["mean_decode_batch"],
                )
            )
            + " |"
        )
    return "\n".join(lines)


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--concurrency wants comma-separated integers, got {text!r}") from e
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("--concurrency levels must be >= 1")
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="checkpoint directory (default: a tiny one in a temp dir)"
    )
    parser.add_argument(
        "--concurrency",
        type=parse_levels,
        default=[1, 4, 16],
        metavar="C1,C2,...",
        help="concurrent requests per level (default: 1,4,16)",
    )
    parser.add_argument(
        "--requests-per-level", type=int, metavar="N", help="requests per level (default: max(C, 4))"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default: 64)")
    parser.add_argument(
        "--image",
        action="store_true",
        help="also run a workload with one synthetic 1000x750 document page per request",
    )
    parser.add_argument("--no-plain-loop", action="store_true", help="skip the generate_greedy baseline")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="model dtype (default: float32)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    if args.requests_per_level is not None and args.requests_per_level < 1:
        parser.error("--requests-per-level must be >= 1")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="minicpmv-bench-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint

            checkpoint = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
            print(f"wrote a tiny checkpoint in {time.perf_counter() - started:.1f} s")
        # The vision cache is off so that every mode encodes every page (distinct pages never hit anyway).
        config = EngineConfig(max_num_seqs=max(args.concurrency), vision_cache_size=0)
        engine = Engine.from_pretrained(checkpoint, device=args.device, dtype=args.dtype, config=config)
        try:
            rows, checks = benchmark(engine, args)
        finally:
            engine.shutdown()
    runtime = time.perf_counter() - started
    table = markdown_table(rows)
    print(table)
    print(f"\ntotal runtime {runtime:.1f} s")
    report = {
        "benchmark": "engine_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "settings": {
            "checkpoint": "tiny (write_tiny_checkpoint seed 0)"
            if args.checkpoint is None
            else str(args.checkpoint),
            "device": args.device,
            "dtype": args.dtype,
            "concurrency_levels": args.concurrency,
            "requests_per_level": args.requests_per_level or "max(C, 4)",
            "max_tokens": args.max_tokens,
            "sampling": "temperature 0, ignore_eos, repetition_penalty 1.0",
            "engine_config": {"max_num_seqs": config.max_num_seqs, "vision_cache_size": 0},
            "workloads": ["text"]
            + (["image (one 1000x750 synthetic page per request)"] if args.image else []),
        },
        "greedy_match_engine_vs_plain_loop": checks,
        "runtime_s": round(runtime, 1),
        # Other work on the machine skews the figures; the 1-minute load average says how much there was.
        "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"engine_throughput_{torch.device(args.device).type}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report, table))
    print(f"wrote {stem}.json and {stem}.md")


def benchmark(engine: Engine, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, str]]:
    params = SamplingParams(
        temperature=0, max_tokens=args.max_tokens, ignore_eos=True, repetition_penalty=1.0
    )
    workloads = ["text"] + (["image"] if args.image else [])
    rows: list[dict[str, Any]] = []
    checks: dict[str, str] = {}
    next_index = 0
    for workload in workloads:
        with_image = workload == "image"
        warmup = make_specs(2, 10_000, with_image)
        run_engine(engine, warmup, 2, params, f"warmup-{workload}", "warmup")
        if not args.no_plain_loop:
            run_plain_loop(engine, warmup[:1], args.max_tokens)
        agreement: Counter[str] = Counter()
        for level in args.concurrency:
            count = args.requests_per_level or max(level, 4)
            specs = make_specs(count, next_index, with_image)
            next_index += count
            results = [run_engine(engine, specs, level, params, f"{workload}-c{level}", "engine")]
            # At C = 1 both engine runs are the same thing; their ratio shows the run-to-run noise.
            results.append(run_engine(engine, specs, 1, params, f"{workload}-c{level}-seq", "engine-seq"))
            if not args.no_plain_loop:
                results.append(run_plain_loop(engine, specs, args.max_tokens))
            for result in results:
                if any(len(t.token_ids) != args.max_tokens for t in result.timings):
                    raise RuntimeError(
                        f"{result.mode}: a request did not produce exactly {args.max_tokens} tokens"
                    )
            level_rows = [summarise(r, workload, level, prompt_lengths(engine, specs)) for r in results]
            by_mode = {r["mode"]: r["output_tokens_per_s"] for r in level_rows}
            for row in level_rows:
                for base in ("engine-seq", "plain-loop"):
                    if base in by_mode and row["mode"] != base:
                        row[f"ratio_vs_{base.replace('-', '_')}"] = round(
                            row["output_tokens_per_s"] / by_mode[base], 2
                        )
            rows.extend(level_rows)
            if not args.no_plain_loop:
                for ours, plain in zip(results[0].timings, results[-1].timings, strict=True):
                    agreement[compare_greedy(ours.token_ids, plain.token_ids, params.stop_token_ids)] += 1
            print("\n".join(markdown_table(level_rows).splitlines()[2:]), flush=True)  # progress
        if agreement:
            total = sum(agreement.values())
            checks[workload] = (
                f"{agreement['identical']}/{total} identical, {agreement['identical until stop']}/{total} "
                "identical up to the plain loop's first stop token, "
                f"{agreement['different']}/{total} different"
            )
    return rows, checks


def compare_greedy(ours: list[int], plain: list[int], stop_token_ids: list[int]) -> str:
    """Engine (batched) vs plain-loop greedy tokens. Under ignore_eos the engine masks the stop tokens while
    the plain loop (no stop ids given) emits them and goes on, so the two part at the first stop token."""
    if ours == plain:
        return "identical"
    stop = next((k for k, token in enumerate(plain) if token in stop_token_ids), None)
    if stop is not None and ours[:stop] == plain[:stop]:
        return "identical until stop"
    return "different"


def prompt_lengths(engine: Engine, specs: list[RequestSpec]) -> list[int]:
    """Prompt tokens per request, as the engine counts them (image placeholders included)."""
    lengths = []
    for spec in specs:
        images = [spec.image] if spec.image is not None else []
        prompt = format_chat(spec.messages(), engine.tokenizer, images).prompt
        lengths.append(int(engine.processor([prompt], [images]).attention_mask.sum()))
    return lengths


def render_markdown(report: dict[str, Any], table: str) -> str:
    hw, settings = report["hardware"], report["settings"]
    lines = [
        "# Engine throughput",
        "",
        f"Date: {report['date']}. Runtime: {report['runtime_s']} s (checkpoint writing and loading "
        f"included). 1-minute load average {report['load_average_1min']['start']} at the start, "
        f"{report['load_average_1min']['end']} at the end.",
        "",
        f"Hardware: {hw['cpu_model']}, {hw['usable_cores']} usable of {hw['logical_cores']} logical cores, "
        f"torch {hw['torch']} ({hw['torch_threads']} threads), Python {hw['python']}, {hw['os']}"
        + (f", GPU {hw['cuda_device']}" if hw["cuda_device"] else "")
        + ".",
        "",
        f"Settings: checkpoint {settings['checkpoint']}, device {settings['device']}, "
        f"dtype {settings['dtype']}, "
        f"{settings['max_tokens']} output tokens per request ({settings['sampling']}), "
        f"requests per level {settings['requests_per_level']}, engine max_num_seqs "
        f"{settings['engine_config']['max_num_seqs']}, vision cache off.",
        "",
        "Modes: `engine` = C client threads streaming concurrently (continuous batching); `engine-seq` = the "
        "same requests through the same engine one at a time; `plain-loop` = the same requests through "
        "`model.generate_greedy` one at a time (no streaming, so no TTFT). `x engine-seq` / `x plain-loop` = "
        "output tokens/s relative to that baseline at the same level. `decode batch` = mean sequences per "
        "engine step.",
        "",
        table,
        "",
    ]
    if report["greedy_match_engine_vs_plain_loop"]:
        matches = ", ".join(f"{k}: {v}" for k, v in report["greedy_match_engine_vs_plain_loop"].items())
        lines += [f"Greedy outputs, engine (batched) vs plain loop: {matches}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
