"""deploy/k8s agrees with the CLI and Settings, and KEDA's scaler query counts the right depth per task."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, text

from core import jobs as sm
from core.ids import new_id
from core.schema import jobs, tenants
from core.settings import TASKS
from tests.deploy.test_compose import resolve, settings_env_names

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
DOCS: list[dict[str, Any]] = [
    doc
    for name in KUSTOMIZATION["resources"]
    for doc in yaml.safe_load_all((K8S / name).read_text())
    if doc is not None
]
DEPLOYMENTS = {d["metadata"]["name"]: d for d in DOCS if d["kind"] == "Deployment"}
SCALED_OBJECTS = [d for d in DOCS if d["kind"] == "ScaledObject"]


def env_file(name: str) -> dict[str, str]:
    lines = (K8S / name).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    out = [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in DOCS
        if d["kind"] in ("Deployment", "Job")
    ]
    assert out
    return out


def containers() -> list[tuple[str, dict[str, Any]]]:
    return [(name, c) for name, spec in pod_specs() for c in spec["containers"]]


def test_every_resource_parses_and_the_generators_files_exist() -> None:
    for doc in DOCS:
        assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"]["name"], doc
    kinds = {d["kind"] for d in DOCS}
    assert {"Deployment", "Service", "Job", "ScaledObject", "PersistentVolumeClaim"} <= kinds
    assert (K8S / KUSTOMIZATION["configMapGenerator"][0]["envs"][0]).is_file()
    # the secret's file is the operator's; its example is committed and ignored by git under the real name
    assert (K8S / "secrets.env.example").is_file()
    assert "deploy/k8s/secrets.env" in (K8S.parents[1] / ".gitignore").read_text().split()


def test_the_expected_workloads_are_there() -> None:
    expected = {
        "nexusgen-api",
        "nexusgen-worker-webhooks",
        "nexusgen-beat",
        "nexusgen-flower",
        *(f"nexusgen-worker-{task}" for task in TASKS),
    }
    assert expected <= set(DEPLOYMENTS)
    assert DEPLOYMENTS["nexusgen-beat"]["spec"]["replicas"] == 1  # exactly one scheduler
    assert any(
        d["kind"] == "Job" and d["spec"]["template"]["spec"]["containers"][0]["command"][1] == "migrate"
        for d in DOCS
    )
    services = {d["spec"]["selector"]["app.kubernetes.io/name"] for d in DOCS if d["kind"] == "Service"}
    assert {"nexusgen-api", "nexusgen-flower"} <= services


@pytest.mark.parametrize(
    ("workload", "container"), containers(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_container_runs_a_real_cli_command_with_known_settings(
    workload: str, container: dict[str, Any]
) -> None:
    command = container["command"]
    assert command[0] == "nexusgen", f"{workload} must run a `nexusgen` command"
    resolve(command[1:])
    names = {e["name"] for e in container.get("env", [])}
    unknown = names - settings_env_names()
    assert not unknown, f"{workload} sets variables that core/settings.py never reads: {sorted(unknown)}"
    refs = {next(iter(ref.values()))["name"] for ref in container.get("envFrom", [])}
    assert refs == {"nexusgen-config", "nexusgen-secrets"}, workload


def test_config_and_secret_files_name_only_settings() -> None:
    for name in ("config.env", "secrets.env.example"):
        unknown = set(env_file(name)) - settings_env_names()
        assert not unknown, f"{name} names variables nobody reads: {sorted(unknown)}"
    secrets = env_file("secrets.env.example")
    assert {"DATABASE_URL", "CELERY_BROKER_URL", "S3_SECRET_KEY"} <= set(secrets)
    assert env_file("config.env")["S3_PUBLIC_URL"].startswith("https://")


def test_the_example_secrets_are_refused_at_start() -> None:
    from core.secrets import weak_secrets
    from core.settings import Settings

    problems = weak_secrets(Settings.from_env({**env_file("config.env"), **env_file("secrets.env.example")}))
    assert len(problems) == 3, problems  # database and broker passwords, S3 secret key


def test_model_workers_request_a_gpu_each_and_serve_one_task() -> None:
    for task in TASKS:
        container = DEPLOYMENTS[f"nexusgen-worker-{task}"]["spec"]["template"]["spec"]["containers"][0]
        resources = container["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == 1 == resources["limits"]["nvidia.com/gpu"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["NEXUSGEN_TASKS"] == task and env["NEXUSGEN_DEVICE"] == "cuda"
        assert f"{task}@%h" in container["command"]


def test_long_running_containers_have_liveness_and_readiness_probes() -> None:
    for name, deployment in DEPLOYMENTS.items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert "livenessProbe" in container and "readinessProbe" in container, name
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                ping = " ".join(container.get(probe, {}).get("exec", {}).get("command", []))
                if "--destination" in ping:  # a worker pings its own Celery node name
                    node = container["command"][container["command"].index("--hostname") + 1]
                    assert node.replace("%h", "$HOSTNAME") in ping, (name, probe)
    api = DEPLOYMENTS["nexusgen-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_a_scaled_object_per_task_scales_its_worker_from_zero_on_postgres() -> None:
    targets = {}
    for scaled in SCALED_OBJECTS:
        spec = scaled["spec"]
        target = DEPLOYMENTS[spec["scaleTargetRef"]["name"]]
        assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "postgresql"
        meta = trigger["metadata"]
        assert float(meta["targetQueryValue"]) > 0 and float(meta["activationTargetQueryValue"]) == 0
        # KEDA reads the connection string from the target container's environment: the secret has it
        assert meta["connectionFromEnv"] in env_file("secrets.env.example")
        container = target["spec"]["template"]["spec"]["containers"][0]
        assert {"secretRef": {"name": "nexusgen-secrets"}} in container["envFrom"]
        task = next(e["value"] for e in container["env"] if e["name"] == "NEXUSGEN_TASKS")
        targets[task] = meta["query"]
        assert target["spec"]["replicas"] == 0  # KEDA owns the count
    assert set(targets) == set(TASKS)


def scaler_queries() -> dict[str, str]:
    out = {}
    for scaled in SCALED_OBJECTS:
        query = scaled["spec"]["triggers"][0]["metadata"]["query"]
        (task,) = re.findall(r"task = '(\w+)'", query)
        out[task] = query
    return out


def test_scaler_queries_return_the_depth_of_each_task_on_a_real_database(clean_db: Engine) -> None:
    params = {"width": 256, "height": 256, "steps": 2, "cfg_scale": 3.0, "guidance": 3.5, "seed": 1}
    planned = {  # task -> status -> how many
        "generate": {"queued": 8, "succeeded": 2, "failed": 1},
        "edit": {"queued": 6, "canceled": 3},
        "understand": {"succeeded": 4},
    }
    with clean_db.begin() as conn:
        tenant_id = new_id("ten")
        conn.execute(tenants.insert().values(id=tenant_id, name=tenant_id, webhook_secret="whsec_x"))
        rows = [
            dict(
                id=new_id("job"),
                tenant_id=tenant_id,
                task=task,
                prompt="x",
                params=params,
                bucket=sm.bucket_key(task, params),
                status=status,
            )
            for task, statuses in planned.items()
            for status, n in statuses.items()
            for _ in range(n)
        ]
        conn.execute(jobs.insert(), rows)
    with clean_db.begin() as conn:  # a worker takes 3 generate jobs: running ones still count
        claimed = sm.claim_batch(conn, worker_id="w1", tasks=["generate"], max_batch=3, lease_s=60)
    assert len(claimed) == 3

    queries = scaler_queries()
    with clean_db.connect() as conn:
        depth = {task: conn.execute(text(query)).scalar_one() for task, query in queries.items()}
    print(f"KEDA scaler depth per task: {depth}")
    # generate: 5 queued + 3 running; edit: 6 queued (canceled ones are done); understand: nothing to do
    assert depth == {"generate": 8, "edit": 6, "understand": 0}
    assert all(isinstance(n, int) for n in depth.values())  # KEDA needs an integer
