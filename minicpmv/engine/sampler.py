"""Chooses the next token of every sequence of a step: all rows at once, on the logits' device.

Per step, ``choose_all(seqs, logits [B, V])``:

1. Plan, on the host, from the sequences' parameters only (no device data): which rows are greedy, which
   sample (grouped by top-k), which need penalties, stop-id masks, a grammar mask or logprobs. The integer
   data this needs (output ids, row indices, stop ids) and the per-row parameters (temperature, top-p,
   penalties) go to the device in one copy each, pinned and non-blocking on CUDA. Grammar rows fill their
   next-token bitmasks into one [B, ceil(V / 32)] tensor (xgrammar, on the host).
2. On the device: the log_softmax of the rows that ask for logprobs, of logits + the unknown-ids bias (before
   penalties, temperature and masks). Then a working copy of logits + bias (only when something is written into
   it), in which, for all rows together: the repetition penalty (transformers: over prompt + output ids) and the
   presence / frequency penalties (OpenAI: over the output ids, counted with a sort + searchsorted) at the
   (row, id) entries concerned, gathered, computed and written back in one pass; -inf at the stop ids of rows
   under ``ignore_eos`` / ``min_tokens`` (not grammar rows: their grammar decides when to stop); the grammar
   bitmasks with one ``apply_token_bitmask_inplace``. Nothing [B, V]-sized is built for the penalties.
3. Greedy rows: argmax. Sampled rows, one group per top-k value (``candidates``): top-k (a full sort when
   top-k is off but top-p is on), temperature (on the candidates only: it keeps the order), top-p over the
   candidates, softmax, then an exponential race (``race``): argmax p_i / q_i with q_i ~ Exp(1) picks i with
   probability p_i. A seeded row draws its q from its own generator, one call of V draws per step, and gives
   each candidate the draw of its token id (not of its rank among the candidates): its tokens do not depend on
   what else is in the batch, and logits a few ulps off (another batch's matmuls) change a token only where
   two candidates' p_i / q_i nearly tie, where draws by rank reshuffled among thousands of near-equal
   candidates (23 of 950 tokens against 0 of 950, replayed on the tiny checkpoint). Rows without a seed share
   the processor's generator (one call per group, by rank).
4. The one device -> host transfer of the step: the chosen ids and the logprob values asked for, in one
   float64 tensor, ``tolist()`` once. Then every grammar accepts its row's token.

``minicpmv.engine.sampling_params.apply_penalties`` / ``sample`` are the plain one-row reference of steps
2-3 (the values of step 2 are equal to theirs; the race replaces ``torch.multinomial``, so seeded outputs differ from
the per-row sampler's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import xgrammar as xgr

from minicpmv.engine.request import Sequence, TokenLogprob
from minicpmv.tokenizer import TokenPieces

_NEG_INF = float("-inf")
# Exp(1) draws are clamped to this, so that a zero draw can't turn 0 / 0 into NaN (argmax would pick it).
_TINY = torch.finfo(torch.float32).tiny


def candidates(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: int,
    top_p: torch.Tensor | None,
    *,
    tie_break: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling distribution of processed logits rows: temperature, then top-k, then top-p.

    Args:
        logits: float32 [n, V], disallowed ids at -inf (not changed).
        temperature: float32 [n], > 0.
        top_k: kept candidates, for every row; 0 or >= V: no top-k.
        top_p: float32 [n] (rows at >= 1 keep everything), or None: no top-p for any row.
        tie_break: top-k with ``top_k_by_id`` (True) or ``topk`` (False); None: ``top_k_by_id`` except on the
            CPU, whose ``topk`` works row by row, so a row's result there never depends on the other rows.

    Returns:
        ``(probs, ids)``: probs [n, C] over the candidates ``ids`` [n, C], largest first, C = top_k, or V when
        only top-p truncates; ``(probs [n, V], None)`` when nothing truncates (then the column is the id).
        As in ``sampling_params.sample``: top-p keeps the smallest prefix of the top-k candidates whose mass (over
        those candidates) reaches top_p; the most likely token always stays. Dividing by the temperature keeps
        the order, so only the candidates are divided: the same values as dividing the whole row first.
    """
    vocab = logits.shape[-1]
    if not 0 < top_k < vocab and top_p is None:
        return (logits / temperature[:, None]).softmax(-1), None
    if tie_break is None:
        tie_break = logits.device.type != "cpu"
    if 0 < top_k < vocab:
        values, ids = top_k_by_id(logits, top_k) if tie_break else logits.topk(top_k)
    else:
        values, ids = logits.sort(dim=-1, descending=True, stable=True)  # equal values: lower id first
    values = values / temperature[:, None]
    if top_p is not None:
        probs = values.softmax(-1)
        values = values.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], _NEG_INF)
    return values.softmax(-1), ids


def top_k_by_id(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits.topk(k)`` [n, V] -> ([n, k], [n, k]) with equal values ranked by id, lower first.

    ``topk`` leaves the order among equal values (and which of them make the cut) to its kernel, which on CUDA
    is chosen by the tensor's shape: a row's candidates could then depend on the batch, and a seeded row's
    tokens with them (the race pairs draws with positions). Equal values are common with bf16 logits. So rank
    by an int64 key instead: the float's bits mapped to a signed int of the same order, shifted, then V-1-id.
    """
    vocab = logits.shape[-1]
    shift = max(1, (vocab - 1).bit_length())
    bits = (logits + 0.0).view(torch.int32)  # a contiguous copy, -0.0 made +0.0
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()  # negative floats: magnitude bits flipped
    tie = vocab - 1 - torch.arange(vocab, device=logits.device)
    ids = ((ordered << shift) | tie).topk(k).indices
    return logits.gather(1, ids), ids


def race(probs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Column i of each row with probability probs[row, i]: argmax probs / q, q ~ Exp(1) i.i.d. ([n, C] -> [n])."""
    return (probs / q).argmax(-1)


class _Staged:
    """Host values gathered while planning, sent to the device in one copy; named views of it after ``send``."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.values: list = []
        self.spans: dict[str, tuple[int, int]] = {}

    def add(self, name: str, values) -> None:
        start = len(self.values)
        self.values.extend(values)
        self.spans[name] = (start, len(self.values))

    def send(self, device: torch.device) -> dict[str, torch.Tensor]:
        if not self.spans:
            return {}
        on_cuda = device.type == "cuda"
        host = torch.tensor(self.values, dtype=self.dtype, pin_memory=on_cuda)
        tensor = host.to(device, non_blocking=True) if device.type != "cpu" else host
        return {name: tensor[start:end] for name, (start, end) in self.spans.items()}


@dataclass
class _Plan:
    """What a step does to which rows (row = index in ``seqs``), decided from the parameters alone."""

    greedy: list[int] = field(default_factory=list)
    groups: dict[int, list[int]] = field(default_factory=dict)  # top-k key -> sampled rows (see _group_key)
    top_p_groups: set[int] = field(default_factory=set)  # keys of the groups where some row uses top-p
    generators: list[torch.Generator | None] = field(default_factory=list)  # per row: its own, if seeded
    repetition: list[int] = field(default_factory=list)  # rows with repetition_penalty != 1
    counted: bool = False  # some row has a presence or frequency penalty
    num_output_ids: int = 0
    num_prompt_ids: int = 0
    prompts: list[torch.Tensor] = field(default_factory=list)  # the prompt ids of the `repetition` rows
    stop_masked: bool = False
    grammar: list[int] = field(default_factory=list)  # rows whose bitmask must be applied
    bitmask: torch.Tensor | None = None
    logprob_rows: list[int] = field(default_factory=list)
    top_logprobs: int = 0  # the most any row asks for
    ints: _Staged = field(default_factory=lambda: _Staged(torch.long))
    floats: _Staged = field(default_factory=lambda: _Staged(torch.float32))


class LogitsProcessor:
    def __init__(self, tokenizer, vocab_size: int, device: torch.device):
        self.tokenizer = tokenizer
        self.pieces = TokenPieces(tokenizer)  # each token's own bytes and string, for logprobs
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Ids the tokenizer doesn't know can't be decoded: never produce them. (A no-op for the real
        # checkpoint, whose tokenizer covers the whole vocabulary; it matters for tiny test checkpoints.)
        known = [i for i in tokenizer.get_vocab().values() if i < vocab_size]
        bias = torch.full((vocab_size,), float("-inf"))
        bias[known] = 0.0
        self.invalid_bias = bias.to(self.device)
        self._has_unknown_ids = bool(torch.isinf(bias).any())
        self._buffer: torch.Tensor | None = None
        # The randomness of rows without a seed (seeded rows use their sequence's generator).
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)

    @torch.inference_mode()
    def choose_all(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        """The next token of every sequence, row ``i`` of ``logits`` [B, V] being ``seqs[i]``'s, and its
        logprobs where the sequence asks; grammar sequences accept their token. See the module docstring."""
        if not seqs:
            return []
        batch = len(seqs)
        plan, ints, floats, rows, logprobs = self._prepare(seqs, logits)
        tokens = self._sample(rows, plan, ints, floats)

        # The one device -> host transfer: ids, then the chosen logprobs, then the top values and their ids.
        parts = [tokens.double()]
        top = plan.top_logprobs
        if logprobs is not None:
            chosen = tokens if len(plan.logprob_rows) == batch else tokens.index_select(0, ints["logprob_rows"])
            parts.append(logprobs.gather(1, chosen[:, None]).squeeze(1).double())
            if top:
                values, ids = logprobs.topk(top)
                parts += [values.double().flatten(), ids.double().flatten()]
        host = torch.cat(parts).tolist() if len(parts) > 1 else parts[0].tolist()

        token_ids = [int(t) for t in host[:batch]]
        results: list[tuple[int, TokenLogprob | None]] = [(token, None) for token in token_ids]
        n = len(plan.logprob_rows)
        for k, row in enumerate(plan.logprob_rows):
            token = token_ids[row]
            text, raw = self.pieces(token)
            entry = TokenLogprob(token, text, host[batch + k], token_bytes=raw)
            asked = seqs[row].request.sampling.top_logprobs
            if asked:
                values = host[batch + n + k * top : batch + n + k * top + asked]
                ids = host[batch + n + n * top + k * top : batch + n + n * top + k * top + asked]
                pieces = [self.pieces(int(i)) for i in ids]
                entry.top = [(int(i), p[0], v) for v, i, p in zip(values, ids, pieces, strict=True)]
                entry.top_bytes = [p[1] for p in pieces]
            results[row] = (token, entry)
        for row, seq in enumerate(seqs):
            if seq.grammar is not None:
                seq.grammar.accept(token_ids[row])
        return results

    @torch.inference_mode()
    def processed_logits(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """The float32 [B, V] rows ``choose_all`` chooses from (greedy: argmax; sampled: ``candidates``):
        logits + unknown-ids bias, penalized, stop ids and grammar masks at -inf. For tests and debugging; the
        sequences and their grammars are left as they are."""
        return self._prepare(seqs, logits)[3].clone()

    def _prepare(self, seqs: list[Sequence], logits: torch.Tensor):
        plan = self._plan(seqs, logits.shape[-1])
        ints, floats = plan.ints.send(self.device), plan.floats.send(self.device)
        logprobs = None
        if plan.logprob_rows:
            picked = self._select(logits, plan.logprob_rows, ints, "logprob_rows").float()
            logprobs = (picked + self.invalid_bias if self._has_unknown_ids else picked).log_softmax(-1)
        rows = self._working(logits, plan)
        if plan.repetition or plan.counted:
            self._penalize(rows, logits, plan, ints, floats)
        if plan.stop_masked:
            rows.index_put_((ints["stop_rows"], ints["stop_ids"]), rows.new_full((), _NEG_INF))
        if plan.grammar:
            bitmask = plan.bitmask.pin_memory() if self.device.type == "cuda" else plan.bitmask
            xgr.apply_token_bitmask_inplace(rows, bitmask.to(self.device, non_blocking=True), indices=plan.grammar)
        return plan, ints, floats, rows, logprobs

    # ---------------------------------------------------------------- planning (host)

    def _plan(self, seqs: list[Sequence], vocab: int) -> _Plan:
        plan = _Plan()
        batch = len(seqs)
        temperature, top_p, repetition, presence, frequency = [], [], [], [], []
        output_ids, output_lens, prompt_lens, stop_rows, stop_ids = [], [], [], [], []
        grammar_rows = []
        for row, seq in enumerate(seqs):
            params = seq.request.sampling
            if params.greedy:
                plan.greedy.append(row)
                plan.generators.append(None)
                temperature.append(1.0)
                top_p.append(float("inf"))
            else:
                key = _group_key(params.top_k, params.top_p, vocab)
                plan.groups.setdefault(key, []).append(row)
                if params.top_p < 1.0:
                    plan.top_p_groups.add(key)
                plan.generators.append(seq.generator if params.seed is not None else None)
                temperature.append(params.temperature)
                top_p.append(params.top_p if params.top_p < 1.0 else float("inf"))
            repeats = params.repetition_penalty != 1.0
            counts = bool(params.presence_penalty or params.frequency_penalty)
            repetition.append(params.repetition_penalty)
            presence.append(params.presence_penalty)
            frequency.append(params.frequency_penalty)
            if repeats or counts:
                output_ids.extend(seq.output_ids)
                output_lens.append(len(seq.output_ids))
            else:
                output_lens.append(0)
            if repeats:
                plan.repetition.append(row)
                prompt = self._prompt_tensor(seq)
                plan.prompts.append(prompt)
                prompt_lens.append(len(prompt))
            else:
                prompt_lens.append(0)
            plan.counted |= counts
            if seq.grammar is not None:
                grammar_rows.append(row)
            elif params.ignore_eos or len(seq.output_ids) < params.min_tokens:
                masked = [i for i in params.stop_token_ids if i < vocab]
                stop_ids.extend(masked)
                stop_rows.extend([row] * len(masked))
            if params.logprobs:
                plan.logprob_rows.append(row)
                plan.top_logprobs = max(plan.top_logprobs, params.top_logprobs)

        floats, ints = plan.floats, plan.ints
        if plan.groups:
            floats.add("temperature", temperature)
            floats.add("top_p", top_p)
        if plan.repetition or plan.counted:
            for name, values in (("repetition", repetition), ("presence", presence), ("frequency", frequency)):
                floats.add(name, values)
            ints.add("output_ids", output_ids)
            ints.add("output_lens", output_lens)
            plan.num_output_ids = len(output_ids)
            if plan.repetition:
                ints.add("prompt_lens", prompt_lens)
                plan.num_prompt_ids = sum(prompt_lens)
        if stop_ids:
            plan.stop_masked = True
            ints.add("stop_rows", stop_rows)
            ints.add("stop_ids", stop_ids)
        if 0 < len(plan.greedy) < batch:
            ints.add("greedy", plan.greedy)
        for key, members in plan.groups.items():
            if len(members) < batch:
                ints.add(f"group{key}", members)
        if 0 < len(plan.logprob_rows) < batch:
            ints.add("logprob_rows", plan.logprob_rows)
        if grammar_rows:
            plan.bitmask = xgr.allocate_token_bitmask(batch, vocab)
            for row in grammar_rows:
                if _fill_bitmask(seqs[row].grammar, plan.bitmask, row, vocab):
                    plan.grammar.append(row)
        return plan

    def _prompt_tensor(self, seq: Sequence) -> torch.Tensor:
        state = seq.request  # built once per request, shared by its n sequences
        if state.prompt_tensor is None:
            on_cuda = self.device.type == "cuda"
            ids = torch.tensor(seq.prompt_ids, dtype=torch.long, pin_memory=on_cuda)
            state.prompt_tensor = ids.to(self.device, non_blocking=True) if on_cuda else ids
        return state.prompt_tensor

    # ---------------------------------------------------------------- the batch (device)

    @staticmethod
    def _select(rows: torch.Tensor, members: list[int], ints: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """``rows[members]``; ``rows`` itself when the members are every row (they are sorted and distinct)."""
        return rows if len(members) == rows.shape[0] else rows.index_select(0, ints[name])

    def _working(self, logits: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Float32 [B, V]: logits + the unknown-ids bias, in a tensor of our own when anything is changed in
        place (on the CPU a kept buffer: a fresh 40 MB tensor per step costs more in page faults than the copy)."""
        modified = plan.repetition or plan.counted or plan.stop_masked or plan.grammar
        if not modified and not self._has_unknown_ids:
            return logits.float()
        if self.device.type != "cpu":
            rows = logits.float() + self.invalid_bias if self._has_unknown_ids else logits.to(torch.float32, copy=True)
            return rows.contiguous()
        batch, vocab = logits.shape
        if self._buffer is None or self._buffer.shape[0] < batch or self._buffer.shape[1] != vocab:
            self._buffer = torch.empty(batch, vocab)
        rows = self._buffer[:batch]
        return torch.add(logits, self.invalid_bias, out=rows) if self._has_unknown_ids else rows.copy_(logits)

    def _penalize(self, rows: torch.Tensor, logits: torch.Tensor, plan: _Plan, ints, floats) -> None:
        """Penalties, in place in ``rows``, at the (row, id) entries of the ids concerned, each computed from
        the row's logit + bias with the operations of ``sampling_params.apply_penalties`` (so the values are equal);
        every occurrence of an id gets the same value, so duplicates write the same value."""
        batch, vocab = rows.shape
        arange = torch.arange(batch, device=rows.device)
        out_rows = arange.repeat_interleave(ints["output_lens"], output_size=plan.num_output_ids)
        out_ids = ints["output_ids"]
        if plan.repetition:  # transformers: over prompt and output ids, logit / p if > 0 else logit * p
            prompt_rows = arange.repeat_interleave(ints["prompt_lens"], output_size=plan.num_prompt_ids)
            row_index = torch.cat([prompt_rows, out_rows])
            ids = torch.cat([*plan.prompts, out_ids])
        else:
            row_index, ids = out_rows, out_ids
        position = row_index * vocab + ids  # in the flattened [B * V] rows
        flat = logits.view(-1) if logits.is_contiguous() else logits.reshape(-1)
        value = flat.index_select(0, position).float()
        if self._has_unknown_ids:
            value = value + self.invalid_bias.index_select(0, ids)
        if plan.repetition:
            factor = floats["repetition"].index_select(0, row_index)
            value = torch.where(value > 0, value / factor, value * factor)
        if plan.counted:  # OpenAI: logit - (presence + frequency * count) for the ids generated so far
            generated = (out_rows * vocab + out_ids).sort().values
            count = torch.searchsorted(generated, position, right=True) - torch.searchsorted(generated, position)
            count = count.to(value.dtype)
            presence, frequency = (
                floats["presence"].index_select(0, row_index),
                floats["frequency"].index_select(0, row_index),
            )
            value = value - (presence * (count > 0) + frequency * count)
        rows.view(-1).index_copy_(0, position, value)

    def _sample(self, rows: torch.Tensor, plan: _Plan, ints, floats) -> torch.Tensor:
        """The chosen id of every row ([B] long, on the device)."""
        batch = rows.shape[0]
        if len(plan.greedy) == batch:
            return rows.argmax(-1)
        tokens = torch.empty(batch, dtype=torch.long, device=rows.device)
        if plan.greedy:
            index = ints["greedy"]
            tokens.index_copy_(0, index, rows.index_select(0, index).argmax(-1))
        for key, members in plan.groups.items():
            name = f"group{key}"
            temperature = self._select(floats["temperature"], members, ints, name)
            top_p = self._select(floats["top_p"], members, ints, name) if key in plan.top_p_groups else None
            probs, ids = candidates(self._select(rows, members, ints, name), temperature, key, top_p)
            draws = self._exponentials(probs.shape, [plan.generators[row] for row in members], ids, rows.shape[1])
            column = race(probs, draws)
            chosen = column if ids is None else ids.gather(1, column[:, None]).squeeze(1)
            if len(members) == batch:
                return chosen
            tokens.index_copy_(0, ints[name], chosen)
        return tokens

    def _exponentials(self, shape: torch.Size, generators: list[torch.Generator | None], ids: torch.Tensor | None,
                      vocab: int) -> torch.Tensor:  # fmt: skip
        """Exp(1) draws [n, C] for candidates ``ids`` [n, C] (None: every id in order, C = V). Row i with a
        generator of its own: one call of ``vocab`` draws, the draw of each candidate's token id; the others from
        the shared generator, by rank."""
        q = torch.empty(shape, device=self.device)
        if any(generator is None for generator in generators):
            q.exponential_(generator=self.generator)
        for i, generator in enumerate(generators):
            if generator is None:
                continue
            if ids is None:
                q[i].exponential_(generator=generator)
            else:
                by_id = torch.empty(vocab, device=self.device).exponential_(generator=generator)
                q[i] = by_id.index_select(0, ids[i])
        return q.clamp_min_(_TINY)


def _group_key(top_k: int, top_p: float, vocab: int) -> int:
    """Sampled rows are drawn together per key: top_k (0 < top_k < V); V: no top-k but top-p (a full sort);
    0: neither."""
    if 0 < top_k < vocab:
        return top_k
    return vocab if top_p < 1.0 else 0


def _fill_bitmask(grammar, bitmask: torch.Tensor, row: int, vocab: int) -> bool:
    """Fill ``bitmask[row]`` with ``grammar``'s allowed next tokens; False if it allows every token."""
    if grammar.vocab_size != vocab:
        raise ValueError(f"the grammar's vocabulary has {grammar.vocab_size} ids, the logits {vocab}")
    return grammar.fill_bitmask(bitmask, row)
