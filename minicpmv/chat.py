"""OpenAI-style chat messages -> the model's ChatML prompt with image tags, plus its images in order.

Content is a string or a list of parts. Text parts are ``{"type": "text", "text": ...}``;
an image part (``"image"``, ``"image_url"`` or ``"input_image"``) either carries a decoded
``PIL.Image`` under ``"image"`` or takes the next image of the ``images`` argument, so that
a transport can ship the pixels separately from the JSON (Triton's ``image`` tensor). Each
image becomes :data:`~minicpmv.processing.IMAGE_TAG` where it occurs and the parts of one
message are joined with ``"\\n"``, as the original ``chat()`` does; the processor expands
the tags later. The prompt is rendered with the checkpoint's chat template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from minicpmv.processing import IMAGE_TAG, ImageSettings

ROLES = ("system", "user", "assistant")
IMAGE_PART_TYPES = ("image", "image_url", "input_image")
TEXT_PART_TYPES = ("text", "input_text")


class ChatFormatError(ValueError):
    """The messages can't be turned into a prompt (the client's fault: maps to a 400)."""


@dataclass
class ChatPrompt:
    """``images`` in prompt order, each with the settings its part gave (``image_settings``, same order)."""

    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    image_settings: list[ImageSettings] = field(default_factory=list)


def format_chat(
    messages: Sequence[Mapping[str, Any]],
    tokenizer,
    images: Sequence[Image.Image] | None = None,
    *,
    add_generation_prompt: bool = True,
) -> ChatPrompt:
    """Render ``messages`` with ``tokenizer``'s chat template.

    Rules: roles are system/user/assistant ("developer" is taken as system, as OpenAI does);
    at most one system message, and it comes first; at least one user or system message; images only
    in user messages. Every image of ``images`` must be used, each once. An image part may carry its own
    ``max_slice_nums`` (1-36) and ``use_image_id`` (true/false): ``ChatPrompt.image_settings``. Raises
    ChatFormatError.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    supplied = list(images or [])
    used = 0
    rendered: list[dict[str, str]] = []
    ordered_images: list[Image.Image] = []
    settings: list[ImageSettings] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"messages[{i}] must be an object")
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            n = sum(
                1 for m in messages if isinstance(m, Mapping) and m.get("role") in ("system", "developer")
            )
            if n > 1:
                raise ChatFormatError(f"at most one system message is allowed, got {n}")
            raise ChatFormatError("the system message must be the first message")
        parts, used = _render_content(message.get("content"), i, role, supplied, used, ordered_images, settings)
        rendered.append({"role": role, "content": "\n".join(parts)})
    if not any(m["role"] in ("user", "system") for m in rendered):  # a system message alone is answered
        raise ChatFormatError("messages must contain at least one user or system message")
    if used != len(supplied):
        raise ChatFormatError(f"{len(supplied)} images were supplied but the messages reference {used}")
    prompt = tokenizer.apply_chat_template(
        rendered, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return ChatPrompt(prompt=prompt, images=ordered_images, image_settings=settings)


def _render_content(content, index, role, supplied, used, ordered_images, settings) -> tuple[list[str], int]:
    if content is None and role == "assistant":
        return [""], used
    if isinstance(content, str):
        return [_checked_text(content, f"messages[{index}].content")], used
    if not isinstance(content, Sequence) or not content:
        raise ChatFormatError(f"messages[{index}].content must be a string or a non-empty list of parts")
    parts: list[str] = []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in TEXT_PART_TYPES:
            text = part.get("text")
            parts.append(_checked_text(text, where))
        elif kind in IMAGE_PART_TYPES:
            if role != "user":
                raise ChatFormatError(f"{where}: images are only allowed in user messages")
            image = part.get("image")
            if not isinstance(image, Image.Image):
                if used >= len(supplied):
                    raise ChatFormatError(f"{where}: the messages reference more images than were supplied")
                image = supplied[used]
                used += 1
            ordered_images.append(image)
            settings.append(_image_settings(part, where))
            parts.append(IMAGE_TAG)
        else:
            raise ChatFormatError(f"{where}: unsupported content part type {kind!r}")
    return parts, used


def _image_settings(part: Mapping[str, Any], where: str) -> ImageSettings:
    slices, with_id = part.get("max_slice_nums"), part.get("use_image_id")
    if slices is not None and (not isinstance(slices, int) or isinstance(slices, bool) or not 1 <= slices <= 36):
        raise ChatFormatError(f"{where}.max_slice_nums must be an integer between 1 and 36")
    if with_id is not None and not isinstance(with_id, bool):
        raise ChatFormatError(f"{where}.use_image_id must be true or false")
    return ImageSettings(slices, with_id)


def _checked_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise ChatFormatError(f"{where} must be a string")
    if IMAGE_TAG in text:
        # Would be taken for an image slot by the processor; refuse rather than misalign images.
        raise ChatFormatError(
            f"{where} contains the reserved image tag {IMAGE_TAG!r}; use an image part instead"
        )
    return text
