"""Routes over stored completions, as OpenAI defines them (what `client.chat.completions.list /
retrieve / update / delete` and `.messages.list` call), and Steer's datasets route, which turns
stored completions into a training File.

Thin routes: parse, one store (or datasets) call, render. Storing itself is `recorder.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.params import Depends

from steer.service.errors import APIError, bad_request
from steer.service.protocol import FileObject
from steer.service.stored_protocol import (
    CompletionDeleted,
    CompletionUpdate,
    DatasetResult,
    StoredChatCompletion,
    StoredCompletionList,
    StoredMessage,
    StoredMessageList,
)
from steer.store import Database, NotFound
from steer.store import completions as store
from steer.store.completions import StoredCompletion
from steer.store.files import StoredFile
from steer.training.datasets import DatasetError, DatasetSpec, export

_METADATA_KEY = re.compile(r"^metadata\[([^\[\]]*)\]$")
Limit = Annotated[int, Query(ge=1, le=100)]
Order = Literal["asc", "desc"]
# `metadata[key]=value` (OpenAI's filter, what the SDK sends): FastAPI can't declare it.
METADATA_FILTER = {"parameters": [{
    "name": "metadata", "in": "query", "required": False, "style": "deepObject",
    "explode": True, "description": "Only completions with every metadata pair given.",
    "schema": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 512},
               "propertyNames": {"maxLength": 64}},
}]}


def not_found(exc: NotFound, param: str) -> APIError:
    return APIError(404, f"No {exc.kind} found with id '{exc.key}'.", type="not_found_error",
                    param=param, code="not_found")


def metadata_filter(request: Request) -> dict[str, str]:
    """The `metadata[key]=value` pairs of a query string."""
    pairs: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name != "metadata" and not name.startswith("metadata["):
            continue
        match = _METADATA_KEY.match(name)
        if match is None:  # `metadata=x`, or a nested `metadata[a][b]=x`: values are strings
            raise bad_request("filter by metadata as metadata[key]=value", "metadata")
        key = match.group(1)
        if key not in pairs and len(pairs) == 16:  # each pair is a subquery: bounded
            raise bad_request("filter by at most 16 metadata pairs", "metadata")
        if len(key) > 64 or len(value) > 512:
            raise bad_request("metadata keys are at most 64 characters, values at most 512",
                              f"metadata[{key[:64]}]")
        pairs[key] = value
    return pairs


def render(row: StoredCompletion) -> StoredChatCompletion:
    return StoredChatCompletion.model_validate({
        **row.response, "metadata": {p.key: p.value for p in row.pairs},
        "steering_trace_id": row.trace_id, "steering": row.steering,
    })


def file_object(f: StoredFile) -> FileObject:
    return FileObject(id=f.id, bytes=f.size, created_at=f.created_at, filename=f.filename,
                      purpose=f.purpose)


def messages_of(row: StoredCompletion) -> list[StoredMessage]:
    """The request's messages, with ids (`<completion id>-<index>`) a cursor can name."""
    out = []
    for i, m in enumerate(row.request.get("messages", ())):
        content, parts = m.get("content"), None
        if isinstance(content, list):
            parts, content = content, "\n".join(p.get("text", "") for p in content)
        out.append(StoredMessage(id=f"{row.id}-{i}", role=m["role"], content=content,
                                 name=m.get("name"), content_parts=parts))
    return out


def page_of(items: list[StoredMessage], after: str | None, limit: int,
            order: str) -> tuple[list[StoredMessage], bool]:
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [m.id for m in items]
        if after not in ids:
            raise APIError(404, f"No message found with id '{after}'.", type="not_found_error",
                           param="after", code="not_found")
        items = items[ids.index(after) + 1:]
    return items[:limit], len(items) > limit


def stored_router(db: Database, dependencies: Sequence[Depends],
                  max_file_bytes: int | None = None) -> APIRouter:
    """The routes; a dataset bigger than `max_file_bytes` is refused (400)."""
    router = APIRouter(dependencies=list(dependencies))

    @router.get("/v1/chat/completions", openapi_extra=METADATA_FILTER)
    async def list_stored(
        request: Request, model: str | None = None, after: str | None = None,
        limit: Limit = 20, order: Order = "asc",
    ) -> StoredCompletionList:
        try:
            page = await store.list_completions(db, model=model, after=after, limit=limit,
                                                order=order, metadata=metadata_filter(request))
        except NotFound as exc:
            raise not_found(exc, "after") from exc
        data = [render(r) for r in page.rows]
        return StoredCompletionList(data=data, first_id=data[0].id if data else None,
                                    last_id=data[-1].id if data else None,
                                    has_more=page.has_more)

    @router.get("/v1/chat/completions/{completion_id}")
    async def retrieve_stored(completion_id: str) -> StoredChatCompletion:
        try:
            return render(await store.get_completion(db, completion_id))
        except NotFound as exc:
            raise not_found(exc, "completion_id") from exc

    @router.get("/v1/chat/completions/{completion_id}/messages")
    async def stored_messages(completion_id: str, after: str | None = None, limit: Limit = 20,
                              order: Order = "asc") -> StoredMessageList:
        try:
            row = await store.get_completion(db, completion_id)
        except NotFound as exc:
            raise not_found(exc, "completion_id") from exc
        data, more = page_of(messages_of(row), after, limit, order)
        return StoredMessageList(data=data, first_id=data[0].id if data else None,
                                 last_id=data[-1].id if data else None, has_more=more)

    @router.post("/v1/chat/completions/{completion_id}")
    async def update_stored(completion_id: str, body: CompletionUpdate) -> StoredChatCompletion:
        try:
            return render(await store.update_metadata(db, completion_id, body.metadata))
        except NotFound as exc:
            raise not_found(exc, "completion_id") from exc

    @router.delete("/v1/chat/completions/{completion_id}")
    async def delete_stored(completion_id: str) -> CompletionDeleted:
        try:
            await store.delete_completion(db, completion_id)
        except NotFound as exc:
            raise not_found(exc, "completion_id") from exc
        return CompletionDeleted(id=completion_id)

    @router.post("/v1/steering/datasets")
    async def dataset(body: DatasetSpec) -> DatasetResult:
        """A training File (and a validation File) from stored completions."""
        try:
            out = await export(db, body, max_file_bytes)
        except DatasetError as exc:
            raise bad_request(str(exc), exc.param, code=exc.code) from exc
        data = out.dataset
        return DatasetResult(
            training_file=file_object(out.training_file),
            validation_file=file_object(out.validation_file) if out.validation_file else None,
            lines=len(data.training), validation_lines=len(data.validation),
            completions=data.completions, skipped=dict(data.skipped),
        )

    return router
