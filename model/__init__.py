"""The Nexus-Gen V2 stack: `NexusGen` (generate / edit / understand, batched) and its request types.

`NexusGen` and `validate_request` are imported lazily so that `from model import GenerateRequest` does not
load transformers and diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model.requests import (
    CancelCallback,
    EditRequest,
    GenerateRequest,
    ProgressCallback,
    Request,
    RequestError,
    Result,
    UnderstandRequest,
)

if TYPE_CHECKING:
    from model.pipeline import NexusGen, validate_request

__all__ = [
    "CancelCallback",
    "EditRequest",
    "GenerateRequest",
    "NexusGen",
    "ProgressCallback",
    "Request",
    "RequestError",
    "Result",
    "UnderstandRequest",
    "validate_request",
]


def __getattr__(name: str) -> Any:
    if name in ("NexusGen", "validate_request"):
        from model import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
