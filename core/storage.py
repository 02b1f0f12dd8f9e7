"""Object storage over any S3 endpoint (minio client): job-scoped keys, checksums, presigned GETs."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlparse

from minio import Minio
from minio.error import S3Error

from core.settings import Settings


def upload_key(tenant_id: str, upload_id: str) -> str:
    return f"tenants/{tenant_id}/uploads/{upload_id}"


def result_key(tenant_id: str, job_id: str, ext: str) -> str:
    """One key per job, so a retried or duplicated attempt overwrites instead of adding an object."""
    return f"tenants/{tenant_id}/jobs/{job_id}/result.{ext}"


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

    def presign_get(self, key: str, ttl_s: int) -> str:
        """A GET link signed for the host clients use (the signature covers the host name)."""
        client = self.public_client or self.client
        return client.presigned_get_object(self.bucket, key, expires=timedelta(seconds=ttl_s))

    def list_keys(self, prefix: str) -> list[str]:
        return [o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def ping(self) -> bool:
        """True when the server answers and the bucket exists (readiness)."""
        return bool(self.client.bucket_exists(self.bucket))
