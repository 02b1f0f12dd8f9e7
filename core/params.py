"""The service's bounds and defaults of job params, stated once.

core.submit validates every job with them, api.schemas describes them in the OpenAPI document, and
tests/test_contract.py holds each bound inside what the model can do (model/requests.py) and each default
equal to the model's own. Core cannot import the model (tests/test_layering.py), so that test is where the
two sides of the boundary are held equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """An inclusive range of one param: integers (optionally multiples of `multiple`) or any number."""

    low: int
    high: int
    integer: bool = True
    multiple: int = 1

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and (not isinstance(value, int) or value % self.multiple):
            return False
        return value == value and self.low <= value <= self.high  # value == value: not NaN


SIDE = Bound(256, 2048, multiple=16)  # output width and height; no model stage uses more of an input image
STEPS = Bound(1, 100)
# An input image's longer side over its shorter side; the worker's shrink to SIDE.high never raises it
# (core.images.shrunk_size), so an image within it stays within the model's bound (model/requests.py)
MAX_ASPECT_RATIO = 200
SEED = Bound(0, 2**63 - 1)
MAX_NEW_TOKENS = Bound(1, 4096)
SCALES = {  # the float params: a number in the range, stored as a float
    "cfg_scale": Bound(1, 30, integer=False),
    "guidance": Bound(0, 30, integer=False),
    "cache_threshold": Bound(0, 1, integer=False),
}
LANGUAGES = ("en", "zh")
DECODERS = ("edit", "generation")
MAX_PROMPT_CHARS = 4000  # the most NEXUSGEN_MAX_PROMPT_CHARS may allow (prompt and instruction)
MAX_NEGATIVE_PROMPT_CHARS = 4000
# Special-token markup (`<|vision_start|>`) in a prompt, instruction or negative prompt: the model refuses it
SPECIAL_TOKEN_MARKUP = re.compile(r"<\|[A-Za-z_]+\|>")
DRAWN_SEEDS = 2**32  # a seed left out is drawn from 0 .. DRAWN_SEEDS-1 at submission

# Allowed params per task, with the defaults filled in at submission (seed: drawn at submission).
_IMAGE_DEFAULTS: dict[str, Any] = {
    "width": 512,
    "height": 512,
    "steps": 50,
    "guidance": 3.5,
    "language": "en",
}
_IMAGE_EXTRAS: dict[str, Any] = {"negative_prompt": "", "cache_threshold": 0.0}
DEFAULTS: dict[str, dict[str, Any]] = {
    "generate": {**_IMAGE_DEFAULTS, "cfg_scale": 3.0, **_IMAGE_EXTRAS},
    "edit": {**_IMAGE_DEFAULTS, "cfg_scale": 1.0, "decoder": "edit", **_IMAGE_EXTRAS},
    "understand": {"max_new_tokens": 1024},
}
