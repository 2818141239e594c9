"""Fine-tuning jobs: the store's state machine (SQLite), and the routes through the official
openai client against the in-process app (FakeEngine)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from steer.service.app import create_app
from steer.service.settings import Settings
from steer.store import Conflict, Database
from steer.store import adapters as adapter_store
from steer.store import files as file_store
from steer.store import jobs as job_store
from tests.asgi import running
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

SFT = {"messages": [{"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}]}
PREFERENCE = {"input": {"messages": [{"role": "user", "content": "2+2?"}]},
              "preferred_output": [{"role": "assistant", "content": "4"}],
              "non_preferred_output": [{"role": "assistant", "content": "5"}]}
GRADED = {"messages": [{"role": "user", "content": "2+2?"}], "reference": "4"}
GRADER = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
          "reference": "{{item.reference}}", "operation": "eq"}


def jsonl(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def add_file(db: Database, kind: str, *lines: dict[str, Any],
                   source: dict[str, Any] | None = None, purpose: str = "fine-tune") -> str:
    stored = await file_store.create_file(db, filename=f"{kind}.jsonl", purpose=purpose,
                                          content=jsonl(*lines), lines=len(lines), kind=kind,
                                          source=source)
    return stored.id


@pytest.fixture
async def app_client(tmp_path: Path) -> AsyncIterator[tuple[openai.AsyncOpenAI, Database]]:
    settings = Settings(adapter_root=tmp_path / "adapters", max_lora_rank=16)
    async with running(create_app(settings, FakeEngine())) as http:
        client = openai.AsyncOpenAI(base_url="http://steer/v1", api_key="unused",
                                    http_client=http, max_retries=0)
        yield client, http.app.state.db  # type: ignore[attr-defined]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}")
    await database.start()
    yield database
    await database.close()


async def new_job(db: Database, file_id: str, **kw: Any) -> job_store.Job:
    job = await job_store.create_job(
        db, model="fake-model", training_file=file_id, validation_file=None, suffix=None,
        seed=1, method={"type": "supervised", "supervised": {"hyperparameters": {}}},
        metadata=kw.pop("metadata", None))
    return await job_store.transition(db, job.id, "queued", "queued")


# -- routes, through the openai SDK -----------------------------------------------------------


async def test_create_retrieve_list_and_events(
    app_client: tuple[openai.AsyncOpenAI, Database]
) -> None:
    client, db = app_client
    file_id = await add_file(db, "sft", SFT, SFT)
    job = await client.fine_tuning.jobs.create(
        model="fake-model", training_file=file_id, suffix="adder", seed=7,
        metadata={"team": "math"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 2.0}}})
    assert job.status == "queued" and job.model == "fake-model" and job.seed == 7
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 2
    assert job.method is not None and job.method.type == "supervised"
    assert job.fine_tuned_model is None and job.metadata == {"team": "math"}
    assert (await client.fine_tuning.jobs.retrieve(job.id)).id == job.id
    events = (await client.fine_tuning.jobs.list_events(job.id)).data
    assert [e.message for e in events] == [  # newest first, like OpenAI
        "Files validated, moving job to queued state",
        f"Validating training file: {file_id}"]
    other = await client.fine_tuning.jobs.create(model="fake-model", training_file=file_id)
    assert other.seed >= 0 and other.hyperparameters.n_epochs == "auto"
    listed = [j.id async for j in client.fine_tuning.jobs.list(limit=1)]  # pages with after
    assert listed == [other.id, job.id]
    page = await client.fine_tuning.jobs.list(metadata={"team": "math"})
    assert [j.id for j in page.data] == [job.id]
    assert (await client.fine_tuning.jobs.checkpoints.list(job.id)).data == []


async def test_legacy_hyperparameters_fold_into_a_supervised_method(
    app_client: tuple[openai.AsyncOpenAI, Database]
) -> None:
    client, db = app_client
    file_id = await add_file(db, "sft", SFT)
    job = await client.fine_tuning.jobs.create(model="fake-model", training_file=file_id,
                                               hyperparameters={"n_epochs": 3})
    assert job.method is not None and job.method.type == "supervised"
    assert job.hyperparameters.n_epochs == 3


@pytest.mark.parametrize(("change", "status", "param"), [
    ({"training_file": "file-nope"}, 404, "training_file"),
    ({"validation_file": "file-nope"}, 404, "validation_file"),
    ({"model": "gpt-4o-mini"}, 400, "model"),
    ({"model": "ft:fake-model::ftjob-1"}, 400, "model"),
    ({"suffix": "Bad Suffix"}, 400, "suffix"),
    ({"suffix": "x" * 65}, 400, "suffix"),
    ({"method": {"type": "dpo"}}, 400, "training_file"),  # an sft file for dpo
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
     400, "method.supervised.hyperparameters.n_epochs"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {
        "learning_rate_multiplier": -1}}}},
     400, "method.supervised.hyperparameters.learning_rate_multiplier"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"lora_rank": 32}}}},
     400, "method.supervised.hyperparameters.lora_rank"),
    ({"method": {"type": "supervised", "dpo": {}}}, 400, "method.dpo"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 1}}}}, 400, "hyperparameters"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
])
async def test_bad_creates_name_the_field(
    app_client: tuple[openai.AsyncOpenAI, Database], change: dict[str, Any], status: int,
    param: str,
) -> None:
    client, db = app_client
    body: dict[str, Any] = {"model": "fake-model", "training_file": await add_file(db, "sft", SFT)}
    body.update(change)
    with pytest.raises(openai.APIStatusError) as err:
        await client.fine_tuning.jobs.create(**body)
    assert err.value.status_code == status, err.value.body
    assert isinstance(err.value.body, dict) and err.value.body["param"] == param, err.value.body
    assert (await client.fine_tuning.jobs.list()).data == []  # nothing was created


async def test_file_kind_and_purpose_must_fit_the_method(
    app_client: tuple[openai.AsyncOpenAI, Database]
) -> None:
    client, db = app_client
    preference = await add_file(db, "preference", PREFERENCE)
    job = await client.fine_tuning.jobs.create(
        model="fake-model", training_file=preference,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
    assert job.method is not None and job.method.type == "dpo"
    with pytest.raises(openai.BadRequestError) as err:  # a preference file for supervised
        await client.fine_tuning.jobs.create(model="fake-model", training_file=preference)
    assert "preference" in err.value.message
    batch = await add_file(db, "sft", SFT, purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await client.fine_tuning.jobs.create(model="fake-model", training_file=batch)


async def test_reinforcement_checks_its_grader_and_the_lines(
    app_client: tuple[openai.AsyncOpenAI, Database]
) -> None:
    client, db = app_client
    graded = await add_file(db, "graded", GRADED)
    job = await client.fine_tuning.jobs.create(
        model="fake-model", training_file=graded,
        method={"type": "reinforcement", "reinforcement": {"grader": GRADER}})
    assert job.status == "queued"
    bad = [({"type": "python", "name": "x", "source": "def grade(s, i): return 1"},
            "method.reinforcement.grader"),
           ({**GRADER, "reference": "{{item.answer}}"}, "training_file")]  # lines lack it
    for grader, param in bad:
        with pytest.raises(openai.BadRequestError) as err:
            await client.fine_tuning.jobs.create(
                model="fake-model", training_file=graded,
                method={"type": "reinforcement", "reinforcement": {"grader": grader}})
        assert isinstance(err.value.body, dict)
        assert str(err.value.body["param"]).startswith(param), err.value.body
    with pytest.raises(openai.BadRequestError):  # no grader at all
        await client.fine_tuning.jobs.create(model="fake-model", training_file=graded,
                                             method={"type": "reinforcement"})


async def test_cancel_and_unknown_jobs(app_client: tuple[openai.AsyncOpenAI, Database]) -> None:
    client, db = app_client
    job = await client.fine_tuning.jobs.create(model="fake-model",
                                               training_file=await add_file(db, "sft", SFT))
    cancelled = await client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.ConflictError):
        await client.fine_tuning.jobs.cancel(job.id)
    for call in (client.fine_tuning.jobs.retrieve("ftjob-nope"),
                 client.fine_tuning.jobs.cancel("ftjob-nope"),
                 client.fine_tuning.jobs.list_events("ftjob-nope"),
                 client.fine_tuning.jobs.checkpoints.list("ftjob-nope")):
        with pytest.raises(openai.NotFoundError):
            await call
    with pytest.raises(openai.NotFoundError) as err:
        await client.fine_tuning.jobs.list_events(job.id, after="ftevent-nope")
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "after"


async def test_a_job_shows_the_lineage_of_its_model(
    app_client: tuple[openai.AsyncOpenAI, Database]
) -> None:
    client, db = app_client
    job = await client.fine_tuning.jobs.create(model="fake-model",
                                               training_file=await add_file(db, "sft", SFT))
    await adapter_store.record_adapter(db, name="ft:fake-model::ftjob-old", job_id=None,
                                       base_model="fake-model", parent="fake-model",
                                       path="/x", kind="final", lineage={})
    await adapter_store.record_adapter(
        db, name=f"ft:fake-model::{job.id}", job_id=job.id, base_model="fake-model",
        parent="ft:fake-model::ftjob-old", path="/y", kind="final",
        lineage={"parent": "ft:fake-model::ftjob-old", "method": "supervised"})
    lineage = (await client.fine_tuning.jobs.retrieve(job.id)).model_extra["lineage"]  # type: ignore[index]
    assert lineage["model"] == f"ft:fake-model::{job.id}" and lineage["method"] == "supervised"
    assert [a["model"] for a in lineage["ancestors"]] == ["ft:fake-model::ftjob-old",
                                                          "fake-model"]
    assert lineage["ancestors"][0]["trained_by_steer"] is True
    assert lineage["ancestors"][1]["trained_by_steer"] is False


# -- the store's state machine ----------------------------------------------------------------


async def test_transitions_follow_the_state_machine(db: Database) -> None:
    job = await new_job(db, await add_file(db, "sft", SFT))
    with pytest.raises(Conflict, match="queued"):
        await job_store.transition(db, job.id, "succeeded", "skipping running")
    claimed = await job_store.claim_job(db, "w1")
    assert claimed is not None and claimed.status == "running" and claimed.worker == "w1"
    with pytest.raises(Conflict):  # not w2's job
        await job_store.transition(db, job.id, "succeeded", "done", worker="w2")
    done = await job_store.transition(db, job.id, "succeeded", "done", worker="w1",
                                      fine_tuned_model="ft:x")
    assert done.status == "succeeded" and done.finished_at is not None
    for to in ("failed", "cancelled", "running"):
        with pytest.raises(Conflict):
            await job_store.transition(db, job.id, to, "after the end")
    with pytest.raises(Conflict):
        await job_store.cancel(db, job.id)


async def test_two_workers_claiming_at_once_get_different_jobs(db: Database) -> None:
    file_id = await add_file(db, "sft", SFT)
    only = await new_job(db, file_id)
    claims = await asyncio.gather(*(job_store.claim_job(db, f"w{i}") for i in range(4)))
    winners = [c for c in claims if c is not None]
    assert [w.id for w in winners] == [only.id]
    assert (await job_store.get_job(db, only.id)).worker == winners[0].worker
    jobs = [await new_job(db, file_id) for _ in range(3)]
    claims = await asyncio.gather(*(job_store.claim_job(db, f"v{i}") for i in range(5)))
    assert sorted(c.id for c in claims if c is not None) == sorted(j.id for j in jobs)


async def test_events_page_newest_first(db: Database) -> None:
    job = await new_job(db, await add_file(db, "sft", SFT))
    for i in range(25):
        await job_store.add_event(db, job.id, f"e{i}", type="metrics", data={"step": i})
    first, more = await job_store.list_events(db, job.id, limit=10)
    assert more and [e.message for e in first] == [f"e{i}" for i in range(24, 14, -1)]
    second, more = await job_store.list_events(db, job.id, after=first[-1].id, limit=10)
    assert more and [e.message for e in second] == [f"e{i}" for i in range(14, 4, -1)]
    rest, more = await job_store.list_events(db, job.id, after=second[-1].id, limit=10)
    assert not more and [e.message for e in rest][:5] == [f"e{i}" for i in range(4, -1, -1)]
    assert len(rest) == 7  # and the two events of creation


async def test_cancel_queued_and_running(db: Database) -> None:
    file_id = await add_file(db, "sft", SFT)
    queued = await new_job(db, file_id)
    assert (await job_store.cancel(db, queued.id)).status == "cancelled"
    running = await new_job(db, file_id)
    assert (await job_store.claim_job(db, "w")) is not None
    job = await job_store.cancel(db, running.id)
    assert job.status == "cancelled" and job.cancel_requested == 1
    assert not await job_store.heartbeat(db, running.id, "w")  # the worker learns it lost it
    assert await job_store.claim_job(db, "w") is None


async def test_recovery_fails_lost_running_jobs_and_keeps_queued_ones(db: Database) -> None:
    file_id = await add_file(db, "sft", SFT)
    mine, theirs, fresh, waiting = [await new_job(db, file_id) for _ in range(4)]
    for worker in ("me", "gone", "alive"):
        assert await job_store.claim_job(db, worker) is not None
    async with db.session() as s:  # "gone" stopped heartbeating two minutes ago
        job = await s.get(job_store.Job, theirs.id)
        assert job is not None
        job.heartbeat_at = job_store.now() - 120
    failed = await job_store.recover(db, worker="me", stale_s=60)
    assert sorted(failed) == sorted([mine.id, theirs.id])
    for job_id in failed:
        job = await job_store.get_job(db, job_id)
        assert job.status == "failed" and job.error is not None
        assert job.error["code"] == "worker_restarted"
        events, _ = await job_store.list_events(db, job_id, limit=1)
        assert events[0].level == "error" and "worker" in events[0].message
    assert (await job_store.get_job(db, fresh.id)).status == "running"
    assert (await job_store.get_job(db, waiting.id)).status == "queued"


async def test_ancestors_list_the_chain_and_stop_at_a_loop(db: Database) -> None:
    for name, parent in (("ft:a", "base"), ("ft:b", "ft:a"), ("ft:c", "ft:b")):
        await adapter_store.record_adapter(db, name=name, job_id=None, base_model="base",
                                           parent=parent, path="/p", kind="final", lineage={})
    chain = await adapter_store.ancestors(db, "ft:c")
    assert [a["model"] for a in chain] == ["ft:b", "ft:a", "base"]
    with pytest.raises(Conflict):
        await adapter_store.record_adapter(db, name="ft:a", job_id=None, base_model="base",
                                           parent=None, path="/p", kind="final", lineage={})
    async with db.session() as s:  # a loop (never written by Steer) must not hang
        row = await s.get(adapter_store.TrainedAdapter, "ft:a")
        assert row is not None
        row.parent = "ft:c"
    looped = await adapter_store.ancestors(db, "ft:c")
    assert looped[-1] == {"model": "ft:c", "truncated": True}


async def test_a_suffix_too_long_for_the_round_checkpoints_is_refused_at_creation(
    tmp_path: Path
) -> None:
    """Found in review: on the default model a 60-character suffix passed creation, then the
    round-1 checkpoint's longer name was refused after it had trained, failing the job."""
    base = "smollm2-135m-instruct"
    settings = Settings(adapter_root=tmp_path / "adapters", max_lora_rank=16)
    async with running(create_app(settings, FakeEngine(model_name=base))) as http:
        client = openai.AsyncOpenAI(base_url="http://steer/v1", api_key="unused",
                                    http_client=http, max_retries=0)
        db: Database = http.app.state.db  # type: ignore[attr-defined]
        graded = await add_file(db, "graded", GRADED)
        with pytest.raises(openai.BadRequestError) as err:
            await client.fine_tuning.jobs.create(
                model=base, training_file=graded, suffix="x" * 60,
                method={"type": "reinforcement", "reinforcement": {"grader": GRADER}})
        assert isinstance(err.value.body, dict) and err.value.body["param"] == "suffix"
        sft = await add_file(db, "sft", SFT)  # a supervised job has no checkpoints: it fits
        job = await client.fine_tuning.jobs.create(model=base, training_file=sft,
                                                   suffix="x" * 60)
        assert job.status == "queued"


async def test_a_job_left_validating_by_a_stopped_server_is_failed_on_recovery(
    app_client: tuple[openai.AsyncOpenAI, Database]
) -> None:
    _, db = app_client
    file_id = await add_file(db, "sft", SFT)
    job = await job_store.create_job(
        db, model="fake-model", training_file=file_id, validation_file=None, suffix=None,
        seed=1, method={"type": "supervised"}, metadata=None)
    assert job.status == "validating_files"
    assert await job_store.recover(db, stale_s=60) == []  # fresh: creation may still be going
    assert (await job_store.get_job(db, job.id)).status == "validating_files"
    assert await job_store.recover(db, stale_s=-1) == []  # (only running jobs are returned)
    assert (await job_store.get_job(db, job.id)).status == "failed"
