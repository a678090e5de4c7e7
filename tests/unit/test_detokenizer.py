"""IncrementalDetokenizer: streamed chunks equal a one-shot decode cut at the first stop string, never split a
character, never show a special token."""

from __future__ import annotations

import random

import pytest

from minicpmv.engine.detokenizer import IncrementalDetokenizer
from minicpmv.tokenizer import SPECIAL_TOKENS

SPECIAL_IDS = sorted(SPECIAL_TOKENS.values())
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def byte_ids(tokenizer) -> dict[int, int]:
    """Byte value -> the id of the single-byte token (GPT-2's printable-character map for byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    chars = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
    vocab = tokenizer.get_vocab()
    return {b: vocab[char] for b, char in chars.items()}


def single_byte_tokens(byte_ids, text: str) -> list[int]:
    return [byte_ids[b] for b in text.encode("utf-8")]


def stream(tokenizer, ids, stop=(), prompt_ids=()) -> tuple[list[str], IncrementalDetokenizer]:
    """The chunks returned by one add per id, then the flush."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop)
    chunks = [detok.add(token_id) for token_id in ids]
    chunks.append(detok.flush())
    return chunks, detok


def expected(tokenizer, ids, stop=()) -> tuple[str, str | None]:
    """The one-shot decode cut before the earliest stop string, and that stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in stop if s in text]
    if not hits:
        return text, None
    index, reason = min(hits)
    return text[:index], reason


def test_multibyte_characters_fed_byte_by_byte_are_never_split(tokenizer, byte_ids):
    text = "é中文😀 ok"
    ids = single_byte_tokens(byte_ids, text)
    chunks, detok = stream(tokenizer, ids)
    assert "".join(chunks) == text == detok.text
    assert not any(FFFD in chunk for chunk in chunks)
    # Each character comes out with its last byte: é (2 bytes), 中 and 文 (3), 😀 (4), then ASCII.
    assert chunks[:12] == ["", "é", "", "", "中", "", "", "文", "", "", "", "😀"]


def test_bpe_text_streams_back_exactly_with_its_spacing(tokenizer):
    for text in ["Total due: $2,262.77", "  two leading spaces\n\tand a tab", "Café au lait, 发票号码 👍 done. ", "a"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        chunks, detok = stream(tokenizer, ids)
        assert "".join(chunks) == text
        assert not detok.stopped and detok.stop_reason is None


def test_random_sequences_match_one_shot_decode(tokenizer, byte_ids):
    rng = random.Random(1234)
    texts = ["é", "中文", "😀", "ß", "€", "👍🎉"]
    for case in range(300):
        ids: list[int] = []
        while len(ids) < rng.randint(1, 40):
            pick = rng.random()
            if pick < 0.6:
                ids.append(rng.randrange(1000))
            elif pick < 0.75:
                ids.append(rng.choice(SPECIAL_IDS))
            else:  # a multi-byte character as single bytes, sometimes truncated or with a special inside
                run = single_byte_tokens(byte_ids, rng.choice(texts))
                if rng.random() < 0.3:
                    run = run[: rng.randrange(1, len(run) + 1)]
                if rng.random() < 0.2:
                    run.insert(rng.randrange(len(run) + 1), rng.choice(SPECIAL_IDS))
                ids.extend(run)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        stop: list[str] = []
        if full and case % 3:
            for _ in range(rng.randint(1, 3)):  # substrings of the text, so they do match
                start = rng.randrange(len(full))
                stop.append(full[start : start + rng.randint(1, 4)])
            stop.append("never-in-the-output")
        # The reference is the first occurrence in the final text; streaming stops at the first stop string to
        # complete. They agree unless one stop string contains another, so such sets are not drawn.
        stop = [s for s in stop if not any(s != t and s in t for t in stop)]
        chunks, detok = stream(tokenizer, ids, stop)
        want, reason = expected(tokenizer, ids, stop)
        assert "".join(chunks) == want == detok.text, (ids, stop)
        assert detok.stop_reason == reason and detok.stopped == (reason is not None)
        if FFFD not in full:
            assert not any(FFFD in chunk for chunk in chunks), (ids, chunks)


def test_partial_output_is_always_a_prefix_of_the_final_text(tokenizer):
    ids = tokenizer.encode("Subtotal: $2,085.50 Tax (8.5%): $177.27 Total due: $2,262.77", add_special_tokens=False)
    stop = ["Total due", "$177.28"]
    final, _ = expected(tokenizer, ids, stop)
    detok = IncrementalDetokenizer(tokenizer, (), stop)
    for token_id in ids:
        detok.add(token_id)
        assert final.startswith(detok.text)
    detok.flush()
    assert detok.text == final == "Subtotal: $2,085.50 Tax (8.5%): $177.27 "


def test_special_tokens_never_leak(tokenizer):
    words = tokenizer.encode("Hello world", add_special_tokens=False)
    ids = [SPECIAL_TOKENS["<|im_start|>"], *words[:1], SPECIAL_TOKENS["<image>"], SPECIAL_TOKENS["<unk>"]]
    ids += [*words[1:], SPECIAL_TOKENS["</image>"], SPECIAL_TOKENS["<|im_end|>"], SPECIAL_TOKENS["<|endoftext|>"]]
    chunks, _ = stream(tokenizer, ids)
    assert "".join(chunks) == "Hello world"
    assert not any("<" in chunk for chunk in chunks)


def test_stop_string_split_across_tokens(tokenizer, byte_ids):
    ids = single_byte_tokens(byte_ids, "Answer: 42. Done")
    chunks, detok = stream(tokenizer, ids, stop=["42."])
    assert "".join(chunks) == "Answer: "
    assert detok.stopped and detok.stop_reason == "42."
    # The chunk that completed the stop string returned only what precedes it; nothing after it comes out.
    completing = ids.index(byte_ids[ord(".")])
    assert chunks[completing] == "" and chunks[completing - 1] == "" and chunks[completing - 2] == ""
    assert all(chunk == "" for chunk in chunks[completing:])
    detok = IncrementalDetokenizer(tokenizer, (), ["42."])
    assert "".join(detok.add(token_id) for token_id in ids) == "Answer: " and detok.stopped
    assert detok.add(byte_ids[ord("x")]) == "" and detok.flush() == "" and detok.text == "Answer: "


def test_possible_stop_prefix_is_held_then_released(tokenizer, byte_ids):
    ids = single_byte_tokens(byte_ids, "the total is 5")
    chunks, detok = stream(tokenizer, ids, stop=["total due"])
    assert "".join(chunks) == "the total is 5" and not detok.stopped
    # "t", "to", ..., "total " could start the stop string: held until "i" rules it out, then released at once.
    release = len("the total i") - 1
    assert chunks[release] == "total i"
    assert all(chunk == "" for chunk in chunks[len("the ") : release])


def test_flush_releases_a_held_stop_prefix_and_an_unfinished_character(tokenizer, byte_ids):
    chunks, detok = stream(tokenizer, single_byte_tokens(byte_ids, "sum: tot"), stop=["total"])
    assert chunks[-1] == "tot" and "".join(chunks) == "sum: tot" and not detok.stopped
    ids = single_byte_tokens(byte_ids, "ab中")[:-1]  # 中 without its last byte
    chunks, _ = stream(tokenizer, ids)
    assert chunks[:-1] == ["a", "b", "", ""] and chunks[-1] == tokenizer.decode(ids[2:]) == FFFD
    assert detok.flush() == ""


def test_stop_string_completed_only_at_flush_is_cut(tokenizer, byte_ids):
    # The last token leaves an unfinished character, so "end" is still held when generation stops.
    ids = single_byte_tokens(byte_ids, "the end") + single_byte_tokens(byte_ids, "中")[:1]
    chunks, detok = stream(tokenizer, ids, stop=["end"])
    assert "".join(chunks) == "the " and detok.stop_reason == "end"


def test_earliest_stop_string_wins_within_one_chunk(tokenizer):
    ids = tokenizer.encode("Invoice No. INV-2024", add_special_tokens=False)
    chunks, detok = stream(tokenizer, ids, stop=["2024", "No."])
    assert "".join(chunks) == "Invoice " and detok.stop_reason == "No."


def test_prompt_context_does_not_change_the_output(tokenizer, byte_ids):
    prompt = tokenizer.encode("<|im_start|>assistant\nHi", add_special_tokens=False)
    ids = tokenizer.encode(" there, 中文 ok", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids, prompt_ids=prompt)[0]) == " there, 中文 ok"
    # A prompt ending inside a character is not used as context: its bytes would merge into our first character.
    broken_prompt = single_byte_tokens(byte_ids, "中")[:2]
    assert "".join(stream(tokenizer, ids, prompt_ids=broken_prompt)[0]) == " there, 中文 ok"


def test_decoding_window_stays_small(tokenizer):
    class CountingTokenizer:
        longest = 0

        def decode(self, ids, skip_special_tokens):
            CountingTokenizer.longest = max(CountingTokenizer.longest, len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode("The receipt lists three items, a subtotal, the tax and the total. " * 40)
    chunks, _ = stream(CountingTokenizer(), ids, stop=["never"], prompt_ids=list(range(100)))
    assert len(ids) > 500 and "".join(chunks) == tokenizer.decode(ids)
    assert CountingTokenizer.longest <= 5


def test_invalid_use(tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tokenizer, (), ["ok", ""])
    detok = IncrementalDetokenizer(tokenizer)
    detok.add(5)
    detok.flush()
    assert detok.flush() == ""
    with pytest.raises(ValueError, match="after flush"):
        detok.add(5)


# ---------------------------------------------------------------- released_tokens: which tokens the text covers


def plain(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_tokens_of_a_split_character_are_released_with_it(tokenizer):
    ids = tokenizer.encode("a 🦜龘", add_special_tokens=False)  # " 🦜" takes three tokens, "龘" two
    detok = IncrementalDetokenizer(tokenizer)
    chunks, released = [], []
    for token_id in ids:
        chunks.append(detok.add(token_id))
        released.append(detok.released_tokens)
    assert chunks == ["a", "", "", " 🦜", "", "龘"]
    assert released == [1, 1, 1, 4, 4, 6]


def test_tokens_of_a_held_stop_prefix_are_released_with_their_text(tokenizer):
    ids = tokenizer.encode("pay the total", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, (), ["total due"])
    for token_id in ids:
        detok.add(token_id)
        # What was released so far is exactly the text of the released tokens: never part of a token's text.
        assert detok.text == plain(tokenizer, ids[: detok.released_tokens])
    assert detok.text == "pay the" and detok.released_tokens == 2  # " total" may start "total due"
    assert detok.flush() == " total" and detok.released_tokens == 3


def test_a_hold_inside_a_token_holds_the_whole_token(tokenizer, byte_ids):
    # "abcx" is one segment here; "x" may start the stop string "xyz": the whole segment waits.
    ids = single_byte_tokens(byte_ids, "ab") + tokenizer.encode("cx", add_special_tokens=False)
    assert len(ids) == 3
    detok = IncrementalDetokenizer(tokenizer, (), ["xyz"])
    assert [detok.add(i) for i in ids] == ["a", "b", ""] and detok.released_tokens == 2
    assert detok.add(byte_ids[ord("q")]) == "cxq" and detok.released_tokens == 4


def test_stop_string_releases_the_tokens_before_it_and_the_one_it_cuts(tokenizer, byte_ids):
    ids = single_byte_tokens(byte_ids, "ab") + tokenizer.encode("cx", add_special_tokens=False)
    ids += single_byte_tokens(byte_ids, "yz!")
    detok = IncrementalDetokenizer(tokenizer, (), ["xyz"])
    chunks = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(chunks) == "abc" and detok.stopped
    assert detok.released_tokens == 3  # a, b and "cx" (whose "c" is output); not "y", "z" nor "!"


def test_released_text_is_always_the_text_of_the_released_tokens(tokenizer, byte_ids):
    rng = random.Random(99)
    texts = ["é", "中文", "😀", "🦜", "龘 ok", "👍🎉"]
    for case in range(200):
        ids: list[int] = []
        while len(ids) < rng.randint(1, 30):
            pick = rng.random()
            if pick < 0.5:
                ids.append(rng.randrange(151643))
            elif pick < 0.6:
                ids.append(rng.choice(SPECIAL_IDS))
            else:
                ids.extend(tokenizer.encode(rng.choice(texts), add_special_tokens=False))
        full = tokenizer.decode(ids, skip_special_tokens=True)
        stop = [full[s : s + rng.randint(1, 3)] for s in [rng.randrange(len(full))]] if full and case % 2 else []
        detok = IncrementalDetokenizer(tokenizer, (), stop)
        for token_id in ids:
            detok.add(token_id)
            if not detok.stopped:
                assert detok.text == plain(tokenizer, ids[: detok.released_tokens]), (ids, stop)
        detok.flush()
        covered = detok.released_tokens
        if not detok.stopped:
            assert covered == len(ids) and detok.text == full
            continue
        # Cut by a stop string: the released tokens produce the output and no more than the one the cut splits.
        assert plain(tokenizer, ids[:covered]).startswith(detok.text), (ids, stop)
        before = plain(tokenizer, ids[: covered - 1]) if covered else ""
        assert covered == 0 or not before.startswith(detok.text) or before == plain(tokenizer, ids[:covered])
