"""Shared fixtures: the scripted engine and the app in-process over httpx.ASGITransport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from steer.service.app import create_app
from steer.service.settings import Settings
from tests.asgi import running
from tests.fakes import FakeEngine


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def settings() -> Settings:
    return Settings(max_n=4, max_tokens_cap=32, max_concurrent_requests=2, max_queued_requests=1)


@pytest.fixture
async def client(fake_engine: FakeEngine, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(settings, fake_engine)) as c:
        yield c



@pytest.fixture(scope="session", autouse=True)
def _session_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The same for servers a module or session fixture starts (those start before any
    per-test fixture runs)."""
    db = tmp_path_factory.mktemp("session-store") / "steer.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEER_DATABASE_URL", f"sqlite+aiosqlite:///{db}")
        yield


@pytest.fixture(autouse=True)
def _private_database(tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test's app (and any server it starts) gets its own SQLite store, never the
    user's ~/.cache/steer/steer.db."""
    db = tmp_path_factory.mktemp("store") / "steer.db"
    monkeypatch.setenv("STEER_DATABASE_URL", f"sqlite+aiosqlite:///{db}")
