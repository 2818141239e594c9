"""Adapters Steer trained (fine-tuned models and round checkpoints) with their lineage.

Every server serves every `ready` row (it syncs from here), so an adapter a worker trains is
hot-loaded by each replica without an admin call. The lineage says where its priors came
from: parent model, training files and their sources, grader, strategy, round, metrics.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from steer.store.db import Base


class TrainedAdapter(Base):
    __tablename__ = "trained_adapters"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)  # ft:<base>:<suffix>:<job>
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    job_id: Mapped[str | None] = mapped_column(String(64), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    parent: Mapped[str | None] = mapped_column(String(256))  # the model whose answers it learned
    path: Mapped[str] = mapped_column(String(2048))  # adapter directory (shared storage)
    kind: Mapped[str] = mapped_column(String(16))  # final | checkpoint
    status: Mapped[str] = mapped_column(String(16), index=True)  # ready | deleted
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON)
