"""Speed and memory of the engine on a device, as the GPU check (benchmarks/gpu_check.py) reports them.

Everything is measured at engine level (no Triton, no HTTP): weight memory, output tokens/s at a given number
of concurrent sequences with fixed output lengths, time to first token and prefill of one document page, peak
memory, and each throughput set against the memory-bandwidth bound of a decode step (every LLM weight byte is
read once per step, so ``bound tokens/s = sequences * bandwidth / bytes per step``; KV reads are left out,
which makes the bound slightly optimistic).

For the paged attention kernel (issue 23) it also swaps an engine's runner onto the gather path the kernel
replaced (``gather_path``: same weights and KV pool, the old backend and gather CUDA graphs), and times one
layer's attention of both (``attention_step``).
"""

from __future__ import annotations

import contextlib
import re
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minicpmv.devtools.device_checks import chat_request, document_page
from minicpmv.engine.config import EngineConfig
from minicpmv.engine.staging import device_scope

MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
_PARAMETER = re.compile(r'^parameters:\s*\{\s*key:\s*"([^"]*)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"\s*\}\s*\}\s*$')

# Peak HBM bandwidth by the vendors' datasheets (bytes/s), matched against torch.cuda.get_device_name().
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12,
                   "L40S": 0.864e12, "L4": 0.3e12}  # fmt: skip

# The gather graphs' longest context in the kernel-vs-gather comparison: context buckets 256-2048 tokens (36 graphs
# at 64 sequences, not 54 up to 8,192), enough for the decode benchmark's contexts (~25-token prompts + 128).
GATHER_GRAPH_MAX_CONTEXT = 2048

TOPICS = ("invoice totals", "shipping dates", "tax lines", "signatures", "addresses", "payment terms",
          "order numbers", "discounts")  # fmt: skip


def hbm_bandwidth(device_name: str) -> float | None:
    """Datasheet bandwidth of the named GPU, or None when unknown (longest matching key wins)."""
    for key in sorted(HBM_BYTES_PER_S, key=len, reverse=True):
        if key in device_name:
            return HBM_BYTES_PER_S[key]
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and bitsandbytes quantization state (absmax, nested absmax, code) of ``module``."""
    seen: dict[int, torch.Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[id(t)] = t
        state = getattr(t, "quant_state", None)
        while state is not None:
            for extra in (state.absmax, state.code):
                if isinstance(extra, torch.Tensor):
                    seen[id(extra)] = extra
            state = getattr(state, "state2", None)
    return list(seen.values())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's weights (4-bit weights at their packed size, with their statistics)."""
    return tensor_bytes(_module_tensors(model))


def decode_bytes_per_step(model) -> int:
    """Weight bytes one decode step reads: the whole LLM except the embedding table (a step gathers only
    the batch's rows of it). The vision tower and the resampler don't run during decode."""
    llm = model.llm
    embedding = set(map(id, _module_tensors(llm.model.embed_tokens)))
    return tensor_bytes(t for t in _module_tensors(llm) if id(t) not in embedding)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory since the last reset (the KV pool included: it takes its share of the free
    memory at start-up), or this process's peak RSS on the CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()


def triton_engine_config(model: str, repository: Path = MODEL_REPOSITORY) -> EngineConfig:
    """The EngineConfig tritonserver gives ``model`` on a GPU: its config.pbtxt's ``parameters``, read the way the
    Python backend reads them (minicpmv_triton.parameters), without environment overrides. The full-size stages
    of the GPU check run with it, so they capture the CUDA graphs (batch and context buckets) that serving does."""
    from minicpmv_triton.parameters import ModelParameters

    text = (repository / model / "config.pbtxt").read_text()
    found = (_PARAMETER.match(line.strip()) for line in text.splitlines())
    parameters = {m.group(1): {"string_value": m.group(2)} for m in found if m}
    args = {"model_name": model, "model_instance_kind": "GPU", "model_instance_device_id": "0"}
    return ModelParameters.from_model_config({"name": model, "parameters": parameters}, args, environ={}).engine


def random_engine(config: dict[str, Any], device: str, *, nf4: bool, max_num_seqs: int = 64, seed: int = 0,
                  cuda_graph_max_len: int = 2048, engine_config: EngineConfig | None = None):  # fmt: skip
    """An Engine over a random-weight model of ``config`` built directly on ``device`` (no checkpoint on disk),
    bf16, or nf4 quantized while building; with the tiny tokenizer (its ids have non-zero embeddings).
    ``engine_config`` (e.g. :func:`triton_engine_config`) replaces the one made of the other arguments."""
    from minicpmv.config import MiniCPMVConfig
    from minicpmv.devtools.random_weights import random_tensors
    from minicpmv.devtools.reference_config import PREPROCESSOR_CONFIG
    from minicpmv.devtools.tiny_tokenizer import write_tiny_tokenizer
    from minicpmv.engine.engine import Engine
    from minicpmv.image_processing import ImageProcessor, PreprocessorConfig
    from minicpmv.loading import build_model
    from minicpmv.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp))
        tokenizer = load_tokenizer(tmp)
    live = torch.tensor(sorted(tokenizer.get_vocab().values()))
    tensors = random_tensors(config, device=device, seed=seed, live_ids=live)
    model = build_model(MiniCPMVConfig.from_dict(config), tensors, device=device, dtype="bfloat16",
                        quantization="nf4" if nf4 else None)  # fmt: skip
    processor = ImageProcessor(PreprocessorConfig.from_dict(PREPROCESSOR_CONFIG))
    if engine_config is None:
        engine_config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=2048,
                                     cuda_graph_max_len=cuda_graph_max_len)  # fmt: skip
    return Engine(model, tokenizer, processor, engine_config)


def _consume(handle) -> tuple[list[float], Any]:
    """Arrival times of a request's deltas, and its deltas' totals (prompt and completion tokens)."""
    stamps, last = [], None
    for delta in handle:
        stamps.append(time.perf_counter())
        last = delta
    return stamps, last


def measure_decode(engine, concurrency: int, output_tokens: int, bandwidth: float | None = None,
                   sampling: str = "greedy") -> dict[str, Any]:  # fmt: skip
    """``concurrency`` text requests submitted together, each decoding exactly ``output_tokens``, greedy or with
    the model's default sampling (``sampling="default"``: temperature 0.7, top_p 0.8, top_k 100, repetition
    penalty 1.05, what a request that sets nothing gets).

    Returns output tokens/s end to end (submit to last token) and in the decode phase (from the moment every
    request has its first token to the end: steps with all sequences running), the decode step time, and, given
    ``bandwidth`` (bytes/s), the bandwidth-bound tokens/s and the percentage of it reached.
    """
    device = engine.runner.device
    params = {"temperature": 0, "repetition_penalty": 1.0} if sampling == "greedy" else {}
    requests = [chat_request(f"Request {k}: summarise the {TOPICS[k % len(TOPICS)]} of the attached letter.",
                         max_tokens=output_tokens, ignore_eos=True, **params)
                for k in range(concurrency)]  # fmt: skip
    outcomes: list[tuple[list[float], Any]] = [([], None)] * concurrency

    def consume(k: int, handle) -> None:
        outcomes[k] = _consume(handle)

    synchronize(device)
    start = time.perf_counter()
    handles = [engine.submit(r) for r in requests]
    threads = [threading.Thread(target=consume, args=(k, h)) for k, h in enumerate(handles)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end = time.perf_counter()
    tokens = sum(len(stamps) for stamps, _ in outcomes)
    if tokens != concurrency * output_tokens or any(last.finish_reason != "length" for _, last in outcomes):
        raise RuntimeError(f"expected {concurrency} x {output_tokens} output tokens, got {tokens}")
    all_started = max(stamps[0] for stamps, _ in outcomes)
    decode_s = end - all_started
    decode_tok_s = concurrency * (output_tokens - 1) / decode_s if output_tokens > 1 and decode_s > 0 else None
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "sampling": sampling,
        "output_tokens": output_tokens,
        "prompt_tokens": outcomes[0][1].prompt_tokens,
        "e2e_tok_s": round(tokens / (end - start), 1),
        "decode_tok_s": round(decode_tok_s, 1) if decode_tok_s else None,
        "decode_step_ms": round(1000 * decode_s / (output_tokens - 1), 2) if output_tokens > 1 else None,
        "ttft_max_ms": round(1000 * (all_started - start), 1),
        "attention_path": "paged kernel" if engine.runner._tiling is not None else "gather",
        "cuda_graphs": bool(engine.runner.decode_graphs is not None and engine.runner.decode_graphs.graphs),
    }
    if bandwidth and decode_tok_s:
        bound = concurrency * bandwidth / decode_bytes_per_step(engine.model)
        row["bandwidth_bound_tok_s"] = round(bound, 1)
        row["percent_of_bound"] = round(100 * decode_tok_s / bound, 1)
    return row


def measure_page(engine, size: int = 1344, seed: int = 11, max_slice_nums: int | None = None) -> dict[str, Any]:
    """One document page of ``size`` x ``size`` (never seen before: ``seed`` draws it, so neither the vision
    cache nor the prefix cache hits) at the default slicing: time to first token through the engine, and the
    parts timed directly: preprocessing (slicing, on the CPU) and the vision tower + resampler over every
    slice; the rest of the time to first token is the LLM prefill, the first sample and the scheduling."""
    device = engine.runner.device
    page = document_page(seed, (size, size))
    request = chat_request("What is the total amount due?", [page], max_slice_nums=max_slice_nums, temperature=0,
                           max_tokens=1)  # fmt: skip
    synchronize(device)
    start = time.perf_counter()
    stamps, last = _consume(engine.submit(request))
    ttft = stamps[0] - start
    _require_output(last, 1)

    t0 = time.perf_counter()
    processed = engine.processor.image_processor.preprocess(page, max_slice_nums)
    preprocess_s = time.perf_counter() - t0
    pixels = [torch.from_numpy(c) for c in processed.chunks]
    sizes = torch.as_tensor(processed.tgt_sizes).reshape(-1, 2)
    with torch.inference_mode():
        synchronize(device)
        t0 = time.perf_counter()
        engine.model.encode_images(pixels, sizes)
        synchronize(device)
        vision_s = time.perf_counter() - t0
    return {
        "image": f"{size}x{size}",
        "slices": processed.num_chunks,
        "prompt_tokens": last.prompt_tokens,
        "ttft_ms": round(1000 * ttft, 1),
        "preprocess_ms": round(1000 * preprocess_s, 1),
        "vision_ms": round(1000 * vision_s, 1),
        "prefill_and_rest_ms": round(1000 * (ttft - preprocess_s - vision_s), 1),
    }


def _require_output(last, tokens: int) -> None:
    if last is None or last.error or last.completion_tokens != tokens:
        raise RuntimeError(f"the request did not produce {tokens} tokens: {last}")


def measure_request(engine, text: str, images=(), output_tokens: int = 4) -> dict[str, Any]:
    """One request alone: time to first token and seconds per output token after it (CPU full-size mode)."""
    start = time.perf_counter()
    stamps, last = _consume(engine.submit(chat_request(text, images, temperature=0, max_tokens=output_tokens,
                                                   ignore_eos=True)))  # fmt: skip
    _require_output(last, output_tokens)
    per_token = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return {
        "prompt_tokens": last.prompt_tokens,
        "output_tokens": last.completion_tokens,
        "ttft_s": round(stamps[0] - start, 2),
        "s_per_token": round(per_token, 3) if per_token else None,
    }


def count_host_syncs(engine, concurrency: int = 4, output_tokens: int = 8) -> dict[str, Any]:
    """Host waits for the GPU while the engine decodes: ``concurrency`` requests of ``output_tokens`` under
    ``torch.cuda.set_sync_debug_mode("warn")``, each synchronizing call recorded (from any thread) and counted
    per engine step. The sampler's one device-to-host transfer of the sampled ids is one per step by design;
    more than that is the model runner waiting where it should not. CUDA only."""
    import warnings

    if engine.runner.device.type != "cuda":
        raise RuntimeError("host syncs are counted on CUDA only")
    steps_before = engine.num_steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            measure_decode(engine, concurrency, output_tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    steps = max(engine.num_steps - steps_before, 1)
    return {"steps": steps, "syncs": len(syncs), "syncs_per_step": round(len(syncs) / steps, 2),
            "first": syncs[0][:300] if syncs else None}


def graph_figures(graphs) -> dict[str, Any]:
    """What a ``DecodeGraphs`` holds: graphs captured, capture seconds, the memory their pool reserved (MiB),
    batch and context buckets, and whether they run the paged kernel or gather."""
    return {"attention_path": "paged kernel" if graphs.paged is not None else "gather", "captured": len(graphs.graphs),
            "capture_s": round(graphs.capture_seconds, 2), "pool_mib": round(graphs.pool_bytes / 2**20, 1),
            "batch_buckets": graphs.batch_sizes, "max_context_tokens": graphs.max_context,
            "context_buckets_tokens": [w * graphs.block_size for w in graphs.widths]}  # fmt: skip


def gather_attention(device: torch.device, dtype: torch.dtype, name: str = "auto"):
    """The attention backend the paged kernel replaced: "auto" as ``select_backend`` chose before the kernel (on
    CUDA varlen or the reference, whichever passes its self-test and is the faster; on the CPU the reference),
    or "varlen" / "reference" by name."""
    from minicpmv.engine import attention

    device = torch.device(device)
    if name not in ("auto", "varlen", "reference"):
        raise ValueError(f"no gather backend {name!r}: choose auto, varlen or reference")
    if name == "auto" and device.type == "cuda":
        with device_scope(device):
            return attention._select_varlen_or_fastest("auto", device, dtype)
    return attention.select_backend(name, device, dtype)


def _wait_idle(engine, timeout: float) -> None:
    """Until the engine has no sequence running or waiting (its last step is over: a request's last delta can
    reach the caller just before its sequence leaves the scheduler)."""
    deadline = time.monotonic() + timeout
    while engine.num_running or engine.num_waiting:
        if time.monotonic() > deadline:
            raise RuntimeError("the engine is busy: its attention path is swapped only while it is idle")
        time.sleep(0.005)


@contextlib.contextmanager
def gather_path(engine, max_context: int = GATHER_GRAPH_MAX_CONTEXT, backend: Any = "auto",
                capture: bool | None = None, idle_timeout: float = 10.0) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The engine's runner on the gather path the paged kernel replaced, for the block, so both are measured on
    one engine (weights and KV pool shared, nothing loaded twice): ``backend`` (a name for ``gather_attention``,
    or a backend) as its attention, no paged tiling, and, where the engine has decode graphs, gather graphs in
    place of the kernel's (one per batch bucket x context bucket up to ``max_context`` tokens; captured when
    ``capture``, by default on CUDA; elsewhere their static forward runs uncaptured).

    Yields the gather path's figures (backend and why, ``graph_figures`` of its graphs or None). On exit, by an
    exception too, the runner gets its own attention, tiling and graphs back and the gather graphs are dropped
    (their pool returned to the GPU). The engine must be idle on entry (waits up to ``idle_timeout`` s), its pool
    of the model's dtype (an FP8 pool is read by the kernel only)."""
    runner = engine.runner
    if runner.pool.shape.dtype != runner.dtype:
        raise ValueError(f"the gather path reads a KV pool of the model's dtype, not {runner.pool.shape.dtype}")
    _wait_idle(engine, idle_timeout)
    chosen = gather_attention(runner.device, runner.dtype, backend) if isinstance(backend, str) else backend
    saved = runner.attention, runner._tiling, runner.decode_graphs
    graphs = None
    try:
        runner.attention, runner._tiling = chosen, None
        if saved[2] is not None:
            from minicpmv.engine.cuda_graphs import DecodeGraphs

            capture = runner.device.type == "cuda" if capture is None else capture
            graphs = DecodeGraphs(runner._forward_static, block_size=runner.pool.block_size,
                                  scratch_block=runner.pool.scratch_block, max_num_seqs=saved[2].batch_sizes[-1],
                                  max_context=max_context, device=runner.device, capture=capture,
                                  paged=None)  # fmt: skip
            runner.decode_graphs = graphs
        yield {"attention": chosen.name, "attention_selection": chosen.selection,
               "attention_step_ms": chosen.timings_ms,
               "cuda_graphs": None if graphs is None else graph_figures(graphs)}  # fmt: skip
    finally:
        runner.attention, runner._tiling, runner.decode_graphs = saved
        del graphs  # the runner held the only other reference: the graphs and their pool go now
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def int4_path(engine, mode: str, capture: bool | None = None, idle_timeout: float = 10.0) -> Iterator[dict[str, Any]]:
    """The int4 engine's LLM linears on ``mode`` ("bitsandbytes" or "triton", nf4_linear.py) for the block, so
    both are measured on one engine: the switch, and, where the engine has decode graphs, graphs captured anew
    with it (the kernel's own graphs replay what they captured). Yields the selection and the graphs' figures. On
    exit, by an exception too, the engine's own choice and graphs are back. The engine must be idle on entry."""
    from minicpmv.engine.nf4_linear import llm_linear4bit, select_int4_kernel

    runner = engine.runner
    _wait_idle(engine, idle_timeout)
    # The engine's own forwards, put back as they are: its graphs captured their tensors (the kernel's biases).
    layers = llm_linear4bit(runner.model)
    own = [(module, module.__dict__.get("forward")) for _, module in layers]
    saved = runner.decode_graphs
    graphs = None
    try:
        selection = select_int4_kernel(runner.model, mode, runner.device, runner.dtype)
        if saved is not None:
            from minicpmv.engine.cuda_graphs import DecodeGraphs

            capture = runner.device.type == "cuda" if capture is None else capture
            graphs = DecodeGraphs(runner._forward_static, block_size=runner.pool.block_size,
                                  scratch_block=runner.pool.scratch_block, max_num_seqs=saved.batch_sizes[-1],
                                  max_context=saved.max_context, device=runner.device, capture=capture,
                                  paged=saved.paged)  # fmt: skip
            runner.decode_graphs = graphs
        yield {"int4_selection": selection, "cuda_graphs": None if graphs is None else graph_figures(graphs)}
    finally:
        runner.decode_graphs = saved
        for module, forward in own:
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        del graphs
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()


def attention_step(kernel, gather, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int],
                   bandwidth: float | None = None, num_seqs: int = 64, context: int = 2048,
                   repeats: int = 20) -> dict[str, Any]:  # fmt: skip
    """Milliseconds of one layer's attention for a decode step of ``num_seqs`` sequences with ``context`` tokens
    each (``shape``: query heads, KV heads, head dim), the paged ``kernel`` against the ``gather`` backend and,
    if that is not the reference, against the reference too (SDPA over the gathered keys: what the gather CUDA
    graphs replay for decode steps). ``attention._time_step``: CUDA events around ``repeats`` calls, one
    synchronize at the end. With ``bandwidth`` (bytes/s): the K/V bytes the kernel reads per step as a
    percentage of it. CUDA only."""
    from minicpmv.engine import attention

    step = {"query_lens": (1,) * num_seqs, "context_lens": (context,) * num_seqs, "shape": shape}
    timed = {"kernel": kernel, "gather": gather}
    if gather.name != "reference":
        timed["reference_gather"] = attention.ReferenceAttention()
    with device_scope(device):
        ms = {label: attention._time_step(b, device, dtype, repeats, **step) for label, b in timed.items()}
    _, kv_heads, head_dim = shape
    kv_bytes = num_seqs * context * kv_heads * head_dim * 2 * dtype.itemsize  # K and V of every sequence, once
    row: dict[str, Any] = {"sequences": num_seqs, "context_tokens": context, "gather_backend": gather.name,
                           **{f"{label}_ms": round(value, 4) for label, value in ms.items()},
                           "gather_over_kernel": round(ms["gather"] / ms["kernel"], 2),
                           "kernel_kv_bytes": kv_bytes}  # fmt: skip
    if bandwidth:
        row["kernel_percent_of_hbm"] = round(100 * kv_bytes / (ms["kernel"] / 1000) / bandwidth, 1)
    return row
