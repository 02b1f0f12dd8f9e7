"""Chaos runs against real processes: no job lost, none duplicated, no 5xx but a 503 during an outage (or
its recovery), no delivery repeated after a 2xx, under worker kills, broker, database and storage outages
and hostile receivers.

`make test` runs the short scenario; `make chaos` (NEXUSGEN_CHAOS=full) runs every scenario and prints
the table of figures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.run import HEADER, Report, Scenario, run_scenario
from tests.chaos.stack import ChaosStack

pytestmark = pytest.mark.chaos

SHORT = Scenario(
    "short: kills+redis",
    batches=4,
    jobs_per_batch=20,
    faults=[(4, "kill_worker_child"), (12, "kill_worker_main"), (20, "redis")],
    receivers=("ok", "flaky", "trickle", "gone"),
    submit_every_s=2,
)
FULL = [
    Scenario(
        "worker kills",
        batches=8,
        jobs_per_batch=40,
        faults=[
            (8, "kill_worker_child"),
            (22, "kill_worker_main"),
            (36, "kill_worker_child"),
            (50, "kill_worker_main"),
        ],
        receivers=("ok", "flaky", "trickle", "redirect"),
        submit_every_s=4,
    ),
    Scenario(
        "broker + database",
        batches=6,
        jobs_per_batch=40,
        faults=[(8, "redis"), (24, "postgres"), (42, "postgres_stop")],
        receivers=("ok", "flaky", "down", "gone"),
        submit_every_s=5,
    ),
    Scenario(
        "storage + two at once",
        batches=6,
        jobs_per_batch=40,
        faults=[
            (8, "s3"),
            (24, "kill_worker_main+redis"),
            (42, "postgres+s3"),
            (60, "kill_worker_child+postgres"),
        ],
        receivers=("ok", "flaky", "slow"),
        submit_every_s=6,
    ),
]
FULL_RUN = os.environ.get("NEXUSGEN_CHAOS") == "full"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[ChaosStack]:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="nexusgen-chaos-"))  # outside pytest's root: see tests/conftest
    root.chmod(0o755)
    s = ChaosStack(root, tiny_checkpoint)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        report_path = Path(os.environ.get("NEXUSGEN_CHAOS_REPORT", root / "report.txt"))
        print(f"\nchaos logs under {root}; table in {report_path}")


def _run(stack: ChaosStack, scenario: Scenario) -> Report:
    lines: list[str] = []
    report = run_scenario(stack, scenario, print_row=lines.append)
    path = Path(os.environ.get("NEXUSGEN_CHAOS_REPORT", stack.root / "report.txt"))
    new = not path.exists()
    with path.open("a") as out:
        if new:
            out.write(HEADER + "\n")
        out.write(lines[0] + "\n")
    print("\n" + HEADER + "\n" + lines[0] + "\n  faults: " + "; ".join(report.faults))
    return report


def _assert_clean(report: Report) -> None:
    assert report.accepted > 0 and report.faults
    assert report.lost == 0, report
    assert report.duplicates == 0, report
    assert report.failed_below_poison == 0, report
    assert report.server_errors == 0, report
    assert report.unavailable_outside == 0, report
    assert report.repeated_after_2xx == 0, report
    assert report.missing_events == 0, report
    assert report.deliveries_unfinished == 0, report


@pytest.mark.skipif(FULL_RUN, reason="the full run covers these faults")
def test_short_chaos(stack: ChaosStack) -> None:
    _assert_clean(_run(stack, SHORT))


@pytest.mark.skipif(not FULL_RUN, reason="long: `make chaos` runs it (NEXUSGEN_CHAOS=full)")
@pytest.mark.parametrize("scenario", FULL, ids=[s.name for s in FULL])
def test_full_chaos(stack: ChaosStack, scenario: Scenario) -> None:
    _assert_clean(_run(stack, scenario))
