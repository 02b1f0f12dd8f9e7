"""The pytest habits in pyproject.toml hold: our warnings are errors, third-party ones are not."""

from __future__ import annotations

import warnings

import pytest


def _warn_from(module: str, category: type[Warning] = DeprecationWarning) -> None:
    """Call `warnings.warn` from code whose module is `module`, as a function defined there would."""
    namespace: dict[str, object] = {"__name__": module, "warnings": warnings, "category": category}
    exec(compile("def probe():\n    warnings.warn('probe', category)\n", f"<{module}>", "exec"), namespace)
    namespace["probe"]()  # type: ignore[operator]


@pytest.mark.parametrize(
    "module",
    ["core.jobs", "api", "worker.execute", "model.plan", "nexusgen.cli", "bench.x", "tests.api.test_x"],
)
def test_a_warning_from_our_packages_is_an_error(module: str) -> None:
    with pytest.raises(DeprecationWarning, match="probe"):
        _warn_from(module)


@pytest.mark.parametrize("module", ["sqlalchemy.engine", "celery", "corefoo", "apiary.x"])
def test_a_third_party_warning_is_left_alone(module: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        _warn_from(module, UserWarning)
    assert [str(w.message) for w in caught] == ["probe"]


def test_markers_are_strict(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.option.strict_markers
