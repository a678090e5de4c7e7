"""OpenAI's Files API, for batch input and output files: POST/GET /v1/files, GET/DELETE /v1/files/{id},
GET /v1/files/{id}/content. Uploads take purpose "batch" and must be a valid batch file (checked here). Files
belong to the caller's tenant (openai_frontend/tenants.py): another tenant's file is "not found"."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import WithJsonSchema

from openai_frontend.batch import validation
from openai_frontend.batch.objects import file_object, page
from openai_frontend.batch.storage import DiskFull, FileInUse, StorageError
from openai_frontend.batch.store import AsyncStore
from openai_frontend.dependencies import PrincipalDep
from openai_frontend.errors import APIError, ErrorResponse, invalid

router = APIRouter()
_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
           409: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
           507: {"model": ErrorResponse}}  # fmt: skip
_CHUNK = 1 << 20
# OpenAI's bounds of expires_after.seconds (files) and output_expires_after.seconds (batches).
MIN_EXPIRY, MAX_EXPIRY = 3600, 30 * 86400


def store_of(request: Request) -> AsyncStore:
    store = getattr(request.app.state, "batch_store", None)
    if store is None:
        raise APIError(404, "the Batch API is disabled on this server (BATCH_ENABLED=false)", code="batch_disabled")
    return store


def storage_error(e: StorageError) -> APIError:
    """A budget: 429 as OpenAI's quota errors (the SDKs raise RateLimitError, whose code names the quota), with
    ``x-should-retry: false`` so that they don't send the same file again at once. A full disk: 507."""
    status = 507 if isinstance(e, DiskFull) else 429
    return APIError(status, e.message, type="insufficient_quota" if status == 429 else "server_error", code=e.code,
                    headers={"x-should-retry": "false"})  # fmt: skip


def expiry_seconds(request: Request, seconds: int | None, param: str) -> int:
    """The lifetime asked for (at most the server's maximum), or the server's default."""
    settings = request.app.state.settings
    if seconds is None:
        return settings.batch_file_expiry
    if seconds > settings.batch_max_file_expiry:
        raise invalid(f"{param} is at most {settings.batch_max_file_expiry} seconds on this server", param)
    return seconds


async def _file_row(store: AsyncStore, file_id: str, principal: PrincipalDep, param: str = "file_id") -> dict:
    validation.check_file_id(file_id, param)
    row = await store.get_file(file_id, principal.scope)
    if row is None:
        raise validation.file_not_found(file_id, param)
    return row


# The expiry's form fields (the SDKs send expires_after as "expires_after[anchor]" and "expires_after[seconds]") are
# optional, and published without FastAPI's "or null": a multipart form has no null.
@router.post("/v1/files", responses=_ERRORS, summary="Upload a batch input file (JSONL, purpose \"batch\")")
async def upload_file(request: Request, principal: PrincipalDep, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form(json_schema_extra={"enum": ["batch"]})],
                      anchor: Annotated[Literal["created_at"] | None, Form(alias="expires_after[anchor]"),
                                        WithJsonSchema({"type": "string", "enum": ["created_at"]})] = None,
                      seconds: Annotated[int | None, Form(alias="expires_after[seconds]", ge=MIN_EXPIRY, le=MAX_EXPIRY),
                                         WithJsonSchema({"type": "integer", "minimum": MIN_EXPIRY,
                                                         "maximum": MAX_EXPIRY})] = None):  # fmt: skip
    store = store_of(request)
    settings = request.app.state.settings
    if purpose != "batch":
        raise invalid(f"purpose {purpose!r} is not supported; this server stores batch input files only "
                      "(purpose \"batch\")"[:300], "purpose", code="unsupported_purpose")  # fmt: skip
    if (anchor is None) != (seconds is None):
        raise invalid("expires_after takes both anchor (\"created_at\") and seconds", "expires_after")
    lifetime = expiry_seconds(request, seconds, "expires_after")
    limit = settings.batch_max_file_bytes
    too_large = APIError(413, f"the file is larger than the limit of {limit} bytes", param="file",
                         code="file_too_large")  # fmt: skip
    # The multipart parser has measured the file: refuse before anything is written here.
    if file.size is not None and file.size > limit:
        raise too_large
    try:
        await store.check_budget(principal.tenant, file.size or 0)
    except StorageError as e:
        raise storage_error(e) from None
    temp = store.sync.temp_path()
    size = 0
    try:
        with open(temp, "wb") as out:
            while chunk := await file.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise too_large
                await asyncio.to_thread(out.write, chunk)
            await asyncio.to_thread(out.flush)
            await asyncio.to_thread(os.fsync, out.fileno())  # the body is on disk before its row is
        await asyncio.to_thread(validation.scan, temp, settings.batch_max_lines)
        row = await store.add_file(temp, validation.clean_filename(file.filename), purpose, size, principal.tenant,
                                   lifetime)  # fmt: skip
    except StorageError as e:
        raise storage_error(e) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise storage_error(DiskFull("the server's disk is full")) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    return file_object(row)


@router.get("/v1/files", responses=_ERRORS, summary="List files")
async def list_files(request: Request, principal: PrincipalDep, purpose: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10000)] = 10000, order: Literal["asc", "desc"] = "desc",
                     after: str | None = None):  # fmt: skip
    rows, has_more = await store_of(request).list_files(purpose, limit, order, after, principal.scope)
    return page([file_object(r) for r in rows], has_more)


@router.get("/v1/files/{file_id}", responses=_ERRORS, summary="Retrieve a file's description")
async def retrieve_file(request: Request, principal: PrincipalDep, file_id: str):
    return file_object(await _file_row(store_of(request), file_id, principal))


@router.get("/v1/files/{file_id}/content", responses=_ERRORS, summary="Download a file's content")
async def file_content(request: Request, principal: PrincipalDep, file_id: str):
    store = store_of(request)
    row = await _file_row(store, file_id, principal)
    path = store.sync.file_path(row["id"])
    if not path.exists():  # deleted or expired while this request ran
        raise validation.file_not_found(file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=row["filename"])


@router.delete("/v1/files/{file_id}", responses=_ERRORS, summary="Delete a file (its row and its content)")
async def delete_file(request: Request, principal: PrincipalDep, file_id: str):
    store = store_of(request)
    validation.check_file_id(file_id)
    try:
        deleted = await store.delete_file(file_id, principal.scope)
    except FileInUse as e:
        raise APIError(409, f"the file is the input of batch {e.batch_id}, which has not finished; cancel it first",
                       param="file_id", code="file_in_use") from None  # fmt: skip
    if not deleted:
        raise validation.file_not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
