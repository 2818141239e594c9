"""Wire models of the stored-completions routes (OpenAI's) and Steer's datasets route.

The chat request itself (with `store` and `metadata`) is in `protocol.py`; the dataset
request is the training layer's `DatasetSpec`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from steer.service.protocol import ChatCompletion, FileObject, Metadata, _Request


class StoredChatCompletion(ChatCompletion):
    """A stored completion as retrieved: the answer as it was returned, its metadata, the
    request's model name, and the id of its steering trace (`/v1/steering/traces/{id}`)."""

    metadata: dict[str, str] | None = None
    steering_trace_id: str | None = None
    steering: dict[str, Any] | None = None  # the strategy and its options


class StoredCompletionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[StoredChatCompletion]
    first_id: str | None
    last_id: str | None
    has_more: bool


class StoredMessage(BaseModel):
    """One message of a stored completion's request (OpenAI's ChatCompletionStoreMessage)."""

    id: str
    role: str
    content: str | None
    name: str | None = None
    content_parts: list[dict[str, Any]] | None = None


class StoredMessageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[StoredMessage]
    first_id: str | None
    last_id: str | None
    has_more: bool


class CompletionUpdate(_Request):
    """`POST /v1/chat/completions/{id}`: the new metadata (null clears it)."""

    metadata: Metadata | None


class CompletionDeleted(BaseModel):
    id: str
    object: Literal["chat.completion.deleted"] = "chat.completion.deleted"
    deleted: bool = True


class DatasetResult(BaseModel):
    object: Literal["steering.dataset"] = "steering.dataset"
    training_file: FileObject
    validation_file: FileObject | None
    lines: int
    validation_lines: int
    completions: int  # stored completions that matched the filters
    skipped: dict[str, int]  # reason -> completions (or duplicate lines)
