"""The scheduler alone, over a real BlockManager and real (unseeded) Sequences, with no model: a step is
``schedule``, then ``computed``, then one made-up token for every entry that samples, as the engine does.

Its rules: a step never spends more than ``max_num_batched_tokens``; every decoding sequence gets one token;
while any sequence decodes, prefill chunks stay within ``max_prefill_attention_pairs`` (single-token chunks
excepted: the step's first chunk always progresses), and with none decoding that budget does not apply; when
blocks run out, the newest running sequences are preempted; admission keeps one free block per decoding
sequence; a long prompt is prefilled in chunks, in order, until it decodes.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from minicpmv.engine.block_manager import BlockManager
from minicpmv.engine.model_runner import ScheduledSeq
from minicpmv.engine.request import GenerationRequest, RequestState, Sequence
from minicpmv.engine.sampling_params import SamplingParams
from minicpmv.engine.scheduler import Scheduler
from tests.unit.test_block_manager_invariants import Held, check

_ids = iter(range(10**6))


def make_seq(prompt_len: int, max_tokens: int = 8, first_token: int = 0) -> Sequence:
    """An unseeded sequence of ``prompt_len`` prompt tokens (distinct across sequences unless ``first_token``
    is shared, so that prefix-cache hits are the test's choice)."""
    request = GenerationRequest(f"s{next(_ids)}", prompt="x", sampling=SamplingParams(max_tokens=max_tokens))
    assert request.sampling.seed is None
    prompt = [first_token + i for i in range(prompt_len)]
    state = RequestState(request, prompt, [], [], max_tokens, None)
    seq = Sequence(request=state, index=0, prompt_ids=prompt, generator=None, detokenizer=None)
    state.sequences.append(seq)
    return seq


class Sim:
    """The engine's loop around a scheduler, checking the rules at every step."""

    def __init__(self, num_blocks: int, block_size: int = 4, max_num_seqs: int = 8, max_tokens: int = 32,
                 pairs: int | None = None, prefix_caching: bool = True):  # fmt: skip
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_tokens, max_prefill_attention_pairs=pairs)
        self.finished: list[Sequence] = []
        self.preempted: list[list[Sequence]] = []  # per step, in running (admission) order
        self.steps = 0
        self.steps_under_pairs = 0  # steps that prefilled while a sequence decoded, under an attention budget

    def add(self, *seqs: Sequence) -> None:
        self.scheduler.add(list(seqs))

    def step(self, images_ready: Callable[[Sequence], bool] = lambda seq: True) -> list[ScheduledSeq]:
        sched = self.scheduler
        running_before = list(sched.running)
        decoding_before = [s for s in running_before if not s.is_prefilling]
        waiting_before = list(sched.waiting)
        preemptions_before = {id(s): s.num_preemptions for s in [*running_before, *waiting_before]}
        batch = sched.schedule(images_ready)
        self.steps += 1
        entries = {id(e.seq): e for e in batch}
        assert len(entries) == len(batch), "a sequence twice in one step"
        # The token budget.
        assert sum(e.num_tokens for e in batch) <= sched.max_num_batched_tokens
        assert all(e.num_tokens >= 1 for e in batch)
        assert len(sched.running) <= sched.max_num_seqs
        # Preemption: only running sequences, and the newest ones (a suffix of the running list).
        preempted = [s for s in running_before if s not in sched.running]
        assert preempted == running_before[len(running_before) - len(preempted) :], "an older sequence preempted"
        for seq in preempted:
            assert seq.num_preemptions == preemptions_before[id(seq)] + 1
            assert seq.block_table == [] and seq.num_computed_tokens == 0 and id(seq) not in entries
        assert list(sched.waiting)[: len(preempted)] == preempted  # back at the front of the queue, in order
        self.preempted.append(preempted)
        # Every decoding sequence that was not preempted decodes one token.
        for seq in decoding_before:
            if seq in sched.running:
                assert entries[id(seq)].num_tokens == 1 and entries[id(seq)].sample
        # Prefill chunks: in order from what is computed, within the prompt (or recompute) target.
        prefill = [e for e in batch if e.seq.is_prefilling]
        for entry in prefill:
            seq = entry.seq
            assert seq.num_computed_tokens + entry.num_tokens <= seq.prefill_target
            assert entry.sample == (seq.num_computed_tokens + entry.num_tokens == seq.num_tokens)
            assert len(seq.block_table) >= self.blocks.blocks_for(seq.num_tokens)
        # The attention budget while anything decodes; a chunk of more than one token must fit in it.
        pairs = sum(e.num_tokens * (e.seq.num_computed_tokens + e.num_tokens) for e in prefill)
        if decoding_before and sched.max_prefill_attention_pairs is not None:
            limit = sched.max_prefill_attention_pairs
            assert pairs <= limit or all(e.num_tokens == 1 for e in prefill), (pairs, limit)
            self.steps_under_pairs += bool(prefill)
        # Admission keeps one free block per decoding sequence.
        admitted = [s for s in sched.running if s not in running_before]
        if admitted:
            decoding_now = sum(1 for e in batch if not e.seq.is_prefilling)
            assert self.blocks.num_free_blocks >= decoding_now
            assert [s for s in waiting_before if s in admitted] == admitted  # in queue order
        # The first prefill chunk always progresses when there is budget and a sequence to prefill.
        budget_left = sched.max_num_batched_tokens - sum(1 for e in batch if not e.seq.is_prefilling)
        if budget_left > 0 and any(s.is_prefilling and images_ready(s) for s in sched.running):
            assert prefill, "no prefill progress"
        # The blocks' reference counts are the running sequences' tables.
        check(self.blocks, [Held([], s.block_table) for s in sched.running])
        # The engine's side: advance, sample, retire.
        sched.computed(batch)
        for entry in batch:
            if entry.sample:
                seq = entry.seq
                seq.output_ids.append(1000 + len(seq.output_ids))
                if len(seq.output_ids) >= seq.request.max_tokens:
                    sched.finish(seq)
                    self.finished.append(seq)
        return batch

    def run(self, max_steps: int = 2000) -> None:
        while self.scheduler.has_work():
            assert self.steps < max_steps, "no progress"
            self.step()


def by_seq(batch: list[ScheduledSeq]) -> dict[int, int]:
    return {id(e.seq): e.num_tokens for e in batch}


# ---------------------------------------------------------------- random workloads


def test_random_workloads_keep_every_rule():
    """Random prompts, outputs, pools and budgets, through to the end: every step checked (Sim.step)."""
    total_preemptions = chunked = hits = under_pairs = 0
    for seed in range(30):
        rng = random.Random(seed)
        block_size = rng.choice([2, 4, 8])
        max_tokens = rng.choice([8, 16, 40])
        lengths = [(rng.randrange(1, 60), rng.randrange(1, 30)) for _ in range(rng.randrange(4, 14))]
        need = max(BlockManager(1, block_size).blocks_for(p + o) for p, o in lengths)
        sim = Sim(num_blocks=need + rng.randrange(0, need + 1), block_size=block_size,
                  max_num_seqs=rng.choice([2, 4, 8]), max_tokens=max_tokens,
                  pairs=rng.choice([None, 60, 400]))  # fmt: skip
        shared = rng.randrange(3)  # some prompts share a start, so the prefix cache is used
        seqs = [make_seq(p, o, first_token=0 if i % 3 == shared else 100 * i) for i, (p, o) in enumerate(lengths)]
        arrivals = list(seqs)
        while arrivals or sim.scheduler.has_work():
            if arrivals and rng.random() < 0.5:
                sim.add(arrivals.pop(0))
            if sim.scheduler.has_work():
                chunked += sum(1 for e in sim.step() if 1 < e.num_tokens < e.seq.prompt_len)
            assert sim.steps < 3000
        assert sorted(map(id, sim.finished)) == sorted(map(id, seqs))
        assert all(len(s.output_ids) == s.request.max_tokens for s in seqs)
        assert sim.blocks.num_used_blocks == 0
        total_preemptions += sim.scheduler.num_preemptions
        hits += sim.blocks.prefix_hits
        under_pairs += sim.steps_under_pairs
    # The runs exercised preemption, chunked prefill, the prefix cache and the attention budget.
    exercised = (total_preemptions, chunked, hits, under_pairs)
    assert total_preemptions > 20 and chunked > 20 and hits > 0 and under_pairs > 20, exercised


# ---------------------------------------------------------------- the token budget and chunked prefill


def test_decoding_sequences_take_one_token_each_and_a_long_prompt_is_chunked_into_the_rest():
    sim = Sim(num_blocks=64, block_size=4, max_tokens=16)
    a, b = make_seq(5, max_tokens=50), make_seq(6, max_tokens=50, first_token=100)
    sim.add(a, b)
    assert by_seq(sim.step()) == {id(a): 5, id(b): 6}
    long = make_seq(40, max_tokens=3, first_token=200)
    sim.add(long)
    starts = []
    while long.is_prefilling or not long.output_ids:
        starts.append(long.num_computed_tokens)
        batch = sim.step()
        assert by_seq(batch)[id(a)] == 1 and by_seq(batch)[id(b)] == 1
        assert sum(e.num_tokens for e in batch) <= 16
    assert starts == [0, 14, 28]  # 14 + 14 + 12: the budget less the two decode tokens, in order
    assert len(long.output_ids) == 1 and not long.is_prefilling


def test_a_prompt_longer_than_the_budget_alone_takes_the_whole_budget_each_step():
    sim = Sim(num_blocks=64, block_size=4, max_tokens=16)
    seq = make_seq(50, max_tokens=2)
    sim.add(seq)
    assert [e.num_tokens for e in sim.step()] == [16]
    assert [e.num_tokens for e in sim.step()] == [16]
    assert [e.num_tokens for e in sim.step()] == [16]
    last = sim.step()
    assert [e.num_tokens for e in last] == [2] and last[0].sample


def test_a_sequence_whose_images_are_not_ready_is_admitted_but_not_prefilled():
    sim = Sim(num_blocks=64, block_size=4, max_tokens=16)
    seq = make_seq(10)
    sim.add(seq)
    assert sim.step(images_ready=lambda s: False) == []
    assert sim.scheduler.running == [seq] and len(seq.block_table) == 3 and seq.num_computed_tokens == 0
    assert by_seq(sim.step()) == {id(seq): 10}


# ---------------------------------------------------------------- the prefill attention budget


def decoding_then_long(pairs: int, prompt_len: int) -> tuple[Sim, Sequence]:
    """A Sim under an attention budget of ``pairs`` with one sequence decoding, then a long prompt queued."""
    sim = Sim(num_blocks=64, block_size=4, max_tokens=64, pairs=pairs)
    sim.add(make_seq(3, max_tokens=200))
    sim.step()
    long = make_seq(prompt_len, max_tokens=1, first_token=500)
    sim.add(long)
    return sim, long


def test_prefill_chunks_stay_within_the_attention_budget_while_a_sequence_decodes():
    sim, long = decoding_then_long(pairs=1000, prompt_len=120)
    lengths = []
    while long.is_prefilling:
        start = long.num_computed_tokens
        entry = next(e for e in sim.step() if e.seq is long)
        assert 1 <= entry.num_tokens and entry.num_tokens * (start + entry.num_tokens) <= 1000
        lengths.append(entry.num_tokens)
    assert len(lengths) > 120 // 63 + 1  # more steps than the token budget alone would take
    assert max(lengths) < 63


def test_without_a_decoding_sequence_the_attention_budget_does_not_apply():
    sim = Sim(num_blocks=64, block_size=4, max_tokens=64, pairs=1000)
    long = make_seq(120, max_tokens=1)
    sim.add(long)
    assert [e.num_tokens for e in sim.step()] == [64]  # 64 * 64 pairs > 1000
    assert [e.num_tokens for e in sim.step()] == [56]


def test_the_first_chunk_progresses_even_when_one_token_exceeds_the_attention_budget():
    sim, long = decoding_then_long(pairs=10, prompt_len=30)
    computed = []
    while long.is_prefilling:
        computed.append(long.num_computed_tokens)
        sim.step()
    # A chunk of q tokens at c computed costs q * (c + q): from c = 10 on, one token is over the budget.
    steps = [after - before for before, after in zip(computed, [*computed[1:], 30], strict=True)]
    assert all(step >= 1 for step in steps)
    assert all(step == 1 for c, step in zip(computed, steps, strict=True) if c >= 10)
    assert 10 in computed and computed[-1] == 29


# ---------------------------------------------------------------- preemption and admission


def test_the_newest_running_sequence_is_preempted_when_blocks_run_out():
    # Three prompts of one full block each in a pool of four: after their first token each needs a second
    # block. The oldest takes the free one; the second needs one: the newest (c) goes, not the oldest.
    sim = Sim(num_blocks=4, block_size=4, max_tokens=32)
    a, b, c = make_seq(4, 8), make_seq(4, 8, first_token=100), make_seq(4, 8, first_token=200)
    sim.add(a, b, c)
    assert by_seq(sim.step()) == {id(a): 4, id(b): 4, id(c): 4}
    batch = sim.step()
    assert by_seq(batch) == {id(a): 1, id(b): 1}
    assert sim.preempted[-1] == [c]
    assert (a.num_preemptions, b.num_preemptions, c.num_preemptions) == (0, 0, 1)
    assert sim.scheduler.running == [a, b] and list(sim.scheduler.waiting) == [c]
    assert sim.scheduler.num_preemptions == 1
    sim.run()
    assert sorted(map(id, sim.finished)) == sorted(map(id, (a, b, c)))
    assert len(c.output_ids) == 8 and c.num_preemptions >= 1 and a.num_preemptions == 0


def test_a_sequence_that_is_itself_the_newest_is_preempted_and_the_older_ones_keep_decoding():
    # Pool of three, three one-block prompts: a takes c's block; b then needs one and is the newest left.
    sim = Sim(num_blocks=3, block_size=4, max_tokens=32)
    a, b, c = make_seq(4, 20), make_seq(4, 20, first_token=100), make_seq(4, 20, first_token=200)
    sim.add(a, b, c)
    sim.step()
    assert by_seq(sim.step()) == {id(a): 1}
    assert sim.preempted[-1] == [b, c] and list(sim.scheduler.waiting) == [b, c]
    assert a.num_preemptions == 0 and sim.scheduler.running == [a]


def test_admission_keeps_one_free_block_per_decoding_sequence():
    def admitted_with(num_blocks: int) -> bool:
        sim = Sim(num_blocks=num_blocks, block_size=4, max_tokens=32)
        a, b = make_seq(2, 20), make_seq(2, 20, first_token=100)
        sim.add(a, b)
        sim.step()  # both decode from now on; each holds one block with room for two more tokens
        late = make_seq(8, 4, first_token=200)  # two blocks
        sim.add(late)
        sim.step()
        return late in sim.scheduler.running

    # Two decoding sequences: two blocks kept free besides the new sequence's two.
    assert not admitted_with(5)  # 3 free: enough for its blocks, not for the reserve
    assert admitted_with(6)


def test_admission_stops_at_max_num_seqs_and_keeps_queue_order():
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=2, max_tokens=32)
    seqs = [make_seq(3, 4, first_token=100 * i) for i in range(4)]
    sim.add(*seqs)
    sim.step()
    assert sim.scheduler.running == seqs[:2] and list(sim.scheduler.waiting) == seqs[2:]
    sim.run()
    assert [s for s in sim.finished] == seqs
