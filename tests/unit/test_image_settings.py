"""Per-image reading (issue 24): an image part's own ``max_slice_nums`` and ``use_image_id``, as a page beside a
thumbnail, or a video's frames (no ``<image_id>`` tags, 2 slices each, as MiniCPM-V's card passes them), through
the chat format, the processor and the engine's caches."""

from __future__ import annotations

import itertools

import pytest
from PIL import Image

from minicpmv.chat import ChatFormatError, format_chat
from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.request import GenerationRequest
from minicpmv.engine.sampling_params import SamplingParams
from minicpmv.processing import ImageSettings
from tests.unit.test_engine_core import page

_ids = itertools.count()


@pytest.fixture(scope="module")
def engine(tiny_full):
    engine = Engine.from_pretrained(tiny_full, dtype="float32",
                                    config=EngineConfig(max_num_seqs=4, max_num_batched_tokens=512,
                                                        num_kv_blocks=256))  # fmt: skip
    yield engine
    engine.shutdown()


def _request(parts: list[dict], images: list[Image.Image], **sampling) -> GenerationRequest:
    content = [*parts, {"type": "text", "text": "What is shown?"}]
    sampling = {"temperature": 0, "max_tokens": 3, "ignore_eos": True} | sampling
    return GenerationRequest(f"settings-{next(_ids)}", messages=[{"role": "user", "content": content}],
                             images=images, sampling=SamplingParams(**sampling))  # fmt: skip


def _frames(count: int, size=(896, 672)) -> list[Image.Image]:
    return [Image.new("RGB", size, ((37 * k) % 256, (91 * k) % 256, (13 * k) % 256)) for k in range(count)]


def test_the_chat_format_keeps_each_image_parts_settings(engine):
    parts = [{"type": "image", "max_slice_nums": 1}, {"type": "image"},
             {"type": "image", "use_image_id": False, "max_slice_nums": 2}]  # fmt: skip
    chat = format_chat([{"role": "user", "content": [*parts, {"type": "text", "text": "x"}]}], engine.tokenizer,
                       _frames(3))  # fmt: skip
    assert chat.image_settings == [ImageSettings(1, None), ImageSettings(None, None), ImageSettings(2, False)]
    for bad, message in (({"max_slice_nums": 0}, "between 1 and 36"), ({"max_slice_nums": True}, "between 1"),
                         ({"use_image_id": "no"}, "true or false")):  # fmt: skip
        with pytest.raises(ChatFormatError, match=message):
            format_chat([{"role": "user", "content": [{"type": "image", **bad}]}], engine.tokenizer, _frames(1))


def test_a_low_thumbnail_beside_a_page_takes_one_chunk_and_the_page_its_slices(engine):
    thumbnail, document = page(1, (900, 600)), page(2, (1200, 1600))
    both = engine.prepare(_request([{"type": "image", "max_slice_nums": 1}, {"type": "image"}],
                                   [thumbnail, document]))  # fmt: skip
    alone = engine.prepare(_request([{"type": "image"}], [document]))
    chunks = [image.processed.num_chunks for image in both.images]
    assert chunks[0] == 1 and chunks[1] == alone.images[0].processed.num_chunks > 1
    assert len(both.image_bounds) == 1 + chunks[1]
    # The cache keys follow the setting: the same thumbnail read whole or sliced is two entries.
    sliced = engine.prepare(_request([{"type": "image"}, {"type": "image"}], [thumbnail, document]))
    assert sliced.images[0].processed.num_chunks > 1
    assert both.images[0].key != sliced.images[0].key and both.images[1].key == sliced.images[1].key


def test_video_frames_have_no_image_ids_and_the_processors_layout(engine):
    frames = _frames(5)
    parts = [{"type": "image", "use_image_id": False, "max_slice_nums": 2} for _ in frames]
    state = engine.prepare(_request(parts, frames))
    text = engine.tokenizer.decode(state.prompt_ids)
    assert "<image_id>" not in text and all(image.processed.num_chunks <= 3 for image in state.images)
    assert all(image.processed.num_chunks == 3 for image in state.images)  # 896x672: 2 slices + the overview
    # Exactly what the processor builds for the same frames as images with use_image_id=False, max_slice_nums=2.
    chat = format_chat([{"role": "user", "content": [*parts, {"type": "text", "text": "What is shown?"}]}],
                       engine.tokenizer, frames)  # fmt: skip
    expected = engine.processor.encode(chat.prompt, frames, max_slice_nums=2, use_image_id=False)
    assert state.prompt_ids == expected.input_ids
    # A page in the same request keeps its <image_id> tag and default slicing.
    mixed = engine.prepare(_request([*parts[:2], {"type": "image"}], [*frames[:2], page(3, (1200, 1600))]))
    assert engine.tokenizer.decode(mixed.prompt_ids).count("<image_id>") == 1


def test_the_same_video_asked_twice_is_read_from_the_prefix_cache(engine):
    frames = _frames(4)
    parts = [{"type": "image", "use_image_id": False, "max_slice_nums": 2} for _ in frames]
    first = engine.generate(_request(parts, frames))
    hits = engine.block_manager.prefix_hits
    second = engine.generate(_request(parts, _frames(4)))  # equal frames, new objects: keys from content
    assert engine.block_manager.prefix_hits - hits >= first.prompt_tokens - engine.config.block_size
    assert second.choices[0].token_ids == first.choices[0].token_ids
