"""Turns one sequence's logits row into its next token (and, if asked, its logprobs)."""

from __future__ import annotations

import torch

from minicpmv.engine.request import Sequence, TokenLogprob
from minicpmv.engine.sampling import apply_penalties, sample


class LogitsProcessor:
    def __init__(self, tokenizer, vocab_size: int, device: torch.device):
        self.tokenizer = tokenizer
        self.device = device
        # Ids the tokenizer doesn't know can't be decoded: never produce them. (A no-op for the real
        # checkpoint, whose tokenizer covers the whole vocabulary; it matters for tiny test checkpoints.)
        known = [i for i in tokenizer.get_vocab().values() if i < vocab_size]
        bias = torch.full((vocab_size,), float("-inf"))
        bias[known] = 0.0
        self.invalid_bias = bias.to(device)

    def choose_all(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        """``choose`` for every row of ``logits`` [B, V]; plain greedy rows (no penalties, grammar or logprobs)
        take one batched argmax instead of B row-by-row passes over the vocabulary."""
        if not all(self._plain_greedy(seq.request.sampling) and seq.grammar is None for seq in seqs):
            return [self.choose(seq, logits[row]) for row, seq in enumerate(seqs)]
        rows = logits.float() + self.invalid_bias
        for row, seq in enumerate(seqs):
            params = seq.request.sampling
            if params.ignore_eos or len(seq.output_ids) < params.min_tokens:
                rows[row, params.stop_token_ids] = float("-inf")
        return [(int(token), None) for token in rows.argmax(-1).tolist()]

    @staticmethod
    def _plain_greedy(params) -> bool:
        return (params.greedy and not params.logprobs and params.repetition_penalty == 1.0
                and not params.presence_penalty and not params.frequency_penalty)  # fmt: skip

    def choose(self, seq: Sequence, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        params = seq.request.sampling
        row = logits.float() + self.invalid_bias
        logprobs = row.log_softmax(-1) if params.logprobs else None
        if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            output = torch.tensor(seq.output_ids, dtype=torch.long, device=self.device)
            context = torch.cat([self._prompt_tensor(seq), output])
            apply_penalties(row, params, context, output)
        if seq.grammar is not None:
            seq.grammar.apply(row)
        elif params.ignore_eos or len(seq.output_ids) < params.min_tokens:
            row[params.stop_token_ids] = float("-inf")
        token = sample(row, params, seq.generator)
        if seq.grammar is not None:
            seq.grammar.accept(token)
        return token, self._logprob(token, logprobs, params.top_logprobs) if logprobs is not None else None

    def _prompt_tensor(self, seq: Sequence) -> torch.Tensor:
        state = seq.request  # built once per request, shared by its n sequences
        if state.prompt_tensor is None:
            state.prompt_tensor = torch.tensor(seq.prompt_ids, dtype=torch.long, device=self.device)
        return state.prompt_tensor

    def _logprob(self, token: int, logprobs: torch.Tensor, top: int) -> TokenLogprob:
        entry = TokenLogprob(token, self.tokenizer.decode([token]), float(logprobs[token]))
        if top:
            values, ids = logprobs.topk(top)
            entry.top = [(int(i), self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids, strict=True)]
        return entry
