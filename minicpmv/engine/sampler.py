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
