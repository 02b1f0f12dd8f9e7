"""Operations endpoints and the error contract: healthz, readyz, metrics, OpenAPI, docs, 404/405/413."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from core.jobs import claim_batch, complete_job
from tests.api.conftest import Tenant


def test_healthz_and_readyz(client: Any) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.get_json()
    assert {name: check["ok"] for name, check in r.get_json()["checks"].items()} == {
        "database": True,
        "broker": True,
        "storage": True,
    }


def test_readyz_is_503_when_a_dependency_is_down(settings: Any, engine: Any, clean_db: Any) -> None:
    from api.app import create_app

    for override in ({"broker_url": "redis://127.0.0.1:1/0"}, {"s3_bucket": "no-such-bucket-here"}):
        r = create_app(settings.with_overrides(**override)).test_client().get("/readyz")
        assert r.status_code == 503 and r.get_json()["status"] == "unavailable", override
        assert not all(c["ok"] for c in r.get_json()["checks"].values())


def test_metrics_are_computed_from_the_database(client: Any, acme: Tenant, engine: Any) -> None:
    for i in range(3):
        client.post(
            "/v1/jobs", json={"task": "generate", "prompt": "x", "priority": i % 2}, headers=acme.headers
        )
    client.post(
        "/v1/jobs", json={"task": "generate", "prompt": "x", "params": {"steps": 4}}, headers=acme.headers
    )
    with engine.begin() as conn:
        claim_batch(
            conn,
            worker_id="w",
            tasks=["generate"],
            max_batch=1,
            lease_s=60,
            bucket="generate|generation|512x512|4|3|3.5",
        )
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.get_data(as_text=True))
        for s in family.samples
    }
    assert samples[("nexusgen_jobs", (("status", "queued"), ("task", "generate")))] == 3
    assert samples[("nexusgen_jobs", (("status", "running"), ("task", "generate")))] == 1
    bucket = "generate|generation|512x512|50|3|3.5"
    assert (
        samples[("nexusgen_queue_depth", (("bucket", bucket), ("priority", "0"), ("task", "generate")))] == 2
    )
    assert (
        samples[("nexusgen_queue_depth", (("bucket", bucket), ("priority", "1"), ("task", "generate")))] == 1
    )
    assert samples[("nexusgen_webhook_deliveries", (("status", "pending"),))] == 0
    assert samples[("nexusgen_metrics_database_up", ())] == 1


def test_latency_and_batch_size_histograms_of_finished_jobs(client: Any, acme: Tenant, engine: Any) -> None:
    for _ in range(2):
        client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=acme.headers)
    with engine.begin() as conn:
        rows = claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=2, lease_s=60)
    for row, denoise_s in zip(rows, (0.3, 7.0), strict=True):
        with engine.begin() as conn:
            prov = {"batch_size": 2, "timings": {"denoise_s": denoise_s, "upload_s": 0.01}}
            complete_job(conn, row.id, row.attempt, provenance=prov, result={"kind": "text", "text": "t"})
    text = client.get("/metrics").get_data(as_text=True)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    denoise = (("stage", "denoise"), ("task", "generate"))
    assert samples[("nexusgen_job_stage_seconds_count", denoise)] == 2
    assert samples[("nexusgen_job_stage_seconds_sum", denoise)] == 7.3
    assert samples[("nexusgen_job_stage_seconds_bucket", (("le", "0.5"), *denoise))] == 1
    assert samples[("nexusgen_job_stage_seconds_bucket", (("le", "10.0"), *denoise))] == 2
    assert samples[("nexusgen_batch_size_bucket", (("le", "1.0"), ("task", "generate")))] == 0
    assert samples[("nexusgen_batch_size_bucket", (("le", "2.0"), ("task", "generate")))] == 2
    assert samples[("nexusgen_job_wait_seconds_count", (("task", "generate"),))] == 2


def test_openapi_is_generated_and_docs_served(client: Any) -> None:
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    for path in (
        "/v1/jobs",
        "/v1/batches",
        "/v1/uploads",
        "/v1/jobs/{job_id}/result",
        "/v1/batches/{batch_id}/results",
    ):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobIn"}
    assert "multipart/form-data" in spec["paths"]["/v1/uploads"]["post"]["requestBody"]["content"]
    assert spec["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 200


class _Links(HTMLParser):
    """Every URL an HTML page makes the browser load: src and href attributes, the spec URL of Swagger UI."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.script = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]

    def handle_data(self, data: str) -> None:
        self.script += data


def test_docs_load_only_same_origin_assets_that_answer(client: Any) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    links = _Links()
    links.feed(page.get_data(as_text=True))
    spec_urls = re.findall(r'\burl:\s*"([^"]*)"', links.script)
    assert spec_urls == ["/openapi.json"]
    urls = links.urls + spec_urls
    # the stylesheet, both scripts, the favicon (once rendered as the string "None") and the spec
    assert len(urls) == 5 and not any("None" in u for u in urls), urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), f"{url} is not same-origin"
        answer = client.get(url)
        answer.close()  # a file served by send_file stays open until its response is closed
        assert answer.status_code == 200 and answer.content_length, url
    assert client.get("/docs/assets/index.html").status_code == 404  # only the listed files are served


def test_error_contract_for_routing_errors(client: Any, acme: Tenant) -> None:
    r = client.get("/v1/nothing", headers=acme.headers)
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
    r = client.delete("/v1/jobs", headers=acme.headers)
    assert r.status_code == 405 and r.get_json()["error"]["code"] == "method_not_allowed"
    assert "GET" in r.headers["Allow"]
    r = client.get("/v1/jobs/job_unknown", headers=acme.headers)
    assert r.status_code == 404 and set(r.get_json()["error"]) == {"code", "message", "details"}
