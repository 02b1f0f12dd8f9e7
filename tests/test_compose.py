"""docker-compose.yml and .env.example agree with the CLI and with Settings (Docker cannot run here)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from nexusgen.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_SERVICES = {name: s for name, s in SERVICES.items() if s.get("image", "").startswith("nexusgen-batch")}


def settings_env_names() -> set[str]:
    """Every environment variable core/settings.py reads (string constants passed to env lookups)."""
    tree = ast.parse((ROOT / "core" / "settings.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"[A-Z][A-Z0-9_]+", node.value) and "_" in node.value:
                names.add(node.value)
    return names


def compose_variables() -> set[str]:
    """Variables docker compose interpolates (`${NAME...}`) in docker-compose.yml."""
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))


def resolve(args: list[str]) -> click.Command:
    """Walk click's command tree; parse the leaf's options so an unknown option fails too."""
    command: click.Command = cli
    parent = click.Context(cli, info_name="nexusgen")
    while isinstance(command, click.Group) and args:
        name, args = args[0], args[1:]
        sub = command.get_command(parent, name)
        assert sub is not None, f"`nexusgen` has no command {name!r}"
        command = sub
        parent = click.Context(command, info_name=name, parent=parent)
    command.make_context(command.name, list(args), parent=parent.parent)
    return command


def test_the_core_services_are_there() -> None:
    expected = {
        "postgres",
        "redis",
        "rabbitmq",
        "minio",
        "migrate",
        "api",
        "worker-webhooks",
        "beat",
        "flower",
    }
    assert expected <= set(SERVICES)
    assert any(name.startswith("worker-gpu") for name in SERVICES)
    assert "rabbitmq" in SERVICES["rabbitmq"]["profiles"]


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_every_app_service_runs_a_real_cli_command(name: str) -> None:
    command = APP_SERVICES[name]["command"]
    assert command[0] == "nexusgen", f"{name} must run a `nexusgen` command"
    resolve(command[1:])


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_services_set_only_variables_that_settings_reads(name: str) -> None:
    unknown = set(APP_SERVICES[name].get("environment", {})) - settings_env_names()
    assert not unknown, f"{name} sets variables that core/settings.py never reads: {sorted(unknown)}"


def test_gpu_workers_reserve_one_gpu_each_and_use_cuda() -> None:
    gpu_ids = []
    for name, service in APP_SERVICES.items():
        if not name.startswith("worker-gpu"):
            continue
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(device["device_ids"]) == 1 and "gpu" in device["capabilities"]
        gpu_ids += device["device_ids"]
        assert service["environment"]["NEXUSGEN_DEVICE"] == "cuda"
        assert "NEXUSGEN_TASKS" in service["environment"] and "NEXUSGEN_MODEL_DIR" in service["environment"]
        assert any(v.endswith(":/models:ro") for v in service["volumes"])
    assert len(gpu_ids) == len(set(gpu_ids)) >= 1


def test_tensor_parallel_worker_reserves_two_gpus_with_shared_memory() -> None:
    tp = APP_SERVICES["worker-tp"]
    (device,) = tp["deploy"]["resources"]["reservations"]["devices"]
    env = tp["environment"]
    assert len(device["device_ids"]) == 2 and env["NEXUSGEN_ENGINE"] == "deepspeed"
    assert env["NEXUSGEN_DEVICE"].count(",") == 1 and env["NEXUSGEN_TP_SIZE"] == "2"
    assert tp["shm_size"] and "tp" in tp["profiles"]
    gpu_ids = {i for n, s in APP_SERVICES.items() if n.startswith("worker-gpu") for d in
               s["deploy"]["resources"]["reservations"]["devices"] for i in d["device_ids"]}  # fmt: skip
    assert not gpu_ids & set(device["device_ids"])


def test_servers_have_healthchecks_and_app_waits_for_them() -> None:
    for name in ("postgres", "redis", "rabbitmq", "minio", "api"):
        assert "test" in SERVICES[name]["healthcheck"], name
    assert SERVICES["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "minio"):
        assert SERVICES["migrate"]["depends_on"][name]["condition"] == "service_healthy"


def test_flower_keeps_persistent_state_on_a_volume() -> None:
    command = SERVICES["flower"]["command"]
    db = command[command.index("--db") + 1]
    assert any(db.startswith(v.split(":")[1]) for v in SERVICES["flower"]["volumes"])


def test_env_example_names_only_settings_or_compose_variables() -> None:
    names = set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"#?\s*([A-Z][A-Z0-9_]+)=", line)
        if match:
            names.add(match.group(1))
    unknown = names - settings_env_names() - compose_variables()
    assert not unknown, f".env.example names variables nobody reads: {sorted(unknown)}"
    # and every setting is documented there
    assert settings_env_names() - names == set()


def test_the_image_holds_every_package_the_services_import() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY\s+(\S+)\s+\S+\s*$", dockerfile, flags=re.M))
    assert packages <= copied, f"Dockerfile does not copy {sorted(packages - copied)}"
    assert all(name in APP_SERVICES or not s.get("build") for name, s in SERVICES.items())


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = sorted(name for name in settings_env_names() if f"`{name}`" not in readme)
    assert not missing, f"README's configuration table lacks {missing}"
