"""Stored chat completions (OpenAI's `store: true`): the request, the answer, usage, the
model/adapter, the strategy with its options and the full search trace.

Metadata pairs live in their own table so `metadata[key]=value` filters are plain SQL on
every database (no dialect JSON operators).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from steer.store.db import Base


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
