"""POST /v1/responses: OpenAI's Responses API over the chat path (see openai_frontend/responses.py)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from openai_frontend import tools
from openai_frontend.convert import to_generate_request
from openai_frontend.dependencies import ChatDep, RegistryDep, SettingsDep
from openai_frontend.errors import APIError
from openai_frontend.responses import ResponsesRequest, build_response, response_id, restate, to_chat_request
from openai_frontend.responses_stream import response_events
from openai_frontend.routers.chat import _ERRORS
from openai_frontend.serving import ClientDisconnected

router = APIRouter()


@router.post(
    "/v1/responses",
    responses={200: {"content": {"application/json": {}, "text/event-stream": {}},
                     "description": "A response object, or with stream=true its typed events (response.created, "
                                    "response.output_text.delta, ..., response.completed)"},
               **_ERRORS},  # fmt: skip
    summary="Create a model response (OpenAI's Responses API: text, images, PDFs, JSON, function calls)",
)
async def create_response(body: ResponsesRequest, request: Request, settings: SettingsDep, registry: RegistryDep,
                          chat: ChatDep):  # fmt: skip
    origins: list[str] = []
    try:
        target = await registry.resolve(body.model)
        chat_request, origins = to_chat_request(body)
        generate = await to_generate_request(chat_request, settings, request.app.state.http,
                                                  request.app.state.metrics)
        generate.adapter = target.adapter
    except APIError as e:  # counted here; failures after this point are counted by the chat service
        request.app.state.metrics.requests.labels(body.model, str(e.status)).inc()
        raise restate(e, origins) from None
    rid = response_id()
    generate.request_id = rid
    created = time.time()
    try:
        if not body.stream:
            completion = await chat.complete(request, target.model, body.model, generate, False)
            return JSONResponse(build_response(body, rid, created, completion))
        run, first = await chat.open_stream(target.model, body.model, generate)
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as e:  # noqa: BLE001 - re-raised, with the Responses API's param names
        raise restate(tools.explain_error(e, generate.tools), origins) from None
    return StreamingResponse(response_events(body, rid, created, run, first, generate.tools),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
