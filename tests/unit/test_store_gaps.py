"""The store's list queries when rows tie (several replicas writing in the same second, or
the same microsecond), the file-delete vs job-create race at every interleaving, and the
number of statements a job listing costs. SQLite, file-backed (real separate connections);
with STEER_TEST_DATABASE_URL (an empty PostgreSQL database, e.g.
postgresql+asyncpg://steer@/steer_gaps?host=/tmp/pg) the store tests run there too."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text, update
from sqlalchemy.util import await_only

from steer.store import Database
from steer.store import completions as completion_store
from steer.store import files as file_store
from steer.store import jobs as job_store

pytestmark = pytest.mark.anyio
ROWS = 25


DATABASES = ["sqlite", *(["postgresql"] if os.environ.get("STEER_TEST_DATABASE_URL") else [])]


@pytest.fixture(params=DATABASES)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'gaps.db'}")
    else:
        database = Database(os.environ["STEER_TEST_DATABASE_URL"])
        async with database.engine.begin() as conn:  # a fresh schema for every test
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
    await database.start()
    yield database
    await database.close()


async def same_instant(db: Database, table: Any, **values: int) -> None:
    """Every row of `table` as written in one instant (by replicas whose clocks agree)."""
    async with db.session() as s:
        await s.execute(update(table).values(**values))


async def walk(fetch: Callable[[str | None], Awaitable[tuple[list[str], bool]]]) -> list[str]:
    """Every id a client paging with `after` sees, in order."""
    seen: list[str] = []
    after = None
    while True:
        ids, more = await fetch(after)
        seen += ids
        if not more:
            return seen
        assert ids, "has_more with an empty page"
        after = ids[-1]


def assert_one_order(seen: list[str], everything: set[str]) -> None:
    assert len(seen) == len(set(seen)), "a row was listed twice"
    assert set(seen) == everything, f"rows skipped: {everything - set(seen)}"


# -- 1. keyset pagination with ties ---------------------------------------------------------


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_stored_completions_page_through_ties(db: Database, order: str) -> None:
    await completion_store.insert_completions(db, [completion_store.NewCompletion(
        id=f"chatcmpl-{i:02d}", created=1000, model="m", request={"messages": []},
        response={"id": f"chatcmpl-{i:02d}", "choices": []}) for i in range(ROWS)])
    await same_instant(db, completion_store.StoredCompletion, created=1000, seq=7)

    async def page(after: str | None) -> tuple[list[str], bool]:
        p = await completion_store.list_completions(db, after=after, limit=7, order=order)
        return [r.id for r in p.rows], p.has_more

    seen = await walk(page)
    assert_one_order(seen, {f"chatcmpl-{i:02d}" for i in range(ROWS)})
    assert seen == sorted(seen, reverse=order == "desc")  # ties broken by id, both ways


async def test_dataset_selection_reads_every_tied_row(db: Database) -> None:
    await completion_store.insert_completions(db, [completion_store.NewCompletion(
        id=f"chatcmpl-{i:02d}", created=1000, model="m", request={"messages": []},
        response={"id": f"chatcmpl-{i:02d}", "choices": []}) for i in range(ROWS)])
    await same_instant(db, completion_store.StoredCompletion, created=1000, seq=7)
    rows = [r.id async for r in completion_store.select_completions(
        db, completion_store.Selection(), batch=4)]
    assert_one_order(rows, {f"chatcmpl-{i:02d}" for i in range(ROWS)})


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_files_page_through_ties(db: Database, order: str) -> None:
    made = {(await file_store.create_file(db, filename="f.jsonl", purpose="fine-tune",
                                          content=b"{}\n", lines=1, kind="sft")).id
            for _ in range(ROWS)}
    await same_instant(db, file_store.StoredFile, created_at=1000, seq=7)

    async def page(after: str | None) -> tuple[list[str], bool]:
        p = await file_store.list_files(db, after=after, limit=7, order=order)
        return [r.id for r in p.data], p.has_more

    seen = await walk(page)
    assert_one_order(seen, made)
    assert seen == sorted(seen, reverse=order == "desc")


async def _job(db: Database, file_id: str) -> str:
    job = await job_store.create_job(
        db, model="fake-model", training_file=file_id, validation_file=None, suffix=None,
        seed=1, method={"type": "supervised"}, metadata=None)
    return job.id


async def test_jobs_events_and_checkpoints_page_through_ties(db: Database) -> None:
    f = await file_store.create_file(db, filename="f.jsonl", purpose="fine-tune",
                                     content=b"{}\n", lines=1, kind="sft")
    jobs = {await _job(db, f.id) for _ in range(ROWS)}
    await same_instant(db, job_store.Job, created_at=1000, seq=7)

    async def job_page(after: str | None) -> tuple[list[str], bool]:
        rows, more = await job_store.list_jobs(db, after=after, limit=7)
        return [j.id for j in rows], more

    assert_one_order(await walk(job_page), jobs)
    job_id = sorted(jobs)[0]
    for i in range(ROWS):
        await job_store.add_event(db, job_id, f"event {i}")
        await job_store.add_checkpoint(db, job_id, f"ft:m::{job_id}:ckpt-{i}", 1, {})
    await same_instant(db, job_store.JobEvent, created_at=1000)
    await same_instant(db, job_store.Checkpoint, created_at=1000, step_number=1)

    async def event_page(after: str | None) -> tuple[list[str], bool]:
        rows, more = await job_store.list_events(db, job_id, after=after, limit=7)
        return [e.id for e in rows], more

    async def checkpoint_page(after: str | None) -> tuple[list[str], bool]:
        rows, more = await job_store.list_checkpoints(db, job_id, after=after, limit=7)
        return [c.id for c in rows], more

    events = await walk(event_page)
    assert len(events) == ROWS + 1 and len(set(events)) == len(events)  # + the create's
    checkpoints = await walk(checkpoint_page)
    assert len(checkpoints) == ROWS and len(set(checkpoints)) == ROWS


# -- 2. deleting a file vs creating a job that uses it, at every interleaving ---------------


class PauseAt:
    """Stops one task just before its n-th statement (its commit counts as one) until
    released, so another task can run in that window: every interleaving of two units of
    work can be forced in turn, on real, separate SQLite connections."""

    def __init__(self, db: Database, n: int) -> None:
        self.db, self.n = db, n
        self.task: asyncio.Task[Any] | None = None
        self.count = 0
        self.reached, self.release = asyncio.Event(), asyncio.Event()

    def __enter__(self) -> PauseAt:
        engine = self.db.engine.sync_engine
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._step)
        return self

    def __exit__(self, *exc: object) -> None:
        engine = self.db.engine.sync_engine
        event.remove(engine, "before_cursor_execute", self._statement)
        event.remove(engine, "commit", self._step)

    def _statement(self, *_args: object) -> None:
        self._step()

    def _step(self, *_args: object) -> None:
        if asyncio.current_task() is not self.task:
            return
        self.count += 1
        if self.count == self.n:
            self.reached.set()
            # subtle: listeners run inside SQLAlchemy's greenlet, so they may await
            await_only(self.release.wait())


async def _race(db: Database, paused: str, n: int) -> tuple[Any, Any, bool] | None:
    """Run create-job and delete-file on one file, `paused` stopped before its n-th step
    while the other runs (or blocks on a lock); None when `paused` has fewer steps."""
    f = await file_store.create_file(db, filename="f.jsonl", purpose="fine-tune",
                                     content=b"{}\n", lines=1, kind="sft")
    parties: dict[str, Callable[[], Awaitable[Any]]] = {
        "create": lambda: _job(db, f.id), "delete": lambda: file_store.delete_file(db, f.id)}
    other = "delete" if paused == "create" else "create"
    with PauseAt(db, n) as pause:
        first = asyncio.create_task(parties[paused]())
        pause.task = first
        await asyncio.wait([first, asyncio.create_task(pause.reached.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if not pause.reached.is_set():
            await asyncio.gather(first, return_exceptions=True)
            return None
        second = asyncio.create_task(parties[other]())
        await asyncio.wait([second], timeout=1.0)  # done, or waiting for the paused one's lock
        pause.release.set()
        results = dict(zip((paused, other), await asyncio.gather(
            first, second, return_exceptions=True), strict=True))
    try:
        await file_store.get_file(db, f.id)
        exists = True
    except Exception:
        exists = False
    return results["create"], results["delete"], exists


@pytest.mark.parametrize("paused", ["create", "delete"])
async def test_a_file_delete_and_a_job_create_never_both_win(db: Database,
                                                            paused: str) -> None:
    from steer.store import NotFound

    tried = 0
    for n in range(1, 12):
        outcome = await _race(db, paused, n)
        if outcome is None:
            break
        tried += 1
        created, deleted, exists = outcome
        where = f"{paused} paused before its step {n}: create={created!r} delete={deleted!r}"
        if isinstance(created, str):  # the job exists: its file must too
            assert isinstance(deleted, file_store.FileInUse), where
            assert exists and created in deleted.jobs, where
        else:  # no job: the file was deleted, and the create said so
            assert isinstance(created, NotFound) and created.kind == "file", where
            assert deleted is None and not exists, where
    assert tried >= 3  # create and delete each take several statements


# -- 5. the job listing's statements don't grow with the page ---------------------------------


async def test_listing_20_jobs_with_models_costs_a_constant_number_of_statements(
        tmp_path: Path) -> None:
    import openai

    from steer.service.app import create_app
    from steer.service.settings import Settings
    from steer.store import adapters as adapter_store
    from tests.asgi import running
    from tests.fakes import FakeEngine

    settings = Settings(adapter_root=tmp_path / "adapters", adapter_sync_s=3600)
    async with running(create_app(settings, FakeEngine())) as http:
        db: Database = http.app.state.db  # type: ignore[attr-defined]
        client = openai.AsyncOpenAI(base_url="http://steer/v1", api_key="unused",
                                    http_client=http, max_retries=0)
        f = await file_store.create_file(db, filename="f.jsonl", purpose="fine-tune",
                                         content=b"{}\n", lines=1, kind="sft")
        jobs = [await _job(db, f.id) for _ in range(20)]
        for i, job_id in enumerate(jobs):  # every job trained a model; one learned another's
            await adapter_store.record_adapter(
                db, name=f"ft:fake-model::{job_id}", job_id=job_id, base_model="fake-model",
                parent=f"ft:fake-model::{jobs[0]}" if i == 5 else "fake-model", path="/p",
                kind="final", lineage={"method": "supervised"})
        statements: list[str] = []
        me = asyncio.current_task()

        def count(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
            if asyncio.current_task() is me:  # the route runs in this task (ASGI in-process)
                statements.append(statement)

        event.listen(db.engine.sync_engine, "before_cursor_execute", count)
        try:
            page = await client.fine_tuning.jobs.list(limit=20)
        finally:
            event.remove(db.engine.sync_engine, "before_cursor_execute", count)
        assert len(page.data) == 20
        lineage = {j.id: j.model_extra["lineage"] for j in page.data}  # type: ignore[index]
        assert lineage[jobs[0]]["ancestors"] == [{"model": "fake-model",
                                                  "trained_by_steer": False}]
        assert [a["model"] for a in lineage[jobs[5]]["ancestors"]] == [
            f"ft:fake-model::{jobs[0]}", "fake-model"]
        assert len(statements) <= 3, "\n".join(statements)
