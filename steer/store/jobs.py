"""Fine-tuning jobs as a persisted state machine (OpenAI's status names), their events and
checkpoints. A worker claims a queued job, heartbeats while it runs, and appends an event for
every step; every transition is written here before it takes effect.

    validating_files -> queued -> running -> succeeded
          |               |          |-----> failed
          +---------------+----------+-----> cancelled / failed

Every transition is one conditional `UPDATE ... WHERE status IN (...)` checked by its row
count, plus its event, in one transaction: two workers (or a worker and a cancel) racing
for one job can't both win, on SQLite or PostgreSQL. Losing raises `Conflict`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    and_,
    or_,
    select,
    update,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from steer.store.db import Base, Conflict, Database, NotFound, new_id, now

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")
# to -> the statuses a job may be in to get there
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("validating_files",),
    "running": ("queued",),
    "succeeded": ("running",),
    "failed": ("validating_files", "queued", "running"),
    "cancelled": ("validating_files", "queued", "running"),
}


class Job(Base):
    __tablename__ = "fine_tuning_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # ftjob-...
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    seq: Mapped[int] = mapped_column(BigInteger, index=True)
    model: Mapped[str] = mapped_column(String(256))  # the base it trains from
    status: Mapped[str] = mapped_column(String(32), index=True)
    training_file: Mapped[str] = mapped_column(String(64), index=True)
    validation_file: Mapped[str | None] = mapped_column(String(64), index=True)
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"type": ..., <type>: {...}}
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {code, message, param}
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    result_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    worker: Mapped[str | None] = mapped_column(String(256))  # who claimed it
    heartbeat_at: Mapped[int | None] = mapped_column(BigInteger)
    cancel_requested: Mapped[int] = mapped_column(Integer, default=0)


class JobEvent(Base):
    __tablename__ = "fine_tuning_job_events"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                     primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)  # ftevent-...
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(16))  # info | warn | error
    message: Mapped[str] = mapped_column(String(4096))
    type: Mapped[str] = mapped_column(String(16))  # message | metrics
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    __table_args__ = (Index("ix_fine_tuning_job_events_job_seq", "job_id", "seq"),)


class Checkpoint(Base):
    __tablename__ = "fine_tuning_checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # ftckpt-...
    job_id: Mapped[str] = mapped_column(
        ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[int] = mapped_column(BigInteger)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(256))
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)


# -- jobs -------------------------------------------------------------------------------------


async def create_job(
    db: Database, *, model: str, training_file: str, validation_file: str | None,
    suffix: str | None, seed: int, method: dict[str, Any], metadata: dict[str, str] | None,
) -> Job:
    """A new job in `validating_files`, with its first event."""
    job = Job(id=new_id("ftjob"), created_at=now(), seq=time.time_ns(), model=model,
              status="validating_files", training_file=training_file,
              validation_file=validation_file, suffix=suffix, seed=seed, method=method,
              job_metadata=metadata, result_files=[], cancel_requested=0)
    from steer.store.files import StoredFile  # (files imports this module)

    async with db.session() as s:
        # subtle: the job is written before its files are checked, in one transaction (a
        # missing file rolls it back): the INSERT takes SQLite's write lock, and the check
        # locks the file rows where the database can (FOR UPDATE, PostgreSQL), so a
        # concurrent `files.delete_file` either finishes first (the check sees the file gone)
        # or runs after this commits and sees the job
        s.add(job)
        await s.flush()
        for file_id in filter(None, (training_file, validation_file)):
            found = await s.scalar(select(StoredFile.id).where(StoredFile.id == file_id)
                                   .with_for_update())
            if found is None:
                raise NotFound("file", file_id)
        _event(s, job.id, f"Validating training file: {training_file}"
               + (f" and validation file: {validation_file}" if validation_file else ""))
    return job


async def get_job(db: Database, job_id: str) -> Job:
    async with db.session() as s:
        return await _get(s, job_id)


async def _get(s: AsyncSession, job_id: str) -> Job:
    job = await s.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound("fine-tuning job", job_id)
    return job


async def list_jobs(
    db: Database, *, after: str | None = None, limit: int = 20,
    metadata: Mapping[str, str] | None = None,
) -> tuple[list[Job], bool]:
    """Newest first, `limit` of them after the job `after`, and whether more follow.

    The metadata filter runs in Python over the page scan: jobs are few (each is a training
    run), and a JSON column has no operator common to SQLite and PostgreSQL."""
    async with db.session() as s:
        query = select(Job).order_by(Job.seq.desc(), Job.id.desc())
        if after is not None:
            cursor = await _get(s, after)
            query = query.where(or_(Job.seq < cursor.seq,
                                    and_(Job.seq == cursor.seq, Job.id < cursor.id)))
        if not metadata:
            rows = list((await s.scalars(query.limit(limit + 1))).all())
        else:
            rows = [j for j in (await s.scalars(query)).all()
                    if all((j.job_metadata or {}).get(k) == v for k, v in metadata.items())]
    return rows[:limit], len(rows) > limit


async def transition(
    db: Database, job_id: str, to: str, message: str, *, level: str = "info",
    data: dict[str, Any] | None = None, expect: Sequence[str] | None = None,
    worker: str | None = None, **fields: Any,
) -> Job:
    """Move the job to `to` (setting `fields` too) and append `message`, in one transaction,
    if its status allows it (and is in `expect`, and it is `worker`'s, when given); else
    `Conflict` naming the status it is in."""
    allowed = [s for s in TRANSITIONS[to] if expect is None or s in expect]
    values = {"status": to, **fields}
    if to in FINAL:
        values.setdefault("finished_at", now())
    async with db.session() as s:
        stmt = update(Job).where(Job.id == job_id, Job.status.in_(allowed))
        if worker is not None:
            stmt = stmt.where(Job.worker == worker)
        result = await s.execute(stmt.values(**values))
        if _rows(result) != 1:
            job = await _get(s, job_id)
            raise Conflict(f"fine-tuning job '{job_id}' is {job.status}; it can't become {to}")
        _event(s, job_id, message, level=level, data=data)
        return await _get(s, job_id)


async def fail(db: Database, job_id: str, code: str, message: str, *,
               worker: str | None = None, param: str | None = None) -> Job:
    """`failed`, with OpenAI's `error` object and the reason as the last event."""
    return await transition(db, job_id, "failed", message, level="error", worker=worker,
                            error={"code": code, "message": message, "param": param})


async def cancel(db: Database, job_id: str) -> Job:
    """Cancel a job that has not finished: `cancelled` at once (a running job's worker sees
    it and stops its training). A finished job: `Conflict`."""
    async with db.session() as s:
        result = await s.execute(
            update(Job).where(Job.id == job_id, Job.status.in_(TRANSITIONS["cancelled"]))
            .values(status="cancelled", cancel_requested=1, finished_at=now()))
        if _rows(result) != 1:
            job = await _get(s, job_id)
            raise Conflict(f"fine-tuning job '{job_id}' has already {job.status}; it can't be "
                           "cancelled")
        _event(s, job_id, "Job cancelled")
        return await _get(s, job_id)


async def claim_job(db: Database, worker: str) -> Job | None:
    """The oldest queued job, now `running` and `worker`'s; None when none is queued.
    Several workers may call this at once: the conditional update lets exactly one win a
    job, the others try the next one."""
    while True:
        async with db.session() as s:
            job_id = await s.scalar(select(Job.id).where(Job.status == "queued")
                                    .order_by(Job.seq, Job.id).limit(1))
            if job_id is None:
                return None
            t = now()
            result = await s.execute(
                update(Job).where(Job.id == job_id, Job.status == "queued")
                .values(status="running", worker=worker, started_at=t, heartbeat_at=t))
            if _rows(result) == 1:
                _event(s, job_id, "Fine-tuning job started", data={"worker": worker})
                return await _get(s, job_id)


async def heartbeat(db: Database, job_id: str, worker: str) -> bool:
    """Record that `worker` still runs the job; False when it is no longer its running job
    (cancelled, or failed by a recovery)."""
    async with db.session() as s:
        result = await s.execute(
            update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
            .values(heartbeat_at=now()))
        return _rows(result) == 1


async def recover(db: Database, *, stale_s: float, worker: str | None = None) -> list[str]:
    """Fail the running jobs whose worker is gone: any whose heartbeat is older than
    `stale_s`, and `worker`'s own (a worker starting runs nothing yet). Queued jobs stay
    queued."""
    stale_before = now() - int(stale_s)
    lost = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before)
    if worker is not None:
        lost = or_(lost, Job.worker == worker)
    async with db.session() as s:
        ids = list((await s.scalars(select(Job.id).where(Job.status == "running", lost))).all())
        # a server that stopped between creating a job and queueing it (two transactions)
        stuck = list((await s.scalars(select(Job.id).where(
            Job.status == "validating_files", Job.created_at < stale_before))).all())
    for job_id in stuck:
        try:
            await fail(db, job_id, "validation_interrupted", "The server stopped while "
                       "validating this job's files; create it again.")
        except Conflict:  # it moved on meanwhile
            continue
    failed = []
    for job_id in ids:
        try:
            await fail(db, job_id, "worker_restarted", "The worker running this job stopped "
                       "(restarted or lost); the job did not finish. Create it again.")
        except Conflict:  # it finished meanwhile
            continue
        failed.append(job_id)
    return failed


# -- events -----------------------------------------------------------------------------------


def _event(s: AsyncSession, job_id: str, message: str, *, level: str = "info",
           type: str = "message", data: dict[str, Any] | None = None) -> None:
    s.add(JobEvent(id=new_id("ftevent"), job_id=job_id, created_at=now(), level=level,
                   message=message[:4096], type=type, data=data))


async def add_event(db: Database, job_id: str, message: str, *, level: str = "info",
                    type: str = "message", data: dict[str, Any] | None = None) -> None:
    async with db.session() as s:
        _event(s, job_id, message, level=level, type=type, data=data)


async def list_events(db: Database, job_id: str, *, after: str | None = None,
                      limit: int = 20) -> tuple[list[JobEvent], bool]:
    """Newest first, like OpenAI; `after` is the id of the last event of the previous page."""
    async with db.session() as s:
        await _get(s, job_id)
        query = (select(JobEvent).where(JobEvent.job_id == job_id)
                 .order_by(JobEvent.seq.desc()))
        if after is not None:
            cursor = await s.scalar(select(JobEvent.seq).where(JobEvent.id == after,
                                                               JobEvent.job_id == job_id))
            if cursor is None:
                raise NotFound("fine-tuning job event", after)
            query = query.where(JobEvent.seq < cursor)
        rows = list((await s.scalars(query.limit(limit + 1))).all())
    return rows[:limit], len(rows) > limit


# -- checkpoints ------------------------------------------------------------------------------


async def add_checkpoint(db: Database, job_id: str, model: str, step: int,
                         metrics: dict[str, Any]) -> Checkpoint:
    ckpt = Checkpoint(id=new_id("ftckpt"), job_id=job_id, created_at=now(),
                      fine_tuned_model_checkpoint=model, step_number=step, metrics=metrics)
    async with db.session() as s:
        s.add(ckpt)
    return ckpt


async def list_checkpoints(db: Database, job_id: str, *, after: str | None = None,
                           limit: int = 10) -> tuple[list[Checkpoint], bool]:
    """Newest first (by step, then time), like OpenAI."""
    async with db.session() as s:
        await _get(s, job_id)
        rows = list((await s.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.step_number.desc(), Checkpoint.created_at.desc(),
                      Checkpoint.id.desc()))).all())
    if after is not None:
        ids = [c.id for c in rows]
        if after not in ids:
            raise NotFound("fine-tuning checkpoint", after)
        rows = rows[ids.index(after) + 1:]
    return rows[:limit], len(rows) > limit


def _rows(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)
