"""Stored chat completions (OpenAI's `store: true`): the request, the answer, usage, the
model/adapter, the strategy with its options and the full search trace.

Metadata pairs live in their own table so `metadata[key]=value` filters are plain SQL on
every database (no dialect JSON operators).

Queries: `insert_completions` (a batch, from the server's background writer),
`get_completion`, `list_completions` (cursor pages), `update_metadata`, `delete_completion`,
`find_trace`, and `select_completions` (the filtered stream datasets are built from).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Select,
    String,
    and_,
    insert,
    or_,
    select,
)
from sqlalchemy.orm import Mapped, defer, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement

from steer.store.db import Base, Database, NotFound


class StoredCompletion(Base):
    __tablename__ = "stored_completions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the response's chatcmpl-id
    created: Mapped[int] = mapped_column(BigInteger, index=True)
    seq: Mapped[int] = mapped_column(BigInteger, index=True)  # insertion order (ties in created)
    model: Mapped[str] = mapped_column(String(256), index=True)  # as requested (base or adapter)
    adapter: Mapped[str | None] = mapped_column(String(256))
    strategy: Mapped[str | None] = mapped_column(String(64), index=True)  # None: plain
    steering: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the spec with its options
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # the validated request body
    response: Mapped[dict[str, Any]] = mapped_column(JSON)  # the ChatCompletion as returned
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    trace_id: Mapped[str | None] = mapped_column(String(64), index=True)
    trace: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # Trace.to_dict()
    score: Mapped[float | None] = mapped_column(Float)  # the chosen candidate's score, if any
    pairs: Mapped[list[CompletionMetadata]] = relationship(
        back_populates="completion", cascade="all, delete-orphan", lazy="selectin"
    )


class CompletionMetadata(Base):
    __tablename__ = "completion_metadata"

    completion_id: Mapped[str] = mapped_column(
        ForeignKey("stored_completions.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(512))
    completion: Mapped[StoredCompletion] = relationship(back_populates="pairs")

    __table_args__ = (Index("ix_completion_metadata_key_value", "key", "value"),)


# -- queries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewCompletion:
    """One finished chat completion to store (built by the server's writer)."""

    id: str
    created: int
    model: str
    request: dict[str, Any]
    response: dict[str, Any]
    usage: dict[str, Any] | None = None
    adapter: str | None = None
    strategy: str | None = None
    steering: dict[str, Any] | None = None
    trace_id: str | None = None
    trace: dict[str, Any] | None = None
    score: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Page:
    """A page of a cursor-paginated listing (OpenAI's `has_more`)."""

    rows: list[StoredCompletion]
    has_more: bool


@dataclass(frozen=True)
class Selection:
    """Which stored completions a dataset is built from (all given filters must hold)."""

    metadata: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    strategy: str | None = None
    min_score: float | None = None
    created_after: int | None = None
    created_before: int | None = None


_last_seq = 0


def _next_seq() -> int:
    """Insertion order: microseconds, bumped past the last one this process gave out (two
    inserts in one microsecond still sort in the order they came)."""
    global _last_seq
    _last_seq = max(time.time_ns() // 1000, _last_seq + 1)
    return _last_seq


async def insert_completions(db: Database, items: Sequence[NewCompletion]) -> None:
    """Insert a batch in one transaction (two multi-row INSERTs: Core, not ORM objects, as
    this runs beside the server's requests)."""
    if not items:
        return
    rows = [{
        "id": i.id, "created": i.created, "seq": _next_seq(), "model": i.model,
        "adapter": i.adapter, "strategy": i.strategy, "steering": i.steering,
        "request": i.request, "response": i.response, "usage": i.usage,
        "trace_id": i.trace_id, "trace": i.trace, "score": i.score,
    } for i in items]
    pairs = [{"completion_id": i.id, "key": k, "value": v}
             for i in items for k, v in i.metadata.items()]
    async with db.session() as s:
        await s.execute(insert(StoredCompletion), rows)
        if pairs:
            await s.execute(insert(CompletionMetadata), pairs)


async def get_completion(db: Database, completion_id: str) -> StoredCompletion:
    async with db.session() as s:
        row = await s.get(StoredCompletion, completion_id, options=[defer(StoredCompletion.trace)])
        if row is None:
            raise NotFound("chat completion", completion_id)
        return row


def _with_metadata(query: Select[Any], metadata: dict[str, str]) -> Select[Any]:
    # One IN (subquery) per pair: plain SQL on every database, and the (key, value) index.
    for key, value in metadata.items():
        query = query.where(StoredCompletion.id.in_(
            select(CompletionMetadata.completion_id).where(
                CompletionMetadata.key == key, CompletionMetadata.value == value)))
    return query


async def list_completions(
    db: Database, *, model: str | None = None, metadata: dict[str, str] | None = None,
    after: str | None = None, limit: int = 20, order: str = "asc",
) -> Page:
    """Stored completions in insertion order (`asc`) or newest first (`desc`), after the
    completion `after` (NotFound if there is none), at most `limit`; traces not loaded."""
    ascending = order == "asc"
    query = select(StoredCompletion).options(defer(StoredCompletion.trace))
    query = _with_metadata(query, metadata or {})
    if model is not None:
        query = query.where(StoredCompletion.model == model)
    async with db.session() as s:
        if after is not None:
            cursor = await s.scalar(select(StoredCompletion.seq).where(
                StoredCompletion.id == after))
            if cursor is None:
                raise NotFound("chat completion", after)
            query = query.where(_beyond(cursor, after, ascending))
        rows = list((await s.scalars(query.order_by(*_order(ascending)).limit(limit + 1))).all())
    return Page(rows[:limit], len(rows) > limit)


def _order(ascending: bool) -> tuple[Any, ...]:
    # subtle: seq is unique per process only (two replicas can write the same microsecond),
    # so the id breaks ties: (seq, id) is a total order, and a page boundary inside a tie
    # neither skips nor repeats a row
    if ascending:
        return StoredCompletion.seq.asc(), StoredCompletion.id.asc()
    return StoredCompletion.seq.desc(), StoredCompletion.id.desc()


def _beyond(seq: int, row_id: str, ascending: bool) -> ColumnElement[bool]:
    """Rows after (seq, row_id) in `_order(ascending)`: the keyset condition."""
    if ascending:
        return or_(StoredCompletion.seq > seq,
                   and_(StoredCompletion.seq == seq, StoredCompletion.id > row_id))
    return or_(StoredCompletion.seq < seq,
               and_(StoredCompletion.seq == seq, StoredCompletion.id < row_id))


async def update_metadata(db: Database, completion_id: str,
                          metadata: dict[str, str] | None) -> StoredCompletion:
    """Replace a completion's metadata (OpenAI's update: the object given is the new one;
    null clears it)."""
    async with db.session() as s:
        row = await s.get(StoredCompletion, completion_id, options=[defer(StoredCompletion.trace)])
        if row is None:
            raise NotFound("chat completion", completion_id)
        row.pairs = []
        await s.flush()  # the old pairs go before new ones with the same keys arrive
        row.pairs = [CompletionMetadata(key=k, value=v) for k, v in (metadata or {}).items()]
        await s.flush()
        await s.refresh(row, ["pairs"])
        return row


async def delete_completion(db: Database, completion_id: str) -> None:
    async with db.session() as s:
        row = await s.get(StoredCompletion, completion_id)
        if row is None:
            raise NotFound("chat completion", completion_id)
        await s.delete(row)


async def find_trace(db: Database, trace_id: str) -> dict[str, Any] | None:
    """The search trace a stored completion kept, by its trace id (None: not stored)."""
    async with db.session() as s:
        trace: dict[str, Any] | None = await s.scalar(
            select(StoredCompletion.trace).where(StoredCompletion.trace_id == trace_id,
                                                 StoredCompletion.trace.is_not(None)).limit(1))
        return trace


async def select_completions(
    db: Database, selection: Selection, batch: int = 200
) -> AsyncIterator[StoredCompletion]:
    """Every stored completion `selection` matches, oldest first, traces included; read in
    batches (keyset on insertion order, then id), so a large store is never loaded at once."""
    query = _with_metadata(select(StoredCompletion), selection.metadata)
    if selection.model is not None:
        query = query.where(StoredCompletion.model == selection.model)
    if selection.strategy is not None:
        query = query.where(StoredCompletion.strategy == selection.strategy)
    if selection.min_score is not None:
        query = query.where(StoredCompletion.score >= selection.min_score)
    if selection.created_after is not None:
        query = query.where(StoredCompletion.created >= selection.created_after)
    if selection.created_before is not None:
        query = query.where(StoredCompletion.created < selection.created_before)
    cursor: tuple[int, str] | None = None
    while True:
        page = query if cursor is None else query.where(_beyond(*cursor, ascending=True))
        async with db.session() as s:
            rows = list((await s.scalars(
                page.order_by(*_order(ascending=True)).limit(batch))).all())
        for row in rows:
            yield row
        if len(rows) < batch:
            return
        cursor = rows[-1].seq, rows[-1].id
