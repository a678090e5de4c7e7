"""Correctness checks that run on any device: the golden reference, bf16, nf4, the engine, JSON mode, seeds.

Each ``check_*`` function loads what it needs on ``device`` ("cuda" or "cpu"), compares with a float32 CPU
reference or with the ORIGINAL code's golden outputs, raises :class:`CheckFailed` with the numbers when
something is off, and returns the numbers it measured. ``tests/gpu/`` calls them on CUDA and
``benchmarks/gpu_check.py`` runs the same functions (on CUDA on a GPU machine, on the CPU in its smoke mode in
the test suite), so the GPU check and the GPU tests can never drift apart.

Every check also proves that the work ran on ``device``: parameters, KV cache and the vision tower's
inputs are looked at, so a code path that silently falls back to the CPU fails.
"""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

# The original code's float32 noise on the golden data is about 4e-5 (tests/fixtures/golden/README.md).
GOLDEN_ATOL = 2e-4
GOLDEN_STOP_IDS = (151645, 151643)
# bf16 keeps 8 significant bits, so each rounded activation carries up to 2^-9 = 0.2% relative error; through the
# tiny golden model (bf16 weights are exact, so only activations round) the last logits move by 2.1-2.8%
# (relative L2) against the original float32 outputs on the CPU (measured 2026-12-05, all four cases). The bound
# is 3x that, for other kernels' summation orders (cuBLAS, flash / memory-efficient SDPA), and still far below
# what a real bug does: a transposed sin-cos table or an unloaded norm moves the outputs by 30-60%.
BF16_REL_TOL = 0.08
# Engines of the checks take a small, fixed KV pool: on a GPU the default (90% of the free memory) would leave
# no room for the next model a check loads in the same process.
CHECK_KV_MB = 256
# nf4 rounds every LLM weight by ~9% (relative L2); on the random tiny model that moves the logits by 0.3-0.5
# (relative L2) against float32, while an unrelated model of the same architecture is at ~1.4.
NF4_REL_TOL = 0.7
# The same quantized weights on two devices differ only in kernel summation order.
NF4_SAME_WEIGHTS_TOL = 0.05
# CUDA graphs against eager decode (bf16, the same weights and inputs): the two differ only in kernels (gathered-key
# SDPA over a padded batch against the eager attention backend, GEMMs of other shapes), i.e. in bf16 rounding, which
# moves the tiny model's logits by 2-3% against float32; a wrong position, mask or block table moves them by tens of
# percent. The bound is BF16_REL_TOL's. Greedy ids may differ only where the eager logits' top two are within
# GRAPH_TIE: random-weight logits are ~N(0, 1) and their top two over 151k ids are often closer than bf16 rounding.
GRAPH_REL_TOL = BF16_REL_TOL
GRAPH_TIE = 0.1


class CheckFailed(AssertionError):
    """A device check found a wrong number; the message carries the measured values."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@contextmanager
def exact_float32():
    """TF32 off for the duration (cuDNN convolutions default to TF32 on Ampere+, which breaks 2e-4)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def require_on_device(model: torch.nn.Module, device: str | torch.device) -> None:
    """Every parameter and buffer of ``model`` lives on ``device``'s type."""
    kind = torch.device(device).type
    elsewhere = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != kind]
    require(not elsewhere, f"{len(elsewhere)} tensors are not on {kind}: {elsewhere[:5]}")


@contextmanager
def record_vision_devices(model):
    """Yields a list that receives the device type of every vision-tower input while the block runs."""
    seen: list[str] = []
    handle = model.vpm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].device.type))
    try:
        yield seen
    finally:
        handle.remove()


def document_page(seed: int = 0, size: tuple[int, int] = (700, 500)) -> Image.Image:
    """A synthetic page with lines of text and numbers (different per seed)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    lines = max(4, size[1] // 40)
    for line in range(lines):
        draw.text((20, 20 + (size[1] - 40) * line // lines), f"Line {line} total {seed * 31 + line}", fill="black")
    draw.rectangle((size[0] // 2, size[1] // 3, size[0] - 30, size[1] // 2), outline="black", width=3)
    return image


# ---------------------------------------------------------------- golden data


def unpack_golden_checkpoint(golden_dir: Path, out: Path) -> Path:
    """The original code's tiny checkpoint (stored gzipped in the golden folder), unpacked into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "preprocessor_config.json", "generation_config.json"):
        shutil.copy(golden_dir / "tiny" / name, out / name)
    target = out / "model.safetensors"
    if not target.exists():
        target.write_bytes(gzip.decompress((golden_dir / "tiny" / "model.safetensors.gz").read_bytes()))
    return out


def golden_case_inputs(case: dict, arrays, lut) -> dict[str, Any]:
    """The stored model inputs of one golden case: ids, mask, image bounds and (if any) pixels per sample."""
    name = case["name"]
    ids = torch.from_numpy(arrays[f"{name}__input_ids"]).long()
    batch = ids.shape[0]
    inputs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.from_numpy(arrays[f"{name}__attention_mask"]).long(),
        "image_bounds": [torch.from_numpy(arrays[f"{name}__image_bound_s{b}"]) for b in range(batch)],
    }
    if case["pixel_code_keys"]:
        tgt = arrays[f"{name}__tgt_sizes"]
        owner = arrays[f"{name}__chunk_sample"]
        pixels: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        sizes: list[list] = [[] for _ in range(batch)]
        for k, key in enumerate(case["pixel_code_keys"]):
            pixels[owner[k]].append(torch.from_numpy(lut[arrays[key]]))
            sizes[owner[k]].append(tgt[k])
        inputs["pixel_values"] = pixels
        inputs["tgt_sizes"] = [torch.tensor(np.array(s)).reshape(-1, 2) for s in sizes]
    return inputs


def load_golden(golden_dir: Path) -> tuple[list[dict], Any, np.ndarray]:
    cases = json.loads((golden_dir / "model_cases.json").read_text())["cases"]
    arrays = np.load(golden_dir / "model_cases.npz")
    lut = np.load(golden_dir / "processor_arrays.npz")["lut"]
    return cases, arrays, lut


def golden_request_states(engine, case_name: str, inputs: dict[str, Any], max_new_tokens: int) -> list:
    """The golden case's samples as prepared engine requests (their stored ids, bounds and pixels, no chat
    template or tokenizer: the golden checkpoint has none), greedy, stopping at the original stop ids."""
    from minicpmv.engine.detokenizer import IncrementalDetokenizer
    from minicpmv.engine.request import GenerationRequest, ImageInput, RequestState, Sequence
    from minicpmv.engine.sampling_params import SamplingParams
    from minicpmv.image_processing import ProcessedImage

    states = []
    for b in range(inputs["input_ids"].shape[0]):
        valid = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b][valid].tolist()
        pad = int((~valid).sum())
        bounds = [(int(s) - pad, int(e) - pad) for s, e in inputs["image_bounds"][b].reshape(-1, 2).tolist()]
        images = []
        if "pixel_values" in inputs and inputs["pixel_values"][b]:
            sizes = torch.as_tensor(inputs["tgt_sizes"][b]).reshape(-1, 2)
            with torch.inference_mode():
                embeds = engine.model.encode_images(inputs["pixel_values"][b], sizes)
            layout = ProcessedImage([], sizes.numpy(), None, (0, 0), None, (0, 0))
            images = [ImageInput(f"golden:{case_name}:{b}", layout, embeds)]
        params = SamplingParams(temperature=0, max_tokens=max_new_tokens, stop_token_ids=list(GOLDEN_STOP_IDS),
                                repetition_penalty=1.0)  # fmt: skip
        request = GenerationRequest(f"golden-{case_name}-{b}-{next(_request_ids)}", prompt="", sampling=params)
        state = RequestState(request, ids, bounds, images, max_new_tokens, None)
        state.content_spans = engine.encoder.content_spans(images, bounds)
        engine.encoder.finish(state)
        state.sequences.append(Sequence(request=state, index=0, prompt_ids=ids, generator=None,
                                        detokenizer=IncrementalDetokenizer(_NoTokenizer(), ids, [])))  # fmt: skip
        states.append(state)
    return states


class _NoTokenizer:
    """The golden checkpoint has no tokenizer: output text is not needed, only ids."""

    def decode(self, ids, **_):
        return ""

    def convert_ids_to_tokens(self, ids):
        return [""] * len(ids)


def engine_greedy(engine, case_name: str, inputs: dict[str, Any], max_new_tokens: int) -> list[list[int]]:
    """Greedy ids of every sample of a golden case through the ENGINE (scheduler, KV pool, packed steps),
    all samples submitted together."""
    handles = [engine.enqueue(state) for state in golden_request_states(engine, case_name, inputs, max_new_tokens)]
    return [handle.result().choices[0].token_ids for handle in handles]


def _to(inputs: dict[str, Any], device) -> dict[str, Any]:
    moved = dict(inputs, input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device))
    if "pixel_values" in inputs:
        moved["pixel_values"] = [[p.to(device) for p in sample] for sample in inputs["pixel_values"]]
    return moved


# ---------------------------------------------------------------- the checks


def golden_engine(model):
    """An engine over the golden checkpoint's model. That checkpoint has no tokenizer: the tiny one serves
    the engine's plumbing, and every id stays allowed (the golden vocabulary is not the tiny tokenizer's)."""
    import tempfile

    from minicpmv.devtools.reference_config import PREPROCESSOR_CONFIG
    from minicpmv.devtools.tiny_tokenizer import write_tiny_tokenizer
    from minicpmv.engine.engine import Engine, EngineConfig
    from minicpmv.image_processing import ImageProcessor, PreprocessorConfig
    from minicpmv.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp))
        tokenizer = load_tokenizer(tmp)
    processor = ImageProcessor(PreprocessorConfig.from_dict(PREPROCESSOR_CONFIG))
    config = EngineConfig(kv_cache_memory_mb=CHECK_KV_MB, max_num_batched_tokens=128)
    engine = Engine(model, tokenizer, processor, config)
    engine.logits_processor.invalid_bias.zero_()
    return engine


def check_golden_float32(golden_dir: Path, checkpoint: Path, device: str) -> dict[str, Any]:
    """float32 on ``device`` reproduces the original code: last logits within GOLDEN_ATOL and greedy ids
    exactly, through the plain loop (``generate_greedy``) and through the engine (paged KV, chunked prefill,
    the samples of a case batched together), every case; each case twice through the engine, the second
    time from the prefix cache."""
    from minicpmv.loading import load_model

    cases, arrays, lut = load_golden(golden_dir)
    with exact_float32():
        model = load_model(checkpoint, device=device, dtype="float32")
        require_on_device(model, device)
        engine = golden_engine(model)
        worst, checked = 0.0, []
        try:
            for case in cases:
                name = case["name"]
                inputs = golden_case_inputs(case, arrays, lut)
                with torch.inference_mode(), record_vision_devices(model) as seen:
                    last = model(**_to(inputs, device), logits_to_keep=1).logits[:, -1].float().cpu()
                require(not inputs.get("pixel_values") or set(seen) == {torch.device(device).type},
                        f"{name}: the vision tower ran on {seen}")  # fmt: skip
                diff = float((last - torch.from_numpy(arrays[f"{name}__logits_last"])).abs().max())
                worst = max(worst, diff)
                require(diff <= GOLDEN_ATOL, f"{name}: last logits differ from the original code's by {diff:.2e}")
                expected = arrays[f"{name}__generated_ids"].tolist()
                plain = model.generate_greedy(max_new_tokens=16, stop_token_ids=GOLDEN_STOP_IDS,
                                              **_to(inputs, device))  # fmt: skip
                require(plain == expected, f"{name}: generate_greedy gave {plain}, the original code {expected}")
                hits = engine.block_manager.prefix_hits
                for attempt in ("first", "prefix-cached"):
                    ids = engine_greedy(engine, name, inputs, 16)
                    require(ids == expected, f"{name} ({attempt}): the engine gave {ids}, expected {expected}")
                require(engine.block_manager.prefix_hits > hits, f"{name}: the repeat did not hit the prefix cache")
                checked.append(name)
        finally:
            engine.shutdown()
    return {"cases": checked, "max_abs_logit_diff": worst, "tolerance": GOLDEN_ATOL}


def check_golden_bfloat16(golden_dir: Path, checkpoint: Path, device: str) -> dict[str, Any]:
    """bf16 on ``device`` stays within BF16_REL_TOL (relative L2 of the last logits) of the original float32
    outputs, for every golden case, text and images."""
    from minicpmv.loading import load_model

    cases, arrays, lut = load_golden(golden_dir)
    model = load_model(checkpoint, device=device, dtype="bfloat16")
    require_on_device(model, device)
    require(model.dtype == torch.bfloat16, f"the model is {model.dtype}")
    errors = {}
    for case in cases:
        name = case["name"]
        inputs = golden_case_inputs(case, arrays, lut)
        with torch.inference_mode():
            last = model(**_to(inputs, device), logits_to_keep=1).logits[:, -1].float().cpu()
        errors[name] = _rel(last, torch.from_numpy(arrays[f"{name}__logits_last"]))
        require(errors[name] <= BF16_REL_TOL, f"{name}: bf16 logits off by {errors[name]:.4f} (relative L2)")
    return {"relative_l2_by_case": errors, "tolerance": BF16_REL_TOL}


def _prompt_logits(model, tokenizer, image_processor, with_image: bool) -> torch.Tensor:
    """Last-position logits of a fixed chat prompt (with or without a page), float32 on the CPU."""
    from minicpmv.chat import format_chat
    from minicpmv.processing import MiniCPMVProcessor

    images = [document_page(3)] if with_image else []
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": "What is the total?"}]
    chat = format_chat([{"role": "user", "content": content}], tokenizer, images)
    inputs = MiniCPMVProcessor(image_processor, tokenizer)([chat.prompt], [chat.images])
    device = model.device
    extra = {}
    if with_image:
        extra = {"pixel_values": [[p.to(device) for p in inputs.pixel_values[0]]], "tgt_sizes": inputs.tgt_sizes}
    with torch.inference_mode():
        out = model(inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device),
                    image_bounds=inputs.image_bounds, logits_to_keep=1, **extra)  # fmt: skip
    return out.logits[:, -1].float().cpu()


def check_nf4(full_checkpoint: Path, int4_checkpoint: Path, device: str) -> dict[str, Any]:
    """nf4 on ``device``, from the pre-quantized checkpoint and quantized on load from the full one: both near
    the float32 CPU model (text and image prompts), near each other, 4-bit weights on the device, and the
    pre-quantized model generates through the engine with an image."""
    from minicpmv.engine.engine import Engine, EngineConfig
    from minicpmv.image_processing import ImageProcessor
    from minicpmv.loading import load_model
    from minicpmv.offline import import_bitsandbytes
    from minicpmv.tokenizer import load_tokenizer

    bnb = import_bitsandbytes()
    tokenizer = load_tokenizer(full_checkpoint)
    processor = ImageProcessor.from_pretrained(full_checkpoint)
    reference = load_model(full_checkpoint, device="cpu", dtype="float32")
    expected = {image: _prompt_logits(reference, tokenizer, processor, image) for image in (False, True)}
    del reference
    result: dict[str, Any] = {"tolerance": NF4_REL_TOL}
    logits = {}
    for label, path, quantization in (("prequantized", int4_checkpoint, None), ("quantize_on_load", full_checkpoint,
                                                                                "nf4")):  # fmt: skip
        model = load_model(path, device=device, quantization=quantization)
        require_on_device(model, device)
        four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        require(len(four_bit) > 0, f"{label}: no 4-bit linear in the model")
        require(all(m.weight.quant_state is not None and m.weight.device.type == torch.device(device).type
                    for m in four_bit), f"{label}: 4-bit weights not quantized on {device}")  # fmt: skip
        for image in (False, True):
            with record_vision_devices(model) as seen:
                logits[label, image] = _prompt_logits(model, tokenizer, processor, image)
            require(not image or set(seen) == {torch.device(device).type}, f"{label}: vision ran on {seen}")
            error = _rel(logits[label, image], expected[image])
            result[f"{label}_{'image' if image else 'text'}_rel_l2"] = error
            require(error <= NF4_REL_TOL, f"{label} ({'image' if image else 'text'}): nf4 logits off by {error:.3f}")
        if label == "prequantized":
            engine = Engine(model, tokenizer, processor, EngineConfig(kv_cache_memory_mb=CHECK_KV_MB))
            try:
                out = engine.generate(chat_request("nf4", images=[document_page(4)], max_tokens=8, ignore_eos=True,
                                               temperature=0))  # fmt: skip
            finally:
                engine.shutdown()
                del engine  # it holds the model and its KV pool: release both before the next model loads
            require(out.completion_tokens == 8 and out.choices[0].finish_reason == "length",
                    f"nf4 engine generation: {out}")  # fmt: skip
            result["generated_ids"] = out.choices[0].token_ids
        del model
    for image in (False, True):
        between = _rel(logits["prequantized", image], logits["quantize_on_load", image])
        result[f"prequantized_vs_on_load_{'image' if image else 'text'}_rel_l2"] = between
        require(between <= NF4_SAME_WEIGHTS_TOL, f"pre-quantized vs quantized on load differ by {between:.4f}")
    return result


_request_ids = itertools.count()


def chat_request(text: str, images=(), *, max_slice_nums: int | None = None, **sampling):
    """A one-turn chat request: the images, then ``text``; ``sampling`` are SamplingParams fields."""
    from minicpmv.engine.request import GenerationRequest
    from minicpmv.engine.sampling_params import SamplingParams

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return GenerationRequest(f"check-{next(_request_ids)}", messages=[{"role": "user", "content": content}],
                             images=list(images), sampling=SamplingParams(**sampling),
                             max_slice_nums=max_slice_nums)  # fmt: skip


def _first_divergence_is_a_tie(ours, theirs, tie: float = 1e-3) -> tuple[bool, int | None]:
    """Two greedy runs agree, or first differ where the other run's top two logprobs are within ``tie``."""
    for step, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids, strict=False)):
        if a != b:
            top = theirs.logprobs[step].top
            scores = {token: logprob for token, _, logprob in top}
            return (a in scores and abs(scores[a] - scores[b]) <= tie), step
    return len(ours.token_ids) == len(theirs.token_ids), None


def check_engine(checkpoint: Path, device: str) -> dict[str, Any]:
    """The engine in float32 on ``device``: a request with a page gives the same greedy ids alone and inside a
    batch of four submitted together, its KV cache and vision tower are on the device, and the ids equal the
    float32 CPU engine's (a difference only where the CPU's top two candidates tie within 1e-3)."""
    from minicpmv.engine.engine import Engine, EngineConfig

    def make(target: str, cuda_graphs: bool = True) -> Engine:
        config = EngineConfig(max_num_seqs=8, kv_cache_memory_mb=CHECK_KV_MB, cuda_graphs=cuda_graphs)
        return Engine.from_pretrained(checkpoint, device=target, dtype="float32", config=config)

    def probe():
        return chat_request("Who signed the form?", images=[document_page(1)], max_tokens=16, ignore_eos=True,
                        temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip

    with exact_float32():
        engine = make(device)
        try:
            require(engine.runner.device.type == torch.device(device).type, f"runner on {engine.runner.device}")
            require_on_device(engine.model, device)
            with record_vision_devices(engine.model) as seen:
                alone = engine.generate(probe()).choices[0]
            require(set(seen) == {torch.device(device).type}, f"the vision tower ran on {seen}")
            graphs = engine.runner.decode_graphs
            if torch.device(device).type == "cuda":  # decode steps replayed as CUDA graphs, none failed to capture
                require(graphs is not None and len(graphs.graphs) > 0, "no CUDA graph was captured (see the log)")
                require(graphs.num_replays >= 15, f"{graphs.num_replays} CUDA-graph replays for 15 decode steps")
            others = [engine.submit(chat_request(text, images=images, max_tokens=24, ignore_eos=True, temperature=0))
                      for text, images in (("Read every line.", []), ("Summarise.", [document_page(2)]),
                                           ("List the totals.", [document_page(5, (900, 300))]))]  # fmt: skip
            batched = engine.submit(probe())
            cache_device = engine.runner.pool.keys[0].device.type
            in_batch = batched.result().choices[0]
            for handle in others:
                handle.result()
        finally:
            engine.shutdown()
        require(torch.device(cache_device).type == torch.device(device).type, f"KV cache on {cache_device}")
        require(in_batch.token_ids == alone.token_ids,
                f"greedy ids alone {alone.token_ids} != in a batch {in_batch.token_ids}")  # fmt: skip
        if torch.device(device).type == "cpu":
            return {"greedy_ids": alone.token_ids, "batch_parity": True, "compared_with_cpu": "is the CPU"}
        cpu = make("cpu")
        try:
            on_cpu = cpu.generate(probe()).choices[0]
        finally:
            cpu.shutdown()
        eager = make(device, cuda_graphs=False)
        try:
            require(eager.runner.decode_graphs is None, "cuda_graphs=False still captured graphs")
            without_graphs = eager.generate(probe()).choices[0]
        finally:
            eager.shutdown()
    agrees, step = _first_divergence_is_a_tie(alone, on_cpu)
    require(agrees, f"{device} ids {alone.token_ids} != CPU ids {on_cpu.token_ids} (first at step {step}, no tie)")
    agrees, eager_step = _first_divergence_is_a_tie(alone, without_graphs)
    require(agrees, f"ids with CUDA graphs {alone.token_ids} != without {without_graphs.token_ids} "
                    f"(first at step {eager_step}, no tie)")  # fmt: skip
    return {"greedy_ids": alone.token_ids, "batch_parity": True, "cpu_ids": on_cpu.token_ids,
            "first_difference_with_cpu": step, "cuda_graphs": len(graphs.graphs),
            "first_difference_without_graphs": eager_step}  # fmt: skip


ANSWER_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": ["answer", "page"],
        "properties": {"answer": {"type": "string", "enum": ["yes", "no", "unclear"]},
                       "page": {"type": "integer", "enum": [1, 2, 3]}}}},
}  # fmt: skip


def check_json_and_seeds(checkpoint: Path, device: str) -> dict[str, Any]:
    """JSON-schema decoding on ``device`` gives output that parses and follows the schema; a seed reproduces
    the same sampled ids alone and inside a batch; another seed gives other ids."""
    from minicpmv.engine.engine import Engine, EngineConfig

    engine = Engine.from_pretrained(checkpoint, device=device, dtype="float32",
                                    config=EngineConfig(kv_cache_memory_mb=CHECK_KV_MB))
    try:
        require(engine.runner.device.type == torch.device(device).type, f"runner on {engine.runner.device}")
        answer = engine.generate(chat_request("Is the invoice paid?", images=[document_page(6)], max_tokens=256,
                                          response_format=ANSWER_SCHEMA, temperature=0))  # fmt: skip
        text = answer.choices[0].text
        try:
            value = json.loads(text)
        except ValueError as e:
            raise CheckFailed(f"JSON-schema output does not parse: {text!r}") from e
        require(value.get("answer") in ("yes", "no", "unclear") and value.get("page") in (1, 2, 3),
                f"JSON-schema output breaks the schema: {value}")  # fmt: skip

        def sampled(seed: int):
            return chat_request("Write a story.", max_tokens=24, ignore_eos=True, temperature=1.0, top_p=0.95,
                            seed=seed)  # fmt: skip

        first = engine.generate(sampled(7)).choices[0].token_ids
        noise = [engine.submit(chat_request(f"Other {k}", max_tokens=30, ignore_eos=True, temperature=1.0, seed=k))
                 for k in range(3)]  # fmt: skip
        again = engine.submit(sampled(7)).result().choices[0].token_ids
        for handle in noise:
            handle.result()
        other = engine.generate(sampled(8)).choices[0].token_ids
    finally:
        engine.shutdown()
    require(first == again, f"seed 7 gave {first} alone and {again} in a batch")
    require(first != other, "seeds 7 and 8 gave the same sampled ids")
    return {"json": value, "seeded_ids": first}


def _compare_step(static: torch.Tensor, eager: torch.Tensor) -> dict[str, Any]:
    """One decode step's logits [n, V] from the static (graph) forward and the eager one."""
    static, eager = static.float().cpu(), eager.float().cpu()
    rel = ((static - eager).norm(dim=-1) / eager.norm(dim=-1)).max().item()
    ours, theirs = static.argmax(-1), eager.argmax(-1)
    rows = torch.nonzero(ours != theirs).flatten().tolist()
    gaps = [float(eager[r, theirs[r]] - eager[r, ours[r]]) for r in rows]
    return {"rows": static.shape[0], "rel_l2": rel, "different_ids": len(rows), "worst_gap": max(gaps, default=0.0)}


def check_graphs_against_eager(engine, steps: int = 6, words: tuple[int, ...] = (20, 400, 2600)) -> dict[str, Any]:
    """Decode steps through the CUDA graphs (their static-shape forward: replayed on CUDA, run uncaptured on the
    CPU) give the eager forward's logits, on the engine as it is (full size on a GPU: GQA 28:4, head dim 128).

    One request per entry of ``words`` (a prompt of that many words: the longest, ~2,600 tokens, decodes in a
    context bucket past 2,048) decodes ``steps`` tokens greedily, all together. Every step that took the static
    path is run again eagerly on the same inputs (it writes the same K/V again), and the logits are compared:
    relative L2 within GRAPH_REL_TOL for every row, and the same greedy id unless the eager top two are within
    GRAPH_TIE. Restores the engine as it was."""
    runner = engine.runner
    graphs = runner.decode_graphs
    require(graphs is not None, "the engine has no decode graphs (cuda_graphs off, or static decode off the GPU)")
    original = runner.execute
    compared: list[dict[str, Any]] = []
    replays = graphs.num_replays

    def execute(batch, *args, **kwargs):
        before = graphs.num_steps
        out = original(batch, *args, **kwargs)
        if graphs.num_steps == before:  # a prefill, an image or a context past the graphs: eager anyway
            return out
        static = out.clone()
        runner.decode_graphs = None
        try:
            eager = original(batch, *args, **kwargs)
        finally:
            runner.decode_graphs = graphs
        compared.append(_compare_step(static, eager))
        return out

    runner.execute = execute
    try:
        prompts = [f"Request {k}: repeat " + "the quick brown fox " * (n // 4) for k, n in enumerate(words)]
        handles = [engine.submit(chat_request(prompt, temperature=0, max_tokens=steps, ignore_eos=True))
                   for prompt in prompts]  # fmt: skip
        results = [handle.result() for handle in handles]
    finally:
        del runner.execute  # the class's method again
    prompt_tokens = [result.prompt_tokens for result in results]
    require(len(compared) >= steps - 2, f"only {len(compared)} decode steps took the graphs' path (prompts "
                                        f"{prompt_tokens} tokens, {steps} steps each)")  # fmt: skip
    worst = max(step["rel_l2"] for step in compared)
    require(worst <= GRAPH_REL_TOL, f"graph logits off the eager ones by {worst:.4f} (relative L2): {compared}")
    untied = [step for step in compared if step["worst_gap"] > GRAPH_TIE]
    if untied:
        raise CheckFailed(f"graphs and eager chose different ids where the eager top two are "
                          f"{untied[0]['worst_gap']:.3f} apart (over {GRAPH_TIE}): {untied}")  # fmt: skip
    return {"steps_compared": len(compared), "rows": sum(step["rows"] for step in compared),
            "replayed": graphs.num_replays - replays, "prompt_tokens": prompt_tokens, "max_rel_l2": round(worst, 5),
            "steps_with_other_ids": sum(1 for step in compared if step["different_ids"]), "tolerance": GRAPH_REL_TOL,
            "tie": GRAPH_TIE, "max_context_tokens": graphs.max_context}  # fmt: skip
