"""The clients people point at an OpenAI-compatible server, against the real stack (issue 15): the openai SDK's
``chat.completions.parse``, LangChain's ``with_structured_output`` (json_schema) and LiteLLM's error mapping."""

from __future__ import annotations

import json
import os

import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MODEL = "minicpm_v_2_6"
PROMPT = [{"role": "user", "content": "Extract the invoice: vendor, number and a short note."}]
# Sampling from the whole vocabulary (no top-k / top-p cut, which would keep the random test model to its
# favourite tokens): the ~3,500 tokens holding control characters stay candidates at every step.
FULL_VOCABULARY = {"temperature": 1.0, "top_p": 1.0, "extra_body": {"top_k": -1}}


class Invoice(BaseModel):
    # Length bounds: xgrammar lowers these to a production that admitted raw control characters (D1).
    vendor: str = Field(min_length=1, max_length=24)
    number: str = Field(min_length=1, max_length=10)
    note: str = Field(max_length=30)


def test_parse_with_length_limited_fields_over_16_seeds(client):
    stopped = 0
    for seed in range(16):
        try:
            completion = client.chat.completions.parse(model=MODEL, messages=PROMPT, response_format=Invoice,
                                                       seed=seed, max_tokens=160, **FULL_VOCABULARY)  # fmt: skip
        except openai.LengthFinishReasonError:
            continue  # ended by max_tokens, not "stop": not a complete document, and the SDK says so
        (choice,) = completion.choices
        assert choice.finish_reason == "stop"
        invoice = choice.message.parsed  # the SDK parsed and validated it (it raises where it cannot)
        assert isinstance(invoice, Invoice), (seed, choice.message.content)
        # strict JSON (json.loads rejects a raw control character in a string; escapes such as \n are fine)
        assert Invoice(**json.loads(choice.message.content)) == invoice
        stopped += 1
    assert stopped >= 8, f"only {stopped} of 16 seeds ended with stop: the check saw too little"


def test_langchain_structured_output_json_schema(frontend):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=frontend.base_url + "/v1", api_key="unused",
                                      temperature=1.0, max_tokens=160, max_retries=0)  # fmt: skip
    parsed = 0
    for seed in range(4):
        structured = llm.bind(seed=seed).with_structured_output(Invoice, method="json_schema", include_raw=True)
        result = structured.invoke(PROMPT[0]["content"])
        if result["raw"].response_metadata.get("finish_reason") != "stop":
            continue
        assert result["parsing_error"] is None and isinstance(result["parsed"], Invoice), result
        parsed += 1
    assert parsed >= 2, f"only {parsed} of 4 answers ended with stop"


def test_litellm_recognises_the_context_window_error(frontend):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list at import
    litellm = pytest.importorskip("litellm")
    long_prompt = [{"role": "user", "content": "page " * 40000}]
    for kwargs in ({"messages": long_prompt}, {"messages": PROMPT, "max_tokens": 40000}):
        with pytest.raises(litellm.ContextWindowExceededError) as e:
            litellm.completion(model=f"openai/{MODEL}", api_base=frontend.base_url + "/v1", api_key="unused",
                               num_retries=0, **kwargs)  # fmt: skip
        assert "maximum context length is" in str(e.value)
