#!/usr/bin/env python3
"""Host time per decode step, the model forward excluded: where the engine's own work goes.

B requests decode together (tiny checkpoint, CPU, float32); every part of a step is timed by wrapping it:
the scheduler, the attention metadata, the rest of the runner's input preparation, the model forward (the
layers and the lm_head, excluded from the host time), sampling, and the hand-over to the output thread.
Host time = step wall time - forward. Sampling settings: greedy, or the model's defaults (temperature 0.7,
top_p 0.8, top_k 100, repetition_penalty 1.05). Results: ``<out>/step_overhead_cpu.json`` and ``.md``.

    .venv/bin/python benchmarks/step_overhead.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
PARTS = ("schedule", "metadata", "forward", "sample", "handoff")


SPENT: dict[str, float] = defaultdict(float)  # wall seconds per part, since the last reset


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start

    return wrapper


def instrument(engine) -> None:
    """Wrap the step's parts of ``engine`` (once) so that their wall time accumulates in ``SPENT``."""
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.runner._layers = timed("forward", engine.runner._layers)
    engine.runner._logits = timed("forward", engine.runner._logits)
    engine.logits_processor.choose_all = timed("sample", engine.logits_processor.choose_all)
    engine.output.tokens = timed("handoff", engine.output.tokens)
    engine.runner.execute = timed("execute", engine.runner.execute)


def measure(engine, batch: int, tokens: int, sampling: dict[str, Any]) -> dict[str, Any]:
    from minicpmv.engine.request import GenerationRequest
    from minicpmv.engine.sampling_params import SamplingParams

    SPENT.clear()
    requests = [GenerationRequest(f"b{batch}-{k}-{time.monotonic_ns()}", messages=[{"role": "user", "content":
                f"Write note {k} about the shipment."}], sampling=SamplingParams(max_tokens=tokens, ignore_eos=True,
                seed=k, **sampling)) for k in range(batch)]  # fmt: skip
    steps0 = engine.num_steps
    wall0 = time.perf_counter()
    handles = [engine.submit(r) for r in requests]
    for handle in handles:
        handle.result()
    wall = time.perf_counter() - wall0
    steps = engine.num_steps - steps0
    per_step = {name: 1000 * SPENT[name] / steps for name in (*PARTS, "execute")}
    host = 1000 * wall / steps - per_step["forward"]
    inputs = per_step["execute"] - per_step["forward"] - per_step["metadata"]
    return {"batch": batch, "steps": steps, "step_ms": round(1000 * wall / steps, 3),
            "host_ms": round(host, 3), "schedule_ms": round(per_step["schedule"], 3),
            "metadata_ms": round(per_step["metadata"], 3), "inputs_ms": round(inputs, 3),
            "sample_ms": round(per_step["sample"], 3), "handoff_ms": round(per_step["handoff"], 3),
            "forward_ms": round(per_step["forward"], 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint
    from minicpmv.engine import model_runner
    from minicpmv.engine.engine import Engine, EngineConfig

    build = model_runner.AttentionMetadata.build.__func__
    model_runner.AttentionMetadata.build = classmethod(timed("metadata", build))

    settings = {"greedy": {"temperature": 0.0, "repetition_penalty": 1.0}, "default sampling": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        for batch in (int(b) for b in args.batches.split(",")):
            for label, sampling in settings.items():
                engine = Engine.from_pretrained(checkpoint, dtype="float32", config=EngineConfig(max_num_seqs=batch))
                instrument(engine)
                try:
                    measure(engine, batch, 4, sampling)  # warm-up
                    runs = [measure(engine, batch, args.tokens, sampling) for _ in range(2)]
                finally:
                    engine.shutdown()
                best = min(runs, key=lambda r: r["host_ms"])
                rows.append({"sampling": label, **best})
                print(json.dumps(rows[-1]), flush=True)
    hardware = f"{platform.processor() or platform.machine()}, 2 threads, Python {platform.python_version()}"
    report = {"benchmark": "step_overhead", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "hardware": hardware, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_overhead_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    head = ("| batch | sampling | step ms | forward ms | host ms | schedule | metadata | other inputs | sampling "
            "| hand-off |")
    lines = [f"# Host time per decode step, {report['date']}", "", report["hardware"], "", head,
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['sampling']} | {r['step_ms']} | {r['forward_ms']} | **{r['host_ms']}** | "
              f"{r['schedule_ms']} | {r['metadata_ms']} | {r['inputs_ms']} | {r['sample_ms']} | {r['handoff_ms']} |"
              for r in rows]  # fmt: skip
    (args.out / "step_overhead_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"median host ms: {statistics.median(r['host_ms'] for r in rows):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
