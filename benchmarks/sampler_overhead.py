#!/usr/bin/env python3
"""Sampler overhead: host time of one ``LogitsProcessor.choose_all`` step, batched sampler vs the old per-row one.

Random float32 logits [B, 151666] (the model's vocabulary) at B = 1, 16 and 64, for three workloads:

* ``default``: what a request that sets nothing gets (temperature 0.7, top_p 0.8, top_k 100,
  repetition_penalty 1.05), no seed: the engine gives such a row a randomly seeded generator, as here;
* ``seeded``: the same with a seed per request (each row draws from its own generator);
* ``greedy``: temperature 0, repetition_penalty 1.0 (the old code's one batched path).

Each sequence has a ``--prompt-len``-token prompt and ``--output-len`` tokens generated so far (random ids; the
outputs are not appended, so every step does the same work). ``new`` is minicpmv.engine.sampler; ``old`` is a
copy of the sampler before it was batched (kept below), which samples row by row whenever a row is not plain
greedy. The tokenizer covers the whole vocabulary, as the real checkpoint's does. Reported: median and p90 ms
per step over ``--steps`` timed steps after 2 warm-up steps (new and old take turns step by step, so that
machine noise hits both alike), and old / new. Results go to stdout and
``<out>/sampler_overhead_<device>.{json,md}``.

    .venv/bin/python benchmarks/sampler_overhead.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from minicpmv.engine.request import TokenLogprob
from minicpmv.engine.sampler import LogitsProcessor
from minicpmv.engine.sampling_params import SamplingParams, apply_penalties, sample

VOCAB_SIZE = 151666
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
WORKLOADS = {
    "default": {},
    "seeded": {"seed": 1},
    "greedy": {"temperature": 0.0, "repetition_penalty": 1.0},
}


class OldLogitsProcessor:
    """The sampler before batching (minicpmv/engine/sampler.py as it was), for the comparison only."""

    def __init__(self, tokenizer, vocab_size: int, device: torch.device):
        self.tokenizer = tokenizer
        self.device = device
        known = [i for i in tokenizer.get_vocab().values() if i < vocab_size]
        bias = torch.full((vocab_size,), float("-inf"))
        bias[known] = 0.0
        self.invalid_bias = bias.to(device)

    def choose_all(self, seqs, logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        if not all(self._plain_greedy(seq.request.sampling) and seq.grammar is None for seq in seqs):
            return [self.choose(seq, logits[row]) for row, seq in enumerate(seqs)]
        rows = logits.float() + self.invalid_bias
        for row, seq in enumerate(seqs):
            params = seq.request.sampling
            if params.ignore_eos or len(seq.output_ids) < params.min_tokens:
                rows[row, params.stop_token_ids] = float("-inf")
        return [(int(token), None) for token in rows.argmax(-1).tolist()]

    @staticmethod
    def _plain_greedy(params) -> bool:
        return (params.greedy and not params.logprobs and params.repetition_penalty == 1.0
                and not params.presence_penalty and not params.frequency_penalty)  # fmt: skip

    def choose(self, seq, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        params = seq.request.sampling
        row = logits.float() + self.invalid_bias
        logprobs = row.log_softmax(-1) if params.logprobs else None
        if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            output = torch.tensor(seq.output_ids, dtype=torch.long, device=self.device)
            context = torch.cat([self._prompt_tensor(seq), output])
            apply_penalties(row, params, context, output)
        if seq.grammar is not None:
            seq.grammar.apply(row)
        elif params.ignore_eos or len(seq.output_ids) < params.min_tokens:
            row[params.stop_token_ids] = float("-inf")
        token = sample(row, params, seq.generator)
        if seq.grammar is not None:
            seq.grammar.accept(token)
        return token, self._logprob(token, logprobs, params.top_logprobs) if logprobs is not None else None

    def _prompt_tensor(self, seq) -> torch.Tensor:
        state = seq.request
        if state.prompt_tensor is None:
            state.prompt_tensor = torch.tensor(seq.prompt_ids, dtype=torch.long, device=self.device)
        return state.prompt_tensor

    def _logprob(self, token: int, logprobs: torch.Tensor, top: int) -> TokenLogprob:
        entry = TokenLogprob(token, self.tokenizer.decode([token]), float(logprobs[token]))
        if top:
            values, ids = logprobs.topk(top)
            entry.top = [(int(i), self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids, strict=True)]
        return entry


class FullVocabTokenizer:
    """Knows every id, as the real checkpoint's tokenizer does (so the unknown-ids bias is all zeros)."""

    def __init__(self, vocab_size: int):
        self._vocab = {f"t{i}": i for i in range(vocab_size)}

    def get_vocab(self) -> dict[str, int]:
        return self._vocab

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def make_sequences(batch: int, workload: str, prompt_len: int, output_len: int, device: torch.device, seed: int):
    ids = torch.Generator().manual_seed(seed)
    seqs = []
    for index in range(batch):
        params = SamplingParams(**WORKLOADS[workload])
        generator = None
        if not params.greedy:  # as the engine: seed + index, or a random seed
            generator = torch.Generator(device=device)
            random_seed = int.from_bytes(os.urandom(8), "little") >> 1
            generator.manual_seed(params.seed + index if params.seed is not None else random_seed)
        seqs.append(SimpleNamespace(
            request=SimpleNamespace(sampling=params, prompt_tensor=None),
            prompt_ids=torch.randint(0, VOCAB_SIZE, (prompt_len,), generator=ids).tolist(),
            output_ids=torch.randint(0, VOCAB_SIZE, (output_len,), generator=ids).tolist(),
            generator=generator,
            grammar=None,
        ))  # fmt: skip
    return seqs


def time_steps(cases: dict[str, tuple], steps: int) -> dict[str, list[float]]:
    """ms per ``choose_all`` call of each (processor, seqs, logits), the implementations taking turns step by
    step so that machine noise hits them alike (the result is host ints, so device work is included)."""
    for processor, seqs, logits in cases.values():
        for _ in range(2):
            processor.choose_all(seqs, logits)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(steps):
        for name, (processor, seqs, logits) in cases.items():
            start = time.perf_counter()
            processor.choose_all(seqs, logits)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per cell")
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine_throughput import hardware  # the sibling script

    device = torch.device(args.device)
    tokenizer = FullVocabTokenizer(VOCAB_SIZE)
    implementations = {"new": LogitsProcessor(tokenizer, VOCAB_SIZE, device),
                       "old": OldLogitsProcessor(tokenizer, VOCAB_SIZE, device)}  # fmt: skip
    rows = []
    for workload in args.workloads.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            logits = torch.randn(batch, VOCAB_SIZE, generator=torch.Generator().manual_seed(batch)).mul_(3).to(device)
            row = {"workload": workload, "batch": batch}
            cases = {name: (processor, make_sequences(batch, workload, args.prompt_len, args.output_len, device,
                                                      seed=batch), logits)
                     for name, processor in implementations.items()}  # fmt: skip
            for name, times in time_steps(cases, args.steps).items():
                row[f"{name}_p50_ms"] = round(statistics.median(times), 3)
                row[f"{name}_p90_ms"] = round(percentile(times, 0.9), 3)
            row["old_over_new"] = round(row["old_p50_ms"] / row["new_p50_ms"], 2)
            rows.append(row)
            print(f"{workload:8s} B={batch:3d}  new {row['new_p50_ms']:9.2f} ms (p90 {row['new_p90_ms']:9.2f})  "
                  f"old {row['old_p50_ms']:9.2f} ms (p90 {row['old_p90_ms']:9.2f})  old/new {row['old_over_new']:6.2f}",
                  flush=True)  # fmt: skip

    report = {
        "benchmark": "sampler_overhead",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "settings": {"device": str(device), "vocab_size": VOCAB_SIZE, "logits": "randn * 3, float32",
                     "prompt_len": args.prompt_len, "output_len": args.output_len, "steps": args.steps,
                     "warmup_steps": 2, "workloads": {w: WORKLOADS[w] for w in args.workloads.split(",")}},
        "results": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sampler_overhead_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    hw = report["hardware"]
    lines = [
        f"# Sampler overhead, {report['date']}",
        "",
        f"{hw['cpu_model']} ({hw['usable_cores']} cores, {hw['torch_threads']} torch threads), torch {hw['torch']}, "
        f"device {device}{', ' + hw['cuda_device'] if hw['cuda_device'] else ''}. Host time of one `choose_all` "
        f"step on random float32 logits [B, {VOCAB_SIZE}]; prompts of {args.prompt_len} ids, {args.output_len} "
        f"output ids so far; median (p90) of {args.steps} steps, new and old taking turns. `new`: the batched "
        "sampler; `old`: the per-row one it replaced (a copy in the script).",
        "",
        "| workload | B | new p50 ms | new p90 ms | old p50 ms | old p90 ms | old / new |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['batch']} | {r['new_p50_ms']:.2f} | {r['new_p90_ms']:.2f} | "
                     f"{r['old_p50_ms']:.2f} | {r['old_p90_ms']:.2f} | {r['old_over_new']:.2f} |")  # fmt: skip
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
