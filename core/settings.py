"""Every environment variable the service reads, read in one place into one frozen Settings object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from core.params import DECODERS, MAX_PROMPT_CHARS
from core.records import TASKS

TRUE_WORDS = {"1", "true", "yes", "on"}
# The model's option sets, stated here because core may not import the model; tests/test_contract.py holds
# them equal to model.engine.ENGINES, model.pipeline.PREFIX_MODES and model.speed's modes
# (DECODERS: core.params).
ENGINES = ("torch", "deepspeed")
PREFIXES = ("natural", "forced")
FLOWER = "Flower"
COMPILE_MODES = ("off", "regional")
DIT_PRECISIONS = ("bf16", "fp8")
OFFLOAD_MODES = ("none", "model", "group")
WEBHOOK_RETRY_SCHEDULE_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, *(36000.0,) * 7)


def setting(
    env: str, default: Any, doc: str = "", *, choices: tuple[str, ...] = (), read_by: str = ""
) -> Any:
    """A Settings field: its environment variable, default and meaning; `choices`: the values allowed
    (the first is the default); `read_by`: who reads it when no code of ours does (Flower reads FLOWER_*)."""
    meta = {"env": env, "doc": doc, "choices": choices, "read_by": read_by}
    if isinstance(default, Path):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Service configuration, a setting a line. Build it with `Settings.from_env()`; tests build it directly.

    Unset or empty variables take the default; None means "not configured" (`nexusgen up` starts an embedded
    server for an unset URL).
    """

    # infrastructure
    database_url: str | None = setting("DATABASE_URL", None, "PostgreSQL URL")
    broker_url: str | None = setting("CELERY_BROKER_URL", None, "Redis or RabbitMQ URL")
    result_backend: str | None = setting("CELERY_RESULT_BACKEND", None, "Celery result backend URL")
    s3_endpoint_url: str | None = setting("S3_ENDPOINT_URL", None, "S3 API URL")
    s3_access_key: str = setting("S3_ACCESS_KEY", "")
    s3_secret_key: str = setting("S3_SECRET_KEY", "")
    s3_bucket: str = setting("S3_BUCKET", "nexusgen")
    s3_region: str = setting("S3_REGION", "us-east-1")
    s3_public_url: str | None = setting("S3_PUBLIC_URL", None, "for presigned links; None: S3_ENDPOINT_URL")
    # model workers
    model_dir: str | None = setting("NEXUSGEN_MODEL_DIR", None, "the checkpoint directory")
    device: str = setting("NEXUSGEN_DEVICE", "cpu", "a device, or a comma list: one per tensor-parallel rank")
    engine: str = setting("NEXUSGEN_ENGINE", "torch", "deepspeed: tensor parallel", choices=ENGINES)
    dtype: str | None = setting("NEXUSGEN_DTYPE", None, "None: bf16 on cuda, fp32 on cpu")
    max_batch: int = setting("NEXUSGEN_MAX_BATCH", 8, "jobs in one model call at most")
    tasks: tuple[str, ...] = setting("NEXUSGEN_TASKS", TASKS, "the tasks this worker loads and serves")
    tp_size: int | None = setting("NEXUSGEN_TP_SIZE", None, "tensor-parallel ranks; None: one per device")
    tp_timeout_s: float = setting("NEXUSGEN_TP_TIMEOUT_S", 120.0, "a longer collective fails the worker")
    edit_decoders: tuple[str, ...] = setting("NEXUSGEN_EDIT_DECODERS", DECODERS, "what edits may use")
    resident_text_encoders: bool = setting("NEXUSGEN_RESIDENT_TEXT_ENCODERS", False, "keep CLIP, T5 on GPU")
    prefix_mode: str = setting("NEXUSGEN_PREFIX_MODE", "natural", "tiny checkpoint: forced", choices=PREFIXES)
    compile: str = setting("NEXUSGEN_COMPILE", "off", "compile DiT, AR blocks", choices=COMPILE_MODES)
    dit_precision: str = setting("NEXUSGEN_DIT_PRECISION", "bf16", "fp8: sm 8.9+", choices=DIT_PRECISIONS)
    offload: str = setting("NEXUSGEN_OFFLOAD", "none", "weights wait on the CPU", choices=OFFLOAD_MODES)
    batch_window_s: float = setting("NEXUSGEN_BATCH_WINDOW_S", 0.2, "how long to wait for batch mates")
    lease_s: float = setting("NEXUSGEN_LEASE_S", 120.0)
    heartbeat_s: float = setting("NEXUSGEN_HEARTBEAT_S", 10.0)
    max_attempts: int = setting("NEXUSGEN_MAX_ATTEMPTS", 3)
    sweep_interval_s: float = setting("NEXUSGEN_SWEEP_INTERVAL_S", 15.0)
    requeue_after_s: float = setting("NEXUSGEN_REQUEUE_AFTER_S", 30.0, "re-publish queued jobs this old")
    progress_interval_s: float = setting("NEXUSGEN_PROGRESS_INTERVAL_S", 0.3)
    # API
    api_host: str = setting("NEXUSGEN_API_HOST", "127.0.0.1")
    api_port: int = setting("NEXUSGEN_API_PORT", 8080)
    public_base_url: str = setting("NEXUSGEN_PUBLIC_URL", "http://127.0.0.1:8080", "unset: API host:port")
    flower_port: int = setting("NEXUSGEN_FLOWER_PORT", 5555, "`nexusgen up` runs Flower on 127.0.0.1 here")
    # Flower reads the FLOWER_* variables itself (nexusgen/services.py); unset means no login
    flower_basic_auth: str | None = setting("FLOWER_BASIC_AUTH", None, "user:password[,...]", read_by=FLOWER)
    flower_url_prefix: str | None = setting("FLOWER_URL_PREFIX", None, "e.g. flower", read_by=FLOWER)
    flower_auth: str | None = setting("FLOWER_AUTH", None, "OAuth: e-mails let in (regex)", read_by=FLOWER)
    flower_auth_provider: str | None = setting("FLOWER_AUTH_PROVIDER", None, read_by=FLOWER)
    flower_oauth2_key: str | None = setting("FLOWER_OAUTH2_KEY", None, read_by=FLOWER)
    flower_oauth2_secret: str | None = setting("FLOWER_OAUTH2_SECRET", None, read_by=FLOWER)
    flower_oauth2_redirect_uri: str | None = setting("FLOWER_OAUTH2_REDIRECT_URI", None, read_by=FLOWER)
    log_level: str = setting("NEXUSGEN_LOG_LEVEL", "INFO")
    max_body_bytes: int = setting("NEXUSGEN_MAX_BODY_BYTES", 64 * 1024 * 1024)
    max_upload_bytes: int = setting("NEXUSGEN_MAX_UPLOAD_BYTES", 20 * 1024 * 1024)
    max_image_pixels: int = setting("NEXUSGEN_MAX_IMAGE_PIXELS", 40_000_000)
    max_prompt_chars: int = setting("NEXUSGEN_MAX_PROMPT_CHARS", MAX_PROMPT_CHARS, "at most the default")
    max_batch_jobs: int = setting("NEXUSGEN_MAX_BATCH_JOBS", 50_000)
    presign_ttl_s: int = setting("NEXUSGEN_PRESIGN_TTL_S", 3600)
    idempotency_ttl_s: int = setting("NEXUSGEN_IDEMPOTENCY_TTL_S", 24 * 3600)
    result_ttl_s: int = setting("NEXUSGEN_RESULT_TTL_S", 7 * 24 * 3600, "results, inputs kept after last use")
    orphan_grace_s: float = setting(
        "NEXUSGEN_ORPHAN_GRACE_S", 3600.0, "stored inputs with no row this old go"
    )
    # per-tenant limits unless `nexusgen tenant set-limits` set the tenant's own (0: no limit)
    tenant_max_queued: int = setting("NEXUSGEN_TENANT_MAX_QUEUED", 1_000_000)
    tenant_submit_per_minute: int = setting("NEXUSGEN_TENANT_SUBMIT_PER_MINUTE", 600)
    tenant_max_running: int = setting("NEXUSGEN_TENANT_MAX_RUNNING", 0)
    # Server-Sent Events: open streams per API process (each holds a thread, never a database connection
    # while idle), and how long one stays open before the client reconnects with Last-Event-ID
    max_event_streams: int = setting("NEXUSGEN_MAX_EVENT_STREAMS", 48)
    event_stream_max_s: float = setting("NEXUSGEN_EVENT_STREAM_MAX_S", 300.0)
    # webhooks
    webhook_allow_private_networks: bool = setting("WEBHOOK_ALLOW_PRIVATE_NETWORKS", False)
    webhook_timeout_s: float = setting("WEBHOOK_TIMEOUT_S", 10.0, "one delivery attempt, in (0, 300]")
    webhook_retry_schedule_s: tuple[float, ...] = setting("WEBHOOK_RETRY_SCHEDULE", WEBHOOK_RETRY_SCHEDULE_S)
    # local state for the embedded default
    state_dir: Path = setting("NEXUSGEN_STATE_DIR", Path(".nexusgen"))

    def __post_init__(self) -> None:
        if not 0 < self.webhook_timeout_s <= 300:
            raise ValueError(f"WEBHOOK_TIMEOUT_S must be in (0, 300] seconds, got {self.webhook_timeout_s}")
        if self.orphan_grace_s <= 0:  # 0 would delete an input between its put and its row's commit
            raise ValueError(f"NEXUSGEN_ORPHAN_GRACE_S must be above 0 seconds, got {self.orphan_grace_s}")
        if self.max_prompt_chars > MAX_PROMPT_CHARS:
            raise ValueError(
                f"NEXUSGEN_MAX_PROMPT_CHARS must be at most {MAX_PROMPT_CHARS}, got {self.max_prompt_chars}"
            )
        if unknown := [t for t in self.tasks if t not in TASKS]:
            raise ValueError(f"NEXUSGEN_TASKS has unknown tasks {unknown}; choose from {list(TASKS)}")
        if not self.edit_decoders or set(self.edit_decoders) - set(DECODERS):
            raise ValueError(
                f"NEXUSGEN_EDIT_DECODERS must list edit and/or generation, got {self.edit_decoders}"
            )
        if self.tp_size is not None and len(self.devices) > 1 and self.tp_size != len(self.devices):
            raise ValueError(
                f"NEXUSGEN_TP_SIZE={self.tp_size} but NEXUSGEN_DEVICE lists {len(self.devices)} devices"
            )
        if self.tp_world > 1 and self.engine != "deepspeed":
            raise ValueError(
                "tensor parallelism (several devices or NEXUSGEN_TP_SIZE > 1) needs NEXUSGEN_ENGINE=deepspeed"
            )

    @property
    def webhook_lock_s(self) -> float:
        """How long a claimed delivery stays leased: one whole attempt (WEBHOOK_TIMEOUT_S, counted from
        the claim) plus a margin for building the body and recording the outcome, so an attempt in
        flight is never claimed a second time."""
        return 2 * self.webhook_timeout_s + 30

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the environment (design.md, Settings): each field from its variable, parsed by its type."""
        env = os.environ if environ is None else environ
        values = {f.name: _parse(f, env.get(f.metadata["env"])) for f in fields(cls)}
        if not env.get("NEXUSGEN_PUBLIC_URL"):
            values["public_base_url"] = f"http://{values['api_host']}:{values['api_port']}"
        values["tp_size"] = values["tp_size"] or None  # 0: one rank per device
        values["log_level"] = values["log_level"].upper()
        values["flower_url_prefix"] = (values["flower_url_prefix"] or "").strip("/") or None
        _check_basic_auth(values["flower_basic_auth"])
        return cls(**values)

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices NEXUSGEN_DEVICE lists (`cuda:0,cuda:1`), one per tensor-parallel rank."""
        return tuple(d.strip() for d in self.device.split(",") if d.strip())

    @property
    def tp_world(self) -> int:
        """How many tensor-parallel ranks this worker runs (1: a plain single-process worker)."""
        return self.tp_size or len(self.devices)

    def with_overrides(self, **changes: object) -> Settings:
        """Return a copy with some fields changed (used by `nexusgen up` after starting embedded servers)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The environment under which `Settings.from_env` rebuilds these settings (for child processes)."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                env[f.metadata["env"]] = "1" if value else "0"
            elif isinstance(value, tuple):
                env[f.metadata["env"]] = ",".join(str(v) for v in value)
            else:
                env[f.metadata["env"]] = str(value)
        return env

    def require(self, *names: str) -> None:
        """Raise a clear error if a needed service URL is not configured."""
        missing = [n for n in names if getattr(self, n) in (None, "")]
        if missing:
            raise RuntimeError("not configured: " + ", ".join(ENV_NAMES.get(n, n) for n in missing))


# The environment variable of each Settings field (from_env reads them, to_env writes them).
ENV_NAMES = {f.name: f.metadata["env"] for f in fields(Settings)}
_TYPES = get_type_hints(Settings)


def _parse(f: Field[Any], raw: str | None) -> Any:
    """The value of one field from its variable's text (unset or empty: the default), by the field's type;
    every error names the variable."""
    var, kind = f.metadata["env"], _TYPES[f.name]
    default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc,operator]
    if raw is None or raw == "":
        return default
    if f.metadata["choices"] and raw not in f.metadata["choices"]:
        raise ValueError(f"{var} must be one of {', '.join(f.metadata['choices'])}, got {raw!r}")
    if kind is bool:
        return raw.strip().lower() in TRUE_WORDS
    if kind in (int, int | None, float):
        try:
            return float(raw) if kind is float else int(raw)  # both take surrounding spaces
        except ValueError as exc:
            raise ValueError(
                f"{var} must be {'a number' if kind is float else 'an integer'}, got {raw!r}"
            ) from exc
    if kind == tuple[float, ...]:
        try:
            return tuple(float(x) for x in raw.split(",") if x.strip())
        except ValueError as exc:
            raise ValueError(f"{var} must be a comma list of seconds, got {raw!r}") from exc
    if kind == tuple[str, ...]:
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    return Path(raw) if kind is Path else raw


def _check_basic_auth(value: str | None) -> None:
    """FLOWER_BASIC_AUTH: comma-separated user:password pairs (checked here, not at Flower's first login)."""
    if not value:
        return
    for pair in value.split(","):
        user, sep, password = pair.partition(":")
        if not (sep and user and password):
            raise ValueError("FLOWER_BASIC_AUTH must be user:password[,user2:password2]")
