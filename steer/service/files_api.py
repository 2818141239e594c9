"""OpenAI's Files API: upload (multipart `file` + `purpose`), list, retrieve, content, delete.

Thin routes over `steer.store.files`; an upload is checked line by line before it is stored
(`steer.training.formats`, in a thread: a 64 MiB file takes a while to parse). Only
`purpose: "fine-tune"` is accepted: Steer has no batch or assistants API to use other files.

Not here: what a line may hold (`formats`), the error table (`errors.py`), the body-size cap
a request meets before it is parsed (`limits.BodyLimitMiddleware`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from steer.service.errors import APIError, bad_request
from steer.service.limits import file_too_large
from steer.service.protocol import FileDeleted, FileList, FileObject
from steer.service.settings import Settings
from steer.store import Database, NotFound
from steer.store.files import (
    StoredFile,
    create_file,
    delete_file,
    file_content,
    get_file,
    list_files,
)
from steer.training.formats import PURPOSES, validate_jsonl

FIELDS = {"file", "purpose"}
MAX_LIST = 10_000  # OpenAI's bound (and default) for `limit`
BINARY = "application/octet-stream"


def file_object(row: StoredFile) -> FileObject:
    return FileObject(id=row.id, bytes=row.size, created_at=row.created_at,
                      filename=row.filename, purpose=row.purpose)


def files_router(db: Database, settings: Settings, authorized: Callable[..., None]) -> APIRouter:
    router = APIRouter(dependencies=[Depends(authorized)])

    @router.post("/v1/files")
    async def upload(
        request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()],
    ) -> FileObject:
        form = await request.form()  # parsed once already, for the fields above: cached
        extra = sorted({name.split("[")[0] for name in form} - FIELDS)
        if extra:  # e.g. the SDK's `expires_after[...]`: files here are kept until deleted
            raise bad_request(f"Unrecognized request argument supplied: {extra[0]} (files on "
                              "this server are kept until deleted)", param=extra[0])
        if purpose not in PURPOSES:
            raise bad_request(f"purpose must be one of {', '.join(PURPOSES)} on this server "
                              f"(got {purpose!r})", param="purpose", code="invalid_purpose")
        content = await file.read(settings.max_file_bytes + 1)
        if len(content) > settings.max_file_bytes:
            raise file_too_large(settings.max_file_bytes)
        kind, lines = await asyncio.to_thread(validate_jsonl, content, purpose)
        row = await create_file(db, filename=file.filename or "upload.jsonl", purpose=purpose,
                                content=content, lines=lines, kind=kind)
        return file_object(row)

    @router.get("/v1/files")
    async def list_(
        purpose: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = MAX_LIST,
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
    ) -> FileList:
        try:
            page = await list_files(db, purpose=purpose, after=after, limit=limit, order=order)
        except NotFound as exc:
            raise APIError(404, f"{exc}: `after` must name a listed file",
                           type="not_found_error", param="after", code="file_not_found") \
                from exc
        data = [file_object(row) for row in page.data]
        return FileList(data=data, has_more=page.has_more,
                        first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None)

    @router.get("/v1/files/{file_id}")
    async def retrieve(file_id: str) -> FileObject:
        return file_object(await get_file(db, file_id))

    @router.get("/v1/files/{file_id}/content", response_class=Response, responses={
        200: {"description": "The file's bytes, as uploaded.",
              "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}}}})
    async def content(file_id: str) -> Response:
        return Response(await file_content(db, file_id), media_type=BINARY)

    @router.delete("/v1/files/{file_id}")
    async def delete(file_id: str) -> FileDeleted:
        await delete_file(db, file_id)
        return FileDeleted(id=file_id, deleted=True)

    return router
