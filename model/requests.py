"""Request and result dataclasses of the model entry point (`model.NexusGen`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

# What the model can do, checked by model.pipeline.validate_request (the model never fixes input
# silently). Sizes are multiples of 16 (model.config.SIZE_MULTIPLE) so no silent rounding happens; 64 is
# the smallest size the architecture takes (a 4x4 grid of packed latent tokens). A service may be
# stricter: its bounds must lie inside these (tests/test_contract.py).
TASKS = ("generate", "edit", "understand")
LANGUAGES = ("en", "zh")
DECODERS = ("edit", "generation")
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 100
MAX_SCALE = 30.0  # cfg_scale 1..MAX_SCALE, guidance 0..MAX_SCALE
MAX_CACHE_THRESHOLD = 1.0  # TeaCache's FLUX range: 0.25 ~1.5x, 0.4 ~1.8x, 0.6 ~2x, 0.8 ~2.25x fewer steps
MAX_PROMPT_CHARS = 4000  # prompt, instruction and negative prompt
MAX_UNDERSTAND_TOKENS = 4096
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 0..2**63-1
MAX_ASPECT_RATIO = 200  # an input image's longer side over its shorter side (model.ar.smart_resize)

Language = Literal["en", "zh"]
Decoder = Literal["edit", "generation"]


@dataclass
class GenerateRequest:
    """Text-to-image. Defaults follow the reference `image_generation.py` (512², 50 steps, cfg 3)."""

    prompt: str
    width: int = 512
    height: int = 512
    steps: int = 50
    cfg_scale: float = 3.0
    guidance: float = 3.5
    seed: int | None = None  # None: a random seed, recorded in the provenance
    language: Language = "en"
    negative_prompt: str = ""
    cache_threshold: float = 0.0  # step cache (TeaCache) threshold; 0 = off


@dataclass
class EditRequest:
    """Image editing. Defaults follow the reference `image_editing.py` (512², 50 steps, cfg 1)."""

    instruction: str
    image: Image.Image
    width: int = 512
    height: int = 512
    steps: int = 50
    cfg_scale: float = 1.0
    guidance: float = 3.5
    seed: int | None = None
    decoder: Decoder = "edit"
    language: Language = "en"
    negative_prompt: str = ""
    cache_threshold: float = 0.0


@dataclass
class UnderstandRequest:
    """Image understanding: free text about an image."""

    instruction: str
    image: Image.Image
    max_new_tokens: int = 1024


Request = GenerateRequest | EditRequest | UnderstandRequest


@dataclass
class RequestError:
    """Why one request of a batch failed; the rest of its batch is unaffected."""

    code: str  # machine-readable, e.g. "no_image_token", "canceled"
    message: str


@dataclass
class Result:
    """One result per request, in request order: an image, a text, or an error."""

    image: Image.Image | None = None
    text: str | None = None
    error: RequestError | None = None
    provenance: dict[str, Any] = field(
        default_factory=dict
    )  # seed, params, checkpoint hash, timings per stage


# progress(request_index, stage, step, total_steps); stage is one of
# "encoding", "denoising", "decoding" (step/total_steps set for denoising).
ProgressCallback = Callable[[int, str, int | None, int | None], None]
# should_cancel(request_index) -> True to drop that request at the next step boundary.
CancelCallback = Callable[[int], bool]
