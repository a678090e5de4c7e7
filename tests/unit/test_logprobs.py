"""Logprobs with the real Qwen2 vocabulary: each entry carries its token's own bytes (a character split over
several tokens included), entries travel in the delta that carries their text, and the stop token that ends a
sequence is never among them. At the output thread (real detokenizer, real tokenizer) and through the engine on
the tiny checkpoint (a grammar forces a character that the vocabulary splits)."""

from __future__ import annotations

import json

import pytest

from minicpmv.engine.detokenizer import IncrementalDetokenizer
from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.output_processor import OutputProcessor
from minicpmv.engine.request import Delta, GenerationRequest, RequestState, Sequence, TokenLogprob
from minicpmv.engine.sampling_params import SamplingParams
from minicpmv.tokenizer import SPECIAL_TOKENS, TokenPieces

IM_END = SPECIAL_TOKENS["<|im_end|>"]
PARROT = "🦜"  # the vocabulary has no token for it: b"\xf0\x9f\xa6" + b"\x9c", or pieces of other splits


@pytest.fixture(scope="module")
def pieces(tiny_tokenizer) -> TokenPieces:
    return TokenPieces(tiny_tokenizer)


def test_token_pieces_are_the_tokens_own_bytes(tiny_tokenizer, pieces):
    text = f"a {PARROT}龘 “ok” Café 你好"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    entries = [pieces(i) for i in ids]
    assert b"".join(raw for _, raw in entries) == text.encode()
    partial = [(token, raw) for token, raw in entries if token.startswith("bytes:")]
    assert len(partial) >= 4  # " 🦜" and "龘" are split
    for token, raw in entries:
        if token.startswith("bytes:"):  # OpenAI's form for part of a character: the bytes, escaped
            with pytest.raises(UnicodeDecodeError):
                raw.decode()
            assert token == "bytes:" + "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in raw)
        else:
            assert token == raw.decode()
    assert pieces(tiny_tokenizer.encode("龘", add_special_tokens=False)[0]) == ("bytes:\\xe9\\xbe", b"\xe9\xbe")
    # Special tokens add no text: their name, and no bytes.
    assert pieces(IM_END) == ("<|im_end|>", None)
    assert pieces(SPECIAL_TOKENS["<unk>"]) == ("<unk>", None)


# ---------------------------------------------------------------- the output thread


class Run:
    """One sequence through a real OutputProcessor; the deltas it emitted."""

    def __init__(self, tokenizer, pieces, *, stop=(), logprobs=True, ignore_eos=False):
        self.pieces = pieces
        params = SamplingParams(logprobs=logprobs, stop=list(stop), ignore_eos=ignore_eos)
        request = GenerationRequest("r", prompt="", sampling=params)
        self.deltas: list[Delta] = []
        self.state = RequestState(request, [1, 2, 3], [], [], 100, self.deltas.append)
        self.seq = Sequence(request=self.state, index=0, prompt_ids=[1, 2, 3], generator=None,
                            detokenizer=IncrementalDetokenizer(tokenizer, [1, 2, 3], list(stop)))  # fmt: skip
        self.state.sequences.append(self.seq)
        self.stopped: list[Sequence] = []
        self.processor = OutputProcessor(self.stopped.append)
        self.logprobs = logprobs

    def feed(self, ids: list[int], last_reason: str | None = None) -> list[Delta]:
        items = []
        for k, token in enumerate(ids):
            entry = None
            if self.logprobs:
                token_str, raw = self.pieces(token)
                entry = TokenLogprob(token, token_str, -0.5 - k, token_bytes=raw)
            items.append((self.seq, token, entry, last_reason if k == len(ids) - 1 else None))
        self.processor.tokens(items)
        self.processor.drain()
        return self.deltas

    def close(self):
        self.processor.shutdown()


def logprob_bytes(delta: Delta) -> bytes:
    return b"".join(e.token_bytes or b"" for e in delta.logprobs)


def test_split_characters_come_with_their_logprobs_and_the_stop_token_is_left_out(tiny_tokenizer, pieces):
    text = f"Hi {PARROT}龘 and {PARROT}!"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    run = Run(tiny_tokenizer, pieces)
    deltas = run.feed(ids + [IM_END], last_reason="stop")
    run.close()
    assert "".join(d.text for d in deltas) == text and deltas[-1].finish_reason == "stop"
    for delta in deltas:  # every delta's entries are exactly its text, byte for byte
        assert logprob_bytes(delta) == delta.text.encode(), delta
    entries = [e for d in deltas for e in d.logprobs]
    assert [e.token_id for e in entries] == ids  # all but the stop token, in order
    assert any(e.token.startswith("bytes:") for e in entries)
    # The deltas of a character's first pieces carry neither text nor entries.
    assert any(d.text == "" and d.logprobs == [] for d in deltas)


def test_entries_of_a_held_stop_prefix_wait_for_their_text(tiny_tokenizer, pieces):
    ids = tiny_tokenizer.encode("pay the total now", add_special_tokens=False)
    run = Run(tiny_tokenizer, pieces, stop=["total due"])
    deltas = run.feed(ids, last_reason="length")
    run.close()
    assert [d.text for d in deltas] == ["pay", " the", "", " total now"]
    assert [[e.token_id for e in d.logprobs] for d in deltas] == [ids[:1], ids[1:2], [], ids[2:]]


def test_a_stop_string_keeps_the_entries_of_the_text_before_it(tiny_tokenizer, pieces):
    ids = tiny_tokenizer.encode("The total due is 5", add_special_tokens=False)
    run = Run(tiny_tokenizer, pieces, stop=["due"])
    deltas = run.feed(ids)
    run.close()
    assert "".join(d.text for d in deltas) == "The total " and deltas[-1].finish_reason == "stop"
    assert run.stopped == [run.seq]
    entries = [e.token for d in deltas for e in d.logprobs]
    assert entries == ["The", " total", " due"]  # " due" gave the space before the stop string; " is" nothing


def test_the_end_of_a_sequence_releases_an_unfinished_character_with_its_entries(tiny_tokenizer, pieces):
    ids = tiny_tokenizer.encode(f"ok {PARROT}", add_special_tokens=False)[:-1]  # cut inside the parrot
    run = Run(tiny_tokenizer, pieces)
    deltas = run.feed(ids[:-1])
    run.processor.finish(run.state, "cancelled")  # e.g. cancelled: the held piece goes out with the last delta
    run.processor.drain()
    deltas = run.deltas
    run.close()
    assert deltas[-1].finish_reason == "cancelled" and deltas[-1].text.endswith("\ufffd")
    assert [e.token_id for d in deltas for e in d.logprobs] == ids[:-1]


def test_ignored_stop_tokens_are_entries_without_bytes(tiny_tokenizer, pieces):
    ids = tiny_tokenizer.encode("a", add_special_tokens=False) + [IM_END]
    ids += tiny_tokenizer.encode("b", add_special_tokens=False)
    run = Run(tiny_tokenizer, pieces, ignore_eos=True)
    deltas = run.feed(ids, last_reason="length")
    run.close()
    entries = [e for d in deltas for e in d.logprobs]
    assert [(e.token, e.token_bytes) for e in entries] == [("a", b"a"), ("<|im_end|>", None), ("b", b"b")]


def test_no_entries_when_not_asked(tiny_tokenizer, pieces):
    run = Run(tiny_tokenizer, pieces, logprobs=False)
    deltas = run.feed(tiny_tokenizer.encode(f"x {PARROT}", add_special_tokens=False) + [IM_END], last_reason="stop")
    run.close()
    assert all(d.logprobs is None for d in deltas) and "".join(d.text for d in deltas) == f"x {PARROT}"


# ---------------------------------------------------------------- the engine on the tiny checkpoint


@pytest.fixture(scope="module")
def engine(tiny_full):
    eng = Engine.from_pretrained(tiny_full, dtype="float32", config=EngineConfig(max_num_seqs=4))
    yield eng
    eng.shutdown()


def test_engine_logprobs_of_a_split_character(engine):
    """The grammar forces {"w": "🦜🦜"}: whatever tokens the model picks, the parrots take several each."""
    schema = {"type": "object", "properties": {"w": {"const": PARROT * 2}}, "required": ["w"],
              "additionalProperties": False}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    request = GenerationRequest("g", messages=[{"role": "user", "content": "Say parrot."}],
                                sampling=SamplingParams(temperature=0, max_tokens=40, logprobs=True, top_logprobs=2,
                                                        response_format=response_format))  # fmt: skip
    deltas = list(engine.submit(request))
    text = "".join(d.text for d in deltas)
    assert json.loads(text) == {"w": PARROT * 2} and deltas[-1].finish_reason == "stop"
    entries = [e for d in deltas for e in d.logprobs]
    token_ids = [t for d in deltas for t in d.token_ids]
    assert token_ids[-1] in (IM_END, SPECIAL_TOKENS["<|endoftext|>"])  # ended by a stop token ...
    assert [e.token_id for e in entries] == token_ids[:-1]  # ... which is not among the logprobs
    assert b"".join(e.token_bytes for e in entries) == text.encode()
    assert any(e.token.startswith("bytes:") for e in entries)  # the parrots were split
    for delta in deltas:
        assert logprob_bytes(delta) == delta.text.encode()
        for entry in delta.logprobs:
            assert len(entry.top_bytes) == len(entry.top) == 2
