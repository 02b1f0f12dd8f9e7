"""The chaos checker's own rule: a 503 counts as expected only while a server is down or recovering."""

from __future__ import annotations

from tests.chaos.run import RECOVERY_S, outside_outages


def test_a_503_is_expected_only_during_an_outage_or_its_recovery() -> None:
    outages = [(100.0, 106.0), (200.0, 206.0)]
    during = [(101.0, 101.1), (99.0, 100.5), (105.9, 107.0)]  # inside, sent before it, answered after it
    recovering = [(106.0 + RECOVERY_S - 0.1, 106.0 + RECOVERY_S + 1)]
    outside = [(50.0, 51.0), (106.0 + RECOVERY_S + 0.1, 130.0), (300.0, 300.2)]
    assert outside_outages(during + recovering, outages) == 0
    assert outside_outages(during + recovering + outside, outages) == len(outside)
    assert outside_outages(outside, []) == len(outside)
