"""Property test against the generated OpenAPI spec: no generated input yields a 5xx, every error is shaped.

schemathesis builds requests for every operation from /openapi.json and sends them to the WSGI app.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.api.conftest import Tenant

MAX_EXAMPLES = 25


def _operations(app: Any) -> list[Any]:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def _fuzz(operation: Any, headers: dict[str, str], max_examples: int, allowed: set[int] | None) -> set[int]:
    """Send `max_examples` generated requests for one operation; return the statuses seen."""
    label = f"{operation.method.upper()} {operation.path}"
    seen: set[int] = set()

    @settings(
        max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        response = case.call(headers=headers)
        seen.add(response.status_code)
        assert response.status_code < 500, (label, case.path_parameters, case.body, response.text[:500])
        if allowed is not None:
            assert response.status_code in allowed, (label, response.status_code)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str), response.text

    check()
    return seen


@pytest.mark.timeout(300)
def test_generated_requests_never_get_a_server_error(app: Any, acme: Tenant) -> None:
    operations = _operations(app)
    assert len(operations) >= 12
    seen = {f"{op.method} {op.path}": _fuzz(op, acme.headers, MAX_EXAMPLES, None) for op in operations}
    assert all(seen.values())


def test_unauthenticated_generated_requests_are_401(app: Any, acme: Tenant) -> None:
    for operation in _operations(app):
        if operation.path.startswith("/v1/"):
            _fuzz(operation, {"Authorization": "Bearer ngk_not-a-key"}, 3, {401, 404, 405})
