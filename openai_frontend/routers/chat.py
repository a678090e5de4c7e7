"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from openai_frontend import tools
from openai_frontend.convert import to_generate_request
from openai_frontend.dependencies import ChatDep, RegistryDep, SettingsDep
from openai_frontend.errors import APIError, ErrorResponse
from openai_frontend.schemas import ChatCompletion, ChatCompletionRequest
from openai_frontend.serving import ClientDisconnected

router = APIRouter()

_ERRORS = {
    400: {"model": ErrorResponse, "description": "Invalid request: parameters, messages, images, context length"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when keys are configured)"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    429: {"model": ErrorResponse, "description": "Too many requests in flight, or the model's queue is full"},
    500: {"model": ErrorResponse, "description": "The model failed on this request"},
    503: {"model": ErrorResponse, "description": "Triton or the model is not available"},
    504: {"model": ErrorResponse, "description": "The request took longer than the server's time limit"},
}


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "A chat.completion, or with stream=true chat.completion.chunk events"},
               **_ERRORS},  # fmt: skip
    summary="Create a chat completion (text and images; streaming; JSON mode)",
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, settings: SettingsDep,
                                 registry: RegistryDep, chat: ChatDep):  # fmt: skip
    try:
        target = await registry.resolve(body.model)
        generate = await to_generate_request(body, settings, request.app.state.http, request.app.state.metrics)
        generate.adapter = target.adapter
    except APIError as e:  # counted here; failures after this point are counted by the chat service
        request.app.state.metrics.requests.labels(body.model, str(e.status)).inc()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    try:
        result = await chat.complete(request, target.model, body.model, generate, include_usage)
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as e:  # noqa: BLE001 - re-raised, restated against the tools where they caused it
        raise tools.explain_error(e, generate.tools) from None
    if isinstance(result, ChatCompletion):  # serialized once, here (FastAPI would validate it again)
        return Response(result.model_dump_json(), media_type="application/json")
    return result
