"""docker-compose.yml and .env.example agree with the CLI and with Settings (Docker cannot run here)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from core.settings import Settings
from nexusgen.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_SERVICES = {name: s for name, s in SERVICES.items() if s.get("image", "").startswith("nexusgen-batch")}


def settings_env_names() -> set[str]:
    """Every environment variable core/settings.py reads (string constants passed to env lookups)."""
    tree = ast.parse((ROOT / "core" / "settings.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"[A-Z][A-Z0-9_]+", node.value)
            and "_" in node.value
        ):
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


def _gpu_ids(service: dict[str, Any]) -> list[str]:
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"]
    return list(device["device_ids"])


def test_a_one_gpu_host_runs_one_worker_by_default() -> None:
    default_gpu_workers = [
        name for name, s in APP_SERVICES.items() if "deploy" in s and not s.get("profiles")
    ]
    assert default_gpu_workers == ["worker-gpu0"]
    assert _gpu_ids(SERVICES["worker-gpu0"]) == ["0"]


def test_per_gpu_workers_reserve_one_gpu_each_and_use_cuda() -> None:
    gpu_ids = []
    for name, service in APP_SERVICES.items():
        if not name.startswith("worker-gpu"):
            continue
        ids = _gpu_ids(service)
        assert len(ids) == 1 and name == f"worker-gpu{ids[0]}"
        assert f"gpu{ids[0]}@" in " ".join(service["command"])  # its own Celery node name
        gpu_ids += ids
        assert service["environment"]["NEXUSGEN_DEVICE"] == "cuda"
        assert "NEXUSGEN_TASKS" in service["environment"] and "NEXUSGEN_MODEL_DIR" in service["environment"]
        assert any(v.endswith(":/models:ro") for v in service["volumes"])
    assert len(gpu_ids) == len(set(gpu_ids)) >= 2  # the documented second worker is there


def test_the_tensor_parallel_worker_owns_the_devices_it_splits_the_model_over() -> None:
    service = SERVICES["worker-tp"]
    assert service["profiles"] == ["tp"]
    env = service["environment"]
    ids = _gpu_ids(service)
    # inside the container the reserved GPUs are numbered from 0
    assert env["NEXUSGEN_DEVICE"].split(",") == [f"cuda:{i}" for i in range(len(ids))]
    assert int(env.get("NEXUSGEN_TP_SIZE", len(ids))) == len(ids) == 2  # default: one rank per device
    assert env["NEXUSGEN_ENGINE"] == "deepspeed"
    Settings.from_env({k: str(v) for k, v in env.items() if "${" not in str(v)})  # a valid configuration


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, service in SERVICES.items():
        if name == "migrate":
            continue
        assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"


def test_servers_have_healthchecks_and_app_waits_for_them() -> None:
    assert SERVICES["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "minio"):
        assert SERVICES["migrate"]["depends_on"][name]["condition"] == "service_healthy"


def test_the_broker_of_the_inactive_profile_is_not_waited_for() -> None:
    assert SERVICES["redis"]["profiles"] == ["redis"] and SERVICES["rabbitmq"]["profiles"] == ["rabbitmq"]
    for name, service in APP_SERVICES.items():
        for broker in ("redis", "rabbitmq"):
            dependency = service["depends_on"][broker]
            assert dependency == {"condition": "service_healthy", "required": False}, (name, broker)


def test_secrets_have_no_defaults_and_links_name_the_public_s3_address() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for variable in ("POSTGRES_PASSWORD", "S3_SECRET_KEY", "S3_PUBLIC_URL"):
        uses = re.findall(r"\$\{" + variable + r"(:?[-?])?", text)
        assert uses and all(use == ":?" for use in uses), f"{variable} must be required, not defaulted"
    for name, service in APP_SERVICES.items():
        assert service["environment"]["S3_PUBLIC_URL"].startswith("${S3_PUBLIC_URL:?"), name


def test_placeholder_secrets_of_env_example_are_refused_at_start() -> None:
    from core.secrets import refuse_weak_secrets

    example = dict(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=(\S*)", (ROOT / ".env.example").read_text(), re.M))
    placeholders = {k: v for k, v in example.items() if "change-me" in v}
    assert {"POSTGRES_PASSWORD", "RABBITMQ_PASSWORD", "S3_SECRET_KEY"} <= set(placeholders)
    env = {
        "DATABASE_URL": f"postgresql://nexusgen:{example['POSTGRES_PASSWORD']}@postgres:5432/nexusgen",
        "CELERY_BROKER_URL": f"amqp://nexusgen:{example['RABBITMQ_PASSWORD']}@rabbitmq:5672//",
        "S3_ENDPOINT_URL": "http://minio:9000",
        "S3_SECRET_KEY": example["S3_SECRET_KEY"],
    }
    with pytest.raises(ValueError) as refused:
        refuse_weak_secrets(Settings.from_env(env))
    for variable in ("DATABASE_URL", "CELERY_BROKER_URL", "S3_SECRET_KEY"):
        assert variable in str(refused.value)
    with pytest.raises(ValueError, match="S3_SECRET_KEY is empty"):
        refuse_weak_secrets(Settings.from_env({**env, "S3_SECRET_KEY": ""}))
    with pytest.raises(ValueError, match="password in CELERY_BROKER_URL is empty"):
        refuse_weak_secrets(Settings.from_env({"CELERY_BROKER_URL": "amqp://nexusgen:@rabbitmq:5672//"}))
    real = {"DATABASE_URL": "postgresql://nexusgen:Xq83hd@postgres/nexusgen", "S3_SECRET_KEY": "k" * 20}
    refuse_weak_secrets(Settings.from_env({**env, **real, "CELERY_BROKER_URL": "redis://redis:6379/0"}))


@pytest.mark.parametrize("command", [["migrate"], ["api"], ["worker"], ["beat"], ["flower"]])
def test_service_commands_refuse_placeholder_secrets(command: list[str]) -> None:
    from click.testing import CliRunner

    env = {
        "DATABASE_URL": "postgresql://nexusgen:change-me@127.0.0.1:1/nexusgen",
        "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
        "S3_ENDPOINT_URL": "http://127.0.0.1:1",
        "S3_SECRET_KEY": "x" * 20,
    }
    result = CliRunner(env=env).invoke(cli, command)
    assert result.exit_code == 2 and "refusing to start" in result.output, result.output
    assert "DATABASE_URL" in result.output and "Traceback" not in result.output


def test_the_image_installs_dependencies_before_the_source_and_pins_cuda_torch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    first_source_copy = next(
        i for i, line in enumerate(lines) if re.match(r"COPY (core|api|worker|model)\b", line)
    )
    heavy = [
        i for i, line in enumerate(lines) if "pip install" in line and ("torch" in line or "-r " in line)
    ]
    assert heavy and max(heavy) < first_source_copy, (
        "dependencies must be installed before the source is copied"
    )
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}\+\$\{CUDA_TAG\}" --index-url', dockerfile)
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", dockerfile, re.M)
    assert re.search(r"^ARG CUDA_TAG=cu\d+$", dockerfile, re.M)
    assert "DS_BUILD_OPS=0" in dockerfile  # no op compilation: the image has no compiler
    assert not re.search(r"^VOLUME", dockerfile, re.M), "a VOLUME makes an anonymous volume per container"


def test_dockerignore_keeps_local_state_and_weights_out_of_the_build_context() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".nexusgen", "weights", "demo-output", ".env", "*.safetensors"} <= ignored


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
    unknown = names - settings_env_names() - compose_variables() - {"COMPOSE_PROFILES"}
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
