"""LoRA adapters as MiniCPM-V's recipe writes them, made here with ``peft`` on the tiny checkpoint, served by the
engine (minicpmv/lora.py, minicpmv/engine/lora.py): each gives the greedy ids and logprobs of the base model
with the adapter merged by peft (``merge_and_unload``) and the vision file loaded as the official code does
(``load_state_dict(strict=False)``); a batch mixing adapters and the base gives each row what it gives alone,
with fewer slots than adapters; caches never cross adapters; bad adapters are refused with what is wrong."""

from __future__ import annotations

import itertools
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.errors import AdapterNotFoundError
from minicpmv.engine.request import GenerationRequest
from minicpmv.engine.sampling_params import SamplingParams
from minicpmv.image_processing import ImageProcessor
from minicpmv.loading import load_model
from minicpmv.lora import AdapterError, load_adapter
from minicpmv.tokenizer import load_tokenizer
from tests.lora_adapters import ALL_LINEAR, ATTENTION, make_adapter
from tests.unit.test_engine_core import page

# Triton's interpreter (the LoRA kernels' test) turns 1-element arrays into ints, which numpy >= 1.25 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
_ids = itertools.count()


@pytest.fixture(scope="module")
def adapters(tiny_full, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "invoices": make_adapter(tiny_full, root / "invoices", 8, ATTENTION, 1),
        "statements": make_adapter(tiny_full, root / "statements", 64, ALL_LINEAR, 2, use_rslora=True),
        "customs": make_adapter(tiny_full, root / "customs", 8, ATTENTION, 3, vision=True),
    }


def engine_config(**extra) -> EngineConfig:
    return EngineConfig(**({"max_num_seqs": 8, "max_num_batched_tokens": 256, "num_kv_blocks": 256} | extra))


@pytest.fixture(scope="module")
def served(tiny_full, adapters):
    """One engine, three adapters, two slots (a third adapter waits for one), MLP targets on."""
    modules = ",".join(f"{name}={path}" for name, path in adapters.items())
    engine = Engine.from_pretrained(tiny_full, dtype="float32",
                                    config=engine_config(lora_modules=modules, max_loras=2,
                                                         lora_target_modules="all"))  # fmt: skip
    yield engine
    engine.shutdown()


def merged_engine(checkpoint: Path, adapter: Path | None) -> Engine:
    """The reference: the base model with the adapter merged by peft and its vision file loaded as the
    official inference code does."""
    model = load_model(checkpoint, dtype="float32")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        vision_file = adapter / "vpm_resampler_embedtokens.pt"
        if vision_file.exists():
            model.load_state_dict(torch.load(vision_file, weights_only=True), strict=False)
    return Engine(model, load_tokenizer(checkpoint), ImageProcessor.from_pretrained(checkpoint), engine_config())


def request(adapter: str | None, text: str = "What is the total?", images=(), **sampling) -> GenerationRequest:
    sampling = {"temperature": 0, "max_tokens": 6, "ignore_eos": True, "logprobs": True} | sampling
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return GenerationRequest(f"lora-{next(_ids)}", messages=[{"role": "user", "content": content}],
                             images=list(images), sampling=SamplingParams(**sampling), adapter=adapter)  # fmt: skip


def answer(engine: Engine, req: GenerationRequest) -> tuple[list[int], list[float]]:
    choice = engine.generate(req).choices[0]
    assert choice.error is None, choice.error
    return choice.token_ids, [entry.logprob for entry in choice.logprobs]


def test_each_adapter_gives_what_peft_merged_into_the_base_gives(served, tiny_full, adapters):
    base_reference = merged_engine(tiny_full, None)
    try:
        base = answer(served, request(None, images=[page(1, (300, 200))]))
        expected = answer(base_reference, request(None, images=[page(1, (300, 200))]))
        assert base[0] == expected[0]
        torch.testing.assert_close(torch.tensor(base[1]), torch.tensor(expected[1]), rtol=0, atol=1e-4)
    finally:
        base_reference.shutdown()
    outputs = {}
    for name, path in adapters.items():
        reference = merged_engine(tiny_full, path)
        try:
            expected = answer(reference, request(None, images=[page(1, (300, 200))]))
        finally:
            reference.shutdown()
        got = answer(served, request(name, images=[page(1, (300, 200))]))
        assert got[0] == expected[0], name
        torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(expected[1]), rtol=0, atol=1e-4)
        outputs[name] = got
    # The adapters change the answer: none of them is the base model's.
    assert all(out[1] != base[1] for out in outputs.values())


def test_a_batch_mixing_adapters_and_the_base_gives_each_row_its_own_answer(served):
    """Four kinds of rows in one run, three adapters for two slots: the third waits for a slot and is not
    stalling the others; every answer equals the one it gives alone."""
    names = [None, "invoices", "statements", "customs", "invoices", None]
    alone = [answer(served, request(name, f"Question {i}?", images=[page(i, (240, 160))]))
             for i, name in enumerate(names)]  # fmt: skip
    handles = [served.submit(request(name, f"Question {i}?", images=[page(i, (240, 160))]))
               for i, name in enumerate(names)]  # fmt: skip
    for handle, (ids, logprobs) in zip(handles, alone, strict=True):
        choice = handle.result().choices[0]
        assert choice.error is None and choice.token_ids == ids
        torch.testing.assert_close(torch.tensor([e.logprob for e in choice.logprobs]), torch.tensor(logprobs),
                                   rtol=0, atol=1e-4)  # fmt: skip
    assert served.lora.evictions > 0  # three adapters went through two slots


def test_the_same_page_through_two_adapters_misses_the_others_cache(served, tiny_full, adapters):
    """A fresh engine: the same page and question through one adapter, another, the base, then the first again:
    only the last finds anything in the prefix cache (every block key starts from the adapter's salt)."""
    modules = ",".join(f"{name}={adapters[name]}" for name in ("invoices", "statements"))
    engine = Engine.from_pretrained(tiny_full, dtype="float32",
                                    config=engine_config(lora_modules=modules, lora_target_modules="all"))  # fmt: skip
    try:
        prompt = "Read this page carefully and list every amount on it, line by line, in order."
        seen = []
        for name in ("invoices", "statements", None, "invoices"):
            hits = engine.block_manager.prefix_hits
            answer(engine, request(name, prompt, images=[page(7, (300, 200))]))
            seen.append(engine.block_manager.prefix_hits - hits)
        assert seen[:3] == [0, 0, 0] and seen[3] >= 64  # same tokens, three different KVs; then a hit
    finally:
        engine.shutdown()
    # An adapter with its own vision tower has its own image embeddings: a vision-cache key of its own.
    own = served.prepare(request("customs", images=[page(7, (300, 200))])).images[0].key
    shared = served.prepare(request("invoices", images=[page(7, (300, 200))])).images[0].key
    assert own != shared == served.prepare(request(None, images=[page(7, (300, 200))])).images[0].key


def test_unknown_adapters_are_not_found(served, tiny_full):
    with pytest.raises(AdapterNotFoundError, match="no-such"):
        served.submit(request("no-such"))
    plain = Engine.from_pretrained(tiny_full, dtype="float32", config=engine_config())
    try:
        with pytest.raises(AdapterNotFoundError):
            plain.submit(request("invoices"))
    finally:
        plain.shutdown()


def _copy(adapter: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for file in adapter.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


class NotATensor:  # a class the pickle would have to run code to rebuild
    def __reduce__(self):
        return (print, ("this ran",))


def test_bad_adapters_are_refused_with_what_is_wrong(served, tiny_full, adapters, tmp_path):
    model = served.model
    cases = []
    pickled = _copy(adapters["customs"], tmp_path / "pickled")
    with open(pickled / "vpm_resampler_embedtokens.pt", "wb") as f:
        pickle.dump({"resampler.query": NotATensor()}, f)
    cases.append((pickled, "can't be read as tensors only"))
    shapes = _copy(adapters["invoices"], tmp_path / "shapes")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shapes / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(8, 7)
    save_file(tensors, str(shapes / "adapter_model.safetensors"))
    cases.append((shapes, re.escape("needs [r, ") ))
    vision_lora = tmp_path / "vision-lora"
    make_adapter(tiny_full, vision_lora, 8, r"vpm\.encoder\.layers\.\d+\.self_attn\.q_proj", 4)
    cases.append((vision_lora, "only the LLM's linear layers"))
    big = tmp_path / "big"
    make_adapter(tiny_full, big, 128, ATTENTION, 5)
    cases.append((big, "rank 128 .* above this server's max_lora_rank 64"))
    dora = _copy(adapters["invoices"], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    cases.append((dora, "DoRA"))
    foreign = _copy(adapters["customs"], tmp_path / "foreign")
    torch.save({"vpm.no_such.weight": torch.zeros(3)}, foreign / "vpm_resampler_embedtokens.pt")
    cases.append((foreign, "the base model does not have"))
    for path, message in cases:
        with pytest.raises(AdapterError, match=message):
            load_adapter("bad", path, model, 64)
    before = served.lora.names()
    with pytest.raises(AdapterError, match="at runtime is off"):
        served.load_adapter("bad", str(shapes))
    assert served.lora.names() == before  # nothing registered


def test_runtime_loading_stays_inside_the_adapter_directory(tiny_full, adapters, tmp_path):
    root = tmp_path / "lora-dir"
    _copy(adapters["invoices"], root / "invoices-v2")
    engine = Engine.from_pretrained(tiny_full, dtype="float32", config=engine_config(enable_lora=True,
                                                                                      lora_dir=str(root)))  # fmt: skip
    try:
        with pytest.raises(AdapterError, match="outside the adapter directory"):
            engine.load_adapter("escape", "../../" + str(adapters["statements"]))
        with pytest.raises(AdapterError, match="outside the adapter directory"):
            engine.load_adapter("escape", str(adapters["statements"]))
        info = engine.load_adapter("invoices", "invoices-v2")
        assert info.rank == 8 and not info.resident
        first = answer(engine, request("invoices"))
        engine.unload_adapter("invoices")
        with pytest.raises(AdapterNotFoundError):
            engine.submit(request("invoices"))
        engine.load_adapter("invoices", "invoices-v2")  # loaded again: a new uid, the cache is not reused
        hits = engine.block_manager.prefix_hits
        again = answer(engine, request("invoices"))
        assert again[0] == first[0] and again[1] == pytest.approx(first[1], abs=1e-4)
        assert engine.block_manager.prefix_hits == hits
    finally:
        engine.shutdown()


def test_an_nf4_base_with_an_adapter_stays_within_the_nf4_tolerance(tiny_int4, tiny_full, adapters):
    """QLoRA serving: the adapter in float over 4-bit base layers. Its logprobs are as far from the float
    model with the adapter merged as the 4-bit base's are from the float base (twice that at most)."""
    quantized = Engine.from_pretrained(tiny_int4, dtype="float32",
                                       config=engine_config(lora_modules=f"invoices={adapters['invoices']}"))  # fmt: skip
    full = merged_engine(tiny_full, None)
    full_adapter = merged_engine(tiny_full, adapters["invoices"])
    try:
        forced = {"max_tokens": 1, "top_logprobs": 5}
        base_q = served_logprobs(quantized, None, forced)
        base_f = served_logprobs(full, None, forced)
        with_q = served_logprobs(quantized, "invoices", forced)
        with_f = served_logprobs(full_adapter, None, forced)
        base_error = max(abs(a - b) for a, b in zip(base_q, base_f, strict=True))
        adapter_error = max(abs(a - b) for a, b in zip(with_q, with_f, strict=True))
        assert with_q != base_q  # the adapter is applied over the 4-bit layers
        assert adapter_error <= 2 * base_error + 1e-3, (adapter_error, base_error)
    finally:
        for engine in (quantized, full, full_adapter):
            engine.shutdown()


def served_logprobs(engine: Engine, adapter: str | None, sampling: dict) -> list[float]:
    choice = engine.generate(request(adapter, **sampling)).choices[0]
    assert choice.error is None, choice.error
    entry = choice.logprobs[0]
    return [entry.logprob] + [logprob for _, _, logprob in entry.top]


def test_the_triton_lora_kernels_give_the_torch_paths_answers(tiny_full, adapters, monkeypatch):
    """The engine with the LoRA kernels (under Triton's interpreter here; on CUDA by default when they pass
    their self-test) against the masked matmuls: a mixed batch of two adapters and the base, prefill and
    decode, and the static (CUDA-graph) decode forward with its one-tile-per-row table."""
    import functools

    from minicpmv.engine import engine as engine_module
    from minicpmv.engine.model_runner import ModelRunner

    modules = f"invoices={adapters['invoices']},statements={adapters['statements']}"
    config = engine_config(lora_modules=modules, lora_target_modules="all", max_num_batched_tokens=64)
    reference = Engine.from_pretrained(tiny_full, dtype="float32", config=config)
    monkeypatch.setattr(engine_module, "ModelRunner", functools.partial(ModelRunner, lora_kernel=True,
                                                                        static_decode=True))  # fmt: skip
    kernel = Engine.from_pretrained(tiny_full, dtype="float32", config=config)
    try:
        assert kernel.runner.lora.kernel and not reference.runner.lora.kernel
        names = ["invoices", None, "statements"]
        results = []
        for engine in (reference, kernel):
            handles = [engine.submit(request(name, f"Question {i}?", max_tokens=3)) for i, name in enumerate(names)]
            results.append([h.result().choices[0] for h in handles])
        for theirs, ours in zip(*results, strict=True):
            assert ours.error is None and ours.token_ids == theirs.token_ids
            torch.testing.assert_close(torch.tensor([e.logprob for e in ours.logprobs]),
                                       torch.tensor([e.logprob for e in theirs.logprobs]), rtol=0, atol=1e-4)  # fmt: skip
        assert kernel.runner.decode_graphs.num_steps > 0  # decode steps went through the static forward
    finally:
        reference.shutdown()
        kernel.shutdown()
