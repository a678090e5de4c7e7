"""Chat formatting: OpenAI-style messages -> ChatML prompt with image tags, images in order."""

from __future__ import annotations

import pytest
from PIL import Image

from minicpmv.chat import ChatFormatError, format_chat
from minicpmv.processing import IMAGE_TAG


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def img(color: str) -> Image.Image:
    return Image.new("RGB", (20, 10), color)


def test_text_only_with_system(tokenizer):
    chat = format_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenizer
    )
    assert chat.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.images == []


def test_default_system_prompt_comes_from_the_template(tokenizer):
    chat = format_chat([{"role": "user", "content": "Hi"}], tokenizer)
    assert chat.prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_images_are_placed_where_they_occur_and_parts_joined_by_newline(tokenizer):
    red, blue, green = img("red"), img("blue"), img("green")
    messages = [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ignored"}},
            {"type": "text", "text": "Compare with"},
            {"type": "image"},
        ]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": green}]},
    ]  # fmt: skip
    chat = format_chat(messages, tokenizer, images=[red, blue])
    assert f"<|im_start|>user\n{IMAGE_TAG}\nCompare with\n{IMAGE_TAG}<|im_end|>" in chat.prompt
    assert f"<|im_start|>user\nAnd this?\n{IMAGE_TAG}<|im_end|>\n<|im_start|>assistant\n" in chat.prompt
    assert chat.images == [red, blue, green]


@pytest.mark.parametrize(
    "messages, images, message",
    [
        ([], None, "non-empty"),
        ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
         None, "at most one system message"),
        ([{"role": "user", "content": "c"}, {"role": "system", "content": "a"}], None, "first message"),
        ([{"role": "tool", "content": "x"}], None, "role must be one of"),
        ([{"role": "assistant", "content": "x"}], None, "at least one user or system message"),
        ([{"role": "user", "content": [{"type": "image"}]}], None, "more images than were supplied"),
        ([{"role": "user", "content": "hi"}], [img("red")], "1 images were supplied but the messages reference 0"),
        ([{"role": "user", "content": [{"type": "audio"}]}], None, "unsupported content part type"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], None, "must be a string"),
        ([{"role": "user", "content": f"look {IMAGE_TAG}"}], None, "reserved image tag"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image"}]}], [img("red")],
         "only allowed in user messages"),
    ],
)  # fmt: skip
def test_invalid_messages_are_rejected_clearly(tokenizer, messages, images, message):
    with pytest.raises(ChatFormatError, match=message):
        format_chat(messages, tokenizer, images=images)


def test_developer_role_is_system(tokenizer):
    chat = format_chat(
        [{"role": "developer", "content": "Rules"}, {"role": "user", "content": "Hi"}], tokenizer
    )
    assert chat.prompt.startswith("<|im_start|>system\nRules<|im_end|>")


def test_a_system_message_alone_is_a_prompt(tokenizer):
    # OpenAI answers a request with only a system (or developer) message; so do we (issue 15, D8).
    chat = format_chat([{"role": "developer", "content": "Say hello."}], tokenizer)
    assert chat.prompt == "<|im_start|>system\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
