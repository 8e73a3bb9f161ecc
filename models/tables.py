"""The two tables: `batches` (one per submission) and `jobs` (one per document)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy import UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from models.states import BatchState, JobState

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
JobId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base of sumfleet's tables."""


class Batch(Base):
    """One submission: a corpus, the model and prompt it runs with, and its progress."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=BatchState.QUEUED.value, index=True)
    model: Mapped[str] = mapped_column(String(512))
    queue: Mapped[str] = mapped_column(String(255))
    prompt_name: Mapped[str] = mapped_column(String(255))
    prompt_template: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source: Mapped[str | None] = mapped_column(Text, nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # when its queued jobs were last put on the broker (the sweeper republishes lost ones)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    """One document of a batch, and its outcome."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("batch_id", "doc_id", name="uq_jobs_batch_doc"),
        Index("ix_jobs_batch_state", "batch_id", "state"),
    )

    id: Mapped[int] = mapped_column(JobId, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    doc_id: Mapped[str] = mapped_column(String(512))
    text: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    summary: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt_variant: Mapped[str | None] = mapped_column(String(16), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    output_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    generation_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # long documents: how many pieces the document was split into, and how many summarizing levels ran
    pieces: Mapped[int | None] = mapped_column(Integer, nullable=True)
    levels: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # a job that carries its own request instead of a document for the batch's template:
    # {"messages": [{"role", "content"}...], "max_new_tokens": int, "temperature": float}
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # a running job whose lease has expired lost its worker: another delivery may take it over
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
