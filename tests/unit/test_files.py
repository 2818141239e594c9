"""The Files API through the official `openai` client against the in-process app, and the
store queries behind it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from sqlalchemy import update

from steer.service.app import create_app
from steer.service.settings import Settings
from steer.store import Database
from steer.store import jobs as job_store
from steer.store.files import FileInUse, create_file, delete_file, list_files
from tests.asgi import running
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

SFT = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
GRADED = {"messages": [{"role": "user", "content": "2+2?"}], "reference": 4}
MAX_FILE = 8192


def jsonl(*lines: dict[str, object]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@pytest.fixture
async def app_client() -> AsyncIterator[tuple[openai.AsyncOpenAI, Database]]:
    app = create_app(Settings(max_file_bytes=MAX_FILE, max_body_bytes=4096), FakeEngine())
    async with running(app):
        transport = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        client = openai.AsyncOpenAI(base_url="http://steer/v1", api_key="k",
                                    http_client=transport, max_retries=0)
        yield client, app.state.db
        await transport.aclose()


async def test_upload_list_retrieve_content_delete(
    app_client: tuple[openai.AsyncOpenAI, Database],
) -> None:
    client, _ = app_client
    content = jsonl(SFT, SFT)
    created = await client.files.create(file=("train.jsonl", content), purpose="fine-tune")
    assert created.id.startswith("file-")
    assert (created.object, created.bytes, created.filename, created.purpose, created.status) \
        == ("file", len(content), "train.jsonl", "fine-tune", "processed")
    assert created.expires_at is None and created.status_details is None

    assert await client.files.retrieve(created.id) == created
    assert (await client.files.content(created.id)).content == content

    second = await client.files.create(file=("g.jsonl", jsonl(GRADED)), purpose="fine-tune")
    page = await client.files.list()
    assert [f.id for f in page.data] == [second.id, created.id]  # newest first by default
    assert [f.id for f in (await client.files.list(order="asc")).data] == [created.id, second.id]
    first = await client.files.list(limit=1, order="asc")
    assert [f.id for f in first.data] == [created.id] and first.has_more
    rest = await client.files.list(limit=1, order="asc", after=created.id)
    assert [f.id for f in rest.data] == [second.id] and not rest.has_more
    assert [f.id async for f in client.files.list(limit=1)] == [second.id, created.id]
    assert (await client.files.list(purpose="batch")).data == []
    assert len((await client.files.list(purpose="fine-tune")).data) == 2

    deleted = await client.files.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "file")
    assert [f.id for f in (await client.files.list()).data] == [second.id]


async def test_unknown_ids_are_404s_naming_the_field(
    app_client: tuple[openai.AsyncOpenAI, Database],
) -> None:
    client, _ = app_client
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as info:
            await call("file-nope")
        error = info.value.body
        assert isinstance(error, dict)
        assert (error["param"], error["code"], error["type"]) == (
            "file_id", "file_not_found", "not_found_error")
        assert "file-nope" in error["message"]
    with pytest.raises(openai.NotFoundError) as info:
        await client.files.list(after="file-nope")
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "after"


@pytest.mark.parametrize(("content", "param", "message"), [
    (jsonl(SFT, {"messages": [{"role": "user", "content": "x"},
                              {"role": "robot", "content": "y"}]}),
     "file", "line 2: messages[1].role must be one of system/user/assistant/tool"),
    (b"", "file", "the file is empty"),
    (jsonl(SFT) + b"not json\n", "file", "line 2: not valid JSON"),
])
async def test_bad_files_are_400s_naming_the_line(
    app_client: tuple[openai.AsyncOpenAI, Database], content: bytes, param: str, message: str,
) -> None:
    client, _ = app_client
    with pytest.raises(openai.BadRequestError) as info:
        await client.files.create(file=("t.jsonl", content), purpose="fine-tune")
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"] == param and error["message"].startswith(message), error
    assert (await client.files.list()).data == []  # nothing half-stored


async def test_other_purposes_and_fields_are_refused(
    app_client: tuple[openai.AsyncOpenAI, Database],
) -> None:
    client, _ = app_client
    with pytest.raises(openai.BadRequestError) as info:
        await client.files.create(file=("t.jsonl", jsonl(SFT)), purpose="batch")
    assert isinstance(info.value.body, dict)
    assert (info.value.body["param"], info.value.body["code"]) == ("purpose", "invalid_purpose")
    with pytest.raises(openai.BadRequestError) as info:
        await client.files.create(file=("t.jsonl", jsonl(SFT)), purpose="fine-tune",
                                  expires_after={"anchor": "created_at", "seconds": 3600})
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "expires_after"


@pytest.mark.parametrize("size", [MAX_FILE + 1, 200_000])
async def test_files_over_the_cap_are_413s(
    app_client: tuple[openai.AsyncOpenAI, Database], size: int,
) -> None:
    """Just over the cap (the route counts the file's bytes) and far over it (the body limit
    refuses before parsing); both larger than the general body limit, 4096."""
    client, _ = app_client
    line = json.dumps(SFT).encode() + b"\n"
    content = line * (size // len(line) + 1)
    with pytest.raises(openai.APIStatusError) as info:
        await client.files.create(file=("big.jsonl", content), purpose="fine-tune")
    assert info.value.status_code == 413
    assert isinstance(info.value.body, dict)
    assert (info.value.body["param"], info.value.body["code"]) == ("file", "file_too_large")
    ok = await client.files.create(file=("ok.jsonl", line * (MAX_FILE // len(line))),
                                   purpose="fine-tune")
    assert ok.bytes > 4096  # above the general body limit, within the file cap


@pytest.mark.parametrize("status", ["validating_files", "queued", "running"])
async def test_deleting_a_file_an_unfinished_job_uses_is_409(
    app_client: tuple[openai.AsyncOpenAI, Database], status: str,
) -> None:
    client, db = app_client
    train = await client.files.create(file=("t.jsonl", jsonl(SFT)), purpose="fine-tune")
    valid = await client.files.create(file=("v.jsonl", jsonl(SFT)), purpose="fine-tune")
    job = await job_store.create_job(
        db, model="fake-model", training_file=train.id, validation_file=valid.id, suffix=None,
        seed=1, method={"type": "supervised"}, metadata=None)
    async with db.session() as s:
        await s.execute(update(job_store.Job).where(job_store.Job.id == job.id)
                        .values(status=status))
    for used in (train, valid):
        with pytest.raises(openai.ConflictError) as info:
            await client.files.delete(used.id)
        error = info.value.body
        assert isinstance(error, dict)
        assert (error["code"], error["param"]) == ("file_in_use", "file_id")
        assert job.id in error["message"]
    async with db.session() as s:
        await s.execute(update(job_store.Job).where(job_store.Job.id == job.id)
                        .values(status="succeeded"))
    assert (await client.files.delete(train.id)).deleted


async def test_store_queries(app_client: tuple[openai.AsyncOpenAI, Database]) -> None:
    _, db = app_client
    rows = [await create_file(db, filename=f"f{i}.jsonl", purpose="fine-tune",
                              content=jsonl(SFT), lines=1, kind="sft",
                              source={"from": "stored completions", "n": i})
            for i in range(3)]
    assert rows[2].source_dict == {"from": "stored completions", "n": 2}
    page = await list_files(db, limit=2)
    assert [r.id for r in page.data] == [rows[2].id, rows[1].id] and page.has_more
    job = await job_store.create_job(
        db, model="fake-model", training_file=rows[0].id, validation_file=None, suffix=None,
        seed=1, method={"type": "supervised"}, metadata=None)
    with pytest.raises(FileInUse) as info:
        await delete_file(db, rows[0].id)
    assert info.value.jobs == [job.id]


async def test_only_a_request_with_the_key_may_send_an_upload_sized_body() -> None:
    """Found in review: multipart bodies are read before the route's auth, so an anonymous
    client could make the server buffer `max_file_bytes` to be told 401. Without the key an
    upload gets the general body limit (413 at once); with it, the file cap."""
    from pydantic import SecretStr

    app = create_app(Settings(max_file_bytes=MAX_FILE, max_body_bytes=4096,
                              api_key=SecretStr("sekret")), FakeEngine())
    line = json.dumps(SFT).encode() + b"\n"
    content = line * (MAX_FILE // len(line))  # over 4096, within the file cap
    async with running(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                               base_url="http://steer") as http:
        for headers, status in [({}, 413), ({"Authorization": "Bearer wrong"}, 413),
                                ({"Authorization": "Bearer sekret"}, 200)]:
            r = await http.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                                files={"file": ("ok.jsonl", content)})
            assert r.status_code == status, (headers, r.text)
