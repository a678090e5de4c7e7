"""Triton request tensors <-> engine requests and deltas. No Triton import: tested on plain numpy arrays.

The tensor interface follows Triton's vLLM backend so that NVIDIA tools that speak it work unchanged:

inputs  ``text_input`` (a prompt; optional when ``messages`` is given), ``image`` (encoded image bytes, or
        base64 / data-URL text; one element per image, in order), ``stream``, ``sampling_parameters`` (JSON),
        ``exclude_input_in_output``, ``return_finish_reason``, ``return_num_input_tokens``,
        ``return_num_output_tokens``, ``return_logprobs``; ours: ``messages`` (JSON list of OpenAI-style chat
        messages; image parts take the ``image`` elements in order). A LoRA adapter is selected as vLLM's
        backend selects it, by ``lora_name`` in ``sampling_parameters``.
outputs ``text_output``, ``finish_reason``, ``num_input_tokens``, ``num_output_tokens``, ``logprobs`` (JSON);
        ours: ``index`` (the choice, for n > 1).

A **control request** carries ``lora_control`` (JSON ``{"action": "list" | "load" | "unload" | "stats",
"lora_name", "lora_path"}``) and no prompt: the model answers it with one response whose ``text_output`` is JSON
(:func:`parse_control`, :func:`control_tensors`); nothing is generated. ``stats`` answers the engine's load
(the figures the frontend exports for gateways and uses for admission; minicpmv_triton/backend.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from minicpmv.engine.errors import InvalidRequestError
from minicpmv.engine.request import Delta, GenerationRequest
from minicpmv.engine.sampling_params import SamplingParams
from minicpmv.engine.vision_cache import ENCODED_DIGEST

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000
# Images of one request, video frames included: the frontend's 16 images or pages plus one video's 64 frames
# (openai_frontend/settings.py), and room for an operator who raises those.
MAX_IMAGES = 128
MAX_TEXT_BYTES = 1024 * 1024
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)

# vLLM-backend names we accept besides our own SamplingParams fields.
_ALIASES = {"max_new_tokens": "max_tokens"}
_EXTENSIONS = ("max_slice_nums",)
LORA_NAME = "lora_name"  # vLLM's backend: the adapter, in sampling_parameters
MAX_ADAPTER_NAME = 256
CONTROL_ACTIONS = {"list": (), "load": ("lora_name", "lora_path"), "unload": ("lora_name",), "stats": ()}


@dataclass
class ParsedRequest:
    generation: GenerationRequest
    stream: bool
    exclude_input_in_output: bool
    return_finish_reason: bool
    return_num_input_tokens: bool
    return_num_output_tokens: bool
    return_logprobs: bool


def _scalar(tensors: dict[str, np.ndarray], name: str, default: Any = None) -> Any:
    """The single element of an optional input (the batch dimension of size 1 included)."""
    array = tensors.get(name)
    if array is None:
        return default
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise InvalidRequestError(f"input '{name}' must hold exactly one element, got {flat.size}")
    return flat[0]


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        if len(value) > MAX_TEXT_BYTES:
            raise InvalidRequestError(f"input '{name}' is larger than {MAX_TEXT_BYTES} bytes")
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequestError(f"input '{name}' is not valid UTF-8") from e
    if isinstance(value, str):
        return value
    raise InvalidRequestError(f"input '{name}' must be a string")


def _flag(tensors: dict[str, np.ndarray], name: str, default: bool = False) -> bool:
    value = _scalar(tensors, name, default)
    if isinstance(value, bytes | np.bytes_ | str):
        return _text(value, name).strip().lower() in ("1", "true", "yes")
    return bool(value)


def decode_image(data: bytes | str, index: int, lazy: bool = False) -> Image.Image:
    """Encoded image bytes (or base64 / data-URL text of them) -> RGB-able PIL image, with size limits.

    The sha256 of the encoded bytes goes into ``image.info`` (the engine's cache key). ``lazy``: only the
    header is read here (format, size limits); the pixels are decoded by the engine when its vision cache
    does not have the image already (a follow-up about the same page skips the decode)."""
    raw = data if isinstance(data, bytes) else data.encode()
    if _DATA_URL.match(raw[:64].decode("latin-1")) or not _looks_binary(raw):
        text = _DATA_URL.sub("", raw.decode("latin-1").strip(), count=1)
        try:
            raw = base64.b64decode(re.sub(r"\s+", "", text), validate=True)  # line-wrapped base64 too
        except (binascii.Error, ValueError) as e:
            raise InvalidRequestError(f"image {index}: neither image bytes nor valid base64") from e
    if len(raw) > MAX_IMAGE_BYTES:
        raise InvalidRequestError(f"image {index}: {len(raw)} bytes, more than the limit of {MAX_IMAGE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidRequestError(
                    f"image {index}: {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS}"
                )
            image.info[ENCODED_DIGEST] = hashlib.sha256(raw).hexdigest()
            if not lazy:
                image.load()
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InvalidRequestError(f"image {index}: too large, more than the limit of {MAX_IMAGE_PIXELS} pixels") from e
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"image {index}: not a decodable image ({type(e).__name__}: {e})") from e
    return image


def _looks_binary(raw: bytes) -> bool:
    # PNG, JPEG, GIF, BMP, TIFF and WebP start with bytes that are not all base64 characters.
    return bool(re.search(rb"[^A-Za-z0-9+/=\s]", raw[:16]))


@dataclass(frozen=True)
class ControlRequest:
    """A ``lora_control`` request: ``action`` with the fields it needs (``lora_name``, ``lora_path``)."""

    action: str
    lora_name: str | None = None
    lora_path: str | None = None


def parse_sampling(text: str | None) -> tuple[SamplingParams, int | None]:
    """``sampling_parameters`` JSON -> (SamplingParams, max_slice_nums); a ``lora_name`` is checked, not returned."""
    sampling, max_slice_nums, _ = _parse_sampling(text)
    return sampling, max_slice_nums


def _name(value: Any, field: str) -> str:
    """A LoRA adapter's name (or path): a non-empty string; a name of at most MAX_ADAPTER_NAME characters."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{field} must be a non-empty string", param=field)
    if field != "lora_path" and len(value) > MAX_ADAPTER_NAME:
        raise InvalidRequestError(f"{field} is longer than {MAX_ADAPTER_NAME} characters", param=field)
    return value


def _parse_sampling(text: str | None) -> tuple[SamplingParams, int | None, str | None]:
    """``sampling_parameters`` JSON -> (SamplingParams, max_slice_nums, lora_name)."""
    if not text:
        return SamplingParams(), None, None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"sampling_parameters is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidRequestError("sampling_parameters must be a JSON object")
    data = {_ALIASES.get(k, k): v for k, v in data.items()}
    adapter = data.pop(LORA_NAME, None)
    if adapter is not None:
        adapter = _name(adapter, LORA_NAME)
    max_slice_nums = data.pop("max_slice_nums", None)
    if max_slice_nums is not None and (
        not isinstance(max_slice_nums, int) or isinstance(max_slice_nums, bool) or not 1 <= max_slice_nums <= 36
    ):
        raise InvalidRequestError("max_slice_nums must be an integer between 1 and 36")
    if isinstance(data.get("logprobs"), int) and not isinstance(data["logprobs"], bool):
        # vLLM style: logprobs is the number of top alternatives.
        data["top_logprobs"] = data["logprobs"]
        data["logprobs"] = True
    try:
        return SamplingParams.from_dict(data), max_slice_nums, adapter
    except TypeError as e:
        raise InvalidRequestError(f"sampling_parameters: {e}") from e


def parse_request(request_id: str, tensors: dict[str, np.ndarray]) -> ParsedRequest:
    """Validate one Triton request's inputs. Raises InvalidRequestError with a client-facing message."""
    messages_text = _scalar(tensors, "messages")
    prompt_value = _scalar(tensors, "text_input")
    if messages_text is None and prompt_value is None:
        raise InvalidRequestError("either 'text_input' or 'messages' is required")
    if messages_text is not None and prompt_value is not None:
        raise InvalidRequestError("give either 'text_input' or 'messages', not both")
    messages = None
    if messages_text is not None:
        try:
            messages = json.loads(_text(messages_text, "messages"))
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"messages is not valid JSON: {e}") from e
        if not isinstance(messages, list):
            raise InvalidRequestError("messages must be a JSON list")
    images_array = tensors.get("image")
    raw_images = [] if images_array is None else list(np.asarray(images_array).reshape(-1))
    if len(raw_images) > MAX_IMAGES:
        raise InvalidRequestError(f"{len(raw_images)} images; at most {MAX_IMAGES} per request")
    images = [decode_image(bytes(x) if not isinstance(x, str) else x, i, lazy=True) for i, x in enumerate(raw_images)]
    sampling_text = _scalar(tensors, "sampling_parameters")
    sampling, max_slice_nums, adapter = _parse_sampling(
        None if sampling_text is None else _text(sampling_text, "sampling_parameters")
    )
    return ParsedRequest(
        generation=GenerationRequest(
            request_id=request_id,
            messages=messages,
            prompt=None if prompt_value is None else _text(prompt_value, "text_input"),
            images=images,
            sampling=sampling,
            max_slice_nums=max_slice_nums,
            adapter=adapter,
        ),
        stream=_flag(tensors, "stream"),
        exclude_input_in_output=_flag(tensors, "exclude_input_in_output"),
        return_finish_reason=_flag(tensors, "return_finish_reason"),
        return_num_input_tokens=_flag(tensors, "return_num_input_tokens"),
        return_num_output_tokens=_flag(tensors, "return_num_output_tokens"),
        return_logprobs=_flag(tensors, "return_logprobs"),
    )


def parse_control(tensors: dict[str, np.ndarray]) -> ControlRequest | None:
    """The request's ``lora_control`` (None when it has none), checked: a known action with exactly the fields
    it needs, and no prompt beside it. Raises InvalidRequestError."""
    value = _scalar(tensors, "lora_control")
    if value is None:
        return None
    if _scalar(tensors, "text_input") is not None or _scalar(tensors, "messages") is not None:
        raise InvalidRequestError("a lora_control request takes no 'text_input' or 'messages'")
    try:
        data = json.loads(_text(value, "lora_control"))
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"lora_control is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidRequestError("lora_control must be a JSON object")
    action = data.get("action")
    if action not in CONTROL_ACTIONS:
        raise InvalidRequestError(f"lora_control: action must be one of {', '.join(CONTROL_ACTIONS)}, got {action!r}",
                                  param="action")  # fmt: skip
    needed = CONTROL_ACTIONS[action]
    unknown = sorted(set(data) - {"action", *needed})
    if unknown:
        raise InvalidRequestError(f"lora_control: {action!r} takes no {', '.join(unknown)}", param=unknown[0])
    fields = {key: _name(data.get(key), key) for key in needed}
    if "lora_path" in fields and "\x00" in fields["lora_path"]:
        raise InvalidRequestError("lora_path must not contain NUL characters", param="lora_path")
    return ControlRequest(action, **fields)


def control_tensors(payload: Any) -> dict[str, np.ndarray]:
    """The one response to a control request: ``payload`` as JSON in ``text_output`` (batch dimension included)."""
    return {
        "text_output": np.array([[json.dumps(payload).encode("utf-8")]], dtype=np.object_),
        "index": np.array([[0]], dtype=np.uint32),
    }


def response_tensors(parsed: ParsedRequest, delta: Delta, text: str) -> dict[str, np.ndarray]:
    """Output arrays (batch dimension included) for one response carrying ``text``."""
    out = {
        "text_output": np.array([[text.encode("utf-8")]], dtype=np.object_),
        "index": np.array([[delta.index]], dtype=np.uint32),
    }
    if parsed.return_finish_reason:
        out["finish_reason"] = np.array([[(delta.finish_reason or "").encode()]], dtype=np.object_)
    if parsed.return_num_input_tokens:
        out["num_input_tokens"] = np.array([[delta.prompt_tokens]], dtype=np.uint32)
    if parsed.return_num_output_tokens:
        out["num_output_tokens"] = np.array([[delta.completion_tokens]], dtype=np.uint32)
    if parsed.return_logprobs:
        # "bytes": the token's own bytes (a list of ints, null for a special token), as OpenAI's field.
        entries = [
            {
                "token_id": e.token_id,
                "token": e.token,
                "logprob": e.logprob,
                "bytes": _byte_list(e.token_bytes),
                "top_logprobs": [{"token_id": i, "token": t, "logprob": lp,
                                  "bytes": _byte_list(e.top_bytes[k] if k < len(e.top_bytes) else None)}
                                 for k, (i, t, lp) in enumerate(e.top)],
            }
            for e in delta.logprobs or []
        ]  # fmt: skip
        out["logprobs"] = np.array([[json.dumps(entries).encode()]], dtype=np.object_)
    return out


def _byte_list(raw: bytes | None) -> list[int] | None:
    return None if raw is None else list(raw)
