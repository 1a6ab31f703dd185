"""Database tables: files (and their input lines), batches, requests, API keys."""

from __future__ import annotations

from typing import cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only aliases rowid (fast autoincrement) for a column typed exactly INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Priorities: lower runs first.
INTERACTIVE = 0
BULK = 1

# Request statuses
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "expired",
)
TERMINAL_REQUEST = (SUCCEEDED, FAILED, CANCELLED, EXPIRED)

# Batch statuses: OpenAI's eight.
VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED = (
    "validating",
    "in_progress",
    "finalizing",
    "completed",
)
B_FAILED, B_EXPIRED, CANCELLING, B_CANCELLED = "failed", "expired", "cancelling", "cancelled"
TERMINAL_BATCH = (COMPLETED, B_FAILED, B_EXPIRED, B_CANCELLED)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class File(Base):
    """An uploaded input file, or a rendered output/error file of a batch."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), default="default", index=True)
    purpose: Mapped[str] = mapped_column(String(20))
    filename: Mapped[str] = mapped_column(String(255))
    # Output files are rendered on read: their size is measured on first request.
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    line_count: Mapped[int] = mapped_column(Integer, default=0)
    bad_lines: Mapped[int] = mapped_column(Integer, default=0)
    batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class FileLine(Base):
    """One line of an uploaded batch file, parsed once at upload."""

    __tablename__ = "file_lines"

    file_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    )
    line_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str | None] = mapped_column(String(512), nullable=True)
    method: Mapped[str | None] = mapped_column(String(16), nullable=True)
    url: Mapped[str | None] = mapped_column(String(256), nullable=True)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    # The line as uploaded (the worker reads its body); NULL when it was not valid UTF-8.
    raw: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_param: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Orders bulk work so lines sharing a prompt prefix run together (sluice/prefix.py);
    # NULL on bad lines and on lines uploaded before it existed (they keep line order).
    prefix_key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class Batch(Base):
    """A batch (OpenAI's object) or a single job (a batch of one, interactive)."""

    __tablename__ = "batches"
    # `sluice status` lists the newest batches among millions of jobs (batches of one).
    __table_args__ = (Index("ix_batches_kind_created_at", "kind", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), default="default", index=True)
    kind: Mapped[str] = mapped_column(String(8), default="batch")
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(SmallInteger, default=BULK)
    input_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    completion_window: Mapped[str] = mapped_column(String(16), default="24h")
    metadata_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    errors_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    in_progress_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expires_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finalizing_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completed_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    failed_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expired_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancelling_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancelled_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    # Cancelled and expired requests: they end the batch but count as neither.
    dropped: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # Prompt tokens served from the engine's prefix cache (part of input_tokens).
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    # OpenAI's output_expires_after.seconds: how long the output and error files live
    # (NULL: the default, 30 days); the reconciler deletes them after.
    output_expires_after: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Request(Base):
    """One prompt: its body (or its input line), its lease and its result."""

    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id"),
        Index("ix_requests_batch_line", "batch_id", "line_no"),
        # Claims: the next queued rows of a model, interactive first. Model leads: with
        # status first, the planner would reach for this index on `status = 'running'`
        # (no statistics ever see running rows) and walk every dead entry behind it.
        Index("ix_requests_claim", "model", "status", "priority", "id"),
        # Suspects (queued rows that were in an engine when it crashed) are few; the idle
        # poll looks for them every second, so they get an index of their own.
        Index(
            "ix_requests_suspects",
            "model",
            "crashes",
            postgresql_where=text("status = 'queued' AND crashes > 0"),
            sqlite_where=text("status = 'queued' AND crashes > 0"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(String(64), ForeignKey("batches.id", ondelete="CASCADE"))
    file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    line_no: Mapped[int] = mapped_column(Integer, default=0)
    custom_id: Mapped[str] = mapped_column(String(512))
    # Single jobs carry their body; file requests read it from file_lines.
    body: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str] = mapped_column(String(256))
    endpoint: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(SmallInteger, default=BULK)
    status: Mapped[str] = mapped_column(String(12), default=QUEUED)
    # Times a worker started it (informational).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Engine crashes it was present for: a suspect above 0, poison at settings.max_attempts.
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # The worker holding the lease; kept after the result is written (who ran it).
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    output_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Prompt tokens the engine's prefix cache served (vLLM's num_cached_tokens).
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # n > 1 or logprobs: every choice (text, finish_reason, logprobs) as JSON; None otherwise.
    choices_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    queued_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ApiKey(Base):
    """An API key: only its SHA-256 and a display prefix are stored, never the key."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    # Every file, batch and job a key creates belongs to its owner (a team, a tenant).
    owner: Mapped[str] = mapped_column(String(64), index=True)
    prefix: Mapped[str] = mapped_column(String(32))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Sees every owner's resources (responses say so with a header).
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    revoked_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Per-key limits (NULL: none): requests per minute (this key), and the owner's queued
    # requests and stored bytes.
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    queued_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bytes_limit: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Where this key's jobs and batches send their events when they name no webhook_url.
    webhook_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)


class WebhookDelivery(Base):
    """One event for one webhook URL: its signed body, its retries, where it stands."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # The sender's claim: pending rows by due time.
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    # The event id: the payload's `id` and the `webhook-id` header of every attempt.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    batch_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("batches.id", ondelete="CASCADE"), index=True
    )
    owner: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2048))
    # The JSON body, fixed when the event happens (every retry sends the same bytes).
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    # The sender holding it during an attempt (two senders never send one event at once).
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class WebhookAttempt(Base):
    """One HTTP attempt of a delivery: the delivery log."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # succeeded | retrying | failed | disabled
    outcome: Mapped[str] = mapped_column(String(16))


class WebhookEndpoint(Base):
    """A webhook URL that answered 410 Gone: nothing is sent to it any more."""

    __tablename__ = "webhook_endpoints"

    # SHA-256 of the URL: an index entry of bounded size whatever the URL.
    url_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    disabled_at: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)


# Core tables for bulk SQL (the ORM classes above are the schema, for Alembic and typing).
files = cast(Table, File.__table__)
file_lines = cast(Table, FileLine.__table__)
batches = cast(Table, Batch.__table__)
requests = cast(Table, Request.__table__)
api_keys = cast(Table, ApiKey.__table__)
webhook_deliveries = cast(Table, WebhookDelivery.__table__)
webhook_attempts = cast(Table, WebhookAttempt.__table__)
webhook_endpoints = cast(Table, WebhookEndpoint.__table__)
