"""The generation engine on the tiny checkpoint (fp32, CPU): batching, sampling, streaming, cancellation."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import xgrammar
from PIL import Image, ImageDraw

from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.errors import ContextLengthError, InvalidRequestError, QueueFullError
from minicpmv.engine.request import GenerationRequest
from minicpmv.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_full):
    eng = Engine.from_pretrained(tiny_full, dtype="float32", config=EngineConfig(max_num_seqs=8))
    yield eng
    eng.shutdown()


_ids = iter(range(10**6))


def request(text="Describe the invoice.", images=(), **sampling) -> GenerationRequest:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return GenerationRequest(
        request_id=f"r{next(_ids)}",
        messages=[{"role": "user", "content": content}],
        images=list(images),
        sampling=SamplingParams(**sampling),
    )


def page(seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (700, 500), "white")
    draw = ImageDraw.Draw(image)
    for line in range(12):
        draw.text((20, 20 + 38 * line), f"Line {line} total {seed * 31 + line}", fill="black")
    return image


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.002)


def test_engine_greedy_matches_the_plain_reference_loop(engine):
    req = request("Total amount due?", images=[page()], temperature=0, max_tokens=12, ignore_eos=True)
    ours = engine.generate(req).choices[0].token_ids
    inputs = engine.processor([engine.processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "(<image>./</image>)\nTotal amount due?"}], tokenize=False,
        add_generation_prompt=True)], [[page()]])  # fmt: skip
    reference = engine.model.generate_greedy(
        inputs.input_ids, inputs.attention_mask, max_new_tokens=12,
        pixel_values=inputs.pixel_values, tgt_sizes=inputs.tgt_sizes, image_bounds=inputs.image_bounds,
    )  # fmt: skip
    assert ours == reference[0]


def test_greedy_output_is_the_same_alone_and_joining_a_running_batch(engine):
    alone = engine.generate(request("Who signed the form?", images=[page(1)], temperature=0, max_tokens=16,
                                    ignore_eos=True)).choices[0].token_ids  # fmt: skip
    long_a = engine.submit(request("Read every line.", temperature=0, max_tokens=60, ignore_eos=True))
    long_b = engine.submit(request("Summarise.", images=[page(2)], temperature=0, max_tokens=60, ignore_eos=True))
    stream = iter(long_a)
    for _ in range(5):  # let the batch run a few steps before joining it
        next(stream)
    joined = engine.generate(request("Who signed the form?", images=[page(1)], temperature=0, max_tokens=16,
                                     ignore_eos=True)).choices[0].token_ids  # fmt: skip
    long_a.cancel()
    long_b.cancel()
    assert joined == alone


def test_short_request_is_not_held_hostage_by_a_long_one(engine):
    short_alone_steps = 4
    long = engine.submit(request("Write a long report.", temperature=0, max_tokens=400, ignore_eos=True))
    stream = iter(long)
    next(stream)
    start = engine.num_steps
    result = engine.generate(request("Yes or no?", temperature=0, max_tokens=short_alone_steps, ignore_eos=True))
    steps = engine.num_steps - start
    assert result.completion_tokens == short_alone_steps
    assert steps <= 3 * short_alone_steps, steps
    assert engine.num_running >= 1  # the long one was still running
    long.cancel()
    assert list(stream)[-1].finish_reason == "cancelled"


def test_cancelled_request_leaves_the_batch_at_the_next_step(engine):
    handle = engine.submit(request("Go on forever.", temperature=0, max_tokens=500, ignore_eos=True))
    stream = iter(handle)
    next(stream)
    handle.cancel()
    cancelled_at = engine.num_steps
    rest = list(stream)
    assert rest[-1].finish_reason == "cancelled"
    assert engine.num_steps - cancelled_at <= 1
    wait_for(lambda: engine.num_running == 0)
    assert sum(len(d.token_ids) for d in rest) <= 2


def test_seeds_reproduce_whether_or_not_the_prompt_is_cached(engine):
    """The same seeded request sent twice gives the same answer, the second time with its prompt in the prefix
    cache (README, "Seeds": a seeded request never reads it; a prefill after cached tokens computes logits a few
    ulps off a full one on some CPUs, which changed this answer on an AMX Xeon). Both run alone: a row's numbers
    in torch's CPU matmul depend on how many rows the step has (1-3 differ from 12+, measured on an AVX512
    EPYC), so what else runs is not part of the promise."""
    params = dict(temperature=1.0, top_p=0.95, top_k=0, seed=1234, max_tokens=24, ignore_eos=True)
    blocks = engine.block_manager
    first = engine.generate(request("Pick words.", **params)).choices[0].text
    hits = blocks.prefix_hits
    engine.generate(request("Pick words.", **dict(params, seed=None)))  # unseeded: the prompt is cached
    assert blocks.prefix_hits > hits
    hits = blocks.prefix_hits
    second = engine.generate(request("Pick words.", **params)).choices[0].text
    assert blocks.prefix_hits == hits  # it was there to read, and the seeded request did not
    different = engine.generate(request("Pick words.", **dict(params, seed=99))).choices[0].text
    assert first == second
    assert first != different


def test_stop_strings_cut_the_output_exactly(engine):
    full = engine.generate(request("List the totals.", temperature=0, max_tokens=40, ignore_eos=True))
    text = full.choices[0].text
    stop = text[12:15]
    assert stop.strip() and text.index(stop) >= 1
    cut = engine.generate(request("List the totals.", temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streamed_deltas_concatenate_to_the_non_streamed_text(engine):
    params = dict(temperature=0.8, seed=7, max_tokens=30, ignore_eos=True)
    streamed = "".join(d.text for d in engine.submit(request("Stream me.", images=[page(3)], **params)))
    whole = engine.generate(request("Stream me.", images=[page(3)], **params)).choices[0].text
    assert streamed == whole and whole


def test_json_mode_output_parses(engine):
    """Every output is the start of a JSON object, and one that ends by itself (not by max_tokens) is one.
    Random weights over the real 151k-token vocabulary wander inside strings for hundreds of tokens, so most
    choices are cut short here; at temperature 2 over the whole vocabulary, this seed's third choice closes
    its object at once (the seeds are fixed, so it does in every run), which the check of a finished choice
    needs (that a grammar run ends in valid JSON is also tests/unit/test_structured.py's)."""
    result = engine.generate(request("Give JSON.", temperature=2.0, top_k=0, top_p=1.0, seed=4, n=4, max_tokens=24,
                                     response_format={"type": "json_object"}))  # fmt: skip
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo(["a"]))
    any_object = compiler.compile_json_schema('{"type": "object"}', strict_mode=False)
    for choice in result.choices:
        assert xgrammar.GrammarMatcher(any_object).accept_string(choice.text), choice.text
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict), choice.text
        else:  # no stop token inside an unfinished object: only max_tokens cuts one short
            assert choice.finish_reason == "length" and len(choice.token_ids) == 24, choice
    assert [choice.finish_reason for choice in result.choices].count("stop") >= 1  # the check above ran
    plain = engine.generate(request("Give JSON.", temperature=1.0, seed=4, max_tokens=20))  # the check bites
    assert not xgrammar.GrammarMatcher(any_object).accept_string(plain.choices[0].text)


def test_json_schema_mode_output_validates(engine):
    schema = {"type": "object", "properties": {"total": {"type": "integer"}, "currency": {"type": "string",
              "enum": ["EUR", "USD"]}}, "required": ["total", "currency"], "additionalProperties": False}  # fmt: skip
    result = engine.generate(request("Extract.", temperature=0.7, seed=11, max_tokens=200,
                                     response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}))  # fmt: skip
    data = json.loads(result.choices[0].text)
    assert set(data) == {"total", "currency"} and isinstance(data["total"], int) and data["currency"] in ("EUR", "USD")


def test_ignore_eos_and_min_tokens(engine):
    result = engine.generate(request("Short.", temperature=0.9, seed=3, max_tokens=25, ignore_eos=True))
    assert result.completion_tokens == 25
    assert not {151643, 151645} & set(result.choices[0].token_ids)
    # Make the greedy first token a stop token: without min_tokens generation ends at once ...
    first = engine.generate(request("Short.", temperature=0, max_tokens=5)).choices[0].token_ids[0]
    stopped = engine.generate(request("Short.", temperature=0, max_tokens=30, stop_token_ids=[first]))
    assert stopped.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    # ... with min_tokens it can't stop before 6 tokens.
    held = engine.generate(request("Short.", temperature=0, max_tokens=30, stop_token_ids=[first], min_tokens=6))
    assert held.completion_tokens >= 6 and first not in held.choices[0].token_ids[:6]


def test_n_choices_and_logprobs(engine):
    result = engine.generate(request("Three ways.", temperature=1.0, seed=42, n=3, max_tokens=10, ignore_eos=True,
                                     logprobs=True, top_logprobs=3))  # fmt: skip
    texts = [c.text for c in result.choices]
    assert len(texts) == 3 and len(set(texts)) == 3
    assert result.completion_tokens == 30
    for choice in result.choices:
        assert len(choice.logprobs) == 10
        for entry in choice.logprobs:
            assert len(entry.top) == 3 and entry.top[0][2] >= entry.top[1][2] >= entry.top[2][2]
            assert entry.logprob <= entry.top[0][2] + 1e-6 and entry.logprob < 0
    greedy = engine.generate(request("Three ways.", temperature=0, max_tokens=5, logprobs=True, top_logprobs=1))
    assert all(e.token_id == e.top[0][0] for e in greedy.choices[0].logprobs)


def test_vision_embeddings_are_cached_by_content(engine):
    image = page(9)
    first = engine.generate(request("What page?", images=[image], temperature=0, max_tokens=8, ignore_eos=True))
    hits = engine.vision_cache.hits
    second = engine.generate(request("What page?", images=[image.copy()], temperature=0, max_tokens=8,
                                     ignore_eos=True))  # fmt: skip
    assert engine.vision_cache.hits == hits + 1
    assert first.choices[0].token_ids == second.choices[0].token_ids


def test_context_too_long_is_rejected_before_any_compute(engine):
    steps = engine.num_steps
    with pytest.raises(ContextLengthError, match="context"):
        engine.submit(request("x", max_tokens=engine.max_model_len))
    assert engine.num_steps == steps


@pytest.mark.parametrize(
    "sampling, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n must be"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"response_format": {"type": "xml"}}, "response_format|type"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_requests_raise_clear_errors(engine, sampling, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.submit(request("x", **sampling))


def test_bad_messages_are_invalid_requests(engine):
    bad = GenerationRequest("bad", messages=[{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                                             {"role": "user", "content": "c"}])  # fmt: skip
    with pytest.raises(InvalidRequestError, match="at most one system"):
        engine.submit(bad)


def test_queue_full(tiny_full):
    eng = Engine.from_pretrained(tiny_full, dtype="float32",
                                 config=EngineConfig(max_num_seqs=1, max_waiting=1))  # fmt: skip
    try:
        running = eng.submit(request("a", temperature=0, max_tokens=300, ignore_eos=True))
        wait_for(lambda: eng.num_running == 1)
        waiting = eng.submit(request("b", temperature=0, max_tokens=5))
        with pytest.raises(QueueFullError):
            eng.submit(request("c", temperature=0, max_tokens=5))
        running.cancel()
        assert waiting.result().completion_tokens >= 1
    finally:
        eng.shutdown()


def test_concurrent_submitters_all_finish(engine):
    results = {}

    def worker(i):
        results[i] = engine.generate(request(f"Question {i}?", temperature=0.5, seed=i, max_tokens=8 + i,
                                             ignore_eos=True))  # fmt: skip

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.completion_tokens for r in results.values()) == [8, 9, 10, 11, 12, 13]
    wait_for(lambda: engine.num_running == 0)


def test_batched_greedy_choice_matches_the_row_by_row_path(engine):
    """Plain greedy rows take one batched argmax; asking for logprobs forces the row-by-row path."""
    prompts = ["Total amount due?", "Who signed?", "Read the first line.", "Summarise."]
    plain = dict(temperature=0, repetition_penalty=1.0, max_tokens=10, ignore_eos=True)
    batched = [engine.submit(request(p, **plain)) for p in prompts]
    rowwise = [engine.submit(request(p, logprobs=True, **plain)) for p in prompts]
    for a, b in zip(batched, rowwise, strict=True):
        first, second = a.result().choices[0], b.result().choices[0]
        assert first.token_ids == second.token_ids and len(first.token_ids) == 10


def _outside_strings(text: str) -> str:
    """``text`` with the contents of JSON strings removed (escapes included): what lies between the tokens."""
    return re.sub(r'"(?:[^"\\]|\\.)*"?', '""', text)


def test_json_outputs_have_no_whitespace_between_tokens(engine):
    """Compact JSON by default: over several seeds, JSON mode's and a tool-style schema's outputs (finished or
    cut by max_tokens) hold no whitespace outside strings, where a model with random weights used to emit
    spaces and newlines between tokens."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "arguments": {"type": "object",
              "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city", "days"]}},
              "required": ["name", "arguments"], "additionalProperties": False}  # fmt: skip
    formats = [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "call", "schema": schema}}]
    for response_format in formats:
        result = engine.generate(request("Give JSON.", temperature=1.5, top_k=0, top_p=1.0, seed=5, n=6,
                                         max_tokens=40, response_format=response_format))  # fmt: skip
        for choice in result.choices:
            between = _outside_strings(choice.text)
            assert not re.search(r"\s", between), (response_format["type"], choice.text)
