"""Grammar-constrained decoding for OpenAI's ``response_format`` (JSON mode and JSON schema), via xgrammar.

Why xgrammar: it is actively maintained and is the structured-output backend of vLLM, SGLang and
TensorRT-LLM, so its behaviour on real tokenizers is well exercised. It compiles JSON schemas (and arbitrary
JSON) in milliseconds, supports recursion (nested objects of any depth), and precomputes most per-token work
at compile time, so filling the next-token bitmask costs a fraction of a millisecond per step on CPU; the
packed int32 bitmask is applied to the logits by its own CPU or CUDA kernel. outlines-core turns a schema
into a regex automaton instead: fast per step, but no recursive structures, and compilation grows quickly
with schema size. lm-format-enforcer runs a character-level parser over the vocabulary trie in Python at
every step: flexible, but far slower per token at a vocabulary of 150k.

Contracts worth knowing:
* Ids the tokenizer lacks (the model's vocabulary is padded) and every special token other than the stop
  tokens are never allowed. xgrammar's ``TokenizerInfo.from_huggingface`` would treat special tokens such
  as ``<|im_start|>`` or ``<image>`` as the literal text of their names (and allow them inside JSON
  strings), so we blank them, which makes xgrammar treat them as never-valid special tokens.
* Once the grammar is complete, only the stop tokens (``<|im_end|>``, ``<|endoftext|>``) are allowed;
  accepting one terminates the matcher.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from minicpmv.tokenizer import DEFAULT_STOP_TOKEN_IDS

logger = logging.getLogger(__name__)

CompiledGrammar = xgr.CompiledGrammar
_DEFAULT_CACHE_SIZE = 64
# Whitespace between JSON tokens is free-form (models pretty-print) but bounded: unbounded whitespace lets a
# model loop on spaces until max_tokens, a known failure of grammar-constrained decoding. 16 characters
# still allow two-space indentation seven levels deep.
MAX_WHITESPACE = 16
_RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the rest is the useful message.
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class GrammarCompilerCache:
    """Compiles OpenAI ``response_format`` objects into xgrammar grammars for one tokenizer, with an LRU cache.

    Args:
        tokenizer: the model's Hugging Face fast tokenizer.
        vocab_size: the number of logits the model produces (151666 for MiniCPM-V 2.6); ids at or above
            the tokenizer's own vocabulary are never allowed.
        stop_token_ids: the tokens that end a completed grammar.
        cache_size: how many compiled grammars to keep.

    Raises:
        ValueError: ``vocab_size`` or ``cache_size`` is not positive, or a stop token id is out of range.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        stop_token_ids: Sequence[int] = DEFAULT_STOP_TOKEN_IDS,
        cache_size: int = _DEFAULT_CACHE_SIZE,
    ) -> None:
        if vocab_size <= 0 or cache_size <= 0:
            raise ValueError(f"vocab_size and cache_size must be positive, got {vocab_size}, {cache_size}")
        if not stop_token_ids or not all(0 <= i < vocab_size for i in stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-empty ids below {vocab_size}, got {stop_token_ids}")
        self.vocab_size = vocab_size
        self.tokenizer_info = _tokenizer_info(tokenizer, vocab_size, list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, response_format: dict[str, Any] | None) -> CompiledGrammar | None:
        """The grammar for ``response_format``, or None for plain text.

        ``{"type": "text"}`` (or None) -> None; ``{"type": "json_object"}`` -> any JSON object;
        ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`` -> JSON
        matching ``schema``, properties in declared order (xgrammar's strict mode: properties and items
        the schema does not declare are never generated). Schemas with the same JSON text, key order
        included, share one compiled grammar.

        Raises:
            ValueError: unknown type, missing or malformed ``json_schema`` / ``schema``, or a schema that
                xgrammar cannot compile (the message says why).
        """
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise ValueError(f"response_format must be an object, got {type(response_format).__name__}")
        kind = response_format.get("type")
        if kind not in _RESPONSE_FORMAT_TYPES:
            raise ValueError(f"response_format.type must be one of {list(_RESPONSE_FORMAT_TYPES)}, got {kind!r}")
        if kind == "text":
            return None
        if kind == "json_object":
            # Not compile_builtin_json_grammar: that one also accepts a top-level array.
            return self._cached("json_object", self._compile_any_object)
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format.json_schema must be an object with a 'schema' field")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON Schema object")
        try:
            # Compact but not key-sorted: xgrammar generates properties in the schema's declared order.
            canonical = json.dumps(schema, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"response_format.json_schema.schema is not valid JSON: {error}") from error
        return self._cached("json_schema:" + canonical, lambda: self._compile_schema(canonical))

    def _compile_any_object(self) -> CompiledGrammar:
        return self._compiler.compile_json_schema('{"type":"object"}', any_whitespace=True, strict_mode=False,
                                                  max_whitespace_cnt=MAX_WHITESPACE)  # fmt: skip

    def _compile_schema(self, canonical_schema: str) -> CompiledGrammar:
        try:
            return self._compiler.compile_json_schema(canonical_schema, any_whitespace=True, strict_mode=True,
                                                      max_whitespace_cnt=MAX_WHITESPACE)  # fmt: skip
        except RuntimeError as error:
            reason = _XGRAMMAR_LOCATION.sub("", str(error).strip())
            raise ValueError(f"response_format.json_schema.schema is not supported: {reason}") from error

    def _cached(self, key: str, build: Any) -> CompiledGrammar:
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
        grammar = build()  # outside the lock: compiling a large schema can take a while
        with self._lock:
            self._cache[key] = grammar
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar


class GrammarState:
    """The grammar matcher of one sequence: masks its logits and follows its sampled tokens.

    Per step: :meth:`apply` to the sequence's logits row, sample, then :meth:`accept` the sampled token.
    """

    def __init__(self, compiled: CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = compiled.tokenizer_info.vocab_size
        # Packed: int32 of shape (1, ceil(vocab_size / 32)), bit j of word i = token 32 * i + j allowed.
        self._bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits of the tokens the grammar forbids next to -inf, in place.

        Args:
            logits: one float row of shape (vocab_size,), on any device.

        Raises:
            ValueError: ``logits`` has the wrong shape, or the matcher has already terminated.
        """
        if logits.dim() != 1 or logits.shape[0] != self.vocab_size:
            raise ValueError(f"logits must have shape ({self.vocab_size},), got {tuple(logits.shape)}")
        if self._matcher.is_terminated():
            raise ValueError("the grammar has terminated; no further token is allowed")
        if not self._matcher.fill_next_token_bitmask(self._bitmask):
            return  # every token is allowed
        bitmask = self._bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), bitmask)

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> bool:
        """Fill row ``index`` of a batch bitmask (``xgr.allocate_token_bitmask(B, vocab_size)``) with the
        tokens allowed next; False if every token is. Raises ValueError once the grammar has terminated."""
        if self._matcher.is_terminated():
            raise ValueError("the grammar has terminated; no further token is allowed")
        return self._matcher.fill_next_token_bitmask(bitmask, index)

    def allowed_mask(self) -> torch.Tensor:
        """The tokens allowed next, as a bool tensor of shape (vocab_size,) on the CPU."""
        logits = torch.zeros(self.vocab_size)
        self.apply(logits)
        return torch.isfinite(logits)

    def accept(self, token_id: int) -> bool:
        """Advance the matcher by ``token_id``; False (state unchanged) if the grammar forbids it."""
        accepted = self._matcher.accept_token(token_id)
        if not accepted:
            logger.debug("grammar rejected token %d", token_id)
        return accepted

    def is_completed(self) -> bool:
        """Whether the tokens accepted so far form a complete document (only stop tokens may follow)."""
        return self._matcher.is_completed()

    def is_terminated(self) -> bool:
        """Whether a stop token has been accepted after a complete document; the sequence is done."""
        return self._matcher.is_terminated()


def _tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of ``tokenizer``: its vocabulary at the model's size, specials blanked (never valid)."""
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    special_ids = set(tokenizer.all_special_ids)
    special_ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    encoded_vocab = [""] * vocab_size
    beyond = 0
    for token, token_id in tokenizer.get_vocab().items():
        if token_id >= vocab_size:
            beyond += 1
        elif token_id not in special_ids:
            encoded_vocab[token_id] = token
    if beyond:
        logger.warning("%d tokenizer ids are >= the model's vocab_size %d; they are ignored", beyond, vocab_size)
    info = xgr.TokenizerInfo.from_vocab_and_metadata(encoded_vocab, detected.dump_metadata())
    logger.info(
        "grammar tokenizer info: %s, %d of %d ids never valid, stop tokens %s",
        info.vocab_type.name,
        len(info.special_token_ids),
        vocab_size,
        info.stop_token_ids,
    )
    return info
