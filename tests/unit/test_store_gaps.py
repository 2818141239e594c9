"""The store's list queries when rows tie (several replicas writing in the same second, or
the same microsecond), the file-delete vs job-create race at every interleaving, and the
number of statements a job listing costs. SQLite, file-backed (real separate connections)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from steer.store import Database
from steer.store import completions as completion_store
from steer.store import files as file_store
from steer.store import jobs as job_store

pytestmark = pytest.mark.anyio
ROWS = 25


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'gaps.db'}")
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
