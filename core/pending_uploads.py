"""The input images of a submission: upload ids checked, inline images stored and their rows inserted.

Inline images are put into object storage before the transaction opens (network I/O; deleted again if the
request creates nothing), their rows inserted in it, before the jobs that use them (core.ingest).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, RowMapping, select

from core.retention import keep_uploads, retained_until
from core.schema import uploads
from core.storage import Storage, upload_key
from core.submit import JobDraft, PendingUpload

log = logging.getLogger(__name__)

INSERT_CHUNK = 1000


def missing_uploads(
    conn: Connection, tenant_id: str, drafts: Iterable[tuple[int, JobDraft]], position: str, ttl_s: float
) -> list[dict[str, Any]]:
    """Errors for drafts naming an upload id the tenant does not have or whose retention ended; the
    others are kept `ttl_s` (or the tenant's override) from now (one statement)."""
    drafts = list(drafts)
    wanted = {d.upload_id for _, d in drafts if d.upload_id and d.pending_upload is None}
    found = keep_uploads(conn, tenant_id, wanted, ttl_s)
    if found == wanted:
        return []
    expired = set(
        conn.execute(
            select(uploads.c.id).where(uploads.c.tenant_id == tenant_id, uploads.c.id.in_(wanted - found))
        ).scalars()
    )
    errors = []
    for n, d in drafts:
        if d.upload_id is None or d.pending_upload is not None or d.upload_id in found:
            continue
        if d.upload_id in expired:
            errors.append(
                {position: n, "code": "upload_expired", "message": f"upload {d.upload_id!r} expired"}
            )
        else:
            errors.append({position: n, "code": "upload_not_found", "message": f"no upload {d.upload_id!r}"})
    return errors


def put_pending_uploads(storage: Storage, tenant_id: str, uploads_: Iterable[PendingUpload | None]) -> int:
    """Put inline images (None: a job without one) into object storage, before any transaction opens
    (network I/O); if one put fails, the ones already put are deleted. Returns how many were put."""
    pending = [upload for upload in uploads_ if upload is not None]
    try:
        for upload in pending:
            key = upload_key(tenant_id, upload.id)
            upload.sha256 = storage.put_bytes(key, upload.data, upload.info.content_type)
            upload.object_key = key
    except BaseException:
        delete_pending_uploads(storage, pending)
        raise
    return len(pending)


def delete_pending_uploads(storage: Storage, pending: Iterable[PendingUpload | None]) -> None:
    """Delete the stored inline images of a request that created nothing (failed, or was a replay).

    Best effort: a failed delete is logged, and the request's own outcome stands."""
    for upload in pending:
        if upload is None or upload.object_key is None:
            continue
        try:
            storage.delete(upload.object_key)
        except Exception:  # the answer to the client matters more than one orphaned object
            log.warning(
                "could not delete %s of a request that created nothing", upload.object_key, exc_info=True
            )
        upload.object_key = None


def insert_pending_uploads(
    conn: Connection, tenant_id: str, uploads_: Iterable[PendingUpload | None], ttl_s: float
) -> list[RowMapping]:
    """Insert the upload rows of stored inline images (before the jobs that use them); returns the rows."""
    pending = [upload for upload in uploads_ if upload is not None]
    if not pending:
        return []
    # one value for every row (executemany takes no SQL expressions)
    expires_at = conn.execute(select(retained_until(tenant_id, ttl_s))).scalar_one()
    rows = [
        {
            "id": upload.id,
            "tenant_id": tenant_id,
            "object_key": upload.object_key,
            "content_type": upload.info.content_type,
            "size_bytes": len(upload.data),
            "sha256": upload.sha256,
            "width": upload.info.width,
            "height": upload.info.height,
            "expires_at": expires_at,
        }
        for upload in pending
    ]
    inserted: list[RowMapping] = []
    for start in range(0, len(rows), INSERT_CHUNK):
        result = conn.execute(uploads.insert().returning(*uploads.c), rows[start : start + INSERT_CHUNK])
        inserted += result.mappings().all()
    return inserted
