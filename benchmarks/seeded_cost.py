"""What reproducible seeds cost: a follow-up question about the same page, seeded vs not (engine, CPU).

A seeded request never reads the prefix cache (README, "Seeds"), so its follow-up question prefills the whole
conversation again, page included, where an unseeded one takes the page's blocks from the cache. This script
measures that cost on the tiny checkpoint in-process (float32, CPU): time to first token of the first turn and
of the follow-up, for pairs run alternately seeded and unseeded, and their median ratio (seeded / unseeded).
The ratio carries over as an order of magnitude only: on a GPU a prefill of a page is a few milliseconds and
the image embeddings come from the vision cache either way.

    python benchmarks/seeded_cost.py [--pages 6] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=6)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from serving import document_page  # the sibling script's synthetic 1344x1344 page

    from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint
    from minicpmv.engine.engine import Engine, EngineConfig
    from minicpmv.engine.request import GenerationRequest
    from minicpmv.engine.sampling_params import SamplingParams

    torch.set_num_threads(2)
    ids = iter(range(10**6))

    def ttft(engine: Engine, messages: list[dict], images: list, seed: int | None) -> tuple[float, str]:
        params = SamplingParams(temperature=0.7, max_tokens=8, ignore_eos=True, seed=seed)
        sent = time.perf_counter()
        handle = engine.submit(GenerationRequest(f"b{next(ids)}", messages=messages, images=images, sampling=params))
        deltas = iter(handle)
        first = next(deltas)
        elapsed = time.perf_counter() - sent
        text = first.text + "".join(d.text for d in deltas)
        return elapsed, text

    rows = []
    with tempfile.TemporaryDirectory(prefix="seeded-cost-") as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp), seed=0)
        engine = Engine.from_pretrained(checkpoint, dtype="float32", config=EngineConfig(num_kv_blocks=512))
        try:
            for index in range(2 * args.pages):
                seed = 7 if index % 2 else None
                image = document_page(200 + index)
                question = [{"type": "image"}, {"type": "text", "text": "What is the total?"}]
                turn = [{"role": "user", "content": question}]
                first, answer = ttft(engine, turn, [image], seed)
                follow = [*turn, {"role": "assistant", "content": answer},
                          {"role": "user", "content": "And which region reports it?"}]  # fmt: skip
                again, _ = ttft(engine, follow, [image], seed)
                rows.append({"page": index, "seeded": seed is not None, "ttft_first_ms": round(1000 * first, 1),
                             "ttft_follow_up_ms": round(1000 * again, 1)})  # fmt: skip
        finally:
            engine.shutdown()

    def median(seeded: bool, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["seeded"] == seeded)

    report = {"benchmark": "seeded_cost", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "hardware": f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, CPU",
              "rows": rows}  # fmt: skip
    for key in ("ttft_first_ms", "ttft_follow_up_ms"):
        report[key] = {"unseeded": round(median(False, key), 1), "seeded": round(median(True, key), 1)}
    follow, first = report["ttft_follow_up_ms"], report["ttft_first_ms"]
    report["follow_up_ratio"] = round(follow["seeded"] / follow["unseeded"], 2)
    report["first_ratio"] = round(first["seeded"] / first["unseeded"], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeded_cost_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"follow-up TTFT median: unseeded {follow['unseeded']} ms, seeded {follow['seeded']} ms "
          f"({report['follow_up_ratio']}x); first turn {first['unseeded']} vs {first['seeded']} ms "
          f"({report['first_ratio']}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
