"""Stored completions: the store's queries on SQLite, the background writer (never on the
request path, drops when full, flushes on shutdown), and OpenAI's stored-completion routes
driven by the official `openai` client against the app in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from steer.service.app import create_app
from steer.service.metrics import Metrics
from steer.service.protocol import ChatCompletionRequest
from steer.service.recorder import Finished, Recorder, row
from steer.service.settings import Settings
from steer.store import Database, NotFound
from steer.store.completions import (
    NewCompletion,
    delete_completion,
    find_trace,
    get_completion,
    insert_completions,
    list_completions,
    update_metadata,
)
from tests.asgi import running
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
BEST_OF_3 = {"strategy": "best_of_n", "options": {"n": 3},
             "critic": {"name": "exact_answer", "reference": 42}}


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}")
    await database.start()
    yield database
    await database.close()


def record(i: int, model: str = "m", **metadata: str) -> NewCompletion:
    return NewCompletion(
        id=f"chatcmpl-{i}", created=1000 + i, model=model,
        request={"model": model, "messages": [{"role": "user", "content": f"q{i}"}]},
        response={"id": f"chatcmpl-{i}", "created": 1000 + i, "model": model, "choices": []},
        metadata=metadata,
    )


# -- queries ----------------------------------------------------------------------------------


async def test_list_filters_by_model_and_every_metadata_pair(db: Database) -> None:
    await insert_completions(db, [
        record(0, grade="good", team="a"), record(1, grade="good", team="b"),
        record(2, model="other", grade="good", team="a"), record(3, grade="bad", team="a"),
    ])
    page = await list_completions(db, metadata={"grade": "good", "team": "a"})
    assert [r.id for r in page.rows] == ["chatcmpl-0", "chatcmpl-2"]
    page = await list_completions(db, model="m", metadata={"grade": "good"})
    assert [r.id for r in page.rows] == ["chatcmpl-0", "chatcmpl-1"]
    assert (await list_completions(db, metadata={"grade": "none"})).rows == []


async def test_pages_follow_insertion_order_both_ways(db: Database) -> None:
    await insert_completions(db, [record(i) for i in range(5)])
    first = await list_completions(db, limit=2)
    assert [r.id for r in first.rows] == ["chatcmpl-0", "chatcmpl-1"] and first.has_more
    rest = await list_completions(db, limit=2, after="chatcmpl-3")
    assert [r.id for r in rest.rows] == ["chatcmpl-4"] and not rest.has_more
    newest = await list_completions(db, limit=3, order="desc")
    assert [r.id for r in newest.rows] == ["chatcmpl-4", "chatcmpl-3", "chatcmpl-2"]
    older = await list_completions(db, limit=3, order="desc", after="chatcmpl-2")
    assert [r.id for r in older.rows] == ["chatcmpl-1", "chatcmpl-0"] and not older.has_more
    with pytest.raises(NotFound):
        await list_completions(db, after="chatcmpl-nope")


async def test_update_replaces_metadata_and_delete_removes_it(db: Database) -> None:
    await insert_completions(db, [record(0, grade="bad", who="ann")])
    updated = await update_metadata(db, "chatcmpl-0", {"grade": "good"})
    assert {p.key: p.value for p in updated.pairs} == {"grade": "good"}
    assert [r.id for r in (await list_completions(db, metadata={"grade": "good"})).rows] == [
        "chatcmpl-0"]
    assert (await list_completions(db, metadata={"who": "ann"})).rows == []
    cleared = await update_metadata(db, "chatcmpl-0", None)
    assert cleared.pairs == []
    await delete_completion(db, "chatcmpl-0")
    for call in (get_completion(db, "chatcmpl-0"), delete_completion(db, "chatcmpl-0"),
                 update_metadata(db, "chatcmpl-0", {})):
        with pytest.raises(NotFound):
            await call


async def test_find_trace_by_trace_id(db: Database) -> None:
    trace = {"strategy": "best_of_n", "nodes": [], "edges": []}
    item = NewCompletion(**{**record(0).__dict__, "trace_id": "steer-1", "trace": trace})
    await insert_completions(db, [item, record(1)])
    assert await find_trace(db, "steer-1") == trace
    assert await find_trace(db, "steer-2") is None


# -- the writer -------------------------------------------------------------------------------


def finished(i: int, **fields: Any) -> Finished:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})
    return Finished(req, {"id": f"chatcmpl-{i}", "created": 1, "model": "m", "choices": [],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 0,
                                    "total_tokens": 1}})


async def test_full_queue_drops_and_counts_never_waits(db: Database) -> None:
    metrics = Metrics()
    recorder = Recorder(db, "all", metrics, max_queue=2)
    # No writer running: the queue fills; submit still returns at once.
    assert [recorder.submit(finished(i)) for i in range(3)] == [True, True, False]
    assert metrics.registry.get_sample_value("steer_store_dropped_total") == 1
    recorder.start()
    await recorder.close()  # flushes the two queued ones
    assert [r.id for r in (await list_completions(db)).rows] == ["chatcmpl-0", "chatcmpl-1"]
    assert metrics.registry.get_sample_value("steer_store_written_total") == 2


async def test_a_failed_insert_is_counted_and_the_writer_goes_on(db: Database) -> None:
    metrics = Metrics()
    recorder = Recorder(db, "all", metrics)
    recorder.start()
    recorder.submit(finished(0))
    await recorder.queue.join()
    recorder.submit(finished(0))  # the same id again: the insert fails
    await recorder.queue.join()
    recorder.submit(finished(1))
    await recorder.close()
    assert metrics.registry.get_sample_value("steer_store_write_errors_total") == 1
    assert len((await list_completions(db)).rows) == 2


async def test_one_bad_record_in_a_batch_loses_only_itself(db: Database) -> None:
    """Found in review: a batch is one insert, so one bad record lost the whole batch."""
    metrics = Metrics()
    recorder = Recorder(db, "all", metrics)
    recorder.start()
    recorder.submit(finished(0))
    await recorder.queue.join()
    for i in (1, 0, 2, 3):  # one batch (the writer lingers); 0 is a duplicate id
        recorder.submit(finished(i))
    await recorder.close()
    assert metrics.registry.get_sample_value("steer_store_write_errors_total") == 1
    assert len((await list_completions(db)).rows) == 4


async def test_mode_and_the_requests_own_store_decide() -> None:
    item = finished(0)
    off, steered, everything = (Recorder(Database("sqlite+aiosqlite://"), mode, Metrics())
                                for mode in ("off", "steered", "all"))
    assert not off.wanted(item.request, steered=True)
    assert steered.wanted(item.request, steered=True)
    assert not steered.wanted(item.request, steered=False)
    assert everything.wanted(item.request, steered=False)
    assert not everything.wanted(finished(0, store=False).request, steered=False)
    assert off.wanted(finished(0, store=True).request, steered=False)


def test_row_keeps_the_chosen_candidates_score_and_strips_the_inline_trace() -> None:
    trace = {"id": "steer-1", "strategy": "best_of_n", "nodes": [
        {"id": 0, "role": "generator", "text": "41", "scores": {"exact_answer": 0.0}},
        {"id": 1, "role": "generator", "text": "42", "scores": {"exact_answer": 1.0},
         "chosen": True},
        {"id": 2, "role": "final", "text": "42", "scores": {}, "chosen": True}]}
    item = finished(0, metadata={"k": "v"})
    stored = row(Finished(item.request, {**item.response, "steering_trace": trace},
                          trace=trace, trace_id="steer-1"))
    assert stored.score == 1.0 and stored.metadata == {"k": "v"}
    assert "steering_trace" not in stored.response and "id" not in (stored.trace or {})


# -- through the app --------------------------------------------------------------------------


def openai_over(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://steer/v1", api_key="unused", max_retries=0,
                              http_client=client)


async def stored_app(fake: FakeEngine, **settings: Any) -> Any:
    return create_app(Settings(max_tokens_cap=32, **settings), fake)


async def test_openai_client_lists_retrieves_updates_deletes(fake_engine: FakeEngine) -> None:
    async with running(await stored_app(fake_engine)) as client:
        oai = openai_over(client)
        fake_engine.enqueue("plain answer", "forty", "42", "41")
        plain = await oai.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hello"}], store=True,
            metadata={"run": "t1", "kind": "plain"})
        steered = await oai.chat.completions.create(
            model="fake-model", messages=[{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "6 times 7?"}],
            store=True, metadata={"run": "t1", "kind": "steered"},
            extra_body={"steering": BEST_OF_3})
        await oai.chat.completions.create(  # not stored: no store, server default off
            model="fake-model", messages=[{"role": "user", "content": "x"}])
        await client.app.state.recorder.queue.join()  # type: ignore[attr-defined]

        listed = await oai.chat.completions.list(metadata={"run": "t1"})
        assert [c.id for c in listed.data] == [plain.id, steered.id]
        only = await oai.chat.completions.list(metadata={"run": "t1", "kind": "steered"},
                                               order="desc", limit=1)
        assert [c.id for c in only.data] == [steered.id] and only.has_more is False
        pages = [c.id async for c in oai.chat.completions.list(limit=1)]
        assert pages == [plain.id, steered.id]  # the SDK's auto-pagination follows `after`

        got = await oai.chat.completions.retrieve(steered.id)
        assert got.choices[0].message.content == "42" and got.metadata == {
            "run": "t1", "kind": "steered"}
        extra = got.model_extra or {}
        assert extra["steering_trace_id"].startswith("steer-")
        assert extra["steering"]["strategy"] == "best_of_n"
        trace = (await client.get(f"/v1/steering/traces/{extra['steering_trace_id']}")).json()
        assert [n["text"] for n in trace["nodes"] if n["role"] == "generator"] == [
            "forty", "42", "41"]

        messages = await oai.chat.completions.messages.list(steered.id)
        assert [(m.role, m.content) for m in messages.data] == [
            ("system", "be brief"), ("user", "6 times 7?")]
        second = await oai.chat.completions.messages.list(steered.id, after=messages.data[0].id)
        assert [m.content for m in second.data] == ["6 times 7?"]

        updated = await oai.chat.completions.update(steered.id, metadata={"grade": "good"})
        assert updated.metadata == {"grade": "good"}
        assert [c.id for c in (await oai.chat.completions.list(
            metadata={"grade": "good"})).data] == [steered.id]

        deleted = await oai.chat.completions.delete(plain.id)
        assert (deleted.id, deleted.object, deleted.deleted) == (
            plain.id, "chat.completion.deleted", True)
        with pytest.raises(openai.NotFoundError) as missing:
            await oai.chat.completions.retrieve(plain.id)
        assert missing.value.body["param"] == "completion_id"  # type: ignore[index]


async def test_unknown_ids_and_bad_queries_name_their_param(client: httpx.AsyncClient) -> None:
    for method, path in (("GET", f"{CHAT}/nope"), ("GET", f"{CHAT}/nope/messages"),
                         ("POST", f"{CHAT}/nope"), ("DELETE", f"{CHAT}/nope")):
        kwargs = {"json": {"metadata": {}}} if method == "POST" else {}
        r = await client.request(method, path, **kwargs)
        assert r.status_code == 404 and r.json()["error"]["param"] == "completion_id", r.text
    r = await client.get(CHAT, params={"after": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "after"
    for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"),
                          ({"order": "up"}, "order"), ({"metadata": "x"}, "metadata")):
        r = await client.get(CHAT, params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = await client.post(f"{CHAT}/nope", json={"metadata": {str(i): "v" for i in range(17)}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"


async def test_server_mode_steered_stores_steered_and_streamed(fake_engine: FakeEngine) -> None:
    async with running(await stored_app(fake_engine, store="steered")) as client:
        oai = openai_over(client)
        fake_engine.enqueue("a plain one", "forty", "42", "41", "streamed plain")
        await oai.chat.completions.create(model="fake-model",
                                          messages=[{"role": "user", "content": "hi"}])
        stream = await oai.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "6 times 7?"}],
            stream=True, extra_body={"steering": BEST_OF_3})
        streamed_id = [chunk.id async for chunk in stream][-1]
        kept = await oai.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True,
            store=True, metadata={"how": "stream"})
        plain_id = [chunk.id async for chunk in kept][-1]
        await client.app.state.recorder.queue.join()  # type: ignore[attr-defined]
        listed = (await oai.chat.completions.list()).data
        assert [c.id for c in listed] == [streamed_id, plain_id]
        assert listed[0].choices[0].message.content == "42"
        assert listed[1].choices[0].message.content == "streamed plain"
        assert listed[1].metadata == {"how": "stream"}
        assert listed[0].usage is not None and listed[0].usage.completion_tokens == 3


async def test_stored_traces_outlive_the_memory_store(fake_engine: FakeEngine) -> None:
    app = await stored_app(fake_engine, trace_store_bytes=0)  # memory keeps no trace at all
    async with running(app) as client:
        fake_engine.enqueue("forty", "42", "41")
        r = await client.post(CHAT, json={
            "model": "fake-model", "messages": [{"role": "user", "content": "6 times 7?"}],
            "store": True, "steering": {**BEST_OF_3, "trace": True}})
        trace_id = r.json()["steering_trace"]["id"]
        await app.state.recorder.queue.join()
        got = await client.get(f"/v1/steering/traces/{trace_id}")
        assert got.status_code == 200 and got.json()["id"] == trace_id
        assert got.json()["strategy"] == "best_of_n"
        assert (await client.get(f"/v1/steering/traces/{trace_id}?format=dot")).text.startswith(
            "digraph")
        assert (await client.get("/v1/steering/traces/steer-none")).status_code == 404


async def test_storing_never_holds_up_the_answer(fake_engine: FakeEngine) -> None:
    app = await stored_app(fake_engine, store="all")
    async with running(app) as client:
        recorder: Recorder = app.state.recorder
        release = asyncio.Event()
        write = recorder.write

        async def stuck(items: list[Finished]) -> None:
            await release.wait()
            await write(items)

        recorder.write = stuck  # type: ignore[method-assign]
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        async with asyncio.timeout(5):  # a hang detector: the store is stuck, answers are not
            for _ in range(3):
                assert (await client.post(CHAT, json=body)).status_code == 200
        assert (await list_completions(app.state.db)).rows == []
        release.set()
        await recorder.queue.join()
        assert len((await list_completions(app.state.db)).rows) == 3


async def test_a_metadata_filter_takes_at_most_16_pairs(fake_engine: FakeEngine) -> None:
    """Found in review: every pair is a subquery, and nothing bounded their number."""
    async with running(await stored_app(fake_engine)) as client:
        ok = await client.get("/v1/chat/completions",
                              params={f"metadata[k{i}]": "v" for i in range(16)})
        assert ok.status_code == 200, ok.text
        many = await client.get("/v1/chat/completions",
                                params={f"metadata[k{i}]": "v" for i in range(17)})
        assert many.status_code == 400, many.text
        assert many.json()["error"]["param"] == "metadata"
