"""Hostile clients against the HTTP layer: oversized bodies and requests, floods of amplified
work, slow readers, disconnects before a stream starts, and failures inside a stream. Each
test reproduces one finding of issue 9 with the app in-process over the FakeEngine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from steer.engine import Prompt, SamplingParams
from steer.search import Trace
from steer.service.app import create_app
from steer.service.settings import Settings
from steer.service.traces import TraceStore
from tests.asgi import running
from tests.fakes import FakeEngine
from tests.integration.support import error_of

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "q"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": MSG, **fields}


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture
def settings() -> Settings:
    return Settings(max_concurrent_requests=8, max_queued_requests=4, max_tokens_cap=4096,
                    max_body_bytes=65536, max_messages=8, max_prompt_chars=2000,
                    max_prompts=4, max_inflight_tokens=40_000, sse_send_timeout_s=0.5)


@pytest.fixture
async def client(fake_engine: FakeEngine, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(settings, fake_engine)) as c:
        yield c


# -- request sizes ----------------------------------------------------------------------------


async def test_an_oversized_body_is_413_before_it_is_parsed(client: httpx.AsyncClient) -> None:
    huge = json.dumps(chat(messages=[{"role": "user", "content": "x" * 2_000_000}]))
    start = time.perf_counter()
    r = await client.post(CHAT, content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert error_of(r)["code"] == "request_too_large"
    assert time.perf_counter() - start < 1.0


async def test_an_oversized_chunked_body_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
        yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 4096
        yield b'"}]}'

    r = await client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert error_of(r)["code"] == "request_too_large"


@pytest.mark.parametrize(("route", "body", "param"), [
    (CHAT, chat(messages=MSG * 9), "messages"),
    (CHAT, chat(messages=[{"role": "user", "content": "y" * 2001}]), "messages.0.content"),
    (CHAT, chat(messages=[{"role": "user", "content": "y" * 1500}] * 2), "messages.1.content"),
    (COMPLETIONS, {"model": "fake-model", "prompt": ["p"] * 5}, "prompt"),
    (COMPLETIONS, {"model": "fake-model", "prompt": "z" * 2001}, "prompt"),
])
async def test_request_caps_are_400s_naming_the_field(
    client: httpx.AsyncClient, route: str, body: dict[str, Any], param: str
) -> None:
    r = await client.post(route, json=body)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param


# -- admission weighs work --------------------------------------------------------------------


async def test_a_flood_of_amplified_requests_gets_429_while_plain_ones_get_through(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.hold = asyncio.Event()
    heavy = chat(max_tokens=4096, steering={"strategy": "best_of_n", "options": {"n": 4}})
    flood = [asyncio.create_task(client.post(CHAT, json=heavy)) for _ in range(4)]
    admission = client.app.state.admission  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while sum(t.done() for t in flood) + admission.in_flight < 4:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    refused = [t.result() for t in flood if t.done()]
    assert refused and all(r.status_code == 429 for r in refused)
    assert {error_of(r)["code"] for r in refused} == {"server_busy"}
    assert all(r.headers["retry-after"] for r in refused)
    # A plain request still fits beside the admitted heavy ones.
    plain = asyncio.create_task(client.post(CHAT, json=chat(max_tokens=16)))
    while admission.in_flight < len(flood) - len(refused) + 1:
        await asyncio.sleep(0.01)
    fake_engine.hold.set()
    assert (await plain).status_code == 200
    statuses = [r.status_code for r in await asyncio.gather(*flood)]
    assert statuses.count(200) == len(flood) - len(refused)
    assert admission.in_flight == 0 and admission.work == 0


async def test_a_multi_prompt_completion_counts_as_that_much_work(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.hold = asyncio.Event()
    admission = client.app.state.admission  # type: ignore[attr-defined]
    task = asyncio.create_task(client.post(COMPLETIONS, json={
        "model": "fake-model", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 100}))
    while admission.in_flight < 1:
        await asyncio.sleep(0.01)
    assert admission.work >= 3 * 2 * 100
    fake_engine.hold.set()
    assert (await task).status_code == 200
    assert admission.work == 0


async def test_one_api_key_cannot_take_the_whole_server(
    fake_engine: FakeEngine, settings: Settings
) -> None:
    fake_engine.hold = asyncio.Event()
    app = create_app(settings.model_copy(update={"max_key_share": 0.25}), fake_engine)
    async with running(app) as c:
        body = chat(max_tokens=4000)
        mine = [asyncio.create_task(c.post(CHAT, json={**body, "user": "alice"}))
                for _ in range(4)]
        while sum(t.done() for t in mine) + app.state.admission.in_flight < 4:
            await asyncio.sleep(0.01)
        refused = [t.result() for t in mine if t.done()]
        assert refused and {error_of(r)["code"] for r in refused} == {"key_limit"}
        other = asyncio.create_task(c.post(CHAT, json={**body, "user": "bob"}))
        while app.state.admission.in_flight < 4 - len(refused) + 1:
            await asyncio.sleep(0.01)
        fake_engine.hold.set()
        assert (await other).status_code == 200
        await asyncio.gather(*mine)


# -- streams: slow readers, early disconnects, failures after the headers ---------------------


async def _call_app(app: Any, body: dict[str, Any], receive: Any, send: Any) -> None:
    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": CHAT, "raw_path": CHAT.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 1), "server": ("steer", 80), "state": {},
    }
    sent_body = False

    async def recv() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": raw, "more_body": False}
        message: dict[str, Any] = await receive()
        return message

    await app(scope, recv, send)


async def test_a_slow_reader_releases_its_slot_and_engine_request(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    """A client that stops reading: its socket's buffer fills and every ASGI send blocks."""
    app = client.app  # type: ignore[attr-defined]
    admission = app.state.admission
    fake_engine.default_answer = " ".join(["word"] * 200)
    sends = 0
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()  # the client never says it left: it just does not read
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal sends
        sends += 1
        if sends > 3:
            await never.wait()

    task = asyncio.create_task(_call_app(app, chat(stream=True), receive, send))
    deadline = time.monotonic() + 10
    while admission.in_flight == 0 and not task.done():
        await asyncio.sleep(0.01)
    while admission.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert admission.in_flight == 0, "the stalled stream still holds its admission slot"
    assert fake_engine.aborted, "the stalled stream's engine request was never closed"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_disconnect_before_the_stream_starts_releases_the_slot(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    app = client.app  # type: ignore[attr-defined]
    admission = app.state.admission

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise OSError("the client has gone")  # as uvicorn reports a closed socket

    with pytest.raises(OSError):
        await _call_app(app, chat(stream=True), receive, send)
    await asyncio.sleep(0.05)
    assert admission.in_flight == 0 and admission.work == 0


def _events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("steering", [
    None, {"strategy": "none"}, {"strategy": "best_of_n", "options": {"n": 2}},
])
async def test_a_failure_inside_a_stream_ends_with_an_error_event_and_done(
    client: httpx.AsyncClient, fake_engine: FakeEngine, steering: dict[str, Any] | None
) -> None:
    calls = 0

    def respond(prompt: Prompt, params: SamplingParams) -> str:
        nonlocal calls
        calls += 1
        if calls > (1 if steering is None else 0):
            raise RuntimeError("a bug inside the engine adapter")
        return "fine"

    fake_engine.respond = respond
    fake_engine.default_answer = "a b"
    body = chat(stream=True, n=2, temperature=1.0) if steering is None else chat(
        stream=True, steering=steering)
    r = await client.post(CHAT, json=body)
    assert r.status_code in (200, 500)
    if r.status_code == 200:
        events = _events(r.text)
        assert events[-1] == "[DONE]", events
        error = json.loads(events[-2])["error"]
        assert error["type"] == "internal_error" and error["message"]
    else:
        assert error_of(r)["type"] == "internal_error"


async def test_a_critic_failure_is_an_openai_error_on_plain_and_streamed_requests(
    client: httpx.AsyncClient,
) -> None:
    from steer.critics import register_python_critic

    def broken(question: str, candidate: str) -> float:
        raise ZeroDivisionError("plugin bug")

    register_python_critic("broken_plugin", broken)
    steering = {"strategy": "best_of_n", "options": {"n": 2},
                "critic": {"name": "python", "function": "broken_plugin"}}
    r = await client.post(CHAT, json=chat(steering=steering))
    assert r.status_code == 500
    assert error_of(r)["code"] == "critic_failed"
    r = await client.post(CHAT, json=chat(steering=steering, stream=True))
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "critic_failed"
    # A critic the client named wrongly is the client's error.
    steering["critic"] = {"name": "python", "function": "no_such_function"}
    r = await client.post(CHAT, json=chat(steering=steering))
    assert r.status_code == 400
    assert error_of(r)["param"] == "steering.critic.function"


# -- the trace store --------------------------------------------------------------------------


def test_the_trace_store_is_bounded_in_bytes() -> None:
    store = TraceStore(max_bytes=100_000, ttl_s=60)
    for i in range(50):
        trace = Trace("tot")
        trace.add("thought", "x" * 10_000)
        store.put(f"t{i}", trace)
    assert store.size_bytes <= 100_000
    assert store.get("t49") is not None and store.get("t0") is None
    big = Trace("tot")
    big.add("thought", "y" * 200_000)
    store.put("big", big)  # too big to keep at all: dropped, the others stay
    assert store.get("big") is None and store.get("t49") is not None


# -- whose limit ran out ----------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "status", "param", "code"), [
    ({}, 504, None, "server_timeout"),  # the server's cap: not the client's to raise
    ({"budget": {"timeout_s": 0.1}}, 400, "steering.budget.timeout_s", "budget_exhausted"),
])
async def test_a_timeout_before_any_answer_names_whose_limit_it_was(
    fake_engine: FakeEngine, settings: Settings, extra: dict[str, Any], status: int,
    param: str | None, code: str,
) -> None:
    fake_engine.hold = asyncio.Event()  # the engine never answers
    app = create_app(settings.model_copy(update={"steer_timeout_s": 0.2}), fake_engine)
    async with running(app) as c:
        r = await c.post(CHAT, json=chat(steering={
            "strategy": "best_of_n", "options": {"n": 2}, **extra}))
        assert r.status_code == status, r.text
        error = error_of(r)
        assert (error["param"], error["code"]) == (param, code)
        assert "timeout_s" in str(error["message"])
        fake_engine.hold.set()

