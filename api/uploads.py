"""POST /v1/uploads: store an input image (multipart field `file`) in object storage with its checksum."""

from __future__ import annotations

from apiflask import APIBlueprint
from flask import Response, request
from minio.error import S3Error
from sqlalchemy import Connection
from urllib3.exceptions import HTTPError as Urllib3Error

from api.auth import auth, current_principal
from api.context import services
from api.errors import fail
from api.idempotency import Created, create_idempotently
from api.schemas import UploadIn, UploadOut, describes_body, upload_json
from core.ids import new_id
from core.images import inspect_image
from core.pending_uploads import delete_pending_uploads, insert_pending_uploads, put_pending_uploads
from core.submit import PendingUpload

bp = APIBlueprint("uploads", __name__, tag="Uploads")


@bp.post("/v1/uploads")
@bp.auth_required(auth, roles=["submit"])
@describes_body(UploadIn, "multipart/form-data")
@bp.output(UploadOut, status_code=201, description="The stored upload; use its id as a job's `image`.")
@bp.doc(responses=[400, 409, 413, 422, 503])
def create_upload() -> Response:
    """Store an input image (PNG, JPEG or WebP) for edit and understand jobs."""
    principal = current_principal()
    svc = services()
    file = request.files.get("file")
    if file is None:
        fail(422, "invalid_image", "send the image as the multipart/form-data field 'file'")
    data = file.read(svc.settings.max_upload_bytes + 1)
    info = inspect_image(data, svc.settings)

    pending = PendingUpload(id=new_id("upl"), data=data, info=info)

    def prepare() -> PendingUpload:  # the put happens before the transaction opens
        try:
            put_pending_uploads(svc.storage, principal.tenant_id, [pending])
        except (S3Error, Urllib3Error, OSError) as exc:
            fail(503, "storage_unavailable", f"object storage did not take the image: {exc}")
        return pending

    def work(conn: Connection, stored: PendingUpload) -> Created:
        (row,) = insert_pending_uploads(conn, principal.tenant_id, [stored], svc.settings.result_ttl_s)
        return Created(201, upload_json(row))

    def discard(stored: PendingUpload) -> None:
        delete_pending_uploads(svc.storage, [stored])

    return create_idempotently(principal.tenant_id, b"upload\0" + data, prepare, work, discard)
