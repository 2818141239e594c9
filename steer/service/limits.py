"""Request-size limits a hostile client meets before any work is done: the body size (413,
counted as the bytes arrive, before anything is parsed), the number and length of messages
and prompts (400 naming the field), and who a request counts against (its key).

Not here: admission by work (`admission.py`) and per-strategy option bounds (the search
layer's pydantic schemas).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steer.service.errors import APIError, bad_request


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit} "
                    "bytes).", code="request_too_large")


def file_too_large(limit: int) -> APIError:
    return APIError(413, f"The file is larger than this server accepts ({limit} bytes; "
                    "STEER_MAX_FILE_BYTES).", param="file", code="file_too_large")


# Room for the multipart framing around an upload's bytes (boundaries, part headers, purpose).
UPLOAD_FRAMING_BYTES = 64 * 1024
UPLOAD_PATH = "/v1/files"


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413: at once when Content-Length says so, else
    as soon as the bytes received pass the limit. The body is read here, in full, before
    the app sees it, so the app never parses a partial or oversized body. A file upload
    (`POST /v1/files`) may carry up to `max_file_bytes` of file instead."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_file_bytes: int | None = None,
                 api_key: str | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self.api_key = api_key

    def _authorized(self, scope: Scope) -> bool:
        """Only a request with the server's key may send an upload's size: FastAPI reads a
        multipart body before the route's auth runs, so an anonymous client could otherwise
        make the server buffer `max_file_bytes` just to be told 401."""
        if self.api_key is None:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token,
                                                                      self.api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit, refusal = self.max_bytes, _too_large(self.max_bytes)
        if self.max_file_bytes is not None and scope["method"] == "POST" \
                and scope["path"].rstrip("/") == UPLOAD_PATH and self._authorized(scope):
            limit = self.max_file_bytes + UPLOAD_FRAMING_BYTES
            refusal = file_too_large(self.max_file_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await refusal.response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await refusal.response()(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def check_messages(contents: Sequence[str], max_messages: int, max_chars: int) -> None:
    """A chat's size: the count of messages, and their text in total."""
    if len(contents) > max_messages:
        raise bad_request(f"at most {max_messages} messages are accepted on this server; "
                          f"got {len(contents)}", "messages", code="too_many_messages")
    _check_chars(contents, max_chars, "messages.{}.content")


def check_prompts(prompts: Sequence[str], max_prompts: int, max_chars: int) -> None:
    """A completion's size: the count of prompts, and their text in total."""
    if len(prompts) > max_prompts:
        raise bad_request(f"at most {max_prompts} prompts are accepted in one request on this "
                          f"server; got {len(prompts)}", "prompt", code="too_many_prompts")
    _check_chars(prompts, max_chars, "prompt")


def _check_chars(texts: Sequence[str], max_chars: int, param: str) -> None:
    total = 0
    for i, text in enumerate(texts):
        total += len(text)
        if total > max_chars:
            raise bad_request(
                f"the prompt text is longer than this server accepts ({max_chars} characters "
                "in one request)", param.format(i), code="prompt_too_large",
            )


def request_key(user: str | None) -> str | None:
    """Who a request counts against for per-key limits. The server has one API key, shared
    by its clients, so the end user a request names (`user`, as OpenAI asks clients to send)
    tells them apart; anonymous requests share the server-wide limits only."""
    return "user:" + user if user else None
