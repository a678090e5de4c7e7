"""Streaming detokenisation of generated tokens, with stop strings.

Decoding token by token is wrong twice over: a byte-level BPE token may carry only part of a multi-byte
UTF-8 character (it decodes to U+FFFD on its own), and decoders may render a token differently depending
on its neighbours. :class:`IncrementalDetokenizer` therefore keeps two offsets into the token list, as
vLLM and TGI do: ``prefix`` marks the start of a small decoding window (tokens already returned, kept as
context) and ``read`` the end of what has been returned. Each step decodes only ``ids[prefix:]`` and
returns the part beyond the text of ``ids[prefix:read]``, unless it ends with U+FFFD (an unfinished
character), in which case it waits for more tokens. The cost per token is one decode of a few tokens.

Text is released in whole tokens: each read step adds a *segment* (the tokens it read and the text they
produced), and a chunk always ends at a segment's end, never inside one. :attr:`released_tokens` says how
many generated tokens the released text covers, so that their logprobs travel with their text: the tokens of
an unfinished character, and those whose text is held back as a possible start of a stop string, come out
with the chunk that releases their text.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decoding context, as in vLLM: enough for any decoder's look-behind.
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns generated token ids into text chunks for streaming, cutting the output at stop strings.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with ``decode(ids, skip_special_tokens=...)``).
        prompt_ids: the prompt; its last few tokens are decoding context only and are never returned.
        stop: stop strings; the output ends right before the first one that appears in it.

    Contract: the chunks returned by :meth:`add`, followed by :meth:`flush`, concatenate to
    ``tokenizer.decode(generated_ids, skip_special_tokens=True)`` (for a byte-level BPE; a decoder that
    strips a leading space keeps it here, as it would in context), cut before the earliest stop-string
    occurrence at the moment a stop string first completes. That is the first occurrence in the final text
    unless one stop string contains another. Special tokens never appear in the output, and no chunk ends
    inside a multi-byte character, nor inside the text of one segment (see the module's docstring) unless a
    stop string cuts it there.

    Raises:
        ValueError: a stop string is empty.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._stop = tuple(dict.fromkeys(stop))
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        context_text = self._decode(context)
        if context_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: its bytes would merge with ours, so decode without it.
            context, context_text = [], ""
        self._ids: list[int] = context
        self._context_len = len(context)
        self._prefix = 0
        self._read = len(context)
        self._prefix_text = context_text
        self._pending = ""  # decoded text not yet returned because it may start a stop string
        self._chunks: list[str] = []
        # Segments not released yet, as (generated tokens up to its end, characters of output up to its end);
        # the released text is self._released_chars long and covers self._released_tokens generated tokens.
        self._segments: deque[tuple[int, int]] = deque()
        self._produced_chars = 0
        self._released_chars = 0
        self._released_tokens = 0
        self._stop_reason: str | None = None
        self._flushed = False

    @property
    def text(self) -> str:
        """All text returned so far by :meth:`add` and :meth:`flush`."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been found; the output is final then."""
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_reason

    @property
    def released_tokens(self) -> int:
        """How many of the generated tokens (in order) the text returned so far covers. After a stop string:
        the tokens that produced text before it (one whose text the cut splits included), not those after."""
        return self._released_tokens

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it finalises (possibly "").

        After a stop string has matched, tokens are ignored and "" is returned.

        Raises:
            ValueError: :meth:`flush` has already been called.
        """
        if self._flushed:
            raise ValueError("add() called after flush(): the output is already complete")
        if self.stopped:
            return ""
        self._ids.append(token_id)
        window_text = self._decode(self._ids[self._prefix :])
        if window_text.endswith(_REPLACEMENT_CHAR):
            return ""  # an unfinished character; a later token may complete it
        new_text = window_text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        self._add_segment(new_text)
        return self._emit(new_text, final=False)

    def flush(self) -> str:
        """End the output (length limit, stop token, cancellation) and return the text still held back.

        Releases an unfinished trailing character as decode renders it (U+FFFD) and a held possible start
        of a stop string, but never a stop string that actually matched. Calling it again returns "".
        """
        if self._flushed or self.stopped:
            self._flushed = True
            return ""
        self._flushed = True
        tail = self._decode(self._ids[self._prefix :])[len(self._prefix_text) :]
        self._add_segment(tail)
        return self._emit(tail, final=True)

    def _add_segment(self, new_text: str) -> None:
        self._produced_chars += len(new_text)
        self._segments.append((len(self._ids) - self._context_len, self._produced_chars))

    def _emit(self, new_text: str, *, final: bool) -> str:
        """Run ``new_text`` through the stop-string check and return the part that can be released."""
        buffer = self._pending + new_text
        self._pending = ""
        match = self._find_stop(buffer)
        if match is not None:
            index, self._stop_reason = match
            out = buffer[:index]
            self._release_up_to(self._released_chars + index, cut=True)
        elif final:
            out = buffer
            self._release_up_to(self._produced_chars, cut=False)
        else:
            # Hold a possible start of a stop string, extended back to where its segment starts.
            end = self._released_chars + len(buffer) - self._held_suffix_length(buffer)
            end = self._release_up_to(end, cut=False)
            out, self._pending = buffer[: end - self._released_chars], buffer[end - self._released_chars :]
        self._released_chars += len(out)
        if out:
            self._chunks.append(out)
        return out

    def _release_up_to(self, end: int, *, cut: bool) -> int:
        """Release the segments that end by character ``end`` of the output, and with ``cut`` (a stop string
        starts at ``end``) also one that starts before it; return where the last released segment ends."""
        released_end = self._released_chars
        while self._segments:
            tokens, chars = self._segments[0]  # it starts where the last released one ends
            if chars <= end or (cut and released_end < end):
                self._segments.popleft()
                self._released_tokens, released_end = tokens, chars
            else:
                break
        return released_end

    def _find_stop(self, buffer: str) -> tuple[int, str] | None:
        """The earliest occurrence of any stop string in ``buffer`` as (index, stop string), or None."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = buffer.find(stop)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _held_suffix_length(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of some stop string."""
        for length in range(min(len(buffer), self._max_stop_len - 1), 0, -1):
            suffix = buffer[-length:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return length
        return 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
