"""Per-request sampling parameters (``SamplingParams``: defaults, validation), and the plain one-row
reference of what the batched sampler (sampler.py) does with them (``apply_penalties``, ``sample``).

Defaults are MiniCPM-V's own ``chat()`` sampling defaults (MODEL_FACTS §7.1): temperature
0.7, top_p 0.8, top_k 100, repetition_penalty 1.05; stop on ``<|im_end|>`` / ``<|endoftext|>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from minicpmv.engine.errors import InvalidRequestError
from minicpmv.tokenizer import DEFAULT_STOP_TOKEN_IDS

MAX_TOP_LOGPROBS = 20
MAX_N = 16


@dataclass
class SamplingParams:
    """What a request asks of generation. ``max_tokens`` None: up to 2048, within the context.

    ``ignore_eos``: the stop token ids are never produced (so outputs have exactly ``max_tokens`` tokens, what
    benchmarks need); ``min_tokens``: the stop token ids are not produced before that many tokens.
    ``presence_penalty`` / ``frequency_penalty`` follow OpenAI (subtracted from the logits of tokens already
    generated); ``repetition_penalty`` follows transformers (over prompt and output).
    """

    max_tokens: int | None = None
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 100
    repetition_penalty: float = 1.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=lambda: list(DEFAULT_STOP_TOKEN_IDS))
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SamplingParams:
        """Build from a JSON-like dict (unknown keys rejected); ``stop`` may be a string."""
        data = dict(data or {})
        known = cls.__dataclass_fields__.keys()
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InvalidRequestError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        for key in ("stop", "stop_token_ids"):
            if key in data and data[key] is None:
                del data[key]
        params = cls(**data)
        params.validate()
        return params

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidRequestError(message)

        def number(name: str, value: Any) -> None:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            check(ok, f"{name} must be a finite number")

        def integer(name: str, value: Any) -> None:
            check(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer")

        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            number(name, getattr(self, name))
        for name in ("top_k", "min_tokens", "n", "top_logprobs"):
            integer(name, getattr(self, name))
        check(self.temperature >= 0, "temperature must be >= 0")
        check(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        check(self.top_k >= -1, "top_k must be -1 or 0 (disabled) or positive")
        check(self.repetition_penalty > 0, "repetition_penalty must be > 0")
        check(-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]")
        check(-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]")
        if self.max_tokens is not None:
            integer("max_tokens", self.max_tokens)
            check(self.max_tokens >= 1, "max_tokens must be >= 1")
        check(self.min_tokens >= 0, "min_tokens must be >= 0")
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens, "min_tokens must not exceed max_tokens")
        check(1 <= self.n <= MAX_N, f"n must be between 1 and {MAX_N}")
        check(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        check(isinstance(self.logprobs, bool) and isinstance(self.ignore_eos, bool), "logprobs/ignore_eos: booleans")
        if self.seed is not None:
            integer("seed", self.seed)
        check(
            isinstance(self.stop, Sequence) and all(isinstance(s, str) and s for s in self.stop),
            "stop must be a string or a list of non-empty strings",
        )
        check(len(self.stop) <= 16, "at most 16 stop strings")
        check(
            isinstance(self.stop_token_ids, Sequence)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be a list of token ids",
        )
        check(self.response_format is None or isinstance(self.response_format, dict), "response_format: object")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits: torch.Tensor, params: SamplingParams, context_ids: torch.Tensor,
                    output_ids: torch.Tensor) -> None:
    """In place on one row. Repetition penalty (HF semantics) over prompt and output; presence and
    frequency penalties (OpenAI semantics) over the output only."""
    if params.repetition_penalty != 1.0 and context_ids.numel():
        ids = context_ids.unique()
        picked = logits[ids]
        logits[ids] = torch.where(
            picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
        )
    if (params.presence_penalty or params.frequency_penalty) and output_ids.numel():
        ids, counts = output_ids.unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Choose a token from one processed row (float32 [V], disallowed ids at -inf).

    top-k is applied first, so top-p only sorts the k candidates (the default k is 100 of 151,666).
    """
    if params.greedy:
        return int(logits.argmax())
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.numel():
        values, ids = torch.topk(scaled, params.top_k)
    else:
        values, ids = scaled.sort(descending=True)
    if params.top_p < 1.0:
        probs = values.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        values = values.masked_fill(probs.cumsum(-1) - probs >= params.top_p, float("-inf"))
    choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
    return int(ids[choice])
