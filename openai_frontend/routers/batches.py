"""OpenAI's Batch API: POST/GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel. The lines run
in the background (openai_frontend/batch/runner.py); state lives in SQLite (openai_frontend/batch/store.py).
A batch belongs to the caller's tenant, as its output files do; its input file must be the caller's too."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from openai_frontend.batch import validation
from openai_frontend.batch.objects import batch_object, page
from openai_frontend.dependencies import PrincipalDep
from openai_frontend.errors import APIError, ErrorResponse, invalid
from openai_frontend.routers.files import MAX_EXPIRY, MIN_EXPIRY, _file_row, expiry_seconds, store_of

router = APIRouter()
_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
           409: {"model": ErrorResponse}}  # fmt: skip
WINDOWS = {"24h": 24 * 3600}


class OutputExpiresAfter(BaseModel):
    """When the batch's output and error files expire: ``seconds`` after their creation (OpenAI's bounds)."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRY, le=MAX_EXPIRY)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    # The OpenAPI document names the values taken (json_schema_extra); the check and its message are ours
    # (validation.check_endpoint, create_batch), so a wrong value gets a 400 that says what is served.
    endpoint: str = Field(json_schema_extra={"enum": list(validation.SUPPORTED_ENDPOINTS)})
    completion_window: str = Field(json_schema_extra={"enum": list(WINDOWS)})
    metadata: validation.Metadata | None = None
    output_expires_after: OutputExpiresAfter | None = None


@router.post("/v1/batches", responses=_ERRORS, summary="Create a batch from an uploaded JSONL file")
async def create_batch(body: BatchCreate, request: Request, principal: PrincipalDep):
    store = store_of(request)
    settings = request.app.state.settings
    validation.check_endpoint(body.endpoint)
    if body.completion_window not in WINDOWS:
        raise invalid("completion_window must be \"24h\"", "completion_window")
    expires = body.output_expires_after
    lifetime = expiry_seconds(request, expires.seconds, "output_expires_after") if expires else None
    row = await _file_row(store, body.input_file_id, principal, "input_file_id")
    if row["purpose"] != "batch":
        raise invalid(f"file {row['id']} has purpose {row['purpose']!r}; a batch needs a file uploaded with purpose "
                      "\"batch\"", "input_file_id")  # fmt: skip
    scan = await asyncio.to_thread(validation.scan, store.sync.file_path(row["id"]), settings.batch_max_lines)
    if scan.url != body.endpoint:
        raise invalid(f"the file's requests go to {scan.url!r}, but the batch's endpoint is {body.endpoint!r}"[:300],
                      "endpoint", code="endpoint_mismatch")  # fmt: skip
    per_tenant = settings.batch_max_open_batches_per_tenant
    if per_tenant and await store.open_batches(principal.tenant) >= per_tenant:
        raise invalid(f"you have {per_tenant} batches open (the server's limit per tenant); wait for one to finish "
                      "or cancel one", code="too_many_open_batches")  # fmt: skip
    if await store.open_batches() >= settings.batch_max_open_batches:
        raise invalid(f"{settings.batch_max_open_batches} batches are already open (the server's limit); wait for "
                      "one to finish or cancel one", code="too_many_open_batches")  # fmt: skip
    batch = await store.create_batch(row["id"], body.endpoint, body.completion_window, body.metadata, scan,
                                     WINDOWS[body.completion_window], principal.tenant, principal.scope,
                                     lifetime)  # fmt: skip
    if batch is None:  # deleted or expired since it was read
        raise validation.file_not_found(row["id"], "input_file_id")
    request.app.state.batch_runner.wake()
    return batch_object(batch)


async def _batch(request: Request, batch_id: str, principal: PrincipalDep) -> dict:
    validation.check_batch_id(batch_id)
    batch = await store_of(request).get_batch(batch_id, principal.scope)
    if batch is None:
        raise APIError(404, f"no such batch: {batch_id}", param="batch_id", code="batch_not_found")
    return batch


@router.get("/v1/batches", responses=_ERRORS, summary="List batches, newest first")
async def list_batches(request: Request, principal: PrincipalDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                       after: str | None = None):  # fmt: skip
    rows, has_more = await store_of(request).list_batches(limit, after, principal.scope)
    return page([batch_object(r) for r in rows], has_more)


@router.get("/v1/batches/{batch_id}", responses=_ERRORS, summary="Retrieve a batch")
async def retrieve_batch(request: Request, principal: PrincipalDep, batch_id: str):
    return batch_object(await _batch(request, batch_id, principal))


@router.post("/v1/batches/{batch_id}/cancel", responses=_ERRORS, summary="Cancel a batch")
async def cancel_batch(request: Request, principal: PrincipalDep, batch_id: str):
    batch = await _batch(request, batch_id, principal)
    store = store_of(request)
    if batch["status"] not in ("cancelling", "cancelled"):
        if not await store.set_status(batch_id, "cancelling", only_from=("validating", "in_progress")):
            current = (await store.get_batch(batch_id))["status"]
            raise APIError(409, f"cannot cancel a batch that is {current}", param="batch_id",
                           code="batch_not_cancellable")  # fmt: skip
        request.app.state.batch_runner.wake()
    return batch_object(await store.get_batch(batch_id))
