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


@pytest.mark.timeout(300)
def test_generated_requests_never_get_a_server_error(app: Any, acme: Tenant) -> None:
    operations = _operations(app)
    assert len(operations) >= 12
    seen: dict[str, set[int]] = {}

    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call(headers=acme.headers)
            seen.setdefault(label, set()).add(response.status_code)
            assert response.status_code < 500, (label, case.path_parameters, case.body, response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["code"], str) and isinstance(error["message"], str), response.text

        check()
    assert all(seen.values())


def test_unauthenticated_generated_requests_are_401(app: Any, acme: Tenant) -> None:
    for operation in _operations(app):
        if not operation.path.startswith("/v1/"):
            continue

        @settings(max_examples=3, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call(headers={"Authorization": "Bearer ngk_not-a-key"})
            assert response.status_code in (401, 404, 405), (operation.path, response.status_code)

        check()
