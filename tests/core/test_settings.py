"""Settings read every variable in one place, and to_env() is its exact inverse (for child processes)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from core.settings import ENV_NAMES, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_field_has_an_environment_variable() -> None:
    assert {f.name for f in fields(Settings)} == set(ENV_NAMES)
    assert len(set(ENV_NAMES.values())) == len(ENV_NAMES)


def test_every_setting_is_read_somewhere() -> None:
    """No setting that nothing reads: each field is named by code outside core/settings.py, or is passed on
    to a program that reads its variable itself (Flower's FLOWER_*)."""
    sources = [
        p.read_text()
        for package in ("core", "api", "worker", "model", "nexusgen")
        for p in (ROOT / package).rglob("*.py")
        if p != ROOT / "core" / "settings.py"
    ]
    unread = [
        f.name
        for f in fields(Settings)
        if not f.metadata["read_by"] and not any(re.search(rf"\b{f.name}\b", text) for text in sources)
    ]
    assert unread == []


def test_env_example_and_the_readme_list_every_variable() -> None:
    listed = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    assert set(ENV_NAMES.values()) - listed == set()
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `")]
    in_readme = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}
    assert set(ENV_NAMES.values()) - in_readme == set()


def test_bad_values_name_their_variable() -> None:
    for var, value in (
        ("NEXUSGEN_MAX_BATCH", "eight"),
        ("NEXUSGEN_LEASE_S", "long"),
        ("WEBHOOK_RETRY_SCHEDULE", "5,soon"),
        ("NEXUSGEN_ENGINE", "tensorrt"),
        ("NEXUSGEN_TASKS", "generate,paint"),
        ("NEXUSGEN_EDIT_DECODERS", "flux"),
        ("NEXUSGEN_MAX_PROMPT_CHARS", "100000"),
        ("NEXUSGEN_TP_SIZE", "2"),
        ("NEXUSGEN_ORPHAN_GRACE_S", "0"),
    ):
        with pytest.raises(ValueError, match=var):
            Settings.from_env({var: value})


def test_unset_and_empty_variables_take_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env(dict.fromkeys(ENV_NAMES.values(), "")) == Settings()


@pytest.mark.parametrize(
    "settings",
    [
        Settings(),
        Settings(
            database_url="postgresql://db/x",
            broker_url="redis://b:6379/0",
            s3_endpoint_url="http://s3:8333",
            s3_secret_key="secret",
            model_dir="/models",
            dtype="bf16",
            tasks=("edit", "understand"),
            prefix_mode="forced",
            lease_s=3.5,
            api_port=9090,
            public_base_url="https://api.example",
            webhook_allow_private_networks=True,
            webhook_retry_schedule_s=(1.5, 60.0),
            state_dir=Path("/var/lib/nexusgen"),
        ),
    ],
)
def test_to_env_round_trips_through_from_env(settings: Settings) -> None:
    assert Settings.from_env(settings.to_env()) == settings


def test_require_names_the_variable() -> None:
    with pytest.raises(RuntimeError, match="CELERY_BROKER_URL"):
        Settings().require("broker_url")


def test_flower_login_and_prefix_are_read_and_checked() -> None:
    settings = Settings.from_env({"FLOWER_BASIC_AUTH": "admin:pw,ops:pw2", "FLOWER_URL_PREFIX": "/flower/"})
    assert (settings.flower_basic_auth, settings.flower_url_prefix) == ("admin:pw,ops:pw2", "flower")
    assert Settings.from_env(settings.to_env()).flower_basic_auth == "admin:pw,ops:pw2"
    with pytest.raises(ValueError, match="FLOWER_BASIC_AUTH"):
        Settings.from_env({"FLOWER_BASIC_AUTH": "admin"})
