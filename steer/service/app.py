"""The FastAPI app factory and its thin routes.

`create_app(settings, engine)` wires settings, engine, admission, metrics and errors. The
engine is loaded in the background at startup, so `/health` can answer 503 while it loads.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from steer import __version__
from steer.engine import AdapterRef, Engine, EngineNotReady, UnknownAdapter
from steer.engine.adapters import AdapterRegistry
from steer.search import Limits, Steerer, SteeringInvalid, TemplateLibrary
from steer.service.adapters import (
    AdapterAdmin,
    AdapterLeaseMiddleware,
    RequestAdapters,
    admin_router,
    build_registry,
)
from steer.service.admission import Admission, WorkLimits
from steer.service.errors import APIError, install_error_handlers
from steer.service.files_api import files_router
from steer.service.fine_tuning import FineTuning, fine_tuning_router
from steer.service.limits import BodyLimitMiddleware
from steer.service.metrics import Metrics, MetricsMiddleware
from steer.service.openapi import document as openapi_document
from steer.service.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelDeleted,
    ModelList,
)
from steer.service.recorder import Recorder
from steer.service.serving import Serving
from steer.service.settings import Settings
from steer.service.steering import SteeredChat
from steer.service.stored import stored_router
from steer.service.traces import StoredTrace, TraceStore
from steer.service.trained import TrainedAdapters
from steer.store import Database
from steer.store.completions import find_trace

logger = logging.getLogger(__name__)


class EngineState:
    """Tracks the background engine start: loading, ready, or failed with a reason.
    `after_start` (the startup adapters) runs before the engine counts as ready."""

    def __init__(
        self, engine: Engine, after_start: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.engine = engine
        self.after_start = after_start
        self.ready = False
        self.ready_event = asyncio.Event()
        self.failure: str | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.engine.start()
            if self.after_start is not None:
                await self.after_start()
            self.ready = True
            self.ready_event.set()
        except Exception as exc:
            self.failure = f"engine failed to start: {exc!r}"
            logger.exception("engine failed to start")

    def require(self) -> None:
        if not self.ready:
            raise EngineNotReady(self.failure or "the model is still loading")


def create_app(
    settings: Settings, engine: Engine, adapters: AdapterRegistry | None = None
) -> FastAPI:
    metrics = Metrics()
    admission = Admission(
        settings.max_concurrent_requests, settings.max_queued_requests, metrics,
        WorkLimits(capacity=settings.max_inflight_tokens, light_work=settings.max_model_len,
                   heavy_share=settings.max_heavy_share, key_share=settings.max_key_share),
    )
    registry = adapters or build_registry(settings, engine, model_dir=None)
    request_adapters = RequestAdapters(registry, metrics)
    admin = AdapterAdmin(registry, metrics)
    async def after_start() -> None:
        serving.load_tool_parsers()  # needs the loaded engine's tokenizer
        await admin.load_startup(settings.lora_modules)

    state = EngineState(engine, after_start=after_start)
    db = Database(settings.db_url())
    recorder = Recorder(db, settings.store, metrics)
    serving = Serving(engine, settings, metrics, admission, request_adapters, recorder)
    templates = TemplateLibrary(settings.templates_dir)
    steerer = Steerer(
        engine,
        Limits(settings.steer_max_model_calls, settings.steer_max_total_tokens,
               settings.steer_timeout_s),
        templates,
        resolve_adapter=lambda name: _adapter_by_name(request_adapters, name),
    )
    traces = TraceStore(settings.trace_store_bytes, settings.trace_ttl_s,
                        max_traces=settings.trace_store_size or 1)
    chats = SteeredChat(serving, steerer, metrics, admission, traces)
    trained = TrainedAdapters(db, registry, metrics, lambda: engine.model_name,
                              settings.adapter_sync_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await db.start()  # migrations first: a schema the code can't use must stop the start
        recorder.start()
        state.task = asyncio.create_task(state.start())
        syncing = asyncio.create_task(trained.run(state.ready_event))
        try:
            yield
        finally:
            # subtle: a task cancelled mid-query still closes its connection; disposing the
            # database under it leaves that close waiting forever (the event loop never
            # ends), so every task is awaited before anything it uses is closed.
            syncing.cancel()
            state.task.cancel()
            await asyncio.gather(syncing, state.task, return_exceptions=True)
            try:
                await registry.close()
                await engine.shutdown()
            finally:
                try:
                    await recorder.close()  # flush stored completions before the store closes
                finally:
                    await db.close()

    app = FastAPI(title="Steer", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine_state = state
    app.state.admission = admission
    app.state.metrics = metrics
    app.state.db = db
    app.state.recorder = recorder
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(AdapterLeaseMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       max_file_bytes=settings.max_file_bytes,
                       api_key=settings.api_key.get_secret_value() if settings.api_key else None)
    install_error_handlers(app)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]

    def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        expected = settings.api_key.get_secret_value()
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(),
                                                                     expected.encode()):
            raise APIError(
                401, "Incorrect API key provided.", type="invalid_request_error",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )

    def ready() -> None:
        state.require()

    generation = [Depends(authorized), Depends(ready)]
    app.include_router(admin_router(admin, settings, ready))
    app.include_router(files_router(db, settings, authorized))
    app.include_router(fine_tuning_router(FineTuning(db, settings, lambda: engine.model_name)),
                       dependencies=[Depends(authorized)])
    app.include_router(stored_router(db, [Depends(authorized)], settings.max_file_bytes))

    @app.post("/v1/chat/completions", dependencies=generation)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        return await chats.handle(body, request)

    @app.post("/v1/completions", dependencies=generation)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await chats.handle_completion(body, request)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> ModelList:
        root = engine.model_name  # the served name: --model may be a path on this server
        return ModelList(data=[ModelCard(
            id=engine.model_name, created=0, root=root, max_model_len=engine.max_model_len
        ), *trained.annotate(request_adapters.cards(engine.model_name))])

    @app.delete("/v1/models/{model:path}", dependencies=[Depends(authorized)])
    async def delete_model(model: str) -> ModelDeleted:
        await trained.delete(model)  # (a model name may hold a '/': the hub id of its base)
        return ModelDeleted(id=model, deleted=True)

    @app.get("/v1/steering/templates", dependencies=[Depends(authorized)])
    async def list_templates() -> dict[str, Any]:
        return {"object": "list", "data": templates.describe()}

    @app.get("/v1/steering/traces/{trace_id}", dependencies=[Depends(authorized)])
    async def get_trace(trace_id: str, format: str = "json") -> Response:
        trace = traces.get(trace_id)
        if trace is None and (kept := await find_trace(db, trace_id)) is not None:
            trace = StoredTrace(kept)  # a stored completion's, after memory forgot it
        if trace is None:
            raise APIError(404, f"no stored trace '{trace_id}' (traces expire after "
                           f"{settings.trace_ttl_s:.0f}s)", type="not_found_error",
                           param="trace_id", code="trace_not_found")
        if format == "dot":
            return Response(trace.to_dot(), media_type="text/vnd.graphviz")
        if format != "json":
            raise APIError(400, "format must be json or dot", param="format")
        return JSONResponse({"id": trace_id, **trace.to_dict()})

    @app.get("/health")
    async def health() -> JSONResponse:
        if admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state.ready:
            status = "failed" if state.failure else "loading"
            return JSONResponse({"status": status, "detail": state.failure}, status_code=503)
        h = await engine.health()
        metrics.engine_up.set(1 if h.ok else 0)
        if not h.ok:
            return JSONResponse({"status": "unhealthy", "detail": h.detail}, status_code=503)
        return JSONResponse({"status": "ok", "model": engine.model_name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        if state.ready:
            h = await engine.health()
            metrics.engine_up.set(1 if h.ok else 0)
            metrics.engine_running.set(h.running_requests)
        else:
            metrics.engine_up.set(0)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _adapter_by_name(adapters: RequestAdapters, name: str) -> AdapterRef:
    try:
        return adapters.resolve(name)  # held until the response is finished
    except UnknownAdapter as exc:
        known = ", ".join(adapters.names()) or "none loaded"
        raise SteeringInvalid(f"unknown adapter '{name}'; adapters: {known}",
                              "steering.critic.adapter") from exc
