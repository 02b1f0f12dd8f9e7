"""Database tables (SQLAlchemy Core). Migrations in migrations/ create exactly these."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

metadata = MetaData()


def _created() -> Column:
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


tenants = Table(
    "tenants",
    metadata,
    Column("id", String(40), primary_key=True),  # "ten_<hex>"
    Column("name", String(200), nullable=False, unique=True),
    Column("webhook_secret", String(200), nullable=False),  # whsec_...
    Column("webhook_secret_previous", String(200)),  # still signs until the overlap ends
    Column("webhook_secret_previous_expires_at", DateTime(timezone=True)),
    _created(),
    Column("result_ttl_s", Integer),  # None: NEXUSGEN_RESULT_TTL_S
    # Limits (core.limits); None: the settings' default, 0: no limit.
    Column("max_queued", Integer),
    Column("submit_per_minute", Integer),
    Column("max_running", Integer),
    Column("submit_tat", DateTime(timezone=True)),  # the submit rate limiter's state (GCRA)
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 hex of the full key
    Column("prefix", String(16), nullable=False),  # first characters, for display
    Column("scopes", ARRAY(String(20)), nullable=False),  # submit, read, admin
    _created(),
    Column("revoked_at", DateTime(timezone=True)),
)

uploads = Table(
    "uploads",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("object_key", Text),  # None once retention deleted the object
    Column("content_type", String(100), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    _created(),
    Column("expires_at", DateTime(timezone=True)),  # kept until then (pushed back by each job using it)
    Column("expired_at", DateTime(timezone=True)),  # set when retention ended; the object goes next
)
# Retention (core.retention): due rows, and expired rows whose object is still to be deleted.
Index("ix_uploads_expiry", uploads.c.expires_at, postgresql_where=text("expired_at IS NULL"))
Index(
    "ix_uploads_purge",
    uploads.c.expired_at,
    postgresql_where=text("expired_at IS NOT NULL AND object_key IS NOT NULL"),
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("webhook_url", Text),
    Column("webhook_events", ARRAY(String(40))),  # None: the default set
    Column("total_jobs", Integer, nullable=False),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    _created(),
    Column("completed_at", DateTime(timezone=True)),  # set once, when the last job ends
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(40), primary_key=True),  # "job_<hex>"
    # tenant_id and batch_id reference tenants and batches (ON DELETE CASCADE) through statement triggers,
    # checked once per statement, not once per row as a foreign key does (migration 0009_job_references)
    Column("tenant_id", String(40), nullable=False),
    Column("batch_id", String(40)),
    Column("custom_id", String(200)),
    Column("task", String(20), nullable=False),  # generate | edit | understand
    Column("prompt", Text, nullable=False),  # the prompt (generate) or instruction (edit, understand)
    Column("upload_id", String(40), ForeignKey("uploads.id")),
    Column(
        "params", JSONB, nullable=False
    ),  # normalised: width, height, steps, cfg_scale, guidance, seed, ...
    Column("bucket", String(200), nullable=False),  # jobs of one bucket can share a model call
    Column("priority", Integer, nullable=False, server_default=text("0")),  # higher first
    Column("status", String(20), nullable=False, server_default=text("'queued'")),  # core.records.JobStatus
    Column("stage", String(40), nullable=False, server_default=text("'queued'")),
    Column("step", Integer),
    Column("total_steps", Integer),
    Column("progress", Float, nullable=False, server_default=text("0")),
    Column("attempt", Integer, nullable=False, server_default=text("0")),  # claims so far (ownership token)
    # Why a claim did not end the job: its worker was lost (lease expired; counts toward poison), or it
    # was put back after a transient infrastructure error (never counts toward poison).
    Column("worker_losses", Integer, nullable=False, server_default=text("0")),
    Column("put_backs", Integer, nullable=False, server_default=text("0")),
    Column("lease_owner", String(200)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    Column("error_code", String(60)),
    Column("error_message", Text),
    Column("provenance", JSONB),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("webhook_url", Text),
    Column("webhook_events", ARRAY(String(40))),
    _created(),
    Column("enqueued_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("batch_id", "custom_id", name="uq_jobs_batch_custom_id"),
)
# Partial indexes hold only the rows a query looks for, so their size follows the queue, not the history.
QUEUED = text("status = 'queued'")
# Claims: the oldest queued jobs of one (task, bucket, priority, tenant) group, read in index order.
Index(
    "ix_jobs_queue",
    jobs.c.task,
    jobs.c.bucket,
    jobs.c.priority.desc(),
    jobs.c.tenant_id,
    jobs.c.created_at,
    jobs.c.id,
    postgresql_where=QUEUED,
)
# The sweeper's search for forgotten jobs and the oldest-queued-job gauge: queued jobs by wait.
Index("ix_jobs_queued_since", jobs.c.task, jobs.c.enqueued_at, postgresql_where=QUEUED)
# A queued job's position: its tenant's queued jobs of its task and priority ahead of (and behind) it, one
# bounded range (core.events.position_sql).
Index(
    "ix_jobs_queue_tenant",
    jobs.c.task,
    jobs.c.tenant_id,
    jobs.c.priority,
    jobs.c.created_at,
    jobs.c.id,
    postgresql_where=QUEUED,
)
Index("ix_jobs_tenant_created", jobs.c.tenant_id, jobs.c.created_at, jobs.c.id)
Index("ix_jobs_batch", jobs.c.batch_id, jobs.c.status)
Index("ix_jobs_lease", jobs.c.lease_expires_at, postgresql_where=text("status = 'running'"))
Index("ix_jobs_finished", jobs.c.finished_at, postgresql_where=text("finished_at IS NOT NULL"))

# Job counts by (tenant, task, status; bucket and priority for queued jobs), kept by statement triggers on
# `jobs` (migration 0003_fair_share) as append-only delta rows: no transition waits on a counter row.
# Readers sum the rows of a key; the sweeper folds them (core.counts.compact_counts).
job_counts = Table(
    "job_counts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("tenant_id", String(40), nullable=False),  # no foreign key: a tenant's deletion is counted too
    Column("task", String(20), nullable=False),
    Column("status", String(20), nullable=False),
    Column("bucket", String(200), nullable=False),  # '' unless queued
    Column("priority", Integer, nullable=False),  # 0 unless queued
    Column("n", BigInteger, nullable=False),
)
Index("ix_job_counts_key", job_counts.c.status, job_counts.c.task, job_counts.c.bucket)
Index(
    "ix_job_counts_tenant",
    job_counts.c.task,
    job_counts.c.tenant_id,
    job_counts.c.priority,
    postgresql_where=text("status = 'queued'"),
)


def _delta_table(name: str, *keys: Column[Any]) -> Table:
    """An append-only counter: one delta row per changed key and statement, summed by readers and folded
    by the sweeper (core.counts.compact_counts)."""
    return Table(
        name,
        metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        *keys,
        Column("n", BigInteger, nullable=False),
    )


# Rollups of job_counts' queued rows, appended by statement triggers on job_counts (migration
# 0008_queue_rollups): queued jobs per (task, priority, tenant) and per (task, bucket).
queue_tenants = _delta_table(
    "queue_tenants",
    Column("task", String(20), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("tenant_id", String(40), nullable=False),
)
Index("ix_queue_tenants_key", queue_tenants.c.task, queue_tenants.c.priority, queue_tenants.c.tenant_id)
queue_buckets = _delta_table(
    "queue_buckets", Column("task", String(20), nullable=False), Column("bucket", String(200), nullable=False)
)
Index("ix_queue_buckets_key", queue_buckets.c.task, queue_buckets.c.bucket)
# Webhook deliveries per status, kept by statement triggers on webhook_deliveries (0008_queue_rollups).
delivery_counts = _delta_table("delivery_counts", Column("status", String(20), nullable=False))

# Round robin between tenants: when each tenant was last served a batch of each task.
tenant_turns = Table(
    "tenant_turns",
    metadata,
    Column("task", String(20), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("served_at", DateTime(timezone=True), nullable=False),
)

results = Table(
    "results",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, unique=True),
    Column("kind", String(10), nullable=False),  # image | text
    Column("object_key", Text),
    Column("content_type", String(100)),
    Column("size_bytes", BigInteger),
    Column("sha256", String(64)),
    Column("width", Integer),
    Column("height", Integer),
    Column("text", Text),
    _created(),
    Column("expires_at", DateTime(timezone=True)),  # the result is kept until then
    Column(
        "expired_at", DateTime(timezone=True)
    ),  # set when retention ended; object_key cleared once deleted
)
Index("ix_results_expiry", results.c.expires_at, postgresql_where=text("expired_at IS NULL"))
Index(
    "ix_results_purge",
    results.c.expired_at,
    postgresql_where=text("expired_at IS NOT NULL AND object_key IS NOT NULL"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("tenant_id", String(40), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),  # sha256 of method, path and body
    Column("response_status", Integer),  # None while the first request is still being served
    Column("response_body", JSONB),
    _created(),
)

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("url", Text, nullable=False),
    Column("disabled_at", DateTime(timezone=True)),
    Column("disabled_reason", Text),
    _created(),
    UniqueConstraint("tenant_id", "url", name="uq_webhook_endpoints_tenant_url"),
)

# The outbox: one row per event, written in the same transaction as the state change it announces.
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", String(40), primary_key=True),  # "msg_<hex>": the webhook-id header, stable across retries
    Column("tenant_id", String(40), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("type", String(40), nullable=False),
    Column("payload", JSONB, nullable=False),  # {type, timestamp, data}
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE")),
    Column("batch_id", String(40), ForeignKey("batches.id", ondelete="CASCADE")),
    _created(),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("event_id", String(40), ForeignKey("webhook_events.id", ondelete="CASCADE"), nullable=False),
    Column("endpoint_id", String(40), ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False),
    Column("tenant_id", String(40), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("job_id", String(40)),
    Column("status", String(20), nullable=False, server_default=text("'pending'")),  # DeliveryStatus
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("locked_until", DateTime(timezone=True)),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    _created(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True)),
)
# Claims (core.deliveries): each tenant's pending deliveries in due order, and the leased ones (in flight).
Index(
    "ix_webhook_deliveries_pending",
    webhook_deliveries.c.tenant_id,
    webhook_deliveries.c.next_attempt_at,
    postgresql_where=text("status = 'pending'"),
)
Index(
    "ix_webhook_deliveries_leased",
    webhook_deliveries.c.locked_until,
    postgresql_where=text("status = 'pending' AND locked_until IS NOT NULL"),
)
Index("ix_webhook_deliveries_job", webhook_deliveries.c.tenant_id, webhook_deliveries.c.job_id)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "delivery_id", String(40), ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), nullable=False
    ),
    Column("attempt", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("status_code", Integer),
    Column("latency_ms", Float),
    Column("error", Text),
    Column("response_excerpt", Text),
)

# Usage (core.usage): what each job finished by a worker consumed, and running totals per tenant and task
# (the /metrics counters), both written in the transaction that ends the job.
usage_records = Table(
    "usage_records",
    metadata,
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("batch_id", String(40)),
    Column("task", String(20), nullable=False),
    Column("status", String(20), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("model_seconds", Float, nullable=False),  # its share of its model call's time, all stages
    Column("stage_seconds", JSONB, nullable=False),  # {stage: its share of that stage's time}
    Column("images", Integer, nullable=False),
    Column("steps", Integer, nullable=False),
    Column("pixels", BigInteger, nullable=False),
    Column("input_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
)
Index("ix_usage_records_tenant_finished", usage_records.c.tenant_id, usage_records.c.finished_at)

usage_totals = Table(
    "usage_totals",
    metadata,
    Column("tenant_id", String(40), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("task", String(20), primary_key=True),
    Column("jobs", BigInteger, nullable=False),
    Column("model_seconds", Float, nullable=False),
    Column("images", BigInteger, nullable=False),
    Column("steps", BigInteger, nullable=False),
    Column("pixels", BigInteger, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
)

# Every state a job passes through (core.events), for the SSE streams: written by the transition that
# reaches it, read by id after a client's Last-Event-ID.
job_events = Table(
    "job_events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("batch_id", String(40)),
    Column("tenant_id", String(40), nullable=False),
    Column("status", String(20), nullable=False),
    Column("stage", String(40), nullable=False),
    Column("step", Integer),
    Column("total_steps", Integer),
    _created(),
)
Index("ix_job_events_job", job_events.c.job_id, job_events.c.id)
Index(
    "ix_job_events_batch",
    job_events.c.batch_id,
    job_events.c.id,
    postgresql_where=text("batch_id IS NOT NULL"),
)
