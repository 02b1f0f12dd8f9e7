"""The core/model contract: what the service accepts, the model can do, with the same defaults and buckets.

Core may not import the model (tests/test_layering.py), so each side states its own bounds once
(core/params.py and the Settings choices; model/requests.py and the model's option tuples) and this test
holds them together.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

import core.params as service
import model.requests as capability
from core.images import ImageError, inspect_image, shrunk_size
from core.jobs import bucket_key
from core.records import TASKS
from core.settings import Settings
from core.submit import SubmitError, normalize_params, validate_job
from model.ar import smart_resize
from model.config import SIZE_MULTIPLE
from model.engine import ENGINES
from model.pipeline import PREFIX_MODES, SPECIAL_TOKEN_TEXT, bucket_of, validate_request
from model.requests import EditRequest, GenerateRequest, UnderstandRequest
from model.speed import COMPILE_MODES, DIT_PRECISIONS, OFFLOAD_MODES
from worker.execute import REQUEST_TYPES, build_request, decode_input

IMAGE = Image.new("RGB", (64, 64), (120, 30, 200))
IMAGE_TASKS = ("generate", "edit")


def model_request(task: str, params: dict[str, Any]) -> Any:
    """The model request the worker builds from a job with these (core-normalised) params."""
    return build_request(
        task, SimpleNamespace(params=params, prompt="a red fox"), None if task == "generate" else IMAGE
    )  # type: ignore[arg-type]


def model_defaults(task: str) -> dict[str, Any]:
    fields = dataclasses.fields(REQUEST_TYPES[task])
    given = {"prompt", "instruction", "image", "seed"}
    return {f.name: f.default for f in fields if f.name not in given}


def test_tasks_are_the_same_on_both_sides() -> None:
    assert TASKS == capability.TASKS == tuple(REQUEST_TYPES)
    assert Settings().tasks == TASKS


def test_every_service_bound_lies_inside_the_model_bound() -> None:
    assert capability.MIN_SIZE <= service.SIDE.low <= service.SIDE.high <= capability.MAX_SIZE
    assert service.SIDE.multiple % SIZE_MULTIPLE == 0
    assert 1 <= service.STEPS.low <= service.STEPS.high <= capability.MAX_STEPS
    assert 0 <= service.SEED.low <= service.SEED.high <= capability.MAX_SEED
    assert service.SEED.high >= service.DRAWN_SEEDS - 1
    assert 1 <= service.MAX_NEW_TOKENS.low <= service.MAX_NEW_TOKENS.high <= capability.MAX_UNDERSTAND_TOKENS
    assert service.SCALES["cfg_scale"].high <= capability.MAX_SCALE
    assert service.SCALES["guidance"].high <= capability.MAX_SCALE
    assert service.SCALES["cache_threshold"].high <= capability.MAX_CACHE_THRESHOLD
    assert set(service.LANGUAGES) <= set(capability.LANGUAGES)
    assert set(service.DECODERS) <= set(capability.DECODERS)
    assert service.MAX_NEGATIVE_PROMPT_CHARS <= capability.MAX_PROMPT_CHARS
    assert Settings().max_prompt_chars <= service.MAX_PROMPT_CHARS <= capability.MAX_PROMPT_CHARS
    assert 1 <= service.MAX_ASPECT_RATIO <= capability.MAX_ASPECT_RATIO


@pytest.mark.parametrize("task", IMAGE_TASKS)
def test_the_model_accepts_every_edge_the_service_accepts(task: str) -> None:
    """Each bound's both ends, alone and together: a job the API took never fails the model's check."""
    edges: dict[str, tuple[Any, ...]] = {
        "width": (service.SIDE.low, service.SIDE.high),
        "height": (service.SIDE.low, service.SIDE.high),
        "steps": (service.STEPS.low, service.STEPS.high),
        "seed": (service.SEED.low, service.SEED.high),
        "language": service.LANGUAGES,
        **{name: (bound.low, bound.high) for name, bound in service.SCALES.items()},
    }
    if task == "edit":
        edges["decoder"] = service.DECODERS
    for name, values in edges.items():
        for value in values:
            validate_request(model_request(task, normalize_params(task, {name: value})))
    for corner in (0, -1):
        together = {name: values[corner] for name, values in edges.items()}
        validate_request(model_request(task, normalize_params(task, together)))
    for bound, name in ((service.SIDE, "width"), (service.STEPS, "steps")):
        for outside in (bound.low - bound.multiple, bound.high + bound.multiple):
            with pytest.raises(SubmitError):
                normalize_params(task, {name: outside})


def test_text_the_service_accepts_the_model_accepts() -> None:
    """The longest prompt passes both sides; special-token markup is refused by both (the same pattern)."""
    assert service.SPECIAL_TOKEN_MARKUP.pattern == SPECIAL_TOKEN_TEXT.pattern
    longest = "a" * Settings().max_prompt_chars
    validate_job({"task": "generate", "prompt": longest}, Settings())
    validate_request(build_request("generate", SimpleNamespace(params={}, prompt=longest), None))  # type: ignore[arg-type]
    for text in ("a <|vision_start|> b", "<|im_end|>"):
        with pytest.raises(SubmitError, match="special-token markup"):
            validate_job({"task": "generate", "prompt": text}, Settings())
        with pytest.raises(SubmitError, match="special-token markup"):
            normalize_params("generate", {"negative_prompt": text})
        with pytest.raises(ValueError, match="special-token markup"):
            validate_request(GenerateRequest(text))
        with pytest.raises(ValueError, match="special-token markup"):
            validate_request(GenerateRequest("a", negative_prompt=text))


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "size",
    # at the bound, large enough to be shrunk (40000x200 was 2048x10 = 204.8:1 under PIL's thumbnail),
    # just under the bound (197:1 was rounded to 10 px too), small enough to be kept, and both orientations
    [(40000, 200), (200, 40000), (39400, 200), (20000, 100), (2000, 10), (200, 1), (1, 200)],
)
def test_an_input_image_the_service_accepts_the_model_accepts(size: tuple[int, int]) -> None:
    """The image as the worker hands it to the model (decoded, shrunk to SIDE.high) passes the model's
    input check, for edit and understand."""
    data = _png(*size)
    inspect_image(data, Settings())
    image = decode_input(data, "upl_contract")
    assert max(image.size) <= service.SIDE.high
    validate_request(EditRequest("make it blue", image))
    validate_request(UnderstandRequest("describe it", image))


@pytest.mark.parametrize("size", [(40200, 200), (201, 1), (1, 201), (2011, 10)])
def test_an_input_image_past_the_aspect_ratio_is_refused_by_both(size: tuple[int, int]) -> None:
    data = _png(*size)
    with pytest.raises(ImageError) as refused:
        inspect_image(data, Settings())
    assert refused.value.code == "image_aspect_ratio_too_large"
    with pytest.raises(ValueError, match="aspect ratio"):
        validate_request(UnderstandRequest("describe it", Image.open(io.BytesIO(data))))


def test_the_shrink_never_raises_the_aspect_ratio() -> None:
    """Every long side the shrink touches, with the shortest short side the service accepts: the shrunk
    size stays within the model's bound (PIL's `thumbnail`, which rounds to the nearest ratio, broke it for
    55,432 of these 57,951 long sides)."""
    longest = service.SIDE.high
    for long in range(longest + 1, 60_000):
        short = -(-long // service.MAX_ASPECT_RATIO)  # the smallest short side within the bound
        for width, height in ((long, short), (short, long)):
            w, h = shrunk_size(width, height, longest)
            assert max(w, h) == longest and max(w, h) * min(width, height) <= max(width, height) * min(w, h)
            smart_resize(h, w)  # raises past the model's aspect ratio


def test_understanding_edges() -> None:
    for tokens in (service.MAX_NEW_TOKENS.low, service.MAX_NEW_TOKENS.high):
        validate_request(
            model_request("understand", normalize_params("understand", {"max_new_tokens": tokens}))
        )


@pytest.mark.parametrize("task", TASKS)
def test_the_service_defaults_are_the_model_defaults(task: str) -> None:
    """The params core fills in are the ones the model would choose, and the model takes every one."""
    filled = normalize_params(task, {})
    filled.pop("seed", None)
    assert filled == model_defaults(task) == service.DEFAULTS[task]
    request = model_request(task, normalize_params(task, {}))
    assert {name: getattr(request, name) for name in filled} == model_defaults(task)


def _grid(task: str) -> list[dict[str, Any]]:
    axes: dict[str, tuple[Any, ...]] = {
        "width": (512, 768),
        "height": (512, 1024),
        "steps": (1, 50),
        "cfg_scale": (1, 3.0, 3.0000001, 7.5),
        "guidance": (0, 3.5, 3.50000001),
        "cache_threshold": (0, 0.4),
    }
    if task == "edit":
        axes["decoder"] = service.DECODERS
    names = list(axes)
    grid = [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]
    # params outside the bucket: they never split a model call
    extras = ({"seed": 7, "language": "zh", "negative_prompt": "blurry"}, {"seed": 8})
    return [{**p, **extras[i % 2]} for i, p in enumerate(grid)]


@pytest.mark.parametrize("task", IMAGE_TASKS)
def test_the_core_bucket_is_the_model_bucket(task: str) -> None:
    """Two jobs share a core bucket (and so a claim, and a model call) exactly when the model would batch
    them: equal keys never make the model refuse a call, different keys never split a call it could make."""
    jobs = [normalize_params(task, params) for params in _grid(task)]
    keys = [bucket_key(task, params) for params in jobs]
    buckets = [bucket_of(model_request(task, params)) for params in jobs]
    by_key = dict(zip(keys, buckets, strict=True))
    assert len(by_key) == len(set(buckets)) == len(set(keys))
    for key, bucket in zip(keys, buckets, strict=True):
        assert by_key[key] == bucket


def test_the_model_option_sets_are_the_settings_choices() -> None:
    """NEXUSGEN_ENGINE, _PREFIX_MODE, _EDIT_DECODERS, _COMPILE, _DIT_PRECISION and _OFFLOAD take exactly
    what the model takes."""
    for field, allowed in (
        ("engine", ENGINES),
        ("prefix_mode", PREFIX_MODES),
        ("compile", COMPILE_MODES),
        ("dit_precision", DIT_PRECISIONS),
        ("offload", OFFLOAD_MODES),
    ):
        var = {f.name: f for f in dataclasses.fields(Settings)}[field].metadata["env"]
        assert getattr(Settings(), field) == allowed[0]
        for value in allowed:
            assert getattr(Settings.from_env({var: value}), field) == value
        with pytest.raises(ValueError, match=var):
            Settings.from_env({var: "something-else"})
    assert set(Settings().edit_decoders) == set(capability.DECODERS)
    with pytest.raises(ValueError, match="NEXUSGEN_EDIT_DECODERS"):
        Settings.from_env({"NEXUSGEN_EDIT_DECODERS": "flux"})
