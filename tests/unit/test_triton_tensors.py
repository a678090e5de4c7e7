"""The Triton tensor adapter on numpy arrays shaped as Triton's Python backend hands them over.

Every input carries the batch dimension of size 1 (``max_batch_size`` > 0): a TYPE_STRING input is an object
array of bytes shaped [1, 1] (``image``: [1, N]), a TYPE_BOOL input a bool array shaped [1, 1].
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from minicpmv.engine.errors import InvalidRequestError
from minicpmv.engine.request import Delta, TokenLogprob
from minicpmv.engine.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from minicpmv_triton import tensors
from minicpmv_triton.tensors import ParsedRequest, decode_image, parse_request, parse_sampling, response_tensors

FLAGS = (
    "stream", "exclude_input_in_output", "return_finish_reason", "return_num_input_tokens",
    "return_num_output_tokens", "return_logprobs",
)  # fmt: skip


def text(value: str | bytes) -> np.ndarray:
    """A TYPE_STRING input of one element, as Triton gives it: object array of bytes, shape [1, 1]."""
    return np.array([[value.encode() if isinstance(value, str) else value]], dtype=np.object_)


def flag(value: bool) -> np.ndarray:
    return np.array([[value]], dtype=np.bool_)


def image_input(*elements: bytes) -> np.ndarray:
    """The ``image`` input: one element per image, shape [1, N]."""
    array = np.empty((1, len(elements)), dtype=np.object_)
    array[0, :] = list(elements)
    return array


def pattern(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 7 % 256, y * 11 % 256, (x + y) * 5 % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels but holds no pixel data: costs nothing until decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


SOURCE = pattern(24, 16)
PNG = encode(SOURCE, "PNG")
JPEG = encode(pattern(20, 30), "JPEG")


# --- prompt or messages --------------------------------------------------------------------------------------


def test_text_input_becomes_the_prompt_with_default_sampling():
    parsed = parse_request("req-1", {"text_input": text("<|im_start|>user\nHi, é<|im_end|>")})

    assert isinstance(parsed, ParsedRequest)
    assert parsed.generation.request_id == "req-1"
    assert parsed.generation.prompt == "<|im_start|>user\nHi, é<|im_end|>"
    assert parsed.generation.messages is None
    assert parsed.generation.images == []
    assert parsed.generation.sampling == SamplingParams()
    assert parsed.generation.max_slice_nums is None


def test_messages_json_becomes_the_messages():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Total? 合计"}]},
    ]
    parsed = parse_request("req-1", {"messages": text(json.dumps(messages))})

    assert parsed.generation.messages == messages
    assert parsed.generation.prompt is None


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ('{"role": "user", "content": "hi"}', "messages must be a JSON list"),
        ('[{"role": "user"', "messages is not valid JSON"),
    ],
)
def test_messages_must_be_a_json_list(messages, error):
    with pytest.raises(InvalidRequestError, match=error):
        parse_request("r", {"messages": text(messages)})


def test_prompt_and_messages_together_are_rejected():
    with pytest.raises(InvalidRequestError, match="either 'text_input' or 'messages', not both"):
        parse_request("r", {"text_input": text("hi"), "messages": text("[]")})


def test_neither_prompt_nor_messages_is_rejected():
    with pytest.raises(InvalidRequestError, match="either 'text_input' or 'messages' is required"):
        parse_request("r", {"stream": flag(True)})


@pytest.mark.parametrize("name", ["text_input", "messages", "sampling_parameters"])
def test_text_inputs_must_be_utf8(name):
    inputs = {"text_input": text("hi"), name: text(b"\xff\xfe caf\xe9")}
    if name == "messages":
        del inputs["text_input"]
    with pytest.raises(InvalidRequestError, match=f"input '{name}' is not valid UTF-8"):
        parse_request("r", inputs)


def test_text_input_over_the_size_limit_is_rejected(monkeypatch):
    monkeypatch.setattr(tensors, "MAX_TEXT_BYTES", 8)
    assert parse_request("r", {"text_input": text("12345678")}).generation.prompt == "12345678"
    with pytest.raises(InvalidRequestError, match="input 'text_input' is larger than 8 bytes"):
        parse_request("r", {"text_input": text("123456789")})


def test_text_input_with_more_than_one_element_is_rejected():
    two = np.array([[b"a", b"b"]], dtype=np.object_)
    with pytest.raises(InvalidRequestError, match="input 'text_input' must hold exactly one element, got 2"):
        parse_request("r", {"text_input": two})


# --- images --------------------------------------------------------------------------------------------------


def test_images_are_decoded_in_order():
    parsed = parse_request("r", {"text_input": text("x"), "image": image_input(PNG, JPEG)})

    first, second = parsed.generation.images
    assert first.size == (24, 16) and first.format == "PNG"
    assert second.size == (20, 30) and second.format == "JPEG"
    np.testing.assert_array_equal(pixels(first), pixels(SOURCE))


def base64_text(data: bytes) -> bytes:
    return base64.b64encode(data)


def data_url(data: bytes, mime: str) -> bytes:
    return f"data:{mime};base64,".encode() + base64.b64encode(data)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda data, mime: base64_text(data), id="base64"),
        pytest.param(lambda data, mime: base64_text(data) + b"\n", id="base64-trailing-newline"),
        pytest.param(lambda data, mime: data_url(data, mime), id="data-url"),
        pytest.param(lambda data, mime: data_url(data, mime).replace(b"data:image", b"DATA:IMAGE"), id="DATA-URL"),
    ],
)
@pytest.mark.parametrize(("encoded", "mime"), [(PNG, "image/png"), (JPEG, "image/jpeg")], ids=["png", "jpeg"])
def test_base64_and_data_url_images_decode_to_the_same_pixels_as_raw_bytes(wrap, encoded, mime):
    raw = parse_request("r", {"text_input": text("x"), "image": image_input(encoded)}).generation.images[0]
    wrapped = parse_request("r", {"text_input": text("x"), "image": image_input(wrap(encoded, mime))})

    (image,) = wrapped.generation.images
    np.testing.assert_array_equal(pixels(image), pixels(raw))


def test_decode_image_accepts_text():
    np.testing.assert_array_equal(pixels(decode_image(data_url(PNG, "image/png").decode(), 0)), pixels(SOURCE))


@pytest.mark.parametrize(
    ("element", "error"),
    [
        (b"\x00\x01\x02 certainly not an image", r"image 1: not a decodable image"),
        (base64.b64encode(b"plain text, valid base64"), r"image 1: not a decodable image"),
        (JPEG[: len(JPEG) // 2], r"image 1: not a decodable image \(OSError"),
        (b"abc", r"image 1: neither image bytes nor valid base64"),
        (b"data:image/png;base64,@@not-base64@@", r"image 1: neither image bytes nor valid base64"),
    ],
    ids=["garbage", "base64-of-text", "truncated-jpeg", "bad-base64", "bad-data-url"],
)
def test_undecodable_images_are_rejected_with_their_index(element, error):
    with pytest.raises(InvalidRequestError, match=error):
        parse_request("r", {"text_input": text("x"), "image": image_input(PNG, element)})


def test_image_over_the_pixel_limit_is_rejected_before_decoding():
    assert 8000 * 7000 > tensors.MAX_IMAGE_PIXELS
    with pytest.raises(InvalidRequestError, match=r"image 0: 8000x7000 pixels, more than the limit of 50000000"):
        decode_image(png_header(8000, 7000), 0)


def test_image_far_over_the_pixel_limit_is_reported_as_too_large():
    # Past PIL's own decompression-bomb threshold (~89 Mpx) the error must still say what the limit is.
    with pytest.raises(InvalidRequestError, match=r"more than the limit of 50000000"):
        decode_image(png_header(20000, 20000), 0)


def test_pixel_limit_applies_to_real_images(monkeypatch):
    monkeypatch.setattr(tensors, "MAX_IMAGE_PIXELS", 24 * 16)
    assert decode_image(PNG, 0).size == (24, 16)
    with pytest.raises(InvalidRequestError, match=r"image 0: 20x30 pixels, more than the limit of 384"):
        decode_image(JPEG, 0)


def test_image_over_the_byte_limit_is_rejected(monkeypatch):
    monkeypatch.setattr(tensors, "MAX_IMAGE_BYTES", len(PNG))
    assert decode_image(base64.b64encode(PNG), 0).size == (24, 16)
    with pytest.raises(InvalidRequestError, match=rf"image 0: {len(JPEG)} bytes, more than the limit of {len(PNG)}"):
        decode_image(base64.b64encode(JPEG), 0)


def test_at_most_max_images_per_request():
    tiny = encode(pattern(2, 2), "PNG")
    limit = tensors.MAX_IMAGES
    accepted = parse_request("r", {"text_input": text("x"), "image": image_input(*[tiny] * limit)})
    assert len(accepted.generation.images) == limit

    with pytest.raises(InvalidRequestError, match=rf"{limit + 1} images; at most {limit} per request"):
        parse_request("r", {"text_input": text("x"), "image": image_input(*[tiny] * (limit + 1))})


# --- sampling_parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""])
def test_absent_sampling_parameters_give_the_defaults(value):
    assert parse_sampling(value) == (SamplingParams(), None)


def test_sampling_parameters_fill_the_sampling_params():
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    given = {
        "max_tokens": 64, "temperature": 0.0, "top_p": 0.5, "top_k": 7, "seed": 1234, "stop": ["END", "\n\n"],
        "n": 3, "ignore_eos": True, "min_tokens": 5, "response_format": response_format,
        "repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": -0.5, "stop_token_ids": [7],
    }  # fmt: skip
    sampling, max_slice_nums = parse_sampling(json.dumps(given))

    assert {name: getattr(sampling, name) for name in given} == given
    assert max_slice_nums is None


def test_sampling_parameters_reach_the_generation_request():
    parsed = parse_request(
        "r", {"text_input": text("x"), "sampling_parameters": text('{"max_tokens": 3, "max_slice_nums": 4}')}
    )
    assert parsed.generation.sampling.max_tokens == 3
    assert parsed.generation.max_slice_nums == 4


@pytest.mark.parametrize(("stop", "expected"), [("END", ["END"]), (["a", "b"], ["a", "b"]), ([], [])])
def test_stop_is_a_string_or_a_list(stop, expected):
    assert parse_sampling(json.dumps({"stop": stop}))[0].stop == expected


def test_vllm_max_new_tokens_is_max_tokens():
    assert parse_sampling('{"max_new_tokens": 12}')[0].max_tokens == 12


@pytest.mark.parametrize(
    ("logprobs", "expected"),
    [
        (5, (True, 5)),
        (0, (True, 0)),
        (MAX_TOP_LOGPROBS, (True, MAX_TOP_LOGPROBS)),
        (True, (True, 0)),
        (False, (False, 0)),
    ],
)
def test_vllm_integer_logprobs_is_the_number_of_top_alternatives(logprobs, expected):
    sampling, _ = parse_sampling(json.dumps({"logprobs": logprobs}))
    assert (sampling.logprobs, sampling.top_logprobs) == expected


def test_integer_logprobs_beyond_the_maximum_is_rejected():
    with pytest.raises(InvalidRequestError, match="top_logprobs must be between 0 and 20"):
        parse_sampling(json.dumps({"logprobs": MAX_TOP_LOGPROBS + 1}))


@pytest.mark.parametrize("value", [1, 9, 36])
def test_max_slice_nums_extension(value):
    sampling, max_slice_nums = parse_sampling(json.dumps({"max_slice_nums": value, "temperature": 0}))
    assert max_slice_nums == value
    assert sampling == SamplingParams(temperature=0)


@pytest.mark.parametrize("value", [0, 37, -1, 2.5, "9", True, [9]])
def test_max_slice_nums_must_be_an_integer_from_1_to_36(value):
    with pytest.raises(InvalidRequestError, match="max_slice_nums must be an integer between 1 and 36"):
        parse_sampling(json.dumps({"max_slice_nums": value}))


def test_unknown_sampling_parameters_are_rejected_by_name():
    with pytest.raises(InvalidRequestError, match="unknown sampling parameter\\(s\\): beam_width, best_of"):
        parse_sampling('{"temperature": 0, "beam_width": 2, "best_of": 2}')


INVALID_SAMPLING = [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": "hot"}, "temperature must be a finite number"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -2}, "top_k must be -1 or 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"max_tokens": "64"}, "max_tokens must be an integer"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens must not exceed max_tokens"),
    ({"min_tokens": -1}, "min_tokens must be >= 0"),
    ({"n": 0}, "n must be between 1 and 16"),
    ({"n": 17}, "n must be between 1 and 16"),
    ({"seed": "42"}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"stop": [""]}, "stop must be a string or a list of non-empty strings"),
    ({"stop": 5}, "stop must be a string or a list of non-empty strings"),
    ({"stop": [f"s{i}" for i in range(17)]}, "at most 16 stop strings"),
    ({"ignore_eos": "yes"}, "logprobs/ignore_eos: booleans"),
    ({"logprobs": "yes"}, "logprobs/ignore_eos: booleans"),
    ({"response_format": "json"}, "response_format: object"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must be a list of token ids"),
]


@pytest.mark.parametrize(
    ("given", "error"), INVALID_SAMPLING, ids=[json.dumps(given)[:40] for given, _ in INVALID_SAMPLING]
)
def test_invalid_sampling_values_are_rejected(given, error):
    with pytest.raises(InvalidRequestError, match=error):
        parse_sampling(json.dumps(given))


@pytest.mark.parametrize(
    ("value", "error"),
    [("{not json", "sampling_parameters is not valid JSON"), ("[1, 2]", "sampling_parameters must be a JSON object")],
)
def test_sampling_parameters_must_be_a_json_object(value, error):
    with pytest.raises(InvalidRequestError, match=error):
        parse_request("r", {"text_input": text("x"), "sampling_parameters": text(value)})


# --- flags ---------------------------------------------------------------------------------------------------


def test_absent_flags_are_false():
    parsed = parse_request("r", {"text_input": text("x")})
    assert {name: getattr(parsed, name) for name in FLAGS} == dict.fromkeys(FLAGS, False)


@pytest.mark.parametrize("name", FLAGS)
def test_each_bool_flag_sets_only_its_own_field(name):
    parsed = parse_request("r", {"text_input": text("x"), name: flag(True)})
    assert {n: getattr(parsed, n) for n in FLAGS} == {n: n == name for n in FLAGS}


def test_false_flags_are_false():
    parsed = parse_request("r", {"text_input": text("x"), **{name: flag(False) for name in FLAGS}})
    assert not any(getattr(parsed, name) for name in FLAGS)


# --- response_tensors ----------------------------------------------------------------------------------------


def parsed_with(**flags: bool) -> ParsedRequest:
    return parse_request("r", {"text_input": text("x"), **{k: flag(v) for k, v in flags.items()}})


def delta(**overrides) -> Delta:
    fields = {
        "request_id": "r", "index": 2, "text": "ignored: the caller passes the text", "token_ids": [11, 12, 13],
        "prompt_tokens": 70000, "completion_tokens": 3, "finish_reason": "length",
        "logprobs": [
            TokenLogprob(11, "Hé", -0.25, [(11, "Hé", -0.25), (12, "bytes:\\xe4", -1.5)], "Hé".encode(),
                         ["Hé".encode(), b"\xe4"]),
            TokenLogprob(13, "<|im_end|>", 0.0, [], None),
        ],
    }  # fmt: skip
    return Delta(**{**fields, **overrides})


def test_response_has_only_text_and_index_by_default():
    out = response_tensors(parsed_with(), delta(), "Total: 42 €")

    assert set(out) == {"text_output", "index"}
    assert out["text_output"].shape == (1, 1) and out["text_output"].dtype == np.object_
    assert out["text_output"][0, 0] == "Total: 42 €".encode()
    assert out["index"].shape == (1, 1) and out["index"].dtype == np.uint32
    assert out["index"][0, 0] == 2


@pytest.mark.parametrize(
    ("flag_name", "output", "dtype", "value"),
    [
        ("return_finish_reason", "finish_reason", np.object_, b"length"),
        ("return_num_input_tokens", "num_input_tokens", np.uint32, 70000),
        ("return_num_output_tokens", "num_output_tokens", np.uint32, 3),
    ],
)
def test_each_requested_output_is_added_alone(flag_name, output, dtype, value):
    out = response_tensors(parsed_with(**{flag_name: True}), delta(), "t")

    assert set(out) == {"text_output", "index", output}
    assert out[output].shape == (1, 1) and out[output].dtype == dtype
    assert out[output][0, 0] == value


def test_unfinished_delta_has_an_empty_finish_reason():
    out = response_tensors(parsed_with(return_finish_reason=True), delta(finish_reason=None), "t")
    assert out["finish_reason"][0, 0] == b""


def test_logprobs_output_is_json_per_token():
    out = response_tensors(parsed_with(return_logprobs=True), delta(), "t")

    assert set(out) == {"text_output", "index", "logprobs"}
    assert out["logprobs"].shape == (1, 1) and out["logprobs"].dtype == np.object_
    assert json.loads(out["logprobs"][0, 0]) == [
        {
            "token_id": 11, "token": "Hé", "logprob": -0.25, "bytes": [72, 195, 169],
            "top_logprobs": [
                {"token_id": 11, "token": "Hé", "logprob": -0.25, "bytes": [72, 195, 169]},
                {"token_id": 12, "token": "bytes:\\xe4", "logprob": -1.5, "bytes": [228]},
            ],
        },
        {"token_id": 13, "token": "<|im_end|>", "logprob": 0.0, "bytes": None, "top_logprobs": []},
    ]  # fmt: skip


def test_logprobs_output_without_logprobs_is_an_empty_list():
    out = response_tensors(parsed_with(return_logprobs=True), delta(logprobs=None), "t")
    assert json.loads(out["logprobs"][0, 0]) == []


def test_all_outputs_together():
    parsed = parsed_with(**{name: True for name in FLAGS})
    out = response_tensors(parsed, delta(), "t")
    assert set(out) == {"text_output", "index", "finish_reason", "num_input_tokens", "num_output_tokens", "logprobs"}
    assert all(array.shape == (1, 1) for array in out.values())


def test_request_images_are_opened_lazily_and_keyed_by_their_bytes():
    """The pixels are decoded by the engine on a vision-cache miss only; the key is the encoded bytes'."""
    import hashlib

    from minicpmv.engine.vision_cache import ENCODED_DIGEST, image_key

    parsed = parse_request("r", {"text_input": np.array([[b"(<image>./</image>) What?"]], dtype=np.object_),
                                 "image": np.array([[PNG]], dtype=np.object_)})  # fmt: skip
    image = parsed.generation.images[0]
    assert image.info[ENCODED_DIGEST] == hashlib.sha256(PNG).hexdigest()
    assert image.tile  # not decoded yet: PIL clears the tile list once it has decoded the pixels
    assert image_key(image, 9) != image_key(image, 4)  # the slicing setting is part of the key
    assert image_key(image, 9) == image_key(decode_image(PNG, 0, lazy=True), 9)
