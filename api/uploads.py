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
from core.retention import retained_until
from core.schema import uploads
from core.storage import upload_key

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

    def work(conn: Connection) -> Created:
        upload_id = new_id("upl")
        key = upload_key(principal.tenant_id, upload_id)
        try:
            digest = svc.storage.put_bytes(key, data, info.content_type)
        except (S3Error, Urllib3Error, OSError) as exc:
            fail(503, "storage_unavailable", f"object storage did not take the image: {exc}")
        row = (
            conn.execute(
                uploads.insert()
                .values(
                    id=upload_id,
                    tenant_id=principal.tenant_id,
                    object_key=key,
                    content_type=info.content_type,
                    size_bytes=len(data),
                    sha256=digest,
                    width=info.width,
                    height=info.height,
                    expires_at=retained_until(principal.tenant_id, svc.settings.result_ttl_s),
                )
                .returning(*uploads.c)
            )
            .mappings()
            .one()
        )
        return Created(201, upload_json(row))

    return create_idempotently(principal.tenant_id, b"upload\0" + data, work)
