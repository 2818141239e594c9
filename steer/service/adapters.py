"""LoRA adapters over HTTP: vLLM's runtime API, model cards, metrics, per-request leases.

Owns: `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` (vLLM's routes and
bodies; `"replace": true`, or vLLM's `"load_inplace": true`, replaces) behind the admin key;
the `/v1/models` cards of adapters; and holding every adapter a request resolved until its
response is finished, streams included (`AdapterLeaseMiddleware`), so an unload waits for the
requests that use the adapter. The registry, its rules and the file checks live in
`steer.engine.adapters` and `steer.engine.lora_files`.

Admin key: `STEER_ADMIN_KEY`, sent as `Authorization: Bearer <key>`. Unset: the runtime API
answers 403 saying it is off. Startup adapters (`--lora NAME=PATH`) need no key.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from steer.engine import AdapterRef, Engine, EngineError
from steer.engine.adapters import AdapterRegistry, Lease
from steer.engine.lora_files import ModelModules, check_name, inspect_adapter
from steer.service.errors import APIError, from_adapter_error
from steer.service.metrics import Metrics
from steer.service.protocol import LoadLoraAdapterRequest, ModelCard, UnloadLoraAdapterRequest
from steer.service.settings import Settings

logger = logging.getLogger(__name__)

LOAD_ROUTE, UNLOAD_ROUTE = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"

# The leases of the HTTP request being served; None outside a request.
_request_leases: ContextVar[list[Lease] | None] = ContextVar("steer_adapter_leases",
                                                            default=None)


class AdapterLeaseMiddleware:
    """Releases every adapter lease a request took once its response is fully sent (or the
    client is gone). A pure ASGI middleware, so it sees the end of a streamed body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        leases: list[Lease] = []
        token = _request_leases.set(leases)
        try:
            await self.app(scope, receive, send)
        finally:
            _request_leases.reset(token)
            for lease in leases:
                lease.release()


class RequestAdapters:
    """Name -> `AdapterRef` for the request being served, holding the adapter until the
    response is finished. Unknown names raise `UnknownAdapter` (404 listing what exists)."""

    def __init__(self, registry: AdapterRegistry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics

    def resolve(self, name: str) -> AdapterRef:
        leases = _request_leases.get()
        if leases is None:  # not inside a request (a script, a test): nothing to hold
            ref = self.registry.resolve(name)
        else:
            lease = self.registry.lease(name)
            leases.append(lease)
            ref = lease.ref
        self.metrics.adapter_requests.labels(name).inc()
        return ref

    def names(self) -> list[str]:
        return self.registry.names()

    def cards(self, base: str) -> list[ModelCard]:
        # `root` is the adapter's name, not vLLM's path: clients get no server paths.
        return [ModelCard(id=a.ref.name, created=a.created, root=a.ref.name, parent=base)
                for a in self.registry.listing()]


class AdapterAdmin:
    """The runtime API's two operations, with their metrics."""

    def __init__(self, registry: AdapterRegistry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics
        metrics.adapters_resident.set_function(lambda: len(registry.names()))

    async def load(self, body: LoadLoraAdapterRequest) -> str:
        try:
            await self.registry.load(body.lora_name, body.lora_path,
                                     replace=body.replace or body.load_inplace)
        except EngineError as exc:
            self.metrics.adapter_failures.labels("load", _reason(exc)).inc()
            raise from_adapter_error(exc) from exc
        self.metrics.adapter_loads.inc()
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def load_startup(self, modules: Mapping[str, str]) -> None:
        for name, path in modules.items():
            try:
                await self.registry.load(name, path, confined=False)
            except EngineError as exc:
                self.metrics.adapter_failures.labels("load", _reason(exc)).inc()
                raise
            self.metrics.adapter_loads.inc()

    async def unload(self, body: UnloadLoraAdapterRequest) -> str:
        try:
            await self.registry.unload(body.lora_name)
        except EngineError as exc:
            self.metrics.adapter_failures.labels("unload", _reason(exc)).inc()
            raise from_adapter_error(exc) from exc
        self.metrics.adapter_unloads.inc()
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


def build_registry(
    settings: Settings, engine: Engine, model_dir: Path | None, check_startup: bool = False
) -> AdapterRegistry:
    """The registry for `engine`. With the served checkpoint's directory, adapters are checked
    against its weight shapes. `check_startup` validates the `--lora` adapters now (raising
    `InvalidAdapter`); they are loaded into the engine once it has started."""
    model = None
    if model_dir is not None and any(model_dir.glob("*.safetensors")):
        model = ModelModules.from_checkpoint(model_dir)
    elif model_dir is not None:
        logger.warning("no safetensors in %s: adapters are not checked against the model's "
                       "shapes", model_dir)
    if check_startup:
        for name, path in settings.lora_modules.items():
            check_name(name)
            inspect_adapter(Path(path).expanduser(), model, settings.max_lora_rank)
    return AdapterRegistry(
        engine, model=model, max_rank=settings.max_lora_rank, root=settings.adapters_dir(),
        unload_timeout_s=settings.adapter_unload_timeout_s,
    )


def _reason(exc: EngineError) -> str:
    return str(getattr(exc, "reason", type(exc).__name__))


def admin_router(admin: AdapterAdmin, settings: Settings, ready: Callable[[], None]) -> APIRouter:
    """vLLM's runtime LoRA routes. Success is vLLM's plain-text 200, so its scripts work."""

    def admin_key(request: Request) -> None:
        if settings.admin_key is None:
            raise APIError(
                403, "The runtime adapter API is off on this server: no admin key is "
                "configured (set STEER_ADMIN_KEY to turn it on).",
                type="permission_error", code="admin_api_disabled",
            )
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expected = settings.admin_key.get_secret_value().encode()
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), expected):
            raise APIError(
                401, "This endpoint needs the admin key: Authorization: Bearer <admin key>.",
                code="invalid_admin_key", headers={"WWW-Authenticate": "Bearer"},
            )

    router = APIRouter(dependencies=[Depends(admin_key), Depends(ready)])

    @router.post(LOAD_ROUTE, response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> str:
        return await admin.load(body)

    @router.post(UNLOAD_ROUTE, response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> str:
        return await admin.unload(body)

    return router
