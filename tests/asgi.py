"""The app in-process: an httpx client over ASGI, and the app started with its engine ready."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from asgi_lifespan import LifespanManager


def asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://steer")


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Start `app` (its lifespan), wait until it has seen the engine start, yield a client;
    `client.app` is the app, for tests that look at its state."""
    async with LifespanManager(app) as manager:
        # The engine starts in a background task; wait until the app has seen it.
        await app.state.engine_state.ready_event.wait()
        async with asgi_client(manager.app) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client
