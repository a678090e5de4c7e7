"""Logprobs through the official ``openai`` client against the real stack (tritonserver + frontend, tiny
checkpoints with the real Qwen2 vocabulary). A json_schema ``const`` makes the random model write parrots,
a character the vocabulary has no token for, so each one comes out in pieces: every entry must carry its
token's own bytes, those bytes must join to the UTF-8 of the answer, a stream must deliver each entry in the
chunk that carries its text, and the stop token that ends the answer is never listed."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

PARROTS = "🦜🦜"
SCHEMA = {"type": "object", "properties": {"w": {"const": PARROTS}}, "required": ["w"], "additionalProperties": False}
REQUEST = {
    "model": "minicpm_v_2_6",
    "messages": [{"role": "user", "content": "Which bird?"}],
    "temperature": 0,
    "max_tokens": 40,
    "logprobs": True,
    "top_logprobs": 2,
    "response_format": {"type": "json_schema", "json_schema": {"name": "bird", "schema": SCHEMA}},
}


def joined(entries) -> bytes:
    return b"".join(bytes(e.bytes) for e in entries)


def check_entry(entry) -> None:
    """OpenAI's form: a piece of a character is "bytes:" and its escaped bytes; anything else is the text."""
    raw = bytes(entry.bytes)
    try:
        assert entry.token == raw.decode()
    except UnicodeDecodeError:
        assert entry.token == "bytes:" + "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in raw)
    for top in entry.top_logprobs:
        assert top.bytes is None or isinstance(top.bytes, list)


def test_pieces_of_a_character_carry_their_own_bytes(client):
    r = client.chat.completions.create(**REQUEST)
    choice = r.choices[0]
    assert json.loads(choice.message.content) == {"w": PARROTS} and choice.finish_reason == "stop"
    entries = choice.logprobs.content
    assert joined(entries) == choice.message.content.encode()
    pieces = [e for e in entries if e.token.startswith("bytes:")]
    assert pieces and all(bytes(e.bytes) != "\ufffd".encode() for e in pieces)
    for entry in entries:
        check_entry(entry)
        assert len(entry.top_logprobs) == 2
    # The stop token ended the answer and counts as a completion token, but is not listed.
    assert len(entries) == r.usage.completion_tokens - 1
    assert all(e.token not in ("<|im_end|>", "<|endoftext|>") for e in entries)


def test_a_stream_delivers_each_entry_with_its_text(client):
    whole = client.chat.completions.create(**REQUEST).choices[0]
    chunks = list(client.chat.completions.create(**REQUEST, stream=True))
    text, entries = "", []
    for chunk in chunks:
        for choice in chunk.choices:
            content = choice.delta.content or ""
            listed = choice.logprobs.content if choice.logprobs is not None else []
            assert joined(listed) == content.encode(), (content, listed)  # this chunk's entries are its text
            text += content
            entries += listed
    assert text == whole.message.content
    assert [(e.token, e.bytes) for e in entries] == [(e.token, e.bytes) for e in whole.logprobs.content]
    assert any(e.token.startswith("bytes:") for e in entries)


def test_a_stop_sequence_leaves_out_the_tokens_after_it(client):
    r = client.chat.completions.create(**{**REQUEST, "stop": [PARROTS[0]]})
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content.endswith('"') and PARROTS[0] not in (
        choice.message.content)
    entries = choice.logprobs.content
    # The entries cover the answer; the last one gave text before the stop sequence (none lies wholly after it).
    assert joined(entries).startswith(choice.message.content.encode())
    assert len(joined(entries[:-1])) < len(choice.message.content.encode())
