"""What runs in the next step: admission, chunked prefill under a token budget, preemption, retirement.

Each step spends at most ``max_num_batched_tokens`` tokens, in this order:
1. one token for every decoding sequence (oldest first). One that needs a new block when none is free
   preempts the newest running sequence (its blocks are freed, it goes back to the front of the queue and is
   recomputed later; its full blocks stay in the prefix cache, so the recompute is mostly cache hits),
   never failing anything;
2. the next chunk of every sequence still prefilling (a long prompt is prefilled over several steps, between
   the decode steps of the others);
3. waiting sequences in arrival order, while ``max_num_seqs`` and the pool allow: admission takes the
   longest cached prefix (prefix cache) and blocks for the rest, keeping one free block per decoding sequence
   so that admitting does not force a preemption at the next block boundary.
A sequence whose images are not encoded yet (the engine encodes a few slices per step) is admitted but not
given prefill tokens until they are.

Seeded sequences are computed the same way in every run: they never read the prefix cache (a prefill that
starts after cached tokens computes logits a few ulps away from a full one, enough to change a sampled token)
and their prefill chunks are a function of the sequence alone (``seeded_chunk``): a chunk that does not fit
this step's budget waits for a later step instead of being cut to fit.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable

from minicpmv.engine.block_manager import BlockManager, block_key
from minicpmv.engine.model_runner import ScheduledSeq
from minicpmv.engine.request import Sequence

logger = logging.getLogger(__name__)


def fit_pairs(start: int, pairs: int) -> int:
    """The longest chunk after ``start`` computed tokens within ``pairs`` query-key pairs: the largest q with
    q * (start + q) <= pairs (0 when not even one token fits)."""
    q = (math.isqrt(start * start + 4 * pairs) - start) // 2
    while (q + 1) * (start + q + 1) <= pairs:
        q += 1
    while q > 0 and q * (start + q) > pairs:
        q -= 1
    return q


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_attention_pairs: int | None = None):  # fmt: skip
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_attention_pairs = max_prefill_attention_pairs
        # A seeded sequence's prefill chunk: what is left of the token budget when every other sequence decodes
        # (at least half the budget, so that a budget no larger than max_num_seqs does not prefill token by token).
        self.seeded_chunk_tokens = max(max_num_batched_tokens - max_num_seqs, max_num_batched_tokens // 2, 1)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.num_preemptions = 0
        # Hooks of the engine's LoRA slots: ``admissible(seq)`` takes what a sequence needs to run (False: it
        # waits, and younger sequences may go first); ``on_leave(seq)`` gives it back when it stops running.
        self.admissible: Callable[[Sequence], bool] = lambda seq: True
        self.on_leave: Callable[[Sequence], None] = lambda seq: None

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    def add(self, seqs: list[Sequence]) -> None:
        self.waiting.extend(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, images_ready: Callable[[Sequence], bool]) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        # The attention budget protects decoding sequences from long steps; with none decoding, prefill runs
        # at the full token budget.
        decoding = any(not seq.is_prefilling for seq in self.running)
        self._pairs_left = self.max_prefill_attention_pairs if decoding else None
        self._chunked = False  # a chunk of more than one token was scheduled in this step
        self._prefilled = False  # any chunk was
        batch: list[ScheduledSeq] = []
        for seq in list(self.running):
            if seq not in self.running or seq.is_prefilling:
                continue  # preempted by an older one in this loop, or not decoding
            if self._make_room(seq, batch):
                batch.append(ScheduledSeq(seq, 1))
                budget -= 1
        for seq in self.running:
            if budget <= 0:
                break
            if seq.is_prefilling and images_ready(seq):
                budget -= self._add_chunk(seq, budget, batch)
        # One free block kept per decoding sequence (admitted ones are prefilling, so the count holds).
        reserve = sum(1 for s in self.running if not s.is_prefilling)
        skipped: list[Sequence] = []  # waiting for an adapter slot: younger sequences may go first
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = [] if seq.seeded else self.blocks.cached_prefix(self.block_keys(seq), seq.num_tokens)
            if not self.blocks.can_allocate(seq.num_tokens, cached, reserve=reserve):
                break
            if not self.admissible(seq):
                skipped.append(self.waiting.popleft())
                continue
            self.waiting.popleft()
            seq.block_table = self.blocks.allocate(seq.num_tokens, cached)
            seq.num_computed_tokens = len(cached) * self.block_size
            self.running.append(seq)
            if images_ready(seq):
                budget -= self._add_chunk(seq, budget, batch)
        self.waiting.extendleft(reversed(skipped))  # back at the front, in their order
        return batch

    def _add_chunk(self, seq: Sequence, budget: int, batch: list[ScheduledSeq]) -> int:
        """Schedule ``seq``'s next prefill chunk (``_chunk``) into ``batch``; returns its token count."""
        length = self._chunk(seq, budget, first=not self._chunked)
        if length:
            batch.append(ScheduledSeq(seq, length))
            self._chunked = self._chunked or length > 1
            self._prefilled = True
        return length

    def _chunk(self, seq: Sequence, budget: int, first: bool) -> int:
        """How many of ``seq``'s remaining prefill tokens this step takes: within the token ``budget`` and,
        when set, the step's prefill attention budget (a chunk of q tokens after c computed ones attends
        q * (c + q) query-key pairs; at long contexts that, not the token count, is a step's cost). The first
        chunk of a step always gets at least one token, so that every prompt progresses."""
        start = seq.num_computed_tokens
        if seq.seeded:
            return self._take_seeded_chunk(start, seq.prefill_target, budget)
        length = min(seq.prefill_target - start, budget)
        if self._pairs_left is None or length <= 0:
            return max(length, 0)
        length = min(length, max(1, fit_pairs(start, self._pairs_left)))
        if length * (start + length) > self._pairs_left and not first:
            return 0
        self._pairs_left = max(self._pairs_left - length * (start + length), 0)
        return length

    def seeded_chunk(self, start: int, target: int) -> int:
        """The length of a seeded sequence's prefill chunk from ``start`` towards ``target``: at most
        ``seeded_chunk_tokens`` and, when ``max_prefill_attention_pairs`` is set, within it (as a step's only
        chunk would be), whatever else runs."""
        length = min(target - start, self.seeded_chunk_tokens)
        if self.max_prefill_attention_pairs is not None and length > 0:
            length = min(length, max(1, fit_pairs(start, self.max_prefill_attention_pairs)))
        return max(length, 0)

    def _take_seeded_chunk(self, start: int, target: int, budget: int) -> int:
        """``seeded_chunk`` whole if this step has room for it (the token budget, and the attention budget
        unless no other chunk is in the step), else 0: it waits rather than being cut."""
        length = self.seeded_chunk(start, target)
        if length <= 0 or length > budget:
            return 0
        if self._pairs_left is not None:
            cost = length * (start + length)
            if cost > self._pairs_left and self._prefilled:
                return 0
            self._pairs_left = max(self._pairs_left - cost, 0)
        return length

    def _make_room(self, seq: Sequence, batch: list[ScheduledSeq]) -> bool:
        """A slot for ``seq``'s next token, preempting the newest running sequences while none is free. False
        when ``seq`` itself had to go."""
        while not self.blocks.append_slot(seq.block_table, seq.num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            batch[:] = [entry for entry in batch if entry.seq is not victim]
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first for a recompute of its prompt and outputs so far."""
        self.running.remove(seq)
        self.on_leave(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        logger.info("preempted %s/%d (%d tokens) for lack of KV blocks", seq.request.request_id, seq.index,
                    seq.num_tokens)  # fmt: skip

    def computed(self, batch: list[ScheduledSeq]) -> None:
        """After a step: advance each sequence and put its newly full blocks into the prefix cache."""
        for entry in batch:
            seq = entry.seq
            seq.num_computed_tokens += entry.num_tokens
            first = (seq.num_computed_tokens - entry.num_tokens) // self.block_size
            full = seq.num_computed_tokens // self.block_size
            if full > first and self.blocks.enable_prefix_caching:
                keys = self.block_keys(seq, full)
                for index in range(first, full):
                    self.blocks.register(seq.block_table[index], keys[index])

    def finish(self, seq: Sequence) -> None:
        """``seq`` is done (finished or cancelled): it leaves the queues and its blocks are freed."""
        if seq in self.running:
            self.running.remove(seq)
            self.on_leave(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.blocks.free(seq.block_table)

    def block_keys(self, seq: Sequence, count: int | None = None) -> list[bytes]:
        """The prefix-cache keys of ``seq``'s first ``count`` full blocks (default: all full blocks), extended
        and cached on the sequence as it grows."""
        size = self.block_size
        count = seq.num_tokens // size if count is None else count
        keys = seq.block_keys
        spans = seq.request.content_spans
        while len(keys) < count:
            index = len(keys)
            start, end = index * size, (index + 1) * size
            contents = [(content, max(start, a) - a, max(a - start, 0)) for a, b, content in spans
                        if a < end and b > start]  # fmt: skip
            parent = keys[-1] if keys else seq.request.cache_salt
            keys.append(block_key(parent, seq.token_ids_range(start, end), contents))
        return keys[:count]
