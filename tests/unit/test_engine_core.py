"""The engine core on the tiny checkpoint (float32, CPU): KV pool, scheduler, prefix cache, chunked prefill.

Every greedy comparison is exact: batching, chunking and the cache path change float32 logits by a few ulps at
most (a row's matmul result depends on the step's row count), which moves a greedy id only where the top two
logits are that close, so the same request must give the same ids alone, in a batch, after a preemption and
from the prefix cache.
"""

from __future__ import annotations

import threading

import pytest
from PIL import Image, ImageDraw

from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.request import GenerationRequest
from minicpmv.engine.sampling_params import SamplingParams
from tests.unit.test_block_manager import keys_for

_ids = iter(range(10**6))


def request(text: str, images=(), max_slice_nums=None, **sampling) -> GenerationRequest:
    sampling = {"temperature": 0, "ignore_eos": True, "max_tokens": 16, "repetition_penalty": 1.0} | sampling
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return GenerationRequest(f"core-{next(_ids)}", messages=[{"role": "user", "content": content}],
                             images=list(images), sampling=SamplingParams(**sampling),
                             max_slice_nums=max_slice_nums)  # fmt: skip


def page(seed: int, size=(600, 400)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for line in range(8):
        draw.text((20, 20 + 45 * line), f"Item {line}: {seed * 97 + line * 13} EUR", fill="black")
    return image


def ids(engine: Engine, req: GenerationRequest) -> list[int]:
    return choice(engine, req).token_ids


def choice(engine: Engine, req: GenerationRequest):
    result = engine.generate(req)
    assert all(c.error is None for c in result.choices), result
    return result.choices[0]


# Two paths (batched or alone, chunked, cached, recomputed) differ by a few ulps in float32 (up to 5e-6 measured,
# AMD EPYC and an AMX Xeon): a greedy id may differ only where the reference's top two logprobs are this close.
TIE = 1e-4


def agree(ours, reference) -> bool:
    """Two greedy choices (``logprobs`` with ``top_logprobs`` >= 2 on the reference) are the same, or first
    differ at a near-tie of the reference's (after which they may go their own ways)."""
    for step, (a, b) in enumerate(zip(ours.token_ids, reference.token_ids, strict=False)):
        if a != b:
            scores = {token: logprob for token, _, logprob in reference.logprobs[step].top}
            return a in scores and abs(scores[a] - scores[b]) <= TIE
    return len(ours.token_ids) == len(reference.token_ids)


@pytest.fixture(scope="module")
def engine(tiny_full):
    eng = Engine.from_pretrained(tiny_full, dtype="float32",
                                 config=EngineConfig(max_num_seqs=8, max_num_batched_tokens=64))  # fmt: skip
    yield eng
    eng.shutdown()


def hits_of(engine: Engine, req: GenerationRequest) -> tuple[list[int], int, int]:
    """(ids, prompt tokens found in the prefix cache, vision-cache misses) of one request run alone."""
    blocks, vision = engine.block_manager, engine.vision_cache
    hits, misses = blocks.prefix_hits, vision.misses
    out = ids(engine, req)
    return out, blocks.prefix_hits - hits, vision.misses - misses


# ---------------------------------------------------------------- prefix cache and vision cache keys


def test_a_follow_up_about_the_same_page_hits_both_caches(engine):
    engine.block_manager.reset_prefix_cache()
    first, _, first_misses = hits_of(engine, request("What is the total?", [page(1)]))
    again, hit, misses = hits_of(engine, request("What is the total?", [page(1)]))
    prompt = engine.generate(request("What is the total?", [page(1)], max_tokens=1)).prompt_tokens
    assert again == first
    assert first_misses == 1 and misses == 0  # the vision cache too
    assert hit == (prompt - 1) // 16 * 16  # every full block but the one holding the last token


def test_another_image_of_the_same_size_misses_both_caches(engine):
    engine.block_manager.reset_prefix_cache()
    hits_of(engine, request("What is the total?", [page(2)]))
    image_start = _first_image_position(engine, request("What is the total?", [page(3)]))
    _, hit, misses = hits_of(engine, request("What is the total?", [page(3)]))
    assert misses == 1
    assert hit <= image_start // 16 * 16  # nothing from the first image's position on


def test_another_max_slice_nums_misses_both_caches(engine):
    engine.block_manager.reset_prefix_cache()
    image = page(4, (1200, 900))
    hits_of(engine, request("Read it.", [image], max_slice_nums=4))
    start = _first_image_position(engine, request("Read it.", [image], max_slice_nums=2))
    _, hit, misses = hits_of(engine, request("Read it.", [image], max_slice_nums=2))
    assert misses == 1 and hit <= start // 16 * 16


def test_another_prompt_misses_the_prefix_cache_where_it_differs(engine):
    engine.block_manager.reset_prefix_cache()
    hits_of(engine, request("Summarise the invoice in one line."))
    _, hit, _ = hits_of(engine, request("Translate the invoice into French."))
    a = engine.prepare(request("Summarise the invoice in one line.")).prompt_ids
    b = engine.prepare(request("Translate the invoice into French.")).prompt_ids
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert hit == common // 16 * 16


def test_the_vision_cache_evicts_beyond_its_size(tiny_full):
    eng = Engine.from_pretrained(tiny_full, dtype="float32", config=EngineConfig(vision_cache_size=2))
    try:
        for seed in (10, 11, 12):
            ids(eng, request("Total?", [page(seed)], max_tokens=1))
        assert len(eng.vision_cache) == 2
        misses = eng.vision_cache.misses
        ids(eng, request("Total?", [page(10)], max_tokens=1))  # the oldest was evicted
        assert eng.vision_cache.misses == misses + 1
        ids(eng, request("Total?", [page(12)], max_tokens=1))
        assert eng.vision_cache.misses == misses + 1
    finally:
        eng.shutdown()


def test_the_prefix_cache_evicts_when_the_pool_needs_its_blocks(tiny_full):
    eng = Engine.from_pretrained(tiny_full, dtype="float32", config=EngineConfig(num_kv_blocks=40))
    try:
        text = "Describe the first invoice in detail, " + "line by line, " * 12  # four full blocks
        first = lambda: request(text, max_tokens=8)  # noqa: E731
        ids(eng, first())
        assert hits_of(eng, first())[1] == full_blocks(eng, first()) * 16 == 64
        # Six prompts of 10 blocks each, all but the first block their own: more than the pool holds, so the
        # blocks of finished sequences are evicted, least recently used first.
        others = [request(f"Another long question number {k} " + "about shipping " * 60, max_tokens=8)
                  for k in range(6)]  # fmt: skip
        assert 6 * (full_blocks(eng, others[0]) - 1) + full_blocks(eng, first()) > 40
        for other in others:
            ids(eng, other)
        assert cached_blocks(eng, first()) == 0  # the oldest went first ...
        assert cached_blocks(eng, others[0]) < full_blocks(eng, others[0])  # ... then the next oldest's
        assert cached_blocks(eng, others[-1]) == full_blocks(eng, others[-1])  # the newest are all kept
        _, hit, _ = hits_of(eng, first())
        assert hit == 0
    finally:
        eng.shutdown()


def full_blocks(engine: Engine, req: GenerationRequest) -> int:
    """Full blocks of ``req``'s prompt that the prefix cache could give it (never the last token's)."""
    return (len(engine.prepare(req).prompt_ids) - 1) // engine.block_manager.block_size


def cached_blocks(engine: Engine, req: GenerationRequest) -> int:
    """Leading blocks of ``req``'s prompt (text only) in the prefix cache now; looks, changes nothing."""
    prompt = engine.prepare(req).prompt_ids
    keys = keys_for(prompt, engine.block_manager.block_size)
    return len(engine.block_manager.cached_prefix(keys, len(prompt)))


def _first_image_position(engine: Engine, req: GenerationRequest) -> int:
    state = engine.prepare(req)
    return min(start for start, _, _ in state.content_spans)


# ---------------------------------------------------------------- same output on every path


def test_greedy_ids_are_the_same_alone_batched_preempted_and_cached(tiny_full):
    probe = lambda: request("Who signed the form?", [page(20)], max_tokens=150, logprobs=True,  # noqa: E731
                            top_logprobs=2)
    roomy = Engine.from_pretrained(tiny_full, dtype="float32", config=EngineConfig(enable_prefix_caching=False))
    try:
        alone = choice(roomy, probe())
        others = [roomy.submit(request(f"Other question {k}?", [page(30 + k)] if k % 2 else [], max_tokens=30))
                  for k in range(4)]  # fmt: skip
        batched = choice(roomy, probe())
        for handle in others:
            handle.result()
    finally:
        roomy.shutdown()
    assert agree(batched, alone)

    # A pool too small for all of them at once (3 x 13 blocks + the probe's 25 > 48): as they grow, the
    # newest (the probe) is preempted and recomputed.
    tight = Engine.from_pretrained(tiny_full, dtype="float32", config=EngineConfig(num_kv_blocks=48,
                                                                                  max_num_batched_tokens=96))
    try:
        handles = [tight.submit(request(f"Long answer {k}.", max_tokens=150)) for k in range(3)]
        handles.append(tight.submit(probe()))
        results = [h.result() for h in handles]
        # The newest is preempted, every time: the probe, never the three older ones.
        preemptions = [h._state.sequences[0].num_preemptions for h in handles]
        assert preemptions[:3] == [0, 0, 0] and preemptions[3] > 0, preemptions
        assert tight.scheduler.num_preemptions == preemptions[3]
        assert agree(results[-1].choices[0], alone)
        assert all(r.choices[0].finish_reason == "length" and r.completion_tokens == 150 for r in results[:3])
        cached = choice(tight, probe())  # the page's blocks are in the prefix cache now
        assert agree(cached, alone) and tight.block_manager.prefix_hits > 0
    finally:
        tight.shutdown()


def test_a_long_prompt_is_prefilled_in_chunks_while_others_stream(tiny_full):
    eng = Engine.from_pretrained(tiny_full, dtype="float32", config=EngineConfig(max_num_batched_tokens=32))
    try:
        short = eng.submit(request("Count.", max_tokens=40))
        stream = iter(short)
        next(stream)  # decoding has started
        long_text = "The quarterly report lists revenue, costs and risks. " * 60
        long = eng.submit(request(long_text, max_tokens=4))
        steps_before = eng.num_steps
        seen_before_long_first = 0
        long_first = threading.Event()
        long_result = {}

        def consume_long():
            deltas = iter(long)
            first = next(deltas)
            long_first.set()
            long_result["first"] = first
            for _ in deltas:
                pass

        thread = threading.Thread(target=consume_long)
        thread.start()
        for _ in stream:
            if not long_first.is_set():
                seen_before_long_first += 1
        thread.join()
        prompt = long_result["first"].prompt_tokens
        assert prompt > 600
        assert eng.num_steps - steps_before >= prompt // 32  # the prompt took many steps ...
        assert seen_before_long_first >= 10  # ... and the short stream went on between them
    finally:
        eng.shutdown()


# ---------------------------------------------------------------- the pool itself


def pool_storage(engine: Engine) -> list[int]:
    pool = engine.runner.pool
    return [t.untyped_storage().data_ptr() for t in (*pool.keys, *pool.values)]


def test_the_pool_is_allocated_once(tiny_full):
    # 40 blocks of 16 tokens: the four stories need 45 (21 for the one with a page, 8 for each other).
    eng = Engine.from_pretrained(tiny_full, dtype="float32", config=EngineConfig(num_kv_blocks=40))
    try:
        before, tensors = pool_storage(eng), [*eng.runner.pool.keys, *eng.runner.pool.values]
        handles = [eng.submit(request(f"Story {k}.", [page(40)] if k == 0 else [], max_tokens=100))
                   for k in range(4)]  # fmt: skip
        cancelled = eng.submit(request("Never mind.", max_tokens=200))
        next(iter(cancelled))
        cancelled.cancel()
        for handle in handles:
            handle.result()
        ids(eng, request("And one more.", max_tokens=4))  # joins after retirements
        assert eng.scheduler.num_preemptions > 0  # the run did preempt
        assert pool_storage(eng) == before
        assert all(a is b for a, b in zip(tensors, [*eng.runner.pool.keys, *eng.runner.pool.values], strict=True))
        assert eng.block_manager.num_used_blocks == 0  # everything given back
    finally:
        eng.shutdown()


@pytest.mark.slow
def test_64_long_requests_through_a_pool_that_holds_8(tiny_full):
    prompts = [f"Request {k}: write the shipping note for order {k * 7919}." for k in range(64)]
    roomy = Engine.from_pretrained(tiny_full, dtype="float32", config=EngineConfig(max_num_seqs=64))
    try:
        handles = [roomy.submit(request(p, max_tokens=48, logprobs=True, top_logprobs=2)) for p in prompts]
        expected = [h.result().choices[0] for h in handles]
        need = -(-(max(len(roomy.prepare(request(p)).prompt_ids) for p in prompts) + 48) // 16)
    finally:
        roomy.shutdown()
    tight = Engine.from_pretrained(tiny_full, dtype="float32", config=EngineConfig(
        max_num_seqs=64, num_kv_blocks=8 * need, enable_prefix_caching=False))  # fmt: skip
    try:
        handles = [tight.submit(request(p, max_tokens=48)) for p in prompts]
        results = [h.result() for h in handles]
    finally:
        tight.shutdown()
    assert all(r.choices[0].error is None and r.choices[0].finish_reason == "length" for r in results)
    assert all(agree(r.choices[0], reference) for r, reference in zip(results, expected, strict=True))
    assert tight.scheduler.num_preemptions > 0


# ---------------------------------------------------------------- output processing off the engine thread


def test_deltas_are_made_on_the_output_thread_and_a_slow_consumer_does_not_stop_the_steps(engine):
    threads, steps_during_sleep, done = [], [], threading.Event()

    def slow(delta):
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            before = engine.num_steps
            done.wait(0.5)  # a consumer that blocks (a slow client, a full socket)
            steps_during_sleep.append(engine.num_steps - before)

    handle = engine.submit(request("Keep writing.", max_tokens=40), callback=slow)
    other = ids(engine, request("Meanwhile.", max_tokens=12))
    assert len(other) == 12
    engine.output.drain()
    assert set(threads) == {"minicpmv-output"}
    assert steps_during_sleep[0] >= 10  # the engine kept stepping while the consumer blocked
    assert handle.prompt_tokens > 0


def test_a_stop_string_ends_the_sequence_even_though_text_is_made_off_the_engine_thread(engine):
    # Seeded (greedy all the same): computed the same way twice, not the second time from the prefix cache,
    # whose few-ulp difference could flip one of this random model's near-tied greedy choices.
    text = engine.generate(request("Count.", max_tokens=60, seed=0)).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text  # the random model writes something to cut at
    result = engine.generate(request("Count.", max_tokens=60, stop=[stop], seed=0))
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.text
    assert text.startswith(choice.text)
    assert result.completion_tokens == len(choice.token_ids) < 60  # tokens sampled after the stop are not shown


def test_a_failing_image_encode_fails_that_request_only(tiny_full):
    eng = Engine.from_pretrained(tiny_full, dtype="float32")
    try:
        text = eng.submit(request("Keep going.", max_tokens=60))
        stream = iter(text)
        next(stream)  # decoding

        def broken(*args, **kwargs):
            raise RuntimeError("vision tower exploded")

        eng.encoder.model = type("Broken", (), {"encode_images": staticmethod(broken)})()
        failed = eng.generate(request("Total?", [page(50)], max_tokens=4))
        assert "vision tower exploded" in failed.choices[0].error
        rest = list(stream)
        assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 60
    finally:
        eng.shutdown()


def test_a_lazily_opened_image_that_does_not_decode_is_the_requests_error(engine):
    """Triton hands images over opened lazily (header only); a broken body surfaces in ``submit`` as an invalid
    request naming the image, and the engine keeps serving."""
    import io

    from minicpmv.engine.errors import InvalidRequestError
    from minicpmv_triton.tensors import decode_image

    buffer = io.BytesIO()
    page(60).save(buffer, "PNG")
    broken = decode_image(buffer.getvalue()[: len(buffer.getvalue()) // 2], 0, lazy=True)
    with pytest.raises(InvalidRequestError, match="image 0: not a decodable image"):
        engine.submit(request("Total?", [broken], max_tokens=2))
    assert len(ids(engine, request("Still there?", max_tokens=2))) == 2
