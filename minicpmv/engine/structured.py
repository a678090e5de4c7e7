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
* Every grammar is intersected with xgrammar's built-in strict JSON grammar (:class:`JSONGrammar`): a token
  is allowed only when both the schema's grammar and the JSON grammar allow it. xgrammar's schema converter
  (0.2.x) lowers a string with ``minLength``/``maxLength`` to a repetition of one character class that
  excludes only the quote, the backslash, CR and LF: it admits raw control characters (U+0000-U+001F, TAB
  included), which JSON forbids inside strings, so outputs that ended with "stop" failed strict parsers
  (``json.loads``, the openai SDK's ``parse``). Upstream this is
  mlc-ai/xgrammar#800, with fixes proposed but not released, and the converter has no option to change it.
  Two measures, so that neither depends on the other:
  1. The intersection holds whatever the schema's keywords (lengths, patterns, formats, enums, nesting,
     additionalProperties, propertyNames): the output is always JSON by the built-in grammar's definition,
     which rejects control characters in strings, and follows the schema by the converter's. The cost is a
     second bitmask per step for sequences in JSON mode (about 0.02 ms; the JSON grammar is compiled once).
  2. The bounded-string production itself is rewritten in the converter's EBNF
     (:func:`_with_escapes_in_bounded_strings`) to one JSON character: a raw code point other than the
     controls, the quote and the backslash, or one escape. Without it such strings could hold no escape at all
     (no quotes, backslashes or newlines in the text), the other half of xgrammar#800.
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



class JSONGrammar:
    """A compiled ``response_format``: the schema's grammar and the strict JSON grammar it is intersected with
    (see the module's docstring). What :meth:`GrammarCompilerCache.compile` returns and :class:`GrammarState`
    follows."""

    __slots__ = ("schema", "json")

    def __init__(self, schema: xgr.CompiledGrammar, json_grammar: xgr.CompiledGrammar) -> None:
        self.schema = schema
        self.json = json_grammar

    @property
    def tokenizer_info(self) -> xgr.TokenizerInfo:
        return self.schema.tokenizer_info


CompiledGrammar = JSONGrammar
_DEFAULT_CACHE_SIZE = 64
# By default JSON is compact: no whitespace between its tokens (``{"a":1,"b":[2,3]}``, json.dumps with
# separators (",", ":")). Whitespace the grammar allows is whitespace a model may emit instead of closing the
# object, the known failure of guided decoding where an answer is spaces and newlines until max_tokens (vLLM
# added ``disable_any_whitespace`` for it); with random weights JSON mode's answers were mostly whitespace.
# ``any_whitespace=True`` (EngineConfig.json_any_whitespace) keeps xgrammar's permissive form, bounded: at most
# 16 characters between two tokens (two-space indentation seven levels deep).
MAX_WHITESPACE = 16
COMPACT_SEPARATORS = (",", ":")
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
        any_whitespace: allow (bounded) whitespace between JSON tokens; default compact JSON (see
            ``COMPACT_SEPARATORS``).

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
        any_whitespace: bool = False,
    ) -> None:
        if vocab_size <= 0 or cache_size <= 0:
            raise ValueError(f"vocab_size and cache_size must be positive, got {vocab_size}, {cache_size}")
        if not stop_token_ids or not all(0 <= i < vocab_size for i in stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-empty ids below {vocab_size}, got {stop_token_ids}")
        self.vocab_size = vocab_size
        self.tokenizer_info = _tokenizer_info(tokenizer, vocab_size, list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info)
        self._json_grammar: xgr.CompiledGrammar | None = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.any_whitespace = any_whitespace
        # xgrammar's layout arguments: bounded free whitespace, or none at all with compact separators.
        self._layout = ({"any_whitespace": True, "max_whitespace_cnt": MAX_WHITESPACE} if any_whitespace
                        else {"any_whitespace": False, "separators": COMPACT_SEPARATORS})  # fmt: skip

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
        return self._compiler.compile_json_schema('{"type":"object"}', strict_mode=False, **self._layout)

    def _compile_schema(self, canonical_schema: str) -> CompiledGrammar:
        try:
            grammar = xgr.Grammar.from_json_schema(canonical_schema, strict_mode=True, **self._layout)
        except RuntimeError as error:
            reason = _XGRAMMAR_LOCATION.sub("", str(error).strip())
            raise ValueError(f"response_format.json_schema.schema is not supported: {reason}") from error
        return self._compiler.compile_grammar(_with_escapes_in_bounded_strings(grammar))

    def _strict_json(self) -> xgr.CompiledGrammar:
        if self._json_grammar is None:  # a race compiles it twice at worst; both results are the same
            self._json_grammar = self._compiler.compile_builtin_json_grammar()
        return self._json_grammar

    def _cached(self, key: str, build: Any) -> CompiledGrammar:
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
        grammar = JSONGrammar(build(), self._strict_json())  # outside the lock: compiling can take a while
        with self._lock:
            self._cache[key] = grammar
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar


class GrammarState:
    """The grammar matchers of one sequence (the schema's and the strict JSON grammar's, in step): masks its
    logits with the tokens both allow and follows its sampled tokens.

    Per step: :meth:`apply` to the sequence's logits row, sample, then :meth:`accept` the sampled token.
    """

    def __init__(self, compiled: CompiledGrammar) -> None:
        self._matchers = [xgr.GrammarMatcher(compiled.schema), xgr.GrammarMatcher(compiled.json)]
        self.vocab_size = compiled.tokenizer_info.vocab_size
        # Packed: int32 of shape (1, ceil(vocab_size / 32)), bit j of word i = token 32 * i + j allowed.
        self._bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self._other = xgr.allocate_token_bitmask(1, self.vocab_size)

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits of the tokens the grammar forbids next to -inf, in place.

        Args:
            logits: one float row of shape (vocab_size,), on any device.

        Raises:
            ValueError: ``logits`` has the wrong shape, or the matcher has already terminated.
        """
        if logits.dim() != 1 or logits.shape[0] != self.vocab_size:
            raise ValueError(f"logits must have shape ({self.vocab_size},), got {tuple(logits.shape)}")
        if not self.fill_bitmask(self._bitmask, 0):
            return  # every token is allowed
        bitmask = self._bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), bitmask)

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> bool:
        """Fill row ``index`` of a batch bitmask (``xgr.allocate_token_bitmask(B, vocab_size)``) with the
        tokens allowed next; False if every token is. Raises ValueError once the grammar has terminated."""
        if self.is_terminated():
            raise ValueError("the grammar has terminated; no further token is allowed")
        schema, strict_json = self._matchers
        restricted = schema.fill_next_token_bitmask(bitmask, index)
        if strict_json.fill_next_token_bitmask(self._other, 0):
            if restricted:
                bitmask[index] &= self._other[0]
            else:
                bitmask[index] = self._other[0]
            restricted = True
        return restricted

    def allowed_mask(self) -> torch.Tensor:
        """The tokens allowed next, as a bool tensor of shape (vocab_size,) on the CPU."""
        logits = torch.zeros(self.vocab_size)
        self.apply(logits)
        return torch.isfinite(logits)

    def accept(self, token_id: int) -> bool:
        """Advance the matchers by ``token_id``; False (state unchanged) if the grammar forbids it."""
        schema, strict_json = self._matchers
        accepted = schema.accept_token(token_id)
        if accepted and not strict_json.accept_token(token_id):
            schema.rollback(1)
            accepted = False
        if not accepted:
            logger.debug("grammar rejected token %d", token_id)
        return accepted

    def is_completed(self) -> bool:
        """Whether the tokens accepted so far form a complete document (only stop tokens may follow)."""
        return all(m.is_completed() for m in self._matchers)

    def is_terminated(self) -> bool:
        """Whether a stop token has been accepted after a complete document; the sequence is done."""
        return any(m.is_terminated() for m in self._matchers)


# xgrammar's production for one character of a string with minLength/maxLength (see the module's docstring).
_BOUNDED_STRING_CHARACTER = re.compile(r'^(\w+_characters) ::= \(\(\[\^\\"\\\\\\r\\n\]\)\)$', re.MULTILINE)
# One JSON character, raw or escaped: a code point other than the controls, the quote and the backslash, or an
# escape for one code point (a \uXXXX that is not half of a surrogate pair), so that each repetition is one
# character of the decoded string, as minLength and maxLength count.
_ESCAPE_RULE = "minicpmv_escape"
_ONE_CHARACTER = f'(([^\\0-\\x1f\\"\\\\]) | ("\\\\" {_ESCAPE_RULE}))'
_ESCAPE_DEFINITION = (f'{_ESCAPE_RULE} ::= ([\\"\\\\/bfnrt]) | ("u" [0-9A-Ca-cE-Fe-f] [0-9A-Fa-f] [0-9A-Fa-f] '
                      '[0-9A-Fa-f]) | ("u" [Dd] [0-7] [0-9A-Fa-f] [0-9A-Fa-f])')


def _with_escapes_in_bounded_strings(grammar: xgr.Grammar) -> xgr.Grammar:
    """``grammar`` with the character of length-bounded strings rewritten to :data:`_ONE_CHARACTER`: escapes
    (quotes, backslashes, newlines in the text) become possible there, raw control characters do not. A grammar
    without such strings, or an xgrammar that writes them differently, is returned unchanged (the intersection
    with the strict JSON grammar still keeps the output valid JSON)."""
    text, count = _BOUNDED_STRING_CHARACTER.subn(lambda m: f"{m[1]} ::= {_ONE_CHARACTER}", str(grammar))
    if not count:
        return grammar
    return xgr.Grammar.from_ebnf(f"{text}\n{_ESCAPE_DEFINITION}\n")


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
