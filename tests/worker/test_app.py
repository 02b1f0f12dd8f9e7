"""The Celery app built from Settings: routing, reliability options, beat entries, no import-time app."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest

from core.queue import MAINTENANCE_QUEUE, TASK_DELIVER, TASK_RUN_BATCH, TASK_SWEEP, WEBHOOK_QUEUE
from core.settings import Settings
from tests.worker.support import REPO
from worker.app import make_celery, model_queues
from worker.runtime import TRANSIENT_ERRORS, NexusGenTask


def test_app_is_configured_from_settings() -> None:
    settings = Settings(broker_url="redis://127.0.0.1:1/0", sweep_interval_s=7, tasks=("edit", "understand"))
    app = make_celery(settings)
    conf = app.conf
    assert app.settings is settings
    assert (conf.task_acks_late, conf.task_reject_on_worker_lost, conf.worker_prefetch_multiplier) == (
        True,
        True,
        1,
    )
    assert (conf.worker_pool, conf.worker_concurrency) == ("prefork", 1)
    # Flower sees every task with no -E flag in up, compose or Kubernetes
    assert conf.worker_send_task_events is True and conf.task_send_sent_event is True
    assert conf.task_routes[TASK_SWEEP] == {"queue": MAINTENANCE_QUEUE}
    assert conf.task_routes[TASK_DELIVER] == {"queue": WEBHOOK_QUEUE}
    sweep = conf.beat_schedule["nexusgen-sweep"]
    assert (sweep["task"], sweep["schedule"]) == (TASK_SWEEP, timedelta(seconds=7))
    assert any(entry["task"] == TASK_DELIVER for entry in conf.beat_schedule.values())
    assert {"worker.tasks", "worker.sweeper", "worker.delivery"} <= set(conf.include)
    assert model_queues(settings) == ["nexusgen.edit", "nexusgen.understand"]


def test_importing_the_app_module_builds_nothing() -> None:
    code = (
        "import sys, worker.app as m; "
        "assert m._default_app is None; "
        "assert 'torch' not in sys.modules and 'worker.execute' not in sys.modules; "
        "app = m.celery_app; assert app is m.celery_app and app.settings.max_batch == 3"
    )
    env = {"PATH": "/usr/bin:/bin", "CELERY_BROKER_URL": "redis://127.0.0.1:1/0", "NEXUSGEN_MAX_BATCH": "3"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_heartbeat_slower_than_the_lease_is_refused() -> None:
    with pytest.raises(ValueError, match="NEXUSGEN_HEARTBEAT_S"):
        make_celery(Settings(broker_url="redis://127.0.0.1:1/0", lease_s=5, heartbeat_s=5))


def test_every_task_runs_on_the_one_runtime_with_one_retry_policy() -> None:
    app = make_celery(Settings(broker_url="redis://127.0.0.1:1/0"))
    app.loader.import_default_modules()
    tasks = {name: task for name, task in app.tasks.items() if name.startswith("nexusgen.")}
    assert set(tasks) == {TASK_RUN_BATCH, TASK_SWEEP, TASK_DELIVER}
    assert all(isinstance(task, NexusGenTask) for task in tasks.values())
    assert all(task.runtime is app and task.settings is app.settings for task in tasks.values())
    batch = tasks[TASK_RUN_BATCH]
    assert (batch.autoretry_for, batch.max_retries, batch.retry_backoff_max) == (TRANSIENT_ERRORS, 20, 60)
    # a killed pool process fails its batch task instead of redelivering the ticket (README, Flower)
    assert batch.reject_on_worker_lost is False
    # the sweep and the webhook poll are redone by the next beat: no retries of their own
    assert tasks[TASK_SWEEP].autoretry_for == () and tasks[TASK_DELIVER].autoretry_for == ()
