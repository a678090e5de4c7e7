"""OpenAI's Files API, for batch input and output files: POST/GET /v1/files, GET/DELETE /v1/files/{id},
GET /v1/files/{id}/content. Uploads take purpose "batch" and must be a valid batch file (checked here)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from openai_frontend.batch import validation
from openai_frontend.batch.objects import file_object, page
from openai_frontend.batch.store import AsyncStore
from openai_frontend.errors import APIError, ErrorResponse, invalid

router = APIRouter()
_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
           413: {"model": ErrorResponse}}  # fmt: skip
_CHUNK = 1 << 20


def store_of(request: Request) -> AsyncStore:
    store = getattr(request.app.state, "batch_store", None)
    if store is None:
        raise APIError(404, "the Batch API is disabled on this server (BATCH_ENABLED=false)", code="batch_disabled")
    return store


async def _file_row(store: AsyncStore, file_id: str) -> dict:
    validation.check_file_id(file_id)
    row = await store.get_file(file_id)
    if row is None:
        raise APIError(404, f"no such file: {file_id}", param="file_id", code="file_not_found")
    return row


@router.post("/v1/files", responses=_ERRORS, summary="Upload a batch input file (JSONL, purpose \"batch\")")
async def upload_file(request: Request, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form(json_schema_extra={"enum": ["batch"]})]):  # fmt: skip
    store = store_of(request)
    settings = request.app.state.settings
    if purpose != "batch":
        raise invalid(f"purpose {purpose!r} is not supported; this server stores batch input files only "
                      "(purpose \"batch\")"[:300], "purpose", code="unsupported_purpose")  # fmt: skip
    limit = settings.batch_max_file_bytes
    temp = store.sync.temp_path()
    size = 0
    try:
        with open(temp, "wb") as out:
            while chunk := await file.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise invalid(f"the file is larger than the limit of {limit} bytes", "file",
                                  code="file_too_large")  # fmt: skip
                await asyncio.to_thread(out.write, chunk)
        if size + await store.disk_used() > settings.batch_max_disk_bytes:
            raise invalid(f"the server's batch storage is full (limit {settings.batch_max_disk_bytes} bytes); delete "
                          "files you no longer need", "file", code="storage_limit_exceeded")  # fmt: skip
        await asyncio.to_thread(validation.scan, temp, settings.batch_max_lines)
        row = await store.add_file(temp, validation.clean_filename(file.filename), purpose, size)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    return file_object(row)


@router.get("/v1/files", responses=_ERRORS, summary="List files")
async def list_files(request: Request, purpose: str | None = None, limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
                     order: Literal["asc", "desc"] = "desc", after: str | None = None):  # fmt: skip
    rows, has_more = await store_of(request).list_files(purpose, limit, order, after)
    return page([file_object(r) for r in rows], has_more)


@router.get("/v1/files/{file_id}", responses=_ERRORS, summary="Retrieve a file's description")
async def retrieve_file(request: Request, file_id: str):
    return file_object(await _file_row(store_of(request), file_id))


@router.get("/v1/files/{file_id}/content", responses=_ERRORS, summary="Download a file's content")
async def file_content(request: Request, file_id: str):
    store = store_of(request)
    row = await _file_row(store, file_id)
    return FileResponse(store.sync.file_path(row["id"]), media_type="application/octet-stream",
                        filename=row["filename"])  # fmt: skip


@router.delete("/v1/files/{file_id}", responses=_ERRORS, summary="Delete a file")
async def delete_file(request: Request, file_id: str):
    store = store_of(request)
    await _file_row(store, file_id)
    batch = await store.file_in_use(file_id)
    if batch is not None:
        raise APIError(409, f"the file is the input of batch {batch}, which has not finished; cancel it first",
                       param="file_id", code="file_in_use")  # fmt: skip
    await store.delete_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
