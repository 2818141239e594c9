"""The training worker against the in-process app (FakeEngine), with a fake trainer process
(tests/unit/fake_trainer.py speaks the trainer's JSON-line protocol) as the test double at
the subprocess boundary: success (events, the adapter hot-loaded with its lineage, served),
a crash, an error event, a cancel that kills the trainer, a refused adapter, a restart."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from steer.service.app import create_app
from steer.service.settings import Settings
from steer.store import Database
from steer.store import adapters as adapter_store
from steer.store import jobs as job_store
from steer.training.worker import JobContext, Worker, WorkerConfig
from tests.asgi import running
from tests.fakes import FakeEngine
from tests.lora_helpers import write_adapter
from tests.unit.test_jobs import GRADED, SFT, add_file

pytestmark = pytest.mark.anyio

FAKE_TRAINER = (sys.executable, str(Path(__file__).with_name("fake_trainer.py")))


@dataclass
class Setup:
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient
    db: Database
    worker: Worker
    engine: FakeEngine
    adapters: Path


@pytest.fixture
async def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    adapters = tmp_path / "adapters"
    monkeypatch.setenv("FAKE_ADAPTER", str(write_adapter(tmp_path / "template")))
    settings = Settings(adapter_root=adapters, adapter_sync_s=0.05, max_lora_rank=16)
    engine = FakeEngine()
    async with running(create_app(settings, engine)) as http:
        db: Database = http.app.state.db  # type: ignore[attr-defined]
        config = WorkerConfig(database_url=db.url, server_url="http://steer",
                              base_model_dir=str(tmp_path / "base"), adapters_dir=adapters,
                              name="test-worker", poll_s=0.05, heartbeat_s=0.05,
                              publish_timeout_s=10, trainer_command=FAKE_TRAINER)
        worker = Worker(config, db=db, steer=http)
        client = openai.AsyncOpenAI(base_url="http://steer/v1", api_key="unused",
                                    http_client=http, max_retries=0)
        yield Setup(client, http, db, worker, engine, adapters)


async def sft_job(s: Setup, **kw: Any) -> str:
    training = await add_file(s.db, "sft", SFT, SFT,
                              source={"type": "stored_completions",
                                      "filters": {"model": "fake-model"}})
    job = await s.client.fine_tuning.jobs.create(
        model="fake-model", training_file=training, suffix="adder",
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "learning_rate_multiplier": 0.5}}}, **kw)
    return job.id


async def messages(s: Setup, job_id: str) -> list[str]:
    events = [e async for e in s.client.fine_tuning.jobs.list_events(job_id, limit=100)]
    return [e.message for e in reversed(events)]


async def test_a_supervised_job_trains_publishes_and_serves(setup: Setup) -> None:
    s = setup
    validation = await add_file(s.db, "sft", SFT)
    job_id = await sft_job(s, validation_file=validation)
    assert await s.worker.run_once()
    job = await s.client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded", await messages(s, job_id)
    assert job.fine_tuned_model == f"ft:fake-model:adder:{job_id}"
    assert job.trained_tokens == 123 and job.finished_at is not None
    events = [e async for e in s.client.fine_tuning.jobs.list_events(job_id, limit=100)]
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    assert metrics[0] == {"step": 1, "train_loss": 2.5, "total_steps": 2,
                          "learning_rate": 0.0005, "epoch": 0.5,
                          "train_mean_token_accuracy": 0.4}
    assert metrics[-1]["valid_loss"] == 1.5  # type: ignore[index]
    assert events[0].message == "The job has successfully completed"
    cards = {m.id: m for m in (await s.client.models.list()).data}
    lineage = cards[job.fine_tuned_model].model_extra["lineage"]  # type: ignore[index]
    assert lineage["parent"] == "fake-model" and lineage["method"] == "supervised"
    assert lineage["data"]["training_file"]["source"]["filters"] == {"model": "fake-model"}
    assert lineage["data"]["validation_file"]["id"] == validation
    assert lineage["metrics"]["train_loss"] == 1.875
    assert lineage["hyperparameters"]["learning_rate"] == 0.0005
    assert lineage["ancestors"] == [{"model": "fake-model", "trained_by_steer": False}]
    assert job.model_extra["lineage"]["model"] == job.fine_tuned_model  # type: ignore[index]
    reply = await s.client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "2+2?"}])
    assert reply.choices[0].message.content == "ok"
    assert s.engine.history[-1].adapter is not None
    assert s.engine.history[-1].adapter.name == job.fine_tuned_model
    assert not await s.worker.run_once()  # nothing queued any more


@pytest.mark.parametrize(("mode", "reason"), [
    ("crash", "exited with status 3 without a result; stderr: Traceback"),
    ("error", "out of memory: lower batch_size or max_length"),
])
async def test_a_failed_training_fails_the_job_with_its_reason(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, mode: str, reason: str
) -> None:
    s = setup
    monkeypatch.setenv("FAKE_TRAINER", mode)
    job_id = await sft_job(s)
    await s.worker.run_once()
    job = await s.client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "failed" and job.error is not None
    assert reason in job.error.message and job.error.code == "training_failed"
    assert "boom" in job.error.message or mode == "error"
    assert reason in (await messages(s, job_id))[-1]
    assert await adapter_store.adapters_of_job(s.db, job_id) == []
    assert job.fine_tuned_model is None


async def test_cancel_kills_the_trainer(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    s = setup
    monkeypatch.setenv("FAKE_TRAINER", "hang")
    job_id = await sft_job(s)
    run = asyncio.create_task(s.worker.run_once())
    async with asyncio.timeout(20):
        while "Step 1/2" not in " ".join(await messages(s, job_id)):
            await asyncio.sleep(0.05)
        await s.client.fine_tuning.jobs.cancel(job_id)
        await run  # the hanging trainer was killed, or this would wait 600 s
    job = await s.client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "cancelled"
    assert (await messages(s, job_id))[-1].startswith("Training stopped")
    assert await adapter_store.adapters_of_job(s.db, job_id) == []


async def test_an_adapter_the_server_refuses_fails_the_job(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = setup
    monkeypatch.setenv("FAKE_ADAPTER", str(write_adapter(tmp_path / "big", rank=32)))
    job_id = await sft_job(s)
    await s.worker.run_once()
    job = await s.client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "failed" and job.error is not None
    assert "refused" in job.error.message and "rank 32" in job.error.message
    [row] = await adapter_store.adapters_of_job(s.db, job_id)
    assert row.status == "refused"
    ids = [m.id for m in (await s.client.models.list()).data]
    assert ids == ["fake-model"]


async def test_a_deleted_adapter_is_unloaded(setup: Setup) -> None:
    s = setup
    job_id = await sft_job(s)
    await s.worker.run_once()
    name = (await s.client.fine_tuning.jobs.retrieve(job_id)).fine_tuned_model
    assert name is not None
    await adapter_store.set_status(s.db, name, "deleted")
    async with asyncio.timeout(10):
        while name in [m.id for m in (await s.client.models.list()).data]:
            await asyncio.sleep(0.05)


async def test_a_restarted_worker_fails_its_running_job_and_keeps_queued_ones(
    setup: Setup
) -> None:
    s = setup
    running_id, queued_id = await sft_job(s), await sft_job(s)
    claimed = await job_store.claim_job(s.db, s.worker.config.name)  # then the worker "died"
    assert claimed is not None and claimed.id == running_id
    assert await s.worker.start() == [running_id]
    job = await s.client.fine_tuning.jobs.retrieve(running_id)
    assert job.status == "failed" and job.error is not None
    assert job.error.code == "worker_restarted"
    assert (await s.client.fine_tuning.jobs.retrieve(queued_id)).status == "queued"
    assert await s.worker.run_once()
    assert (await s.client.fine_tuning.jobs.retrieve(queued_id)).status == "succeeded"


async def test_the_job_context_offers_what_the_expert_loop_uses(setup: Setup) -> None:
    """A reinforcement job's context: lines, base dir, the server client, events, train and
    publish of a round checkpoint (listed under /checkpoints)."""
    s = setup
    graded = await add_file(s.db, "graded", GRADED, GRADED)
    created = await s.client.fine_tuning.jobs.create(
        model="fake-model", training_file=graded, method={"type": "reinforcement",
        "reinforcement": {"grader": {"type": "string_check", "name": "x",
                                     "input": "{{sample.output_text}}",
                                     "reference": "{{item.reference}}", "operation": "eq"}}})
    job = await job_store.claim_job(s.db, s.worker.config.name)
    assert job is not None and job.id == created.id
    ctx: JobContext = await s.worker.context(job)
    assert ctx.training_lines == [GRADED, GRADED] and ctx.validation_lines == []
    assert ctx.base_model_dir == s.worker.config.base_model_dir
    assert (await ctx.steer.get("/v1/models")).status_code == 200
    assert not await ctx.cancelled()
    await ctx.event("round 1: searched", {"round": 1}, type="metrics")
    outcome = await ctx.train({"method": "sft", "seed": 3, "n_epochs": 1},
                              [{"prompt": [{"role": "user", "content": "2+2?"}],
                                "completion": [{"role": "assistant", "content": "4"}]}],
                              "round-1")
    assert outcome.adapter_dir.endswith("round-1") and outcome.train_loss == 1.875
    assert outcome.trained_tokens == 123
    name = await ctx.publish(outcome.adapter_dir, f"ft:fake-model::{job.id}:ckpt-round-1",
                             "checkpoint", {"round": 1, "parent": "fake-model",
                                            "metrics": {"train_loss": 1.875}})
    assert name in [m.id for m in (await s.client.models.list()).data]
    [ckpt] = (await s.client.fine_tuning.jobs.checkpoints.list(job.id)).data
    assert ckpt.fine_tuned_model_checkpoint == name and ckpt.step_number == 1
    assert ckpt.metrics.train_loss == 1.875
    await s.client.fine_tuning.jobs.cancel(job.id)
    assert await ctx.cancelled()


def test_steer_worker_takes_its_flags() -> None:
    from steer.service.cli import build_parser

    args = build_parser().parse_args([
        "worker", "--database-url", "sqlite+aiosqlite:///x.db", "--server-url",
        "http://10.0.0.2:8000", "--threads", "2", "--name", "gpu-box"])
    assert (args.command, args.database_url, args.server_url, args.threads, args.name) == (
        "worker", "sqlite+aiosqlite:///x.db", "http://10.0.0.2:8000", 2, "gpu-box")
    with pytest.raises(SystemExit):  # the server to publish to is required
        build_parser().parse_args(["worker"])


def test_the_embedded_worker_dies_with_its_server(tmp_path: Path) -> None:
    """`steer worker` in a server's tree (STEER_SERVER_PID, as `steer serve` exports it) ends
    when the server is killed without a word (SIGKILL: no shutdown hook runs)."""
    import os
    import signal
    import subprocess
    import textwrap
    import time

    import psutil

    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        from steer.engine import lifeline
        lifeline.export_server()
        worker = subprocess.Popen([sys.executable, "-m", "steer.service.cli", "worker",
            "--database-url", "sqlite+aiosqlite:///{tmp_path / 'w.db'}",
            "--server-url", "http://127.0.0.1:9", "--model-dir", "{tmp_path}"])
        print(worker.pid, flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        worker = psutil.Process(int(server.stdout.readline()))
        time.sleep(2)  # the worker is up (its watcher thread started at once)
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        worker.wait(20)  # psutil.TimeoutExpired if it outlived the server
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()


async def test_a_failed_heartbeat_is_skipped_not_fatal(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: one store error ended the beat task, and 60 s later another worker
    would fail a job that was still training."""
    from sqlalchemy.exc import OperationalError

    s = setup
    job_id = await sft_job(s)
    claimed = await job_store.claim_job(s.db, "test-worker")
    assert claimed is not None and claimed.id == job_id
    beats: list[str] = []
    real = job_store.heartbeat

    async def flaky(db: Database, jid: str, worker: str) -> bool:
        beats.append(jid)
        if len(beats) == 1:
            raise OperationalError("UPDATE", {}, Exception("database is locked"))
        return await real(db, jid, worker)

    monkeypatch.setattr(job_store, "heartbeat", flaky)
    beat = asyncio.create_task(s.worker._heartbeat(job_id))
    while len(beats) < 3:
        assert not beat.done(), beat
        await asyncio.sleep(0.02)
    beat.cancel()
    await asyncio.gather(beat, return_exceptions=True)


async def test_the_worker_loop_survives_a_store_error(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    s = setup
    calls: list[int] = []

    async def flaky_once() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT", {}, Exception("server closed the connection"))
        return False

    monkeypatch.setattr(s.worker, "run_once", flaky_once)
    monkeypatch.setattr(s.worker, "close", _nothing)
    loop = asyncio.create_task(s.worker.run_forever())
    while len(calls) < 3:
        assert not loop.done(), loop
        await asyncio.sleep(0.02)
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)


async def _nothing() -> None:
    """The fixture closes the store."""


@pytest.mark.parametrize("mode", ["crash", "refused", "cancelled", "ok"])
async def test_a_job_that_did_not_succeed_leaves_no_directory(
        setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Rows, specs and adapters a failed or cancelled job wrote are removed; a succeeded
    job's adapter stays (it is served from there)."""
    s = setup
    if mode == "refused":  # trained and written, then refused by the server
        monkeypatch.setenv("FAKE_ADAPTER", str(write_adapter(tmp_path / "big", rank=32)))
    monkeypatch.setenv("FAKE_TRAINER", {"cancelled": "hang"}.get(mode, mode))
    job_id = await sft_job(s)
    job_dir = s.adapters / "jobs" / job_id
    run = asyncio.create_task(s.worker.run_once())
    async with asyncio.timeout(20):
        while not job_dir.exists():
            await asyncio.sleep(0.02)
        if mode == "cancelled":
            while "Step 1/2" not in " ".join(await messages(s, job_id)):
                await asyncio.sleep(0.05)
            await s.client.fine_tuning.jobs.cancel(job_id)
        await run
    job = await s.client.fine_tuning.jobs.retrieve(job_id)
    if mode == "ok":
        assert job.status == "succeeded"
        [row] = await adapter_store.adapters_of_job(s.db, job_id)
        assert Path(row.path).is_dir()  # noqa: ASYNC240
        assert Path(row.path).is_relative_to(job_dir)
    else:
        assert job.status == ("cancelled" if mode == "cancelled" else "failed")
        assert not job_dir.exists(), sorted(p.name for p in job_dir.iterdir())


async def test_deleting_a_fine_tuned_model_unloads_it_and_keeps_its_lineage(
        setup: Setup) -> None:
    """OpenAI's `client.models.delete`: e.g. a reinforcement job's round checkpoints, which
    would otherwise stay loaded for good."""
    s = setup
    job_id = await sft_job(s)
    await s.worker.run_once()
    name = (await s.client.fine_tuning.jobs.retrieve(job_id)).fine_tuned_model
    assert name is not None and name in [m.id for m in (await s.client.models.list()).data]
    deleted = await s.client.models.delete(name)
    assert (deleted.id, deleted.deleted, deleted.object) == (name, True, "model")
    assert [m.id for m in (await s.client.models.list()).data] == ["fake-model"]  # at once
    with pytest.raises(openai.NotFoundError):
        await s.client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "2+2?"}])
    assert (await adapter_store.get_adapter(s.db, name)).status == "deleted"
    lineage = (await s.client.fine_tuning.jobs.retrieve(job_id)).model_extra["lineage"]
    assert (lineage["model"], lineage["status"]) == (name, "deleted")
    await asyncio.sleep(0.2)  # a few syncs: a deleted row is never loaded again
    assert [m.id for m in (await s.client.models.list()).data] == ["fake-model"]
    for model, error in ((name, openai.NotFoundError), ("ft:fake-model:x:ftjob-none",
                         openai.NotFoundError), ("fake-model", openai.PermissionDeniedError)):
        with pytest.raises(error) as info:
            await s.client.models.delete(model)
        assert isinstance(info.value.body, dict) and info.value.body["param"] == "model"


async def test_only_models_steer_trained_and_whose_job_ended_can_be_deleted(
        tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    settings = Settings(adapter_root=adapters, adapter_sync_s=0.05, max_lora_rank=16,
                        lora_modules={"hand-made": str(write_adapter(tmp_path / "hand"))})
    async with running(create_app(settings, FakeEngine())) as http:
        db: Database = http.app.state.db  # type: ignore[attr-defined]
        client = openai.AsyncOpenAI(base_url="http://steer/v1", api_key="unused",
                                    http_client=http, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as info:
            await client.models.delete("hand-made")
        assert "unload_lora_adapter" in info.value.message
        assert "hand-made" in [m.id for m in (await client.models.list()).data]
        training = await add_file(db, "sft", SFT)
        job = await client.fine_tuning.jobs.create(model="fake-model",
                                                   training_file=training)
        assert await job_store.claim_job(db, "w") is not None  # running: its search may
        ckpt = f"ft:fake-model::{job.id}:ckpt-round-1"  # still use its round checkpoint
        await adapter_store.record_adapter(
            db, name=ckpt, job_id=job.id, base_model="fake-model", parent="fake-model",
            path=str(write_adapter(adapters / "ckpt")), kind="checkpoint", lineage={})
        async with asyncio.timeout(10):
            while ckpt not in [m.id for m in (await client.models.list()).data]:
                await asyncio.sleep(0.05)
        with pytest.raises(openai.ConflictError):
            await client.models.delete(ckpt)
        await client.fine_tuning.jobs.cancel(job.id)
        assert (await client.models.delete(ckpt)).deleted
        assert ckpt not in [m.id for m in (await client.models.list()).data]
