"""Object storage over any S3 endpoint (minio client): job-scoped keys, checksums, presigned GETs."""

from __future__ import annotations

import hashlib
import io
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from core.records import SignedLink
from core.settings import Settings

# How long one presigned link is handed out again: a tenth of its lifetime, at most a minute. Signing a
# link cost about 0.15 ms of the API's CPU, an eighth of a GET of a succeeded job (py-spy, bench_get's load).
PRESIGN_MAX_WINDOW_S = 60
PRESIGN_CACHE_SIZE = 4096

KEY_ROOT = "tenants/"  # every object of ours: tenants/<tenant id>/<kind>/...
UPLOADS = "uploads"  # the kind of input images (uploads and inline images)


def upload_key(tenant_id: str, upload_id: str) -> str:
    return f"{KEY_ROOT}{tenant_id}/{UPLOADS}/{upload_id}"


def result_key(tenant_id: str, job_id: str, ext: str) -> str:
    """One key per job, so a retried or duplicated attempt overwrites instead of adding an object."""
    return f"{KEY_ROOT}{tenant_id}/jobs/{job_id}/result.{ext}"


def presign_window_s(ttl_s: int) -> int:
    """The window within which one presigned link of lifetime `ttl_s` is handed out again."""
    return max(1, min(PRESIGN_MAX_WINDOW_S, ttl_s // 10))


def _client(endpoint_url: str, settings: Settings) -> Minio:
    url = urlparse(endpoint_url)
    return Minio(
        url.netloc,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=url.scheme == "https",
        region=settings.s3_region,  # known region: presigning needs no request to the server
    )


@dataclass
class Storage:
    """A bucket on an S3 server; presigned links may name another endpoint, the one clients can reach."""

    client: Minio
    bucket: str
    public_client: Minio | None = None  # signs links for S3_PUBLIC_URL (None: the internal endpoint)
    # presigned links of the current window, by (key, ttl, window start); see presign_get
    _links: dict[tuple[str, int, int], SignedLink] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        settings.require("s3_endpoint_url")
        assert settings.s3_endpoint_url is not None
        public = _client(settings.s3_public_url, settings) if settings.s3_public_url else None
        return cls(
            client=_client(settings.s3_endpoint_url, settings),
            bucket=settings.s3_bucket,
            public_client=public,
        )

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:  # created concurrently by another process
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put_bytes(self, key: str, data: bytes, content_type: str) -> str:
        """Store `data` and return its sha256 hex digest."""
        digest = hashlib.sha256(data).hexdigest()
        self.client.put_object(
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
            metadata={"sha256": digest},
        )
        return digest

    def get_bytes(self, key: str) -> bytes:
        response = self.client.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def presign_get(self, key: str, ttl_s: int) -> SignedLink:
        """A GET link signed for the host clients use (the signature covers the host name).

        Links are signed as of the start of the current window of `presign_window_s(ttl_s)` seconds, so
        every request for one object within a window gets the same link, from a small cache, instead of a
        new signature; a link handed out lives between `ttl_s - window` and `ttl_s` seconds.
        """
        window = presign_window_s(ttl_s)
        now = int(time.time())
        signed_at = now - now % window
        cache_key = (key, ttl_s, signed_at)
        link = self._links.get(cache_key)
        if link is None:
            client = self.public_client or self.client
            signed = datetime.fromtimestamp(signed_at, UTC)
            url = client.presigned_get_object(
                self.bucket, key, expires=timedelta(seconds=ttl_s), request_date=signed
            )
            link = SignedLink(url, signed + timedelta(seconds=ttl_s))
            if len(self._links) >= PRESIGN_CACHE_SIZE:  # a new window: the old links are never asked again
                self._links.clear()
            self._links[cache_key] = link
        return link

    def list_keys(self, prefix: str) -> list[str]:
        return [o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]

    def list_page(
        self, prefix: str, start_after: str, limit: int = 1000
    ) -> list[tuple[str, datetime | None]]:
        """(key, last modified) of at most `limit` keys under `prefix` after `start_after`, in key order:
        one ListObjectsV2 request while `limit` is at most S3's page size (1000)."""
        listed = self.client.list_objects(
            self.bucket, prefix=prefix, recursive=True, start_after=start_after or None
        )
        page = itertools.islice(listed, limit)
        return [(o.object_name, o.last_modified) for o in page if o.object_name is not None]

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        """Delete `keys` with DeleteObjects requests (1000 keys each); return the keys that were not deleted
        (deleting a missing key succeeds)."""
        errors = self.client.remove_objects(self.bucket, (DeleteObject(key) for key in keys))
        return [error.name for error in errors if error.name is not None]

    def ping(self) -> bool:
        """True when the server answers and the bucket exists (readiness)."""
        return bool(self.client.bucket_exists(self.bucket))
