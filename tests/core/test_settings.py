"""Settings read every variable in one place, and to_env() is its exact inverse (for child processes)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from core.settings import ENV_NAMES, Settings


def test_every_field_has_an_environment_variable() -> None:
    assert {f.name for f in fields(Settings)} == set(ENV_NAMES)


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
