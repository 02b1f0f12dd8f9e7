"""core.submit and core.ingest: spec validation and normalisation, JSONL parsing, images, the COPY insert."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import event, select

from core.auth import create_tenant
from core.images import ImageError, decode_data_url, inspect_image
from core.ingest import (
    checks_offline,
    copy_validated,
    cyclic_gc_paused,
    insert_jobs,
    parse_jsonl,
    validate_many,
)
from core.jobs import bucket_key
from core.schema import batches, jobs
from core.settings import Settings
from core.submit import SubmitError, normalize_params, validate_job

SETTINGS = Settings(webhook_allow_private_networks=True)


def _png(width: int = 16, height: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def test_generate_defaults_and_seed() -> None:
    draft = validate_job({"task": "generate", "prompt": "a cat"}, SETTINGS)
    assert draft.params["width"] == draft.params["height"] == 512
    assert (draft.params["steps"], draft.params["cfg_scale"], draft.params["guidance"]) == (50, 3.0, 3.5)
    assert 0 <= draft.params["seed"] < 2**32
    assert draft.bucket == bucket_key("generate", draft.params) == "generate|generation|512x512|50|3|3.5"
    seeds = {validate_job({"task": "generate", "prompt": "x"}, SETTINGS).params["seed"] for _ in range(20)}
    assert len(seeds) > 1  # drawn per job at submission


def test_edit_defaults_and_explicit_values() -> None:
    draft = validate_job(
        {"task": "edit", "instruction": "x", "image": "upl_1", "params": {"seed": 5, "cfg_scale": 2}},
        SETTINGS,
    )
    assert (
        draft.params["decoder"] == "edit" and draft.params["cfg_scale"] == 2.0 and draft.params["seed"] == 5
    )
    assert draft.upload_id == "upl_1" and draft.pending_upload is None


def test_understand_params() -> None:
    assert normalize_params("understand", None) == {"max_new_tokens": 1024}
    with pytest.raises(SubmitError) as err:
        normalize_params("understand", {"width": 512})
    assert err.value.code == "invalid_params"
    with pytest.raises(SubmitError):
        normalize_params("understand", {"max_new_tokens": 0})


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"width": 520}, "invalid_size"),
        ({"width": 240}, "invalid_size"),
        ({"height": 2064}, "invalid_size"),
        ({"width": 512.0}, "invalid_size"),
        ({"steps": 0}, "invalid_steps"),
        ({"steps": "5"}, "invalid_steps"),
        ({"cfg_scale": float("nan")}, "invalid_params"),
        ({"guidance": -1}, "invalid_params"),
        ({"language": "fr"}, "invalid_params"),
        ({"seed": 2**64}, "invalid_params"),
        ({"decoder": "edit"}, "invalid_params"),  # generate takes no decoder
    ],
)
def test_bad_params(params: dict[str, Any], code: str) -> None:
    with pytest.raises(SubmitError) as err:
        normalize_params("generate", params)
    assert err.value.code == code


def test_size_bounds_are_inclusive() -> None:
    assert normalize_params("generate", {"width": 256, "height": 2048})["width"] == 256


def test_data_url_and_image_checks() -> None:
    url = "data:image/png;base64," + base64.b64encode(_png(20, 10)).decode()
    draft = validate_job({"task": "understand", "instruction": "?", "image": url}, SETTINGS)
    assert draft.pending_upload is not None and draft.upload_id == draft.pending_upload.id
    assert (draft.pending_upload.info.width, draft.pending_upload.info.height) == (20, 10)
    with pytest.raises(ImageError):
        decode_data_url("data:image/png,abc", 1000)
    with pytest.raises(ImageError) as err:
        decode_data_url("data:image/png;base64," + "A" * 4000, 1000)
    assert err.value.code == "image_too_large"
    assert inspect_image(_png(30, 40), SETTINGS).content_type == "image/png"


def test_parse_jsonl_reports_line_numbers() -> None:
    items, errors = parse_jsonl(b'{"a": 1}\n\n[2]\n{bad}\n\xff\n')
    assert items == [(1, {"a": 1}), (3, [2])]
    assert [(e["line"], e["code"]) for e in errors] == [(4, "invalid_json"), (5, "invalid_json")]


def test_validate_many_collects_every_error() -> None:
    items = [
        (1, {"task": "generate", "prompt": "x", "custom_id": "a"}),
        (2, {"task": "generate", "prompt": "x", "custom_id": "a"}),
        (3, {"task": "generate", "custom_id": "b"}),
        (4, {"task": "generate", "prompt": "x"}),
    ]
    drafts, errors = validate_many(
        items,
        SETTINGS,
        position="line",
        require_custom_id=True,
        inherited_webhook=("http://127.0.0.1/h", None),
    )
    assert [n for n, _ in drafts] == [1]
    assert drafts[0][1].webhook_url == "http://127.0.0.1/h"
    assert [(e["line"], e["code"]) for e in errors] == [
        (2, "duplicate_custom_id"),
        (3, "missing_prompt"),
        (4, "missing_custom_id"),
    ]


# Params objects that lines of a batch repeat, and ones that only look alike: each line of a batch must
# come out as validate_job makes it alone (the batch checks a repeated params object once).
_LOOKALIKES: list[Any] = [
    None,
    {},
    {"width": 768, "height": 512, "steps": 20},
    {"steps": 20, "height": 512, "width": 768},
    {"cfg_scale": 3},
    {"cfg_scale": 3.0},
    {"cfg_scale": True},
    {"guidance": 0.0},
    {"guidance": -0.0},
    {"guidance": float("nan")},
    {"steps": 20, "seed": 7},
    {"steps": 20, "seed": None},
    {"steps": 20, "seed": -1},
    {"steps": 20, "seed": 2**63},
    {"steps": 20, "seed": True},
    {"width": 520, "seed": -1},
    {"widht": 512, "seed": 1},
    {"language": "zh", "negative_prompt": "blur\n\\"},
    {"negative_prompt": ["x"]},
    {"max_new_tokens": 5},
    "big",
]


def _outcome(task: str, params: Any, draft: Any) -> Any:
    if isinstance(draft, dict):  # an error of validate_many
        return (draft["code"], draft["message"])
    drawn = isinstance(params, dict) and params.get("seed") is not None
    seedless = {k: v for k, v in draft.params.items() if drawn or k != "seed"}
    return (list(seedless.items()), [repr(v) for v in seedless.values()], draft.bucket)


def test_a_batch_validates_each_line_as_alone() -> None:
    specs = [
        {"task": task, "params": params}
        | ({"prompt": "p"} if task == "generate" else {"instruction": "i", "image": "upl_x"})
        for _ in range(3)
        for task in ("generate", "edit", "understand")
        for params in _LOOKALIKES
    ]
    drafts, errors = validate_many(
        list(enumerate(specs)), SETTINGS, position="index", require_custom_id=False
    )
    batch: dict[int, Any] = dict(drafts) | {e["index"]: e for e in errors}
    for n, spec in enumerate(specs):
        try:
            alone: Any = validate_job(spec, SETTINGS)
        except SubmitError as exc:
            alone = {"code": exc.code, "message": exc.message}
        assert _outcome(spec["task"], spec.get("params"), batch[n]) == _outcome(
            spec["task"], spec.get("params"), alone
        ), spec
    seeds = [d.params["seed"] for _, d in drafts if d.task == "generate" and d.params["steps"] == 50]
    assert len(set(seeds)) == len(seeds) > 10  # drawn per line, not once per params object
    assert all(0 <= s < 2**32 for s in seeds)


def test_insert_jobs_is_set_based(engine: Any, clean_db: Any) -> None:
    drafts = [validate_job({"task": "generate", "prompt": str(i)}, SETTINGS) for i in range(2500)]
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    try:
        with engine.begin() as conn:
            tenant_id, _ = create_tenant(conn, "acme")
            statements.clear()
            wakeups = insert_jobs(conn, tenant_id, None, drafts)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert wakeups == {("generate", "generate|generation|512x512|50|3|3.5")}
    assert statements == []  # one COPY through the driver, no statement per row
    with engine.connect() as conn:
        prompts = conn.execute(select(jobs.c.prompt).order_by(jobs.c.id)).scalars().all()
    assert prompts == [str(i) for i in range(2500)]  # ids follow the submission order


def _batch_rows(conn: Any, batch_id: str) -> list[tuple[Any, ...]]:
    rows = conn.execute(
        select(
            jobs.c.custom_id,
            jobs.c.task,
            jobs.c.prompt,
            jobs.c.params,
            jobs.c.bucket,
            jobs.c.priority,
            jobs.c.metadata,
            jobs.c.webhook_url,
            jobs.c.webhook_events,
            jobs.c.status,
        )
        .where(jobs.c.batch_id == batch_id)
        .order_by(jobs.c.id)
    ).all()
    # seeds are drawn per line: all else is the same
    return [(*row[:3], {k: v for k, v in row[3].items() if k != "seed"}, *row[4:]) for row in rows]


def test_copy_validated_writes_what_insert_jobs_writes(engine: Any, clean_db: Any) -> None:
    specs = [
        {"task": task, "prompt": f"p{i}", "custom_id": f"c{i}", "params": params}
        | ({"priority": i % 3 - 1} if i % 2 else {"metadata": {"row": i, "tag": "ü"}})
        for i, (task, params) in enumerate(
            [("generate", {"width": 768, "steps": 12})] * 3
            + [("generate", None), ("generate", {"seed": 7, "guidance": 2})] * 2
        )
    ]
    specs += [{"task": "understand", "instruction": "what", "custom_id": "u"}]  # no image: refused
    good, items = specs[:-1], list(enumerate(specs[:-1], start=1))
    assert all(checks_offline(spec) for spec in specs)
    assert not checks_offline({**good[0], "webhook": {"url": "http://127.0.0.1:9/"}})
    assert not checks_offline({"task": "edit", "instruction": "x", "image": "upl_x"})
    webhook = ("http://127.0.0.1:9/batch", ["batch.completed"])
    checks: dict[str, Any] = {"position": "line", "require_custom_id": True, "inherited_webhook": webhook}
    with engine.begin() as conn:
        tenant_id, _ = create_tenant(conn, "acme")
        for batch_id in ("bat_checked_first", "bat_copied"):
            conn.execute(batches.insert().values(id=batch_id, tenant_id=tenant_id, total_jobs=len(good)))
        drafts, errors = validate_many(items, SETTINGS, **checks)
        assert errors == []
        wakeups = insert_jobs(conn, tenant_id, "bat_checked_first", [d for _, d in drafts])
        assert copy_validated(conn, tenant_id, "bat_copied", items, SETTINGS, **checks) == (wakeups, [])
        assert _batch_rows(conn, "bat_copied") == _batch_rows(conn, "bat_checked_first")
        assert len(_batch_rows(conn, "bat_copied")) == len(good)
    # bad lines after good ones: validate_many's errors, and the COPY aborted (the caller rolls back)
    items = list(enumerate(specs + good[:1] + [{**good[1], "params": {"steps": 0}}], start=1))
    expected = validate_many(items, SETTINGS, **checks)[1]
    assert [e["code"] for e in expected] == ["invalid_image", "duplicate_custom_id", "invalid_steps"]
    with engine.connect() as conn:
        transaction = conn.begin()
        conn.execute(batches.insert().values(id="bat_bad", tenant_id=tenant_id, total_jobs=len(items)))
        assert copy_validated(conn, tenant_id, "bat_bad", items, SETTINGS, **checks) == (set(), expected)
        transaction.rollback()
    with engine.connect() as conn:
        assert conn.execute(select(jobs.c.id).where(jobs.c.batch_id == "bat_bad")).all() == []


def test_cyclic_gc_stays_paused_until_the_last_bulk_request_ends() -> None:
    import gc

    assert gc.isenabled()
    first, second = cyclic_gc_paused(), cyclic_gc_paused()
    first.__enter__()
    assert not gc.isenabled()
    second.__enter__()  # a concurrent request (another thread)
    first.__exit__(None, None, None)
    assert not gc.isenabled()  # the other one still holds its jobs
    second.__exit__(None, None, None)
    assert gc.isenabled()
    with pytest.raises(SubmitError), cyclic_gc_paused():
        raise SubmitError("invalid_job", "x")
    assert gc.isenabled()  # an error answer resumes it too
    gc.disable()  # whoever switched it off before keeps it off
    try:
        with cyclic_gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_inspecting_a_large_image_reads_its_header_only() -> None:
    import io
    import time

    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((6000, 4000), 16).convert("RGB").save(buf, "JPEG", quality=60)
    started = time.process_time()
    info = inspect_image(buf.getvalue(), SETTINGS)
    assert (info.width, info.height, info.content_type) == (6000, 4000, "image/jpeg")
    assert time.process_time() - started < 0.1  # decoding 24 MP would take several times that
