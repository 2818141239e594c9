"""Uploaded files (OpenAI's Files API). The content lives in the database, so every replica
and a worker on another machine read the same bytes without a shared disk."""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, deferred, mapped_column

from steer.store.db import Base


class StoredFile(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # file-...
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32), index=True)
    size: Mapped[int] = mapped_column("bytes", BigInteger)
    lines: Mapped[int] = mapped_column(Integer)  # JSONL records
    kind: Mapped[str] = mapped_column(String(32))  # the line format: sft | preference | graded
    source: Mapped[str | None] = mapped_column(String(2048))  # JSON: where the lines came from
    content: Mapped[bytes] = deferred(mapped_column(LargeBinary))
