"""The training worker: claims queued fine-tuning jobs from the store and runs them.

`steer worker --database-url ... --server-url ...` runs one on any machine that shares the
database and the adapter storage; `steer serve` starts one embedded (a subprocess that dies
with the server). Training never runs in the server's event loop: supervised and DPO jobs
go to the trainer subprocess (`trainer_process.py`), reinforcement jobs to
`steer.training.expert.run(ctx)`, which searches through the server's HTTP API and trains
through the same `JobContext`.

A job's life here: claim (`running`, one worker wins), heartbeat while it runs, read its
files, train, `publish` (record a `TrainedAdapter` and wait until the server lists it in
/v1/models), then `succeeded` with `fine_tuned_model`. Cancelled meanwhile: the trainer is
killed. Any failure: `failed` with the reason as its last event. Either way, every adapter
the job recorded is marked deleted (servers unload it) and its directory under the adapter
root (rows, specs, adapters) is removed: nothing half-registered, nothing left on disk. A
worker starting fails the running jobs it owned, and any whose heartbeat went stale, and
cleans up after them the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.exc import SQLAlchemyError

from steer.store import Conflict, Database, NotFound, StoreError
from steer.store import adapters as adapter_store
from steer.store import files as file_store
from steer.store import jobs as job_store
from steer.training import expert
from steer.training.context import JobCancelled, JobContext, PublishFailed
from steer.training.formats import FormatError, parse_lines
from steer.training.rows import RowError, to_trl_rows
from steer.training.trainer_process import TRAINER, TrainerFailed, TrainerStopped

logger = logging.getLogger(__name__)

__all__ = ["JobContext", "Worker", "WorkerConfig"]


@dataclass(frozen=True)
class WorkerConfig:
    database_url: str
    server_url: str
    base_model_dir: str
    adapters_dir: Path
    api_key: str | None = None
    threads: int = 1
    max_lora_rank: int = 16
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    poll_s: float = 1.0  # how often an idle worker looks for a job (and a busy one for cancel)
    heartbeat_s: float = 5.0
    stale_s: float = 60.0  # a running job whose heartbeat is older was lost by its worker
    publish_timeout_s: float = 600.0  # the server may still be starting
    trainer_command: tuple[str, ...] = TRAINER


class Worker:
    def __init__(self, config: WorkerConfig, db: Database | None = None,
                 steer: httpx.AsyncClient | None = None) -> None:
        """`db` and `steer` default to ones opened (and closed) from the config."""
        self.config = config
        self.db = db or Database(config.database_url)
        self._own_db = db is None
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.steer = steer or httpx.AsyncClient(
            base_url=config.server_url.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(600, connect=10))
        self._own_steer = steer is None

    async def start(self) -> list[str]:
        """Migrate (idempotent) and recover: the jobs this worker's name owned, and any with
        a stale heartbeat, fail ("worker restarted"); queued ones stay queued."""
        if self._own_db:
            await self.db.start()
        failed = await job_store.recover(self.db, worker=self.config.name,
                                         stale_s=self.config.stale_s)
        for job_id in failed:
            await self._discard(job_id)
        if failed:
            logger.warning("failed %d job(s) left running by a stopped worker: %s",
                           len(failed), ", ".join(failed))
        return failed

    async def close(self) -> None:
        if self._own_steer:
            await self.steer.aclose()
        if self._own_db:
            await self.db.close()

    async def run_forever(self) -> None:
        await self.start()
        logger.info("worker %s polling %s", self.config.name, self.db.url.split("://")[0])
        try:
            while True:
                try:
                    worked = await self.run_once()
                except (StoreError, SQLAlchemyError, OSError):
                    # a restarting database or a locked SQLite file: try again, don't die
                    logger.exception("worker: the store failed; retrying in %.1fs",
                                     self.config.poll_s)
                    worked = False
                if not worked:
                    await asyncio.sleep(self.config.poll_s)
        finally:
            await self.close()

    async def run_once(self) -> bool:
        """Claim and run one job; False when none was queued. Also fails stale jobs of
        other workers (a machine that died without a restart)."""
        for job_id in await job_store.recover(self.db, stale_s=self.config.stale_s):
            await self._discard(job_id)
        job = await job_store.claim_job(self.db, self.config.name)
        if job is None:
            return False
        logger.info("running job %s (%s)", job.id, job.method.get("type"))
        beat = asyncio.create_task(self._heartbeat(job.id))
        try:
            await self.run_job(job)
        finally:
            beat.cancel()
            # subtle: a beat cancelled mid-query must finish closing its connection before
            # anyone disposes the store (else that close waits forever)
            await asyncio.gather(beat, return_exceptions=True)
        return True

    async def _heartbeat(self, job_id: str) -> None:
        alive = True
        while alive:
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                alive = await job_store.heartbeat(self.db, job_id, self.config.name)
            except (StoreError, SQLAlchemyError, OSError):
                # one missed beat is fine (stale means 60 s of them); a dead beat task
                # would let another worker fail a job that is still training
                logger.warning("heartbeat for %s failed; next one in %.0fs", job_id,
                               self.config.heartbeat_s, exc_info=True)

    async def run_job(self, job: job_store.Job) -> None:
        ctx: JobContext | None = None
        try:
            ctx = await self.context(job)
            if job.method.get("type") == "reinforcement":
                name = await expert.run(ctx)
            else:
                name = await self.supervised(ctx)
            await job_store.transition(
                self.db, job.id, "succeeded", "The job has successfully completed",
                worker=self.config.name, fine_tuned_model=name,
                trained_tokens=ctx.trained_tokens or None)
            return
        except asyncio.CancelledError:  # the worker is stopping: the job can't finish
            await asyncio.shield(self._end(job, "worker_stopped", "the worker was stopped "
                                           "(server shutdown); create the job again"))
            await asyncio.shield(self._discard(job.id))
            raise
        except Conflict as exc:  # a name taken, or the job is no longer ours to finish
            await self._end(job, "training_failed", str(exc))
        except (JobCancelled, TrainerStopped, expert.ExpertCancelled) as exc:
            await self._end(job, "cancelled", str(exc))
        except (TrainerFailed, PublishFailed, expert.ExpertError, expert.MethodError,
                FormatError, RowError, NotFound, ValueError) as exc:
            await self._end(job, "training_failed", str(exc))
        except Exception as exc:  # a bug must fail its job, not the worker that runs jobs
            logger.exception("job %s failed", job.id)
            await self._end(job, "internal_error", f"{type(exc).__name__}: {exc}")
        await self._discard(job.id)

    async def _end(self, job: job_store.Job, code: str, message: str) -> None:
        """Fail the job with `message`, unless it already ended (cancelled: say it stopped)."""
        current = await job_store.get_job(self.db, job.id)
        if current.status != "running" or current.worker != self.config.name:
            await job_store.add_event(self.db, job.id, f"Training stopped: {message}")
            return
        try:
            await job_store.fail(self.db, job.id, code, message, worker=self.config.name)
        except Conflict:  # cancelled between the read and the write
            await job_store.add_event(self.db, job.id, f"Training stopped: {message}")

    async def _discard(self, job_id: str) -> None:
        """What a job that did not succeed leaves: its adapters are marked deleted (servers
        unload them), then its directory goes (a succeeded job's adapters are served from
        theirs, so it stays)."""
        for row in await adapter_store.adapters_of_job(self.db, job_id):
            await adapter_store.set_status(self.db, row.name, "deleted")
        await asyncio.to_thread(_remove_tree, self.job_dir(job_id))

    def job_dir(self, job_id: str) -> Path:
        """Where a job's rows, specs and adapters go (`JobContext.job_dir`)."""
        return self.config.adapters_dir / "jobs" / job_id

    async def context(self, job: job_store.Job) -> JobContext:
        training = await file_store.get_file(self.db, job.training_file)
        lines = parse_lines(await file_store.file_content(self.db, job.training_file))
        validation, valid_lines = None, []
        if job.validation_file is not None:
            validation = await file_store.get_file(self.db, job.validation_file)
            valid_lines = parse_lines(await file_store.file_content(self.db, validation.id))
        await job_store.add_event(self.db, job.id, f"Read {len(lines)} training lines"
                                  + (f" and {len(valid_lines)} validation lines"
                                     if validation is not None else ""))
        return JobContext(self, job, training, validation, lines, valid_lines)

    async def supervised(self, ctx: JobContext) -> str:
        job = ctx.job
        kind = job.method["type"]
        line_kind = "sft" if kind == "supervised" else "preference"
        rows = to_trl_rows(line_kind, ctx.training_lines)  # type: ignore[arg-type]
        eval_rows = (to_trl_rows(line_kind, ctx.validation_lines)  # type: ignore[arg-type]
                     if ctx.validation_lines else None)
        hp = dict((job.method.get(kind) or {}).get("hyperparameters") or {})
        kwargs: dict[str, Any] = {"method": "sft" if kind == "supervised" else "dpo",
                                  "seed": job.seed}
        kwargs.update({k: v for k, v in hp.items() if v != "auto"})
        outcome = await ctx.train(kwargs, rows, "final", eval_rows=eval_rows)
        lineage = {"method": kind, "round": None, "hyperparameters": outcome.hyperparameters,
                   "metrics": outcome.metrics()}
        return await ctx.publish(outcome.adapter_dir, expert.final_name(job), "final", lineage)


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:  # the job never wrote anything (or another worker cleaned up)
        return
    except OSError as exc:  # the job has ended either way: a leftover is logged, not fatal
        logger.warning("could not remove %s: %s", path, exc)


async def run_worker(config: WorkerConfig) -> None:
    """`steer worker`: run until SIGTERM/SIGINT; a job running then is failed, its trainer
    killed."""
    worker = Worker(config)
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await worker.run_forever()
    except asyncio.CancelledError:
        logger.info("worker %s stopped", config.name)
