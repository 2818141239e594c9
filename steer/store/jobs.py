"""Fine-tuning jobs as a persisted state machine (OpenAI's status names), their events and
checkpoints. A worker claims a queued job, heartbeats while it runs, and appends an event for
every step; every transition is written here before it takes effect."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from steer.store.db import Base

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")


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
