"""What serving several LoRA adapters at once costs: 16 concurrent requests spread over 4 adapters against the
same 16 on the base model alone, in one engine, alternated (CPU, tiny checkpoint, float32).

The adapters are made with peft as MiniCPM-V's recipe makes them (rank 16 on q/k/v/o, and one with the MLP
too); the engine holds 4 slots, so no request waits for one. Each round submits 16 requests at once (a short
question, 32 output tokens, greedy, ignore_eos), all on the base model or 4 per adapter, and times the round to
its last token; rounds alternate (base, adapters, base, ...) so that the machine's noise falls on both. Printed:
output tokens/s of each kind (median over rounds) and their ratio (adapters / base; issue 25's target on the CPU:
at least 0.7). On a GPU the ratio comes from the GPU check.

    python benchmarks/lora.py [--rounds 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
ATTENTION = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
ALL_LINEAR = r"llm\..*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


def make_adapters(checkpoint: Path, root: Path, count: int = 4, rank: int = 16) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from minicpmv.loading import load_model

    adapters = {}
    for i in range(count):
        torch.manual_seed(i)
        model = load_model(checkpoint, dtype="float32")
        targets = ALL_LINEAR if i == count - 1 else ATTENTION
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                      init_lora_weights=False))  # fmt: skip
        out = root / f"adapter-{i}"
        peft_model.save_pretrained(out)
        adapters[f"adapter-{i}"] = out
    return adapters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import torch

    from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint
    from minicpmv.engine.engine import Engine, EngineConfig
    from minicpmv.engine.request import GenerationRequest
    from minicpmv.engine.sampling_params import SamplingParams

    torch.set_num_threads(2)
    ids = iter(range(10**6))
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        adapters = make_adapters(checkpoint, Path(tmp))
        modules = ",".join(f"{name}={path}" for name, path in adapters.items())
        config = EngineConfig(max_num_seqs=args.requests, max_num_batched_tokens=512, num_kv_blocks=512,
                              lora_modules=modules, max_loras=len(adapters), max_lora_rank=16,
                              lora_target_modules="all", enable_prefix_caching=False)  # fmt: skip
        engine = Engine.from_pretrained(checkpoint, dtype="float32", config=config)
        names = list(adapters)

        def round_tok_s(with_adapters: bool) -> float:
            params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
            requests = [GenerationRequest(f"b{next(ids)}", sampling=params,
                                          messages=[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
                                          adapter=names[i % len(names)] if with_adapters else None)
                        for i in range(args.requests)]  # fmt: skip
            start = time.perf_counter()
            handles = [engine.submit(r) for r in requests]
            tokens = sum(len(h.result().choices[0].token_ids) for h in handles)
            return tokens / (time.perf_counter() - start)

        try:
            round_tok_s(False), round_tok_s(True)  # warm-up: every adapter into its slot, caches filled
            base, mixed = [], []
            for _ in range(args.rounds):
                base.append(round_tok_s(False))
                mixed.append(round_tok_s(True))
        finally:
            engine.shutdown()
    result = {
        "date": dt.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads", "model": "tiny random-weight checkpoint, float32, CPU",
        "requests": args.requests, "adapters": len(adapters), "output_tokens": args.tokens, "rounds": args.rounds,
        "base_tok_s": round(statistics.median(base), 1), "adapters_tok_s": round(statistics.median(mixed), 1),
        "ratio": round(statistics.median(mixed) / statistics.median(base), 3),
        "base_rounds": [round(x, 1) for x in base], "adapter_rounds": [round(x, 1) for x in mixed],
    }  # fmt: skip
    print(f"{args.requests} concurrent requests x {args.tokens} tokens, median of {args.rounds} alternated rounds:")
    print(f"  base model alone          {result['base_tok_s']:8.1f} tok/s")
    print(f"  over {len(adapters)} LoRA adapters     {result['adapters_tok_s']:8.1f} tok/s")
    print(f"  ratio (adapters / base)   {result['ratio']:8.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
