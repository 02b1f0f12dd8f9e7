"""Run one claimed batch: job rows -> model requests -> ONE model call (worker.results stores what it gave).

Bad input fails only its own job; an out-of-memory error halves the batch and retries down to one job
(then `out_of_memory`); any other model exception is isolated the same way (then `model_error`). A job
whose lease was lost gets nothing written; a canceled one ends `canceled`. Transient infrastructure errors
propagate to the task, which requeues what it still holds and retries.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from minio.error import S3Error
from PIL import Image, ImageOps, UnidentifiedImageError
from sqlalchemy import Engine, select

from core import jobs as jobstate
from core.db import transaction
from core.images import shrunk_size
from core.params import SIDE
from core.records import Job, JobStatus, Task
from core.schema import uploads
from core.settings import Settings
from core.storage import Storage
from core.usage import Usage
from model import (
    EditRequest,
    GenerateRequest,
    NexusGen,
    RequestError,
    Result,
    UnderstandRequest,
    validate_request,
)
from worker.heartbeat import LeaseKeeper
from worker.runtime import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

REQUEST_TYPES: dict[str, type] = {
    Task.GENERATE: GenerateRequest,
    Task.EDIT: EditRequest,
    Task.UNDERSTAND: UnderstandRequest,
}
TEXT_FIELD: dict[str, str] = {
    Task.GENERATE: "prompt",
    Task.EDIT: "instruction",
    Task.UNDERSTAND: "instruction",
}
OUT_OF_MEMORY = (torch.OutOfMemoryError,)  # torch.cuda.OutOfMemoryError is the same class

_model: tuple[int, NexusGen] | None = None
_load_lock = threading.Lock()  # a preload thread and the first task may ask at once


def worker_device(settings: Settings) -> str:
    """The device of this process: with NEXUSGEN_DEVICE=cuda, prefork child i takes cuda:i (one per GPU)."""
    if settings.device != "cuda" or settings.engine != "torch":
        return settings.device
    from billiard.process import current_process

    index = getattr(current_process(), "index", None)  # set on prefork children only
    return settings.device if index is None else f"cuda:{index}"


def check_speed_options(settings: Settings) -> None:
    """Refuse at start what this worker's device or engine cannot do (fp8 on a CPU, offload with TP)."""
    from model.speed import SpeedOptions, check_options

    options = SpeedOptions(settings.compile, settings.dit_precision, settings.offload)
    check_options(options, worker_device(settings), settings.engine)


def load_model(settings: Settings) -> NexusGen:
    """The model of this process, loaded on first use (after the prefork fork, never before).

    With NEXUSGEN_TP_SIZE > 1 this process is rank 0 and the model drives every rank (worker.ranks).
    """
    global _model
    with _load_lock:
        if _model is None or _model[0] != os.getpid():
            from worker.ranks import open_model

            started = time.monotonic()
            model = open_model(settings, worker_device(settings))
            log.info(
                "model loaded from %s on %s (%s, tp %d, tasks %s) in %.1fs",
                settings.model_dir,
                model.device,
                settings.engine,
                settings.tp_world,
                ",".join(sorted(model.loaded)),
                time.monotonic() - started,
            )
            _model = (os.getpid(), model)
    return _model[1]


@dataclass
class Item:
    """One claimed job on its way through the batch."""

    job: Job
    request: Any = None
    input_s: float = 0.0

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def attempt(self) -> int:
        return self.job.attempt


@dataclass
class Outcome:
    """What the model call gave one item, and the size of the call that gave it."""

    item: Item
    result: Result
    batch_size: int
    timings: dict[str, float] = field(default_factory=dict)


def build_request(task: str, job: Job, image: Image.Image | None) -> Any:
    """The model request of a job: its params (unknown keys ignored), its text and input image."""
    cls = REQUEST_TYPES[task]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in job.params.items() if k in names and v is not None}
    kwargs[TEXT_FIELD[task]] = job.prompt
    if "image" in names:
        if image is None:
            raise ValueError(f"{task} needs an input image")
        kwargs["image"] = image
    request = cls(**kwargs)
    validate_request(request)
    return request


def load_image(engine: Engine, storage: Storage, upload_id: str | None) -> Image.Image | None:
    """The job's input image from object storage (None for jobs without one)."""
    if upload_id is None:
        return None
    with engine.connect() as conn:
        key = conn.execute(select(uploads.c.object_key).where(uploads.c.id == upload_id)).scalar_one_or_none()
    if key is None:
        raise ValueError(f"upload {upload_id} does not exist")
    try:
        data = storage.get_bytes(key)
    except S3Error as exc:
        if exc.code != "NoSuchKey":
            raise
        raise ValueError(f"upload {upload_id} has no stored image") from exc
    return decode_input(data, upload_id)


def decode_input(data: bytes, upload_id: str) -> Image.Image:
    """Decode a stored input for the model: EXIF orientation applied, sides bounded to SIDE.high.

    No stage uses more than that many pixels a side of an input (the AR encoder and the edit decoder's
    reference are smaller still), so a 40 MP photo is decoded at a reduced JPEG scale and shrunk before
    it is held; the stored original is kept as it is.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft(
                "RGB", (SIDE.high, SIDE.high)
            )  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that suffices
            upright = ImageOps.exif_transpose(img)
            size = shrunk_size(upright.width, upright.height, SIDE.high)  # keeps the aspect ratio bound
            if size != upright.size:
                upright = upright.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)  # as thumbnail
            return upright.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"upload {upload_id} is not a readable image: {exc}") from exc


def run_model(model: NexusGen, task: str, items: Sequence[Item], keeper: LeaseKeeper) -> list[Outcome]:
    """One model call for `items`; on OOM or a model exception, split in halves (down to one job)."""
    started = time.monotonic()
    try:
        answers = getattr(model, task)(
            [it.request for it in items],
            progress=lambda i, stage, step, total: keeper.progress(items[i].job_id, stage, step, total),
            should_cancel=lambda i: keeper.should_stop(items[i].job_id),
        )
    except OUT_OF_MEMORY as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return _split(model, task, items, keeper, "out_of_memory", exc)
    except TRANSIENT_ERRORS:
        raise  # a progress write hit an outage: not the model's fault
    except Exception as exc:  # a model failure: find the job that causes it, fail only that one
        log.exception("model call failed for %d %s job(s)", len(items), task)
        return _split(model, task, items, keeper, "model_error", exc)
    if len(answers) != len(items):
        raise RuntimeError(f"the model returned {len(answers)} results for {len(items)} requests")
    call_s = time.monotonic() - started
    return [
        Outcome(it, res, len(items), {"model_call_s": round(call_s, 4)})
        for it, res in zip(items, answers, strict=True)
    ]


def _split(
    model: NexusGen, task: str, items: Sequence[Item], keeper: LeaseKeeper, code: str, exc: BaseException
) -> list[Outcome]:
    if len(items) == 1:
        message = f"{exc.__class__.__name__}: {exc}"
        return [Outcome(items[0], Result(error=RequestError(code=code, message=message)), 1)]
    log.warning("%s with %d jobs; retrying in halves", code, len(items))
    half = len(items) // 2
    return run_model(model, task, items[:half], keeper) + run_model(model, task, items[half:], keeper)


@dataclass
class ComputedBatch:
    """A batch whose model call is done and whose results still have to be stored (leases still held)."""

    task: str
    size: int
    keeper: LeaseKeeper
    outcomes: list[Outcome]
    ended: dict[str, str]  # job id -> what happened, for jobs that ended before the model call
    result_ttl_s: float = Settings.result_ttl_s


def compute_batch(settings: Settings, engine: Engine, storage: Storage, rows: Sequence[Job]) -> ComputedBatch:
    """Load the inputs (failing bad ones) and run the model call; the leases stay held until stored."""
    task = rows[0].task
    ended: dict[str, str] = {}
    claims = {job.id: job.attempt for job in rows}
    keeper = LeaseKeeper(
        engine,
        claims,
        lease_s=settings.lease_s,
        heartbeat_s=settings.heartbeat_s,
        progress_interval_s=settings.progress_interval_s,
    ).start()
    try:
        items: list[Item] = []
        for job in rows:
            item = Item(job)
            started = time.monotonic()
            try:
                image = load_image(engine, storage, job.upload_id)
                item.request = build_request(task, job, image)
            except ValueError as exc:
                with transaction(engine) as conn:
                    jobstate.fail_job(
                        conn, item.job_id, item.attempt, code="invalid_input", message=str(exc), usage=Usage()
                    )
                keeper.release([item.job_id])
                ended[item.job_id] = f"{JobStatus.FAILED.value}: invalid_input"
                continue
            item.input_s = time.monotonic() - started
            items.append(item)
        outcomes = run_model(load_model(settings), task, items, keeper) if items else []
    except BaseException:
        keeper.stop()
        raise
    return ComputedBatch(task, len(rows), keeper, outcomes, ended, settings.result_ttl_s)
