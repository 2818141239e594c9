"""Adapters Steer trained (fine-tuned models and round checkpoints) with their lineage.

Every server serves every `ready` row whose base it serves (it syncs from here), so an
adapter a worker trains is hot-loaded by each replica without an admin call. The lineage
says where its priors came from: parent model, training files and their sources, grader,
strategy, round, metrics. A server that refuses to load one (rank above its limit, shapes
that don't fit its model) marks it `refused` with the reason, so the worker waiting for it
fails its job with that reason instead of waiting forever.

Statuses: ready -> deleted | refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import JSON, BigInteger, String, Text, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Mapped, mapped_column

from steer.store.db import Base, Conflict, Database, NotFound, now

MAX_ANCESTORS = 32  # a lineage chain longer than this is cut (and says so)


class TrainedAdapter(Base):
    __tablename__ = "trained_adapters"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)  # ft:<base>:<suffix>:<job>
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    job_id: Mapped[str | None] = mapped_column(String(64), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    parent: Mapped[str | None] = mapped_column(String(256))  # the model whose answers it learned
    path: Mapped[str] = mapped_column(String(2048))  # adapter directory (shared storage)
    kind: Mapped[str] = mapped_column(String(16))  # final | checkpoint
    status: Mapped[str] = mapped_column(String(16), index=True)  # ready | deleted | refused
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)  # why a server refused it


async def record_adapter(
    db: Database, *, name: str, job_id: str | None, base_model: str, parent: str | None,
    path: str, kind: str, lineage: dict[str, Any],
) -> TrainedAdapter:
    """A new `ready` adapter; `Conflict` if the name is taken."""
    async with db.session() as s:
        if await s.get(TrainedAdapter, name) is not None:
            raise Conflict(f"an adapter named '{name}' already exists")
        row = TrainedAdapter(name=name, created_at=now(), job_id=job_id, base_model=base_model,
                             parent=parent, path=path, kind=kind, status="ready",
                             lineage=lineage)
        s.add(row)
    return row


async def get_adapter(db: Database, name: str) -> TrainedAdapter:
    async with db.session() as s:
        row = await s.get(TrainedAdapter, name, populate_existing=True)
        if row is None:
            raise NotFound("trained adapter", name)
        return row


async def ready_adapters(db: Database, base_model: str | None = None) -> list[TrainedAdapter]:
    """Every `ready` adapter (of `base_model`, when given), oldest first."""
    async with db.session() as s:
        query = select(TrainedAdapter).where(TrainedAdapter.status == "ready")
        if base_model is not None:
            query = query.where(TrainedAdapter.base_model == base_model)
        return list((await s.scalars(query.order_by(TrainedAdapter.created_at,
                                                    TrainedAdapter.name))).all())


async def adapters_of_job(db: Database, job_id: str) -> list[TrainedAdapter]:
    async with db.session() as s:
        return list((await s.scalars(select(TrainedAdapter)
                                     .where(TrainedAdapter.job_id == job_id)
                                     .order_by(TrainedAdapter.created_at))).all())


async def set_status(db: Database, name: str, status: str, error: str | None = None) -> bool:
    """`deleted` or `refused` (with the reason); False when the row was not `ready`. Only a
    `ready` row changes: a refusal never resurrects a deleted adapter."""
    async with db.session() as s:
        result = await s.execute(
            update(TrainedAdapter)
            .where(TrainedAdapter.name == name, TrainedAdapter.status == "ready")
            .values(status=status, error=error))
        assert isinstance(result, CursorResult)
        return bool(result.rowcount == 1)


async def finals_of_jobs(db: Database, job_ids: Sequence[str]) -> dict[str, TrainedAdapter]:
    """Each job's newest `final` adapter (any status), for a page of jobs in one query."""
    if not job_ids:
        return {}
    async with db.session() as s:
        rows = (await s.scalars(select(TrainedAdapter).where(
            TrainedAdapter.job_id.in_(job_ids), TrainedAdapter.kind == "final")
            .order_by(TrainedAdapter.created_at, TrainedAdapter.name))).all()
    return {row.job_id: row for row in rows if row.job_id is not None}


async def ancestors(db: Database, name: str) -> list[dict[str, Any]]:
    """The chain of models `name` descends from, nearest first: each trained ancestor with
    its job, kind and status, ending with the first parent Steer did not train (the base)."""
    async with db.session() as s:
        row = await s.get(TrainedAdapter, name)
    if row is None:
        return []
    return (await chains(db, [row]))[name]


async def chains(db: Database, rows: Sequence[TrainedAdapter]) -> dict[str, list[dict[str, Any]]]:
    """`ancestors` of several adapters at once: one query per generation, however many rows
    (a parent that is the row's own base model is known without one: Steer never trains a
    base)."""
    out: dict[str, list[dict[str, Any]]] = {row.name: [] for row in rows}
    seen = {row.name: {row.name} for row in rows}
    base = {row.name: row.base_model for row in rows}
    walking = {row.name: row.parent for row in rows if row.parent is not None}
    async with db.session() as s:
        while walking:
            for origin, parent in list(walking.items()):
                if parent in seen[origin] or len(out[origin]) >= MAX_ANCESTORS:
                    out[origin].append({"model": parent, "truncated": True})
                    del walking[origin]
                elif parent == base[origin]:
                    out[origin].append({"model": parent, "trained_by_steer": False})
                    del walking[origin]
            wanted = set(walking.values())
            found = {up.name: up for up in (await s.scalars(select(TrainedAdapter).where(
                TrainedAdapter.name.in_(wanted)))).all()} if wanted else {}
            for origin, parent in list(walking.items()):
                up = found.get(parent)
                seen[origin].add(parent)
                if up is None:
                    out[origin].append({"model": parent, "trained_by_steer": False})
                    del walking[origin]
                    continue
                out[origin].append({"model": up.name, "trained_by_steer": True,
                                    "job_id": up.job_id, "kind": up.kind, "status": up.status})
                if up.parent is None:
                    del walking[origin]
                else:
                    walking[origin] = up.parent
    return out
