"""Every environment variable the service reads, read in one place into one frozen Settings object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from core.records import TASKS


def _bool(value: str | None, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def _basic_auth(value: str | None) -> str | None:
    """FLOWER_BASIC_AUTH: comma-separated user:password pairs (checked here, not at Flower's first login)."""
    if not value:
        return None
    for pair in value.split(","):
        user, sep, password = pair.partition(":")
        if not (sep and user and password):
            raise ValueError("FLOWER_BASIC_AUTH must be user:password[,user2:password2]")
    return value


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    """One of `allowed` (the first is the default when unset)."""
    value = env.get(name) or allowed[0]
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


# The environment variable of each Settings field (from_env reads them, to_env writes them).
ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "broker_url": "CELERY_BROKER_URL",
    "result_backend": "CELERY_RESULT_BACKEND",
    "s3_endpoint_url": "S3_ENDPOINT_URL",
    "s3_access_key": "S3_ACCESS_KEY",
    "s3_secret_key": "S3_SECRET_KEY",
    "s3_bucket": "S3_BUCKET",
    "s3_region": "S3_REGION",
    "s3_public_url": "S3_PUBLIC_URL",
    "model_dir": "NEXUSGEN_MODEL_DIR",
    "device": "NEXUSGEN_DEVICE",
    "engine": "NEXUSGEN_ENGINE",
    "dtype": "NEXUSGEN_DTYPE",
    "max_batch": "NEXUSGEN_MAX_BATCH",
    "tasks": "NEXUSGEN_TASKS",
    "tp_size": "NEXUSGEN_TP_SIZE",
    "tp_timeout_s": "NEXUSGEN_TP_TIMEOUT_S",
    "edit_decoders": "NEXUSGEN_EDIT_DECODERS",
    "resident_text_encoders": "NEXUSGEN_RESIDENT_TEXT_ENCODERS",
    "prefix_mode": "NEXUSGEN_PREFIX_MODE",
    "compile": "NEXUSGEN_COMPILE",
    "dit_precision": "NEXUSGEN_DIT_PRECISION",
    "offload": "NEXUSGEN_OFFLOAD",
    "batch_window_s": "NEXUSGEN_BATCH_WINDOW_S",
    "lease_s": "NEXUSGEN_LEASE_S",
    "heartbeat_s": "NEXUSGEN_HEARTBEAT_S",
    "max_attempts": "NEXUSGEN_MAX_ATTEMPTS",
    "sweep_interval_s": "NEXUSGEN_SWEEP_INTERVAL_S",
    "requeue_after_s": "NEXUSGEN_REQUEUE_AFTER_S",
    "progress_interval_s": "NEXUSGEN_PROGRESS_INTERVAL_S",
    "api_host": "NEXUSGEN_API_HOST",
    "api_port": "NEXUSGEN_API_PORT",
    "public_base_url": "NEXUSGEN_PUBLIC_URL",
    "flower_port": "NEXUSGEN_FLOWER_PORT",
    "flower_basic_auth": "FLOWER_BASIC_AUTH",
    "flower_url_prefix": "FLOWER_URL_PREFIX",
    "flower_auth": "FLOWER_AUTH",
    "flower_auth_provider": "FLOWER_AUTH_PROVIDER",
    "flower_oauth2_key": "FLOWER_OAUTH2_KEY",
    "flower_oauth2_secret": "FLOWER_OAUTH2_SECRET",
    "flower_oauth2_redirect_uri": "FLOWER_OAUTH2_REDIRECT_URI",
    "log_level": "NEXUSGEN_LOG_LEVEL",
    "max_body_bytes": "NEXUSGEN_MAX_BODY_BYTES",
    "max_upload_bytes": "NEXUSGEN_MAX_UPLOAD_BYTES",
    "max_image_pixels": "NEXUSGEN_MAX_IMAGE_PIXELS",
    "max_prompt_chars": "NEXUSGEN_MAX_PROMPT_CHARS",
    "max_batch_jobs": "NEXUSGEN_MAX_BATCH_JOBS",
    "presign_ttl_s": "NEXUSGEN_PRESIGN_TTL_S",
    "idempotency_ttl_s": "NEXUSGEN_IDEMPOTENCY_TTL_S",
    "webhook_allow_private_networks": "WEBHOOK_ALLOW_PRIVATE_NETWORKS",
    "webhook_timeout_s": "WEBHOOK_TIMEOUT_S",
    "webhook_retry_schedule_s": "WEBHOOK_RETRY_SCHEDULE",
    "state_dir": "NEXUSGEN_STATE_DIR",
}


@dataclass(frozen=True)
class Settings:
    """Service configuration. Build it with `Settings.from_env()`; tests build it directly."""

    # infrastructure (None means "not configured": `nexusgen up` starts an embedded server)
    database_url: str | None = None
    broker_url: str | None = None
    result_backend: str | None = None
    s3_endpoint_url: str | None = None
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "nexusgen"
    s3_region: str = "us-east-1"
    s3_public_url: str | None = None  # presigned links use this endpoint (None: S3_ENDPOINT_URL)
    # model workers
    model_dir: str | None = None
    device: str = "cpu"
    engine: str = "torch"
    dtype: str | None = None  # None: bf16 on cuda, fp32 on cpu
    max_batch: int = 8
    tasks: tuple[str, ...] = TASKS
    tp_size: int | None = None  # tensor-parallel ranks; None: one per device listed in `device`
    tp_timeout_s: float = 120.0  # a collective that waits longer than this for a rank fails the worker
    edit_decoders: tuple[str, ...] = ("edit", "generation")  # decoders edit jobs may ask this worker for
    resident_text_encoders: bool = False  # keep CLIP and T5 on the accelerator between calls
    prefix_mode: str = "natural"  # natural | forced (forced for the tiny random checkpoint)
    compile: str = "off"  # off | regional: torch.compile of the repeated DiT and AR blocks
    dit_precision: str = "bf16"  # bf16 | fp8 (torchao float8 DiT blocks; CUDA sm 8.9+ only)
    offload: str = "none"  # none | model | group: keep weights on the CPU, move them in per use
    batch_window_s: float = 0.2  # how long a worker waits for batch mates after the first job
    lease_s: float = 120.0
    heartbeat_s: float = 10.0
    max_attempts: int = 3
    sweep_interval_s: float = 15.0
    requeue_after_s: float = 30.0  # queued jobs older than this with no claim are re-published
    progress_interval_s: float = 0.3
    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    public_base_url: str = "http://127.0.0.1:8080"
    flower_port: int = 5555  # `nexusgen up` runs Flower on 127.0.0.1 at this port
    # Flower reads these FLOWER_* variables itself; unset means no login (bind Flower to loopback then)
    flower_basic_auth: str | None = None  # user:password[,user2:password2]
    flower_url_prefix: str | None = None  # e.g. flower, behind a reverse proxy at /flower/
    flower_auth: str | None = None  # OAuth: a regex of the e-mail addresses allowed in
    flower_auth_provider: str | None = None  # e.g. flower.views.auth.GithubLoginHandler
    flower_oauth2_key: str | None = None
    flower_oauth2_secret: str | None = None
    flower_oauth2_redirect_uri: str | None = None
    log_level: str = "INFO"
    max_body_bytes: int = 64 * 1024 * 1024
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_prompt_chars: int = 4000
    max_batch_jobs: int = 50_000
    presign_ttl_s: int = 3600
    idempotency_ttl_s: int = 24 * 3600
    # webhooks
    webhook_allow_private_networks: bool = False
    webhook_timeout_s: float = 10.0
    webhook_retry_schedule_s: tuple[float, ...] = (
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        36000,
        36000,
        36000,
        36000,
        36000,
        36000,
    )
    # local state for the embedded default
    state_dir: Path = field(default_factory=lambda: Path(".nexusgen"))

    def __post_init__(self) -> None:
        if not 0 < self.webhook_timeout_s <= 300:
            raise ValueError(f"WEBHOOK_TIMEOUT_S must be in (0, 300] seconds, got {self.webhook_timeout_s}")

    @property
    def webhook_lock_s(self) -> float:
        """How long a claimed delivery stays leased: one whole attempt (WEBHOOK_TIMEOUT_S, counted from
        the claim) plus a margin for building the body and recording the outcome, so an attempt in
        flight is never claimed a second time."""
        return 2 * self.webhook_timeout_s + 30

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the environment (design.md, Settings) into a Settings object."""
        env = os.environ if environ is None else environ
        tasks = tuple(t.strip() for t in env.get("NEXUSGEN_TASKS", ",".join(TASKS)).split(",") if t.strip())
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"NEXUSGEN_TASKS has unknown tasks {unknown}; choose from {list(TASKS)}")
        schedule = env.get("WEBHOOK_RETRY_SCHEDULE")
        engine = env.get("NEXUSGEN_ENGINE", "torch")
        if engine not in ("torch", "deepspeed"):
            raise ValueError(f"NEXUSGEN_ENGINE must be torch or deepspeed, got {engine!r}")
        prefix_mode = env.get("NEXUSGEN_PREFIX_MODE", "natural")
        if prefix_mode not in ("natural", "forced"):
            raise ValueError(f"NEXUSGEN_PREFIX_MODE must be natural or forced, got {prefix_mode!r}")
        tp_size = _int(env, "NEXUSGEN_TP_SIZE", 0) or None
        devices = [d.strip() for d in env.get("NEXUSGEN_DEVICE", "cpu").split(",") if d.strip()]
        if tp_size is not None and len(devices) > 1 and tp_size != len(devices):
            raise ValueError(f"NEXUSGEN_TP_SIZE={tp_size} but NEXUSGEN_DEVICE lists {len(devices)} devices")
        if (tp_size or len(devices)) > 1 and engine != "deepspeed":
            raise ValueError(
                "tensor parallelism (several devices or NEXUSGEN_TP_SIZE > 1) needs NEXUSGEN_ENGINE=deepspeed"
            )
        edit_decoders = tuple(
            d.strip() for d in env.get("NEXUSGEN_EDIT_DECODERS", "edit,generation").split(",") if d.strip()
        )
        if not edit_decoders or set(edit_decoders) - {"edit", "generation"}:
            raise ValueError(f"NEXUSGEN_EDIT_DECODERS must list edit and/or generation, got {edit_decoders}")
        speed = {
            "compile": _choice(env, "NEXUSGEN_COMPILE", ("off", "regional")),
            "dit_precision": _choice(env, "NEXUSGEN_DIT_PRECISION", ("bf16", "fp8")),
            "offload": _choice(env, "NEXUSGEN_OFFLOAD", ("none", "model", "group")),
        }
        api_port = _int(env, "NEXUSGEN_API_PORT", 8080)
        api_host = env.get("NEXUSGEN_API_HOST", "127.0.0.1")
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            broker_url=env.get("CELERY_BROKER_URL") or None,
            result_backend=env.get("CELERY_RESULT_BACKEND") or None,
            s3_endpoint_url=env.get("S3_ENDPOINT_URL") or None,
            s3_access_key=env.get("S3_ACCESS_KEY", ""),
            s3_secret_key=env.get("S3_SECRET_KEY", ""),
            s3_bucket=env.get("S3_BUCKET", "nexusgen"),
            s3_region=env.get("S3_REGION", "us-east-1"),
            s3_public_url=env.get("S3_PUBLIC_URL") or None,
            model_dir=env.get("NEXUSGEN_MODEL_DIR") or None,
            device=env.get("NEXUSGEN_DEVICE", "cpu"),
            engine=engine,
            dtype=env.get("NEXUSGEN_DTYPE") or None,
            max_batch=_int(env, "NEXUSGEN_MAX_BATCH", 8),
            tasks=tasks,
            tp_size=tp_size,
            tp_timeout_s=_float(env, "NEXUSGEN_TP_TIMEOUT_S", 120.0),
            edit_decoders=edit_decoders,
            resident_text_encoders=_bool(env.get("NEXUSGEN_RESIDENT_TEXT_ENCODERS")),
            prefix_mode=prefix_mode,
            **speed,
            batch_window_s=_float(env, "NEXUSGEN_BATCH_WINDOW_S", 0.2),
            lease_s=_float(env, "NEXUSGEN_LEASE_S", 120.0),
            heartbeat_s=_float(env, "NEXUSGEN_HEARTBEAT_S", 10.0),
            max_attempts=_int(env, "NEXUSGEN_MAX_ATTEMPTS", 3),
            sweep_interval_s=_float(env, "NEXUSGEN_SWEEP_INTERVAL_S", 15.0),
            requeue_after_s=_float(env, "NEXUSGEN_REQUEUE_AFTER_S", 30.0),
            progress_interval_s=_float(env, "NEXUSGEN_PROGRESS_INTERVAL_S", 0.3),
            api_host=api_host,
            api_port=api_port,
            public_base_url=env.get("NEXUSGEN_PUBLIC_URL", f"http://{api_host}:{api_port}"),
            flower_port=_int(env, "NEXUSGEN_FLOWER_PORT", 5555),
            flower_basic_auth=_basic_auth(env.get("FLOWER_BASIC_AUTH")),
            flower_url_prefix=env.get("FLOWER_URL_PREFIX", "").strip("/") or None,
            flower_auth=env.get("FLOWER_AUTH") or None,
            flower_auth_provider=env.get("FLOWER_AUTH_PROVIDER") or None,
            flower_oauth2_key=env.get("FLOWER_OAUTH2_KEY") or None,
            flower_oauth2_secret=env.get("FLOWER_OAUTH2_SECRET") or None,
            flower_oauth2_redirect_uri=env.get("FLOWER_OAUTH2_REDIRECT_URI") or None,
            log_level=env.get("NEXUSGEN_LOG_LEVEL", "INFO").upper(),
            max_body_bytes=_int(env, "NEXUSGEN_MAX_BODY_BYTES", 64 * 1024 * 1024),
            max_upload_bytes=_int(env, "NEXUSGEN_MAX_UPLOAD_BYTES", 20 * 1024 * 1024),
            max_image_pixels=_int(env, "NEXUSGEN_MAX_IMAGE_PIXELS", 40_000_000),
            max_prompt_chars=_int(env, "NEXUSGEN_MAX_PROMPT_CHARS", 4000),
            max_batch_jobs=_int(env, "NEXUSGEN_MAX_BATCH_JOBS", 50_000),
            presign_ttl_s=_int(env, "NEXUSGEN_PRESIGN_TTL_S", 3600),
            idempotency_ttl_s=_int(env, "NEXUSGEN_IDEMPOTENCY_TTL_S", 24 * 3600),
            webhook_allow_private_networks=_bool(env.get("WEBHOOK_ALLOW_PRIVATE_NETWORKS")),
            webhook_timeout_s=_float(env, "WEBHOOK_TIMEOUT_S", 10.0),
            webhook_retry_schedule_s=(
                tuple(float(x) for x in schedule.split(",") if x.strip())
                if schedule
                else Settings.webhook_retry_schedule_s
            ),
            state_dir=Path(env.get("NEXUSGEN_STATE_DIR", ".nexusgen")),
        )

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
        for name, var in ENV_NAMES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool):
                env[var] = "1" if value else "0"
            elif isinstance(value, tuple):
                env[var] = ",".join(str(v) for v in value)
            else:
                env[var] = str(value)
        return env

    def require(self, *names: str) -> None:
        """Raise a clear error if a needed service URL is not configured."""
        missing = [n for n in names if getattr(self, n) in (None, "")]
        if missing:
            raise RuntimeError("not configured: " + ", ".join(ENV_NAMES.get(n, n) for n in missing))
