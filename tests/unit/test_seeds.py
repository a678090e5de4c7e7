"""Seeded requests are computed the same way in every run (README, "Seeds"): no prefix-cache reads, prefill
chunks and image-encoder calls that depend on the request alone, whatever else the engine runs.

The mechanism is checked directly (which chunks and encoder calls a seeded request gets, alone and under load),
and the answers where the promise holds on every CPU: the same request run alone, with its prompt and pages
cached or not. Under load the rows of a step share its matmuls, whose numbers depend on the row count on the
CPU (1-3 rows differ from 12+ on an AVX512 EPYC), so tokens are not compared there.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.request import GenerationRequest
from minicpmv.engine.sampling_params import SamplingParams

_ids = iter(range(10**6))
SAMPLED = dict(temperature=1.0, top_p=0.95, top_k=0, max_tokens=12, ignore_eos=True)


def request(text: str, images=(), **sampling) -> GenerationRequest:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return GenerationRequest(f"seed-{next(_ids)}", messages=[{"role": "user", "content": content}],
                             images=list(images), sampling=SamplingParams(**sampling))  # fmt: skip


def page(seed: int, size=(900, 700)) -> Image.Image:
    """A page of noise: no two slices of any two pages have the same pixels (the test tells them apart so)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


LONG = "Read this carefully: " + " ".join(f"clause {k} applies to section {k % 7}." for k in range(40))


@pytest.fixture(scope="module")
def engine(tiny_full):
    # Small steps so that a long prompt takes several chunks, and an attention budget that shapes them.
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=96, max_prefill_attention_pairs=20_000,
                          max_encoder_slices_per_step=2, num_kv_blocks=160)  # fmt: skip
    eng = Engine.from_pretrained(tiny_full, dtype="float32", config=config)
    yield eng
    eng.shutdown()


class Recorder:
    """Wraps the engine's ``scheduler.schedule`` and ``model.encode_images`` (attributes looked up every step)
    to record the prefill chunks and encoder calls of requests whose id starts with ``prefix``."""

    def __init__(self, engine: Engine, monkeypatch):
        self.chunks: dict[str, list[tuple[int, int]]] = {}  # request id -> [(start, length)]
        self.admitted_at: dict[str, int] = {}  # request id -> computed tokens when first scheduled
        self.calls: list[list[str]] = []  # per encoder call: a digest of each slice's pixels
        schedule, encode = engine.scheduler.schedule, engine.model.encode_images

        def recording_schedule(images_ready):
            batch = schedule(images_ready)
            for entry in batch:
                if entry.seq.is_prefilling:
                    rid = entry.seq.request.request_id
                    self.admitted_at.setdefault(rid, entry.seq.num_computed_tokens)
                    self.chunks.setdefault(rid, []).append((entry.seq.num_computed_tokens, entry.num_tokens))
            return batch

        def recording_encode(pixels, sizes):
            self.calls.append([hashlib.sha256(p.numpy().tobytes()).hexdigest()[:12] for p in pixels])
            return encode(pixels, sizes)

        monkeypatch.setattr(engine.scheduler, "schedule", recording_schedule)
        monkeypatch.setattr(engine.model, "encode_images", recording_encode)


def text_of(engine: Engine, req: GenerationRequest) -> list[int]:
    result = engine.generate(req)
    assert all(c.error is None for c in result.choices), result
    return result.choices[0].token_ids


def test_a_seeded_prompt_is_prefilled_in_the_same_chunks_alone_cached_and_under_load(engine, monkeypatch):
    rec = Recorder(engine, monkeypatch)
    alone = request(LONG, seed=5, **SAMPLED)
    first = text_of(engine, alone)
    # The same prompt again, now in the prefix cache, while a long decode and a long unseeded prefill compete.
    busy = [engine.submit(request("Keep talking.", temperature=1.0, max_tokens=60, ignore_eos=True)),
            engine.submit(request(LONG.replace("clause", "term"), temperature=1.0, max_tokens=40, ignore_eos=True))]
    stream = iter(busy[0])
    next(stream)
    loaded = request(LONG, seed=5, **SAMPLED)
    text_of(engine, loaded)
    for handle in busy:
        handle.cancel()
    second = text_of(engine, request(LONG, seed=5, **SAMPLED))  # alone again, the prompt cached
    assert engine.block_manager.cached_prefix(engine.scheduler.block_keys(_sequence_like(engine, LONG)), 10**6)
    assert rec.admitted_at[alone.request_id] == 0 and rec.admitted_at[loaded.request_id] == 0  # no cache read
    assert len(rec.chunks[alone.request_id]) > 2  # the chunking is exercised
    assert rec.chunks[loaded.request_id] == rec.chunks[alone.request_id]
    assert second == first
    # An unseeded copy does read the cache (the rule is for seeded requests only).
    unseeded = request(LONG, **SAMPLED)
    text_of(engine, unseeded)
    assert rec.admitted_at[unseeded.request_id] > 0


def _sequence_like(engine: Engine, text: str):
    """A sequence of ``text``'s prompt, for its prefix-cache keys."""
    return engine.prepare(request(text, **SAMPLED)).sequences[0]


def test_seeded_chunks_follow_the_attention_budget_as_if_alone(engine):
    scheduler = engine.scheduler
    pairs = scheduler.max_prefill_attention_pairs
    start, target = 0, 900
    while start < target:
        length = scheduler.seeded_chunk(start, target)
        assert 1 <= length <= scheduler.seeded_chunk_tokens
        assert length == 1 or length * (start + length) <= pairs
        start += length
    assert start == target


def test_a_seeded_page_is_encoded_in_calls_of_its_own(engine, monkeypatch):
    rec = Recorder(engine, monkeypatch)
    params = dict(SAMPLED, seed=11)
    first = text_of(engine, request("What is the total?", [page(1)], **params))
    alone_calls = list(rec.calls)
    assert len(alone_calls) >= 2 and all(len(c) <= 2 for c in alone_calls)  # several slices, 2 per call
    engine.vision_cache.clear()
    rec.calls.clear()
    # The same page again (its embeddings recomputed), while unseeded pages are encoded and a decode runs.
    talker = engine.submit(request("Keep talking.", temperature=1.0, max_tokens=60, ignore_eos=True))
    stream = iter(talker)
    next(stream)
    others = [engine.submit(request("Summarise.", [page(20 + k)], temperature=1.0, max_tokens=4)) for k in range(2)]
    text_of(engine, request("What is the total?", [page(1)], **params))
    for handle in others:
        handle.result()
    talker.cancel()
    second = text_of(engine, request("What is the total?", [page(1)], **params))  # alone, the page cached
    seeded_slices = {digest for call in alone_calls for digest in call}
    with_seeded = [call for call in rec.calls if seeded_slices & set(call)]
    assert with_seeded == alone_calls  # the same groups, none shared with another page's slices
    assert any(not seeded_slices & set(call) for call in rec.calls)  # the others were encoded too
    assert second == first



def test_fit_pairs_is_the_longest_chunk_within_the_budget():
    from minicpmv.engine.scheduler import fit_pairs

    for start in (0, 1, 7, 100, 3000):
        for pairs in (0, 1, 5, 10, 99, 1000, 123_457):
            q = fit_pairs(start, pairs)
            assert q * (start + q) <= pairs < (q + 1) * (start + q + 1), (start, pairs, q)


def _seq(prompt_len: int, seed: int | None, first_token: int = 0):
    from minicpmv.engine.request import RequestState, Sequence

    req = GenerationRequest(f"seed-{next(_ids)}", prompt="x", sampling=SamplingParams(max_tokens=8, seed=seed))
    prompt = [first_token + i for i in range(prompt_len)]
    state = RequestState(req, prompt, [], [], 8, None)
    seq = Sequence(request=state, index=0, prompt_ids=prompt, generator=None, detokenizer=None)
    state.sequences.append(seq)
    return seq


def test_a_seeded_chunk_waits_rather_than_overrun_the_attention_budget():
    from minicpmv.engine.block_manager import BlockManager
    from minicpmv.engine.scheduler import Scheduler

    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=32,
                          max_prefill_attention_pairs=100)  # fmt: skip
    decoding, long, seeded = _seq(4, None), _seq(60, None, 1000), _seq(10, 5, 2000)
    scheduler.add([decoding])
    for entry in scheduler.schedule(lambda s: True):
        scheduler.computed([entry])
    decoding.output_ids.append(1)  # it decodes from now on
    long.num_computed_tokens = 0
    scheduler.add([long, seeded])
    steps = []
    for _ in range(60):
        batch = scheduler.schedule(lambda s: True)
        prefill = [(e.seq, e.seq.num_computed_tokens, e.num_tokens) for e in batch if e.seq.is_prefilling]
        scheduler.computed(batch)
        for entry in batch:
            if entry.sample:
                entry.seq.output_ids.append(1)
        steps.append([(seq is seeded, start, n) for seq, start, n in prefill])
        # The budget holds, except for a step's only chunk (it must progress).
        assert sum(n * (start + n) for _, start, n in prefill) <= 100 or len(prefill) == 1, steps[-1]
        if not seeded.is_prefilling:
            break
    assert not seeded.is_prefilling
    seeded_chunks = [(start, n) for step in steps for is_seeded, start, n in step if is_seeded]
    assert all(n == scheduler.seeded_chunk(start, 10) for start, n in seeded_chunks), seeded_chunks


def test_a_seeded_chunk_is_at_least_half_the_token_budget():
    from minicpmv.engine.block_manager import BlockManager
    from minicpmv.engine.scheduler import Scheduler

    assert Scheduler(BlockManager(8, 4), max_num_seqs=16, max_num_batched_tokens=512).seeded_chunk_tokens == 496
    assert Scheduler(BlockManager(8, 4), max_num_seqs=64, max_num_batched_tokens=64).seeded_chunk_tokens == 32
    assert Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=1).seeded_chunk_tokens == 1
