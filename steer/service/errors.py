"""The one table from exception to HTTP status and OpenAI error shape.

Inner layers raise their own exceptions (`steer.engine.base`); the service raises `APIError`
for what only HTTP knows (auth, admission, unknown model). Everything leaves as
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from steer.critics import CriticError
from steer.engine import (
    AdapterConflict,
    EngineDead,
    EngineError,
    EngineNotReady,
    EngineRequestError,
    InvalidAdapter,
    PromptTooLong,
    UnknownAdapter,
)
from steer.search import BudgetExhausted, SearchError, SteeringInvalid
from steer.service.fields import error_param, refusal_reason
from steer.service.protocol import ErrorBody, ErrorResponse
from steer.store import Conflict, NotFound, StoreError
from steer.store.files import FileInUse
from steer.training.formats import FormatError
from steer.training.graders import GraderError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client should see as is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.body().model_dump(), status_code=self.status, headers=self.headers
        )


def bad_request(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_engine_error(
    exc: EngineError, prompt_param: str = "messages", max_tokens_param: str = "max_tokens"
) -> APIError:
    """Translate an engine exception (the table)."""
    if isinstance(exc, PromptTooLong):
        param = prompt_param if exc.prompt_alone_too_long else max_tokens_param
        return APIError(400, str(exc), param=param, code="context_length_exceeded")
    if isinstance(exc, EngineNotReady):
        return APIError(
            503, f"The model is not ready: {exc}", type="service_unavailable",
            code="engine_not_ready", headers={"Retry-After": "5"},
        )
    if isinstance(exc, EngineDead):
        return APIError(
            503, f"The engine is unavailable: {exc}", type="service_unavailable",
            code="engine_dead",
        )
    if isinstance(exc, UnknownAdapter):
        return APIError(404, str(exc), type="not_found_error", param="model",
                        code="model_not_found")
    if isinstance(exc, InvalidAdapter):
        return APIError(400, str(exc), param=f"lora_{exc.field}", code=exc.reason)
    if isinstance(exc, AdapterConflict):
        return APIError(409, str(exc), type="conflict_error", param="lora_name",
                        code=exc.reason)
    if isinstance(exc, EngineRequestError):
        return APIError(400, str(exc), param=exc.param)
    return APIError(500, f"engine error: {exc}", type="internal_error")


def from_adapter_error(exc: EngineError) -> APIError:
    """The table for the runtime adapter API, where an unknown name is `lora_name`'s."""
    if isinstance(exc, UnknownAdapter):
        return APIError(404, str(exc), type="not_found_error", param="lora_name",
                        code="adapter_not_found")
    return from_engine_error(exc)


# The path parameter that names each kind of stored thing (for a 404's `param`).
NOT_FOUND_PARAMS = {"file": "file_id"}


def _ident(kind: str) -> str:
    """A stored thing's name as an identifier: "fine-tuning job" -> "fine_tuning_job"."""
    return kind.replace(" ", "_").replace("-", "_")


def from_store_error(exc: StoreError) -> APIError:
    """A store exception no route translated itself: an unknown id (404), a row in use (409)."""
    if isinstance(exc, NotFound):
        return APIError(404, str(exc), type="not_found_error",
                        param=NOT_FOUND_PARAMS.get(exc.kind, f"{_ident(exc.kind)}_id"),
                        code=f"{_ident(exc.kind)}_not_found")
    if isinstance(exc, FileInUse):
        return APIError(409, str(exc), type="conflict_error", param="file_id",
                        code="file_in_use")
    if isinstance(exc, Conflict):
        return APIError(409, str(exc), type="conflict_error", code="conflict")
    return internal_error(exc)


def from_training_error(exc: FormatError | GraderError) -> APIError:
    """A training file's bad line (`file`, or `purpose`) or a grader's bad field."""
    if isinstance(exc, FormatError):
        return bad_request(str(exc), exc.param, code="invalid_file_format")
    return bad_request(str(exc), exc.param, code="invalid_grader")


_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = {"body", "query", "path", "str", "int", "float", "bool", "list", "dict", "none"}


def from_search_error(exc: Exception, request_id: str | None = None) -> APIError:
    """Translate a search-layer, critic or engine exception raised while steering;
    anything else is our bug: a 500, logged with the request id."""
    if isinstance(exc, SteeringInvalid):
        return bad_request(str(exc), exc.param)
    if isinstance(exc, BudgetExhausted):
        return from_budget_exhausted(exc)
    if isinstance(exc, CriticError):
        if exc.param is not None:  # the client's spec named something that can't work
            return bad_request(str(exc), exc.param, code="invalid_critic")
        logger.error("critic failed (request %s): %s", request_id, exc)
        return APIError(500, f"The critic failed: {exc}", type="internal_error",
                        code="critic_failed")
    if isinstance(exc, EngineError):
        return from_engine_error(exc)
    return internal_error(exc, request_id)


def from_budget_exhausted(exc: BudgetExhausted) -> APIError:
    """The request's own budget ran out before any answer: the client may raise it (400).
    The server's cap ran out: the client can't raise it, so say which one, with a 5xx."""
    limit, source = exc.limit, exc.source
    if source == "server":
        if limit == "timeout_s":
            return APIError(504, f"{exc}. This is the server's limit per steered request "
                            "(STEER_STEER_TIMEOUT_S); ask for a smaller search.",
                            type="timeout_error", code="server_timeout")
        return APIError(503, f"{exc}. This is the server's limit per steered request "
                        f"(STEER_STEER_{str(limit).upper()}); ask for a smaller search.",
                        type="service_unavailable", code="server_limit_reached")
    if source == "preset":  # the budget reasoning_effort chose, not a field the client sent
        return APIError(400, f"{exc}. Ask for a higher reasoning_effort, or set "
                        "steering.budget yourself.", param="reasoning_effort",
                        code="budget_exhausted")
    param = f"steering.budget.{limit}" if limit else "steering.budget"
    return APIError(400, f"{exc}. Raise the budget or ask for less.", param=param,
                    code="budget_exhausted")


def internal_error(exc: BaseException, request_id: str | None = None) -> APIError:
    """A failure that is our bug, not the client's: logged with its traceback and an id the
    client can quote."""
    rid = request_id or f"err-{uuid.uuid4().hex[:12]}"
    logger.error("internal error in request %s", rid, exc_info=exc)
    return APIError(500, f"Internal server error ({type(exc).__name__}); request id {rid}.",
                    type="internal_error", code="internal_error")


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    # Keep field names and list indexes; drop pydantic's union-member tags
    # ("constrained-str", "list[TextPart]", "function-after[...]", "TextPart").
    parts = [
        str(p) for p in loc
        if isinstance(p, int) or (isinstance(p, str) and _FIELD.match(p) and p not in _TYPE_TAGS)
    ]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    # With unions pydantic reports one error per member; the deepest is the most specific.
    # An unknown field inside a union member usually means "wrong member": prefer the others,
    # except an OpenAI field refused on purpose (its reason is the useful answer).
    first: dict[str, Any] = max(
        errors,
        key=lambda e: (refusal_reason(_loc_to_param(tuple(e.get("loc", ()))),
                                      e.get("type")) is not None,
                       e.get("type") != "extra_forbidden",
                       len(_loc_to_param(tuple(e.get("loc", ()))) or "")),
        default={},
    )
    if any(e.get("type") == "json_invalid" for e in errors):
        first = next(e for e in errors if e.get("type") == "json_invalid")
    if first.get("type") == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request: "
            f"{first.get('ctx', {}).get('error', 'invalid JSON')}",
            param=None,
            code="invalid_json",
        )
    if first.get("type") == "extra_forbidden":
        param = _loc_to_param(tuple(first.get("loc", ())))
        reason = refusal_reason(param, "extra_forbidden")
        if reason is not None:
            return bad_request(f"{param} is not supported: {reason}", param=param,
                               code="unsupported_parameter")
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param)
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return bad_request("The request body must be a JSON object.", param=None)
    param = error_param(_loc_to_param(tuple(first.get("loc", ()))))
    msg = str(first.get("msg", "invalid value"))
    reason = refusal_reason(param, first.get("type"))
    if reason is not None:
        msg = f"{msg}: {reason}"
    message = f"Invalid value for '{param}': {msg}" if param else msg
    return bad_request(message, param=param,
                       code="unsupported_value" if reason is not None else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return from_engine_error(exc).response()

    @app.exception_handler(CriticError)
    async def _critic(_: Request, exc: CriticError) -> JSONResponse:
        return from_search_error(exc).response()

    @app.exception_handler(SearchError)
    async def _search(_: Request, exc: SearchError) -> JSONResponse:
        return from_search_error(exc).response()

    @app.exception_handler(StoreError)
    async def _store(_: Request, exc: StoreError) -> JSONResponse:
        return from_store_error(exc).response()

    @app.exception_handler(FormatError)
    @app.exception_handler(GraderError)
    async def _training(_: Request, exc: FormatError | GraderError) -> JSONResponse:
        return from_training_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        # subtle: keep Starlette's headers (a 405's Allow, which RFC 9110 requires)
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:  # Starlette's Allow names the first route on the path only
            headers = {**(headers or {}), "Allow": _allowed(request)}
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return internal_error(exc).response()


def _allowed(request: Request) -> str:
    """Every method some route on this path answers (GET and POST /v1/chat/completions are
    two routes)."""
    methods = {m for route in request.app.router.routes
               if route.matches(request.scope)[0] != Match.NONE
               for m in getattr(route, "methods", None) or ()}
    return ", ".join(sorted(methods))


def sse_error(err: APIError) -> str:
    """An error inside an already-started stream, as vLLM and OpenAI send it."""
    return json.dumps(err.body().model_dump())
