"""Output processing on its own thread: detokenization, stop strings, and the deltas to the requests.

The engine thread only samples tokens and hands them over (one queue put per step); this thread turns them
into text, cuts at stop strings and calls the requests' delta callbacks (the Triton backend builds and sends
its responses there), so that none of that host work sits between two model steps.

What needs text is known here only: when a stop string completes, the sequence finishes here and the engine
is told (``on_stopped``) to drop it at its next step; tokens it sampled for that sequence in the meantime are
discarded, never emitted. Finishes the engine decides (stop token, max_tokens, grammar, cancellation, errors)
arrive with the tokens, in order.

Logprobs travel with the text their tokens produced: a token's entry is held until the detokenizer releases
its text (the tokens of a character split over several tokens, text held as a possible start of a stop
string) and goes out in the same delta. The stop token that ends a sequence is not in the logprobs (as OpenAI
leaves it out), nor are tokens whose text a stop string cut off.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from minicpmv.engine.request import Delta, RequestState, Sequence, TokenLogprob

logger = logging.getLogger(__name__)

# (seq, token, logprob, finish reason decided by the engine or None) for a sampled token;
# (state, reason, error) to finish a request's unfinished choices (cancellation, errors, shutdown).
TokenItem = tuple[Sequence, int, TokenLogprob | None, str | None]


class OutputProcessor:
    def __init__(self, on_stopped: Callable[[Sequence], None]):
        self._on_stopped = on_stopped
        self._held: dict[Sequence, _Held] = {}  # output thread only
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="minicpmv-output", daemon=True)
        self._thread.start()

    def tokens(self, items: list[TokenItem]) -> None:
        """Engine thread: one step's sampled tokens."""
        self._queue.put(("tokens", items))

    def finish(self, state: RequestState, reason: str, error: str | None = None) -> None:
        """Finish every choice of ``state`` not finished yet, after the tokens queued before."""
        self._queue.put(("finish", (state, reason, error)))

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far has been emitted."""
        done = threading.Event()
        self._queue.put(("barrier", done))
        done.wait(timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._queue.put(("stop", None))
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            kind, payload = self._queue.get()
            try:
                if kind == "tokens":
                    for item in payload:
                        self._token(*item)
                elif kind == "finish":
                    self._finish(*payload)
                elif kind == "barrier":
                    payload.set()
                else:
                    return
            except Exception:  # a broken request must not stop the others' output
                logger.exception("output processing failed")

    def _token(self, seq: Sequence, token: int, logprob: TokenLogprob | None, reason: str | None) -> None:
        if seq.output_finished:
            return  # sampled after a stop string ended it here: never shown
        state = seq.request
        params = state.sampling
        seq.num_emitted += 1
        is_stop_token = reason == "stop" and token in params.stop_token_ids and not params.ignore_eos
        text = ""
        if not is_stop_token:
            text = seq.detokenizer.add(token)
            if logprob is not None:
                self._held.setdefault(seq, _Held()).entries.append(logprob)
        if seq.detokenizer.stopped and reason != "stop":
            if reason is None:  # the engine does not know yet
                self._on_stopped(seq)
            reason = "stop"  # a stop string wins over max_tokens reached on the same token, as OpenAI reports it
        if reason is not None:
            text += seq.detokenizer.flush()
            seq.output_finished = True
        state.emit(Delta(state.request_id, seq.index, text, [token], seq.prompt_len, seq.num_emitted, reason,
                         self._released_logprobs(seq)))  # fmt: skip

    def _finish(self, state: RequestState, reason: str, error: str | None) -> None:
        for seq in state.sequences:
            if seq.output_finished:
                continue
            seq.output_finished = True
            text = seq.detokenizer.flush() if not error else ""
            logprobs = self._released_logprobs(seq) if not error else None
            self._held.pop(seq, None)
            state.emit(Delta(state.request_id, seq.index, text, [], seq.prompt_len, seq.num_emitted, reason,
                             logprobs, error))  # fmt: skip

    def _released_logprobs(self, seq: Sequence) -> list[TokenLogprob] | None:
        """The held logprob entries of ``seq`` whose text the detokenizer has released (None when the request
        did not ask for logprobs); forgets the rest once ``seq`` has finished."""
        if not seq.request.sampling.logprobs:
            return None
        held = self._held.get(seq)
        if held is None:
            return []
        count = seq.detokenizer.released_tokens - held.sent
        released, held.entries[:count] = held.entries[:count], []
        held.sent += len(released)
        if seq.output_finished:
            del self._held[seq]
        return released


class _Held:
    """A sequence's logprob entries not sent yet; ``sent`` entries went out before them."""

    __slots__ = ("entries", "sent")

    def __init__(self) -> None:
        self.entries: list[TokenLogprob] = []
        self.sent = 0
