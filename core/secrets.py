"""Refuse to start a service with a secret left empty or at a placeholder of `.env.example`."""

from __future__ import annotations

from urllib.parse import urlsplit

from core.settings import Settings

# `.env.example` marks every secret to replace with these words (tests/deploy/test_compose.py holds them
# together).
PLACEHOLDER_MARKERS = ("change-me", "changeme")


def _placeholder(value: str) -> bool:
    return any(marker in value.lower() for marker in PLACEHOLDER_MARKERS)


def _url_password(url: str | None) -> str | None:
    return urlsplit(url).password if url else None


def weak_secrets(settings: Settings) -> list[str]:
    """One message per secret that is empty where it is needed, or still a placeholder."""
    problems = []
    for variable, url in (
        ("DATABASE_URL", settings.database_url),
        ("CELERY_BROKER_URL", settings.broker_url),
        ("CELERY_RESULT_BACKEND", settings.result_backend),
    ):
        password = _url_password(url)
        if password == "":  # `user:@host`: a password was meant but left empty (compose's ${X:-})
            problems.append(f"the password in {variable} is empty")
        elif password is not None and _placeholder(password):
            problems.append(f"the password in {variable} is the example placeholder {password!r}")
    if settings.s3_endpoint_url:
        if not settings.s3_secret_key:
            problems.append("S3_SECRET_KEY is empty")
        elif _placeholder(settings.s3_secret_key):
            problems.append(f"S3_SECRET_KEY is the example placeholder {settings.s3_secret_key!r}")
    return problems


def refuse_weak_secrets(settings: Settings) -> None:
    """Raise ValueError naming every weak secret (checked by each service command at start)."""
    problems = weak_secrets(settings)
    if problems:
        raise ValueError(
            "refusing to start: " + "; ".join(problems) + " (set real secrets in .env or the environment)"
        )
