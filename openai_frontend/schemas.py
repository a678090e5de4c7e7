"""OpenAI chat-completions schemas, written by hand: one class per OpenAI object, fields named and ordered as
in OpenAI's API reference. Our extensions are fenced off and marked as such."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

# ---------------------------------------------------------------- request: messages


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"
    # --- extension: this image's slices (overrides detail and the request's max_slice_nums)
    max_slice_nums: int | None = Field(None, ge=1, le=36)


class ChatCompletionContentPartText(_Strict):
    type: Literal["text"]
    text: str


class ChatCompletionContentPartImage(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class FileData(_Strict):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None
    # --- extension: which pages of a PDF, e.g. "2-4", "3", "2-" (default: all, up to the server's limit)
    pages: str | None = None


class ChatCompletionContentPartFile(_Strict):
    type: Literal["file"]
    file: FileData


class VideoURL(_Strict):
    """A video (as vLLM takes it): a data URL, or http(s) where the server allows remote media. Extensions:
    frames per second to sample (default 1, as MiniCPM-V's card does), the most frames to keep (default and
    maximum: the server's, 64), slices per frame (default 2, the card's; 1 for large videos)."""

    url: str
    fps: float | None = Field(None, gt=0, le=30)
    max_frames: int | None = Field(None, ge=1)
    max_slice_nums: int | None = Field(None, ge=1, le=36)


class ChatCompletionContentPartVideo(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


# The part types we take, as a client would write them (unknown ones get a 400 naming these: errors.py).
CONTENT_PART_TYPES = ("text", "image_url", "file", "video_url")

ContentPart = Annotated[
    ChatCompletionContentPartText | ChatCompletionContentPartImage | ChatCompletionContentPartFile
    | ChatCompletionContentPartVideo,
    Field(discriminator="type"),
]


class ChatCompletionMessage(BaseModel):
    """A message of the request. Unknown roles (function) get a clear 400 from the converter; ``tool`` messages
    and assistant ``tool_calls`` are rendered into the prompt (openai_frontend/tools.py)."""

    model_config = ConfigDict(extra="ignore")  # e.g. "refusal" or "annotations" echoed back by clients

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant: earlier calls (checked in tools.py)
    tool_call_id: str | None = None  # tool: the call this result answers


class ResponseFormatJSONSchema(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: ResponseFormatJSONSchema | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # accepted; we never add obfuscation padding to chunks


# ---------------------------------------------------------------- request


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    # Accepted and ignored: they change nothing about a local model's answer.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # Function calling (openai_frontend/tools.py checks them, with the offending param).
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    # Not supported; refused with a clear message when set (see convert.py).
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    logit_bias: dict[str, float] | None = None
    # Current official fields, accepted with no effect on a local model (README says which do what).
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: str | None = Field(None, max_length=64)
    web_search_options: dict[str, Any] | None = None
    # Output modalities: ["text"] only; audio output is refused by convert.py (and so is a non-null audio).
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None  # null only: there is no moderation here (convert.py refuses one)

    # OpenAI's spec allows an explicit null for every optional field, meaning "the default".
    @field_validator("n", "stream", "logprobs", mode="before")
    @classmethod
    def _null_is_default(cls, value, info: ValidationInfo):
        return cls.model_fields[info.field_name].default if value is None else value

    # --- extensions (not in OpenAI's API; as in vLLM) ---
    top_k: int | None = Field(None, ge=-1, description="extension: sample from the k most likely tokens")
    repetition_penalty: float | None = Field(None, gt=0.0, description="extension: >1 discourages repeats")
    min_tokens: int | None = Field(None, ge=0, description="extension: no stop before this many tokens")
    ignore_eos: bool | None = Field(None, description="extension: fixed-length output (benchmarks)")
    max_slice_nums: int | None = Field(None, ge=1, le=36, description="extension: image slices per image")


# ---------------------------------------------------------------- responses


def _now() -> int:
    return int(time.time())


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ChatCompletionMessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ChatCompletionMessageToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_tool_calls(self, handler):  # OpenAI leaves tool_calls out (never null) without calls
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class Choice(BaseModel):
    index: int
    message: ChatCompletionResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: CompletionUsage


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # {"index", "id"?, "type"?, "function": {"name"?, "arguments"}}


class ChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "openbmb"
    # Extensions: the Triton model behind the name (a LoRA adapter's: where the server read it, as vLLM's), the
    # other names it answers to, and a LoRA adapter's base model (vLLM's "parent"; absent for a model).
    root: str | None = None
    aliases: list[str] = Field(default_factory=list)
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
