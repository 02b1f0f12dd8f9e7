"""A small HTTP client of the batch API (design.md, HTTP API), used by the CLI and the demo."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8080"


class ApiError(RuntimeError):
    """An error answer of the API: `{"error": {"code", "message", "details"}}`."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}" + (f" {details}" if details else ""))
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        raise ApiError(
            response.status_code, error.get("code", "error"), error.get("message", ""), error.get("details")
        )
    except (ValueError, KeyError, TypeError):
        raise ApiError(response.status_code, "http_error", response.text[:500]) from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Client:
    """Calls the API with a bearer key; every method returns the decoded JSON or raises ApiError."""

    base_url: str
    api_key: str
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=self.timeout_s,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Client:
        """Read NEXUSGEN_API_URL (default http://127.0.0.1:8080) and NEXUSGEN_API_KEY."""
        env = os.environ if environ is None else environ
        key = env.get("NEXUSGEN_API_KEY", "")
        if not key:
            raise ValueError(
                "NEXUSGEN_API_KEY is not set (create one with `nexusgen key create --tenant NAME`)"
            )
        return cls(env.get("NEXUSGEN_API_URL") or DEFAULT_API_URL, key)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        _raise_for_error(response)
        return response.json()

    # --- operations --------------------------------------------------------------------------------

    def healthy(self) -> bool:
        try:
            return self._http.get("/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API at {self.base_url} did not answer /healthz in {timeout_s:.0f} s")
            time.sleep(0.5)

    # --- uploads, jobs and batches -----------------------------------------------------------------

    def upload(self, data: bytes, filename: str = "image.png", content_type: str = "image/png") -> str:
        """Store an input image; return its upload id."""
        body = self._request("POST", "/v1/uploads", files={"file": (filename, data, content_type)})
        return str(body["id"])

    def create_job(self, job: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=job, headers=headers)

    def create_batch(
        self,
        jobs: list[dict[str, Any]],
        *,
        webhook: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"jobs": jobs}
        if webhook:
            body["webhook"] = webhook
        if metadata:
            body["metadata"] = metadata
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/batches", json=body, headers=headers)

    def create_batch_jsonl(
        self,
        jsonl: bytes,
        idempotency_key: str | None = None,
        *,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Post a JSONL body (one job a line, each with a unique custom_id); the batch-level webhook and
        metadata travel as query parameters."""
        headers = {"Content-Type": "application/x-ndjson"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        params: dict[str, str] = {}
        if webhook_url:
            params["webhook_url"] = webhook_url
        if webhook_events:
            params["webhook_events"] = ",".join(webhook_events)
        if metadata is not None:
            params["metadata"] = json.dumps(metadata, separators=(",", ":"))
        return self._request("POST", "/v1/batches", content=jsonl, headers=headers, params=params)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/batches/{batch_id}")

    def get(self, object_id: str) -> dict[str, Any]:
        """A job or a batch, by the prefix of its id."""
        return self.get_batch(object_id) if object_id.startswith("bat_") else self.get_job(object_id)

    def iter_jobs(self, batch_id: str | None = None, status: str | None = None) -> Iterator[dict[str, Any]]:
        """Every job (of a batch), following the cursor."""
        params: dict[str, str] = {}
        if batch_id:
            params["batch_id"] = batch_id
        if status:
            params["status"] = status
        while True:
            page = self._request("GET", "/v1/jobs", params=params)
            yield from page.get("data", [])
            cursor = page.get("next_cursor")
            if not cursor:
                return
            params["cursor"] = cursor

    def batch_results(self, batch_id: str) -> list[dict[str, Any]]:
        """The batch's results as a list of JSONL records (custom_id, status, result URL or text, error)."""
        response = self._http.get(f"/v1/batches/{batch_id}/results")
        _raise_for_error(response)
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    def cancel(self, object_id: str) -> dict[str, Any]:
        kind = "batches" if object_id.startswith("bat_") else "jobs"
        return self._request("POST", f"/v1/{kind}/{object_id}/cancel")

    def result_bytes(self, job_id: str) -> tuple[bytes, str]:
        """The job's result: (content, content type), following the redirect to the presigned URL."""
        response = self._http.get(f"/v1/jobs/{job_id}/result", follow_redirects=False)
        _raise_for_error(response)
        if response.status_code in (301, 302, 303, 307, 308):
            # The presigned URL carries its own credentials: no bearer header for the object server.
            response = httpx.get(response.headers["location"], timeout=self.timeout_s)
            _raise_for_error(response)
        return response.content, response.headers.get("content-type", "application/octet-stream")

    def download_result(
        self, job: dict[str, Any], out_dir: Path, name: str | None = None
    ) -> tuple[Path, bool]:
        """Write a succeeded job's result under out_dir; skip it when a file with its sha256 is there.

        Returns (path, downloaded): downloaded is False when the existing file already matched.
        """
        result = job.get("result") or {}
        stem = name or job.get("custom_id") or job["id"]
        ext = "txt" if job["task"] == "understand" else "png"
        path = out_dir / f"{stem}.{ext}"
        expected = result.get("sha256")
        if path.exists() and expected and sha256_file(path) == expected:
            return path, False
        if ext == "txt" and result.get("text") is not None:
            data = str(result["text"]).encode()
        elif result.get("url"):
            response = httpx.get(result["url"], timeout=self.timeout_s)
            _raise_for_error(response)
            data = response.content
        else:
            data, _ = self.result_bytes(job["id"])
        if expected and ext == "png" and hashlib.sha256(data).hexdigest() != expected:
            raise ApiError(200, "checksum_mismatch", f"result of {job['id']} does not match its sha256")
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(path.suffix + ".part")
        partial.write_bytes(data)
        partial.replace(path)
        return path, True
