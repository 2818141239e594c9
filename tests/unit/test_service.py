"""Auth, admission (429), readiness (503 while loading), health, metrics, cancellation."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from steer.service.app import create_app
from steer.service.errors import APIError
from steer.service.serving import cancel_on_disconnect
from steer.service.settings import Settings
from tests.asgi import asgi_client
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "q"}]}


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


async def test_api_key_required_when_configured(fake_engine: FakeEngine) -> None:
    app = create_app(Settings(api_key=SecretStr("sekret")), fake_engine)
    async with LifespanManager(app) as m, asgi_client(m.app) as c:
        await app.state.engine_state.ready_event.wait()
        r = await c.post(CHAT, json=BODY)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = await c.post(CHAT, json=BODY, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert (await c.get("/v1/models")).status_code == 401
        r = await c.post(CHAT, json=BODY, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
        assert (await c.get("/health")).status_code == 200  # probes need no key


async def test_health_is_503_while_loading(fake_engine: FakeEngine) -> None:
    fake_engine.release_start = asyncio.Event()
    app = create_app(Settings(), fake_engine)
    async with LifespanManager(app) as m, asgi_client(m.app) as c:
        r = await c.get("/health")
        assert (r.status_code, r.json()["status"]) == (503, "loading")
        r = await c.post(CHAT, json=BODY)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "engine_not_ready"
        assert r.headers["retry-after"]
        fake_engine.release_start.set()
        await app.state.engine_state.ready_event.wait()
        assert (await c.get("/health")).status_code == 200


async def test_health_is_503_when_engine_stops(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    assert (await client.get("/health")).status_code == 200
    fake_engine.alive = False
    r = await client.get("/health")
    assert (r.status_code, r.json()["status"]) == (503, "unhealthy")
    r = await client.post(CHAT, json=BODY)
    assert r.status_code == 503


async def test_queue_full_is_429_with_retry_after(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    # conftest: 2 concurrent, 1 queued
    fake_engine.hold = asyncio.Event()
    held = [asyncio.create_task(client.post(CHAT, json=BODY)) for _ in range(3)]
    admission = client.app.state.admission  # type: ignore[attr-defined]
    while admission.in_flight < 3:
        await asyncio.sleep(0.01)
    r = await client.post(CHAT, json=BODY)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    fake_engine.hold.set()
    assert [t.status_code for t in await asyncio.gather(*held)] == [200, 200, 200]
    assert admission.in_flight == 0


async def test_draining_refuses_new_requests(client: httpx.AsyncClient) -> None:
    client.app.state.admission.start_draining()  # type: ignore[attr-defined]
    r = await client.post(CHAT, json=BODY)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "draining"
    assert (await client.get("/health")).json()["status"] == "draining"


async def test_metrics_move(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    fake_engine.enqueue("a b c")
    await client.post(CHAT, json=BODY)
    await client.post(CHAT, json={**BODY, "n": 0})
    text = (await client.get("/metrics")).text
    assert metric(text, "steer_requests_total", route=CHAT, status="200") == 1
    assert metric(text, "steer_requests_total", route=CHAT, status="400") == 1
    assert metric(text, "steer_prompt_tokens_total", route=CHAT) == 1
    assert metric(text, "steer_completion_tokens_total", route=CHAT) == 3
    assert metric(text, "steer_request_duration_seconds_count", route=CHAT) == 2
    assert metric(text, "steer_time_to_first_token_seconds_count", route=CHAT) == 1
    assert metric(text, "steer_requests_in_flight") == 0
    assert metric(text, "steer_engine_up") == 1


async def test_cancel_on_disconnect_aborts_generation(fake_engine: FakeEngine) -> None:
    disconnect = asyncio.Event()

    class FakeRequest:
        async def receive(self) -> dict[str, str]:
            await disconnect.wait()
            return {"type": "http.disconnect"}

    aborted: list[bool] = []
    never = asyncio.Event()

    async def work() -> str:
        await never.wait()
        return "unreachable"

    async def on_cancel() -> None:
        aborted.append(True)

    task = asyncio.create_task(cancel_on_disconnect(FakeRequest(), work, on_cancel))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    disconnect.set()
    with pytest.raises(APIError, match="client disconnected"):
        await task
    assert aborted == [True]
