"""The tables. Typed SQLAlchemy 2 models; the Alembic migrations in ``migrations/`` create them.

Times are stored in UTC and always come back timezone-aware, on SQLite as on PostgreSQL, so no caller
ever compares a naive and an aware datetime.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always UTC-aware in Python whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass a timezone-aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact), plain JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    pass


class Flow(Base):
    """A named notebook flow. Its content lives in versions (the newest is the highest ``version``);
    the flow row holds what a user configures."""

    __tablename__ = "flow"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20), default="notebook")
    source_path: Mapped[str | None] = mapped_column(Text)
    kernel_name: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[list[str]] = mapped_column(JSONType, default=list)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    retry_delay: Mapped[float] = mapped_column(Float, default=0.0)
    retry_backoff: Mapped[float] = mapped_column(Float, default=2.0)
    timeout: Mapped[float | None] = mapped_column(Float)
    cell_timeout: Mapped[float | None] = mapped_column(Float)
    concurrency_limit: Mapped[int | None] = mapped_column(Integer)
    # What a run does when the flow is at its concurrency limit: ``enqueue`` (wait) or ``cancel-new``.
    collision: Mapped[str] = mapped_column(String(20), default="enqueue", server_default="enqueue")
    # A paused flow's schedules skip their slots and its pipeline and file events wait; a run asked for by
    # hand (CLI, API) still runs.
    paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Worker labels a run of this flow needs: only a runner declaring all of them claims it (``nbflow.core.workers``).
    labels: Mapped[list[str]] = mapped_column(JSONType, default=list, server_default="[]")
    # Bytes the run's kernel (and what it starts) may use, where the worker's cgroups allow
    # (nbflow.execution.containment).
    memory_limit: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class FlowVersion(Base):
    """An immutable snapshot of a flow's notebook: what a run executed is always recoverable."""

    __tablename__ = "flow_version"
    __table_args__ = (UniqueConstraint("flow_id", "version"), UniqueConstraint("flow_id", "content_hash"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flow_id: Mapped[int] = mapped_column(ForeignKey("flow.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    has_parameters_cell: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    flow: Mapped[Flow] = relationship(foreign_keys=[flow_id])


class Schedule(Base):
    """Created empty by the core; the scheduler issue fills it."""

    __tablename__ = "schedule"
    __table_args__ = (UniqueConstraint("flow_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flow_id: Mapped[int] = mapped_column(ForeignKey("flow.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    trigger: Mapped[str] = mapped_column(String(20))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    catch_up: Mapped[str] = mapped_column(String(20), default="skip")
    max_lateness: Mapped[float | None] = mapped_column(Float)
    next_fire_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    # Why the scheduler could not fire it (a broken stored definition, parameters that no longer fit):
    # shown by ``nbflow schedule list``; cleared by adding the schedule again or by its next good slot.
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Run(Base):
    __tablename__ = "run"
    __table_args__ = (
        # The slot key: one run per (schedule, slot), whichever process fires it.
        UniqueConstraint("schedule_id", "scheduled_for", name="uq_run_schedule_slot"),
        Index("ix_run_flow_created", "flow_id", "created_at"),
        Index("ix_run_state_created", "state", "created_at"),
        Index("ix_run_created", "created_at"),
        Index("ix_run_parent", "parent_run_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    flow_id: Mapped[int] = mapped_column(ForeignKey("flow.id", ondelete="CASCADE"))
    flow_version_id: Mapped[int] = mapped_column(ForeignKey("flow_version.id"))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    kernel_name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20))
    state_name: Mapped[str] = mapped_column(String(40))
    state_message: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    retry_delay: Mapped[float] = mapped_column(Float, default=0.0)
    retry_backoff: Mapped[float] = mapped_column(Float, default=2.0)
    timeout: Mapped[float | None] = mapped_column(Float)
    cell_timeout: Mapped[float | None] = mapped_column(Float)
    trigger: Mapped[str] = mapped_column(String(20), default="manual")
    schedule_id: Mapped[int | None] = mapped_column(ForeignKey("schedule.id", ondelete="SET NULL"))
    scheduled_for: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expected_start_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    parent_run_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("run.id"))
    worker_id: Mapped[str | None] = mapped_column(String(200))
    process_id: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    output_path: Mapped[str | None] = mapped_column(Text)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    result: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    log_bytes: Mapped[int] = mapped_column(Integer, default=0)

    flow: Mapped[Flow] = relationship(foreign_keys=[flow_id])
    flow_version: Mapped[FlowVersion] = relationship(foreign_keys=[flow_version_id])


class RunCount(Base):
    """Exact run counts per (state, flow), kept by triggers on ``run`` (migration 0006, ``nbflow.core.counts``):
    a count is a sum over these rows plus the pending ``RunCountDelta`` rows, not a scan of the history.

    No foreign key to ``flow``: a deleted flow's runs are counted down by the same triggers as they cascade
    away, and its rows, then zero, are removed by the next compaction."""

    __tablename__ = "run_count"
    __table_args__ = (Index("ix_run_count_flow", "flow_id"),)

    state: Mapped[str] = mapped_column(String(20), primary_key=True)
    flow_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(BigInteger)


class RunCountDelta(Base):
    """Append-only changes to ``RunCount`` written by the PostgreSQL triggers (SQLite's update
    ``RunCount`` directly: one writer at a time there, so no contention to avoid). Inserting a new row
    never waits on another transaction, where updating one counter row per state would serialise every
    claim and finish; ``nbflow.core.counts.compact`` folds them into ``RunCount``."""

    __tablename__ = "run_count_delta"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    state: Mapped[str] = mapped_column(String(20))
    flow_id: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)


class RunStateEvent(Base):
    """Append-only history: every transition of every run, never rewritten."""

    __tablename__ = "run_state_event"
    __table_args__ = (Index("ix_run_state_event_run", "run_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("run.id", ondelete="CASCADE"))
    from_state: Mapped[str | None] = mapped_column(String(20))
    to_state: Mapped[str] = mapped_column(String(20))
    to_name: Mapped[str] = mapped_column(String(40))
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    message: Mapped[str | None] = mapped_column(Text)


class CellRun(Base):
    """One executed code cell of one attempt: the task level of a notebook flow."""

    __tablename__ = "cell_run"
    __table_args__ = (UniqueConstraint("run_id", "attempt", "cell_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("run.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    cell_index: Mapped[int] = mapped_column(Integer)
    cell_id: Mapped[str | None] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(20))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    execution_count: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class Log(Base):
    __tablename__ = "log"
    __table_args__ = (Index("ix_log_run", "run_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("run.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stream: Mapped[str] = mapped_column(String(10))
    cell_index: Mapped[int | None] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)


class ApiKey(Base):
    """Created empty by the core; the REST API issue fills it. Only a hash of the key is kept."""

    __tablename__ = "api_key"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSONType, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class TagLimit(Base):
    """At most ``limit`` runs of flows carrying ``tag`` are PENDING-claimed or RUNNING at once, across
    all workers. The tag ``*`` is the global limit (every run)."""

    __tablename__ = "tag_limit"

    tag: Mapped[str] = mapped_column(String(200), primary_key=True)
    limit: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FlowDependency(Base):
    """Pipelines: ``flow`` runs after each run of ``upstream`` that ends (``on``: ``completed`` or ``any``)."""

    __tablename__ = "flow_dependency"
    __table_args__ = (UniqueConstraint("flow_id", "upstream_flow_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flow_id: Mapped[int] = mapped_column(ForeignKey("flow.id", ondelete="CASCADE"))
    upstream_flow_id: Mapped[int] = mapped_column(ForeignKey("flow.id", ondelete="CASCADE"), index=True)
    on: Mapped[str] = mapped_column(String(20), default="completed")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FileTrigger(Base):
    """Run ``flow`` once for each new file matching ``pattern`` (an absolute glob), passing its path as
    the parameter ``parameter``."""

    __tablename__ = "file_trigger"
    __table_args__ = (UniqueConstraint("flow_id", "pattern"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flow_id: Mapped[int] = mapped_column(ForeignKey("flow.id", ondelete="CASCADE"))
    pattern: Mapped[str] = mapped_column(Text)
    parameter: Mapped[str] = mapped_column(String(200))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FileSeen(Base):
    """A file a trigger has already acted on (or found there when it was created): never again."""

    __tablename__ = "file_seen"
    __table_args__ = (UniqueConstraint("trigger_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trigger_id: Mapped[int] = mapped_column(ForeignKey("file_trigger.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    run_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("run.id", ondelete="SET NULL"), index=True)


class Secret(Base):
    """A named secret, encrypted at rest (``nbflow.core.secrets``): the database never holds its value in clear.

    ``value_digest`` is an HMAC of the value keyed by the secret key: it lets a run request be checked for
    a secret passed as a parameter without decrypting anything, and reveals nothing without the key."""

    __tablename__ = "secret"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    ciphertext: Mapped[str] = mapped_column(Text)
    value_digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Webhook(Base):
    """An inbound webhook: ``POST /api/hooks/{token}`` runs ``flow``, with parameters taken from the JSON
    body through ``mapping`` (parameter -> dotted path). Only a hash of the token is kept."""

    __tablename__ = "webhook"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flow_id: Mapped[int] = mapped_column(ForeignKey("flow.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    mapping: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Notification(Base):
    """Call ``url`` with a JSON payload when a run of ``flow`` ends in one of ``on_states``."""

    __tablename__ = "notification"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flow_id: Mapped[int] = mapped_column(ForeignKey("flow.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    on_states: Mapped[list[str]] = mapped_column(JSONType, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class NotificationDelivery(Base):
    """The outbox: one row per (notification, run) to deliver, UNIQUE so that two senders never queue or
    send it twice. A sender claims a row by moving ``next_attempt_at`` past its own attempt (a lease)."""

    __tablename__ = "notification_delivery"
    __table_args__ = (
        UniqueConstraint("notification_id", "run_id"),
        Index("ix_notification_delivery_due", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    notification_id: Mapped[int] = mapped_column(ForeignKey("notification.id", ondelete="CASCADE"))
    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("run.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Worker(Base):
    """A live runner (``nbflow worker`` or the runner of ``nbflow serve``), for ``nbflow workers``: registered
    at start, ``last_seen_at`` renewed with its lease beat, removed on a clean stop, and removed by the reaper
    leader once it stops beating (killed, machine gone). Nothing depends on it for correctness: runs carry
    their own leases."""

    __tablename__ = "worker"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    labels: Mapped[list[str]] = mapped_column(JSONType, default=list)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Runs it executes at once (``--slots``): /metrics' free slots. Null for a runner that did not say.
    slots: Mapped[int | None] = mapped_column(Integer)


class Leader(Base):
    """The lease of one housekeeping ``role`` (``nbflow.services.leader``): ``holder`` does that role's work until
    ``expires_at``, and whoever finds it expired may take it over."""

    __tablename__ = "leader"

    role: Mapped[str] = mapped_column(String(50), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
