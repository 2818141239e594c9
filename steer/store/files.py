"""Uploaded files (OpenAI's Files API). The content lives in the database, so every replica
and a worker on another machine read the same bytes without a shared disk.

Queries: `create_file`, `get_file` / `file_content` (NotFound), `list_files` (a cursor page
in insertion order), `delete_file` (`FileInUse`, a `Conflict`, while a job that has not
finished names the file). What a line may hold is not checked here (`steer.training.formats`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    LargeBinary,
    String,
    Text,
    and_,
    delete,
    or_,
    select,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Mapped, deferred, mapped_column

from steer.store.db import Base, Conflict, Database, NotFound, new_id, now
from steer.store.jobs import FINAL, Job


class StoredFile(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # file-...
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    seq: Mapped[int] = mapped_column(BigInteger, index=True)  # insertion order (ties in created)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32), index=True)
    size: Mapped[int] = mapped_column("bytes", BigInteger)
    lines: Mapped[int] = mapped_column(Integer)  # JSONL records
    kind: Mapped[str] = mapped_column(String(32))  # the line format: sft | preference | graded
    source: Mapped[str | None] = mapped_column(Text)  # JSON: where the lines came from
    content: Mapped[bytes] = deferred(mapped_column(LargeBinary))

    @property
    def source_dict(self) -> dict[str, Any] | None:
        return json.loads(self.source) if self.source else None


class FileInUse(Conflict):
    """A job that has not finished trains on (or validates with) the file."""

    def __init__(self, file_id: str, jobs: list[str]) -> None:
        super().__init__(f"file '{file_id}' is used by fine-tuning job(s) {', '.join(jobs)} "
                         "that have not finished; cancel them or wait until they end")
        self.file_id, self.jobs = file_id, jobs


@dataclass(frozen=True)
class FilePage:
    data: list[StoredFile]
    has_more: bool


_last_seq = 0


def _next_seq() -> int:
    """Microseconds, bumped past the last one this process gave out, so two uploads in one
    second (or microsecond) still list in the order they came."""
    global _last_seq
    _last_seq = max(time.time_ns() // 1000, _last_seq + 1)
    return _last_seq


async def create_file(
    db: Database, *, filename: str, purpose: str, content: bytes, lines: int, kind: str,
    source: dict[str, Any] | None = None,
) -> StoredFile:
    """Store an already validated file; `source` says where its lines came from (JSON)."""
    row = StoredFile(
        id=new_id("file"), created_at=now(), seq=_next_seq(), filename=filename[:512],
        purpose=purpose, size=len(content), lines=lines, kind=kind,
        source=json.dumps(source) if source is not None else None, content=content,
    )
    async with db.session() as s:
        s.add(row)
    return row


async def get_file(db: Database, file_id: str) -> StoredFile:
    async with db.session() as s:
        row = await s.get(StoredFile, file_id)
        if row is None:
            raise NotFound("file", file_id)
        return row


async def file_content(db: Database, file_id: str) -> bytes:
    async with db.session() as s:
        content = await s.scalar(select(StoredFile.content).where(StoredFile.id == file_id))
        if content is None:
            raise NotFound("file", file_id)
        return content


async def list_files(
    db: Database, *, purpose: str | None = None, after: str | None = None, limit: int = 10_000,
    order: str = "desc",
) -> FilePage:
    """Files newest first (`desc`, OpenAI's default) or oldest first, after the file `after`
    (NotFound if there is none), at most `limit`; content not loaded."""
    ascending = order == "asc"
    query = select(StoredFile)
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    async with db.session() as s:
        if after is not None:
            cursor = await s.scalar(select(StoredFile.seq).where(StoredFile.id == after))
            if cursor is None:
                raise NotFound("file", after)
            # subtle: seq is unique per process only (replicas can share a microsecond), so
            # the id breaks ties; a page boundary inside a tie neither skips nor repeats
            if ascending:
                query = query.where(or_(StoredFile.seq > cursor,
                                        and_(StoredFile.seq == cursor, StoredFile.id > after)))
            else:
                query = query.where(or_(StoredFile.seq < cursor,
                                        and_(StoredFile.seq == cursor, StoredFile.id < after)))
        keys = ((StoredFile.seq.asc(), StoredFile.id.asc()) if ascending
                else (StoredFile.seq.desc(), StoredFile.id.desc()))
        rows = list((await s.scalars(query.order_by(*keys).limit(limit + 1))).all())
    return FilePage(rows[:limit], len(rows) > limit)


async def delete_file(db: Database, file_id: str) -> None:
    """Delete a file no unfinished job uses; NotFound, or FileInUse naming the jobs."""
    async with db.session() as s:
        # subtle: delete first, check the users after, in one transaction (raising rolls the
        # delete back). The DELETE takes the write lock (SQLite) or the row lock (PostgreSQL)
        # before the check reads, and `jobs.create_job` writes its job before it checks (and
        # locks) the file: whichever goes second sees the other's committed work, so a job
        # never outlives its file and a file in use is never deleted.
        result = await s.execute(delete(StoredFile).where(StoredFile.id == file_id))
        if _rows(result) != 1:
            raise NotFound("file", file_id)
        users = (await s.scalars(
            select(Job.id).where(
                or_(Job.training_file == file_id, Job.validation_file == file_id),
                Job.status.not_in(FINAL),
            ).order_by(Job.created_at, Job.id).limit(10)
        )).all()
        if users:
            raise FileInUse(file_id, list(users))


def _rows(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)
