"""The loaded Nexus-Gen stack as plain transformers / diffusers modules (what checkpoint.py returns)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Components:
    """Every module and tokenizer the pipelines need; built by `model.checkpoint.load_components`."""

    # autoregressive model (Qwen2.5-VL) and the two Nexus-Gen heads
    tokenizer: Any  # Qwen2 tokenizer (fast) with the Qwen special tokens at their roles
    image_processor: Any  # transformers Qwen2VLImageProcessor
    ar: nn.Module  # transformers Qwen2_5_VLForConditionalGeneration
    # Everything below is None when the worker's tasks do not need it (model.plan.components_for).
    vision_head: nn.Linear | None  # [D, D], no bias
    image_prefill_embeds: nn.Embedding | None  # [81, D]
    # generation decoder
    gen_dit: nn.Module | None  # diffusers FluxTransformer2DModel
    adapter: nn.Sequential | None  # Linear(D,4096) LayerNorm ReLU Linear LayerNorm (tiny: smaller)
    # editing decoder
    edit_dit: nn.Module | None  # diffusers FluxTransformer2DModel
    merger: nn.Module | None  # model.merger.ImageEmbeddingMerger
    # FLUX.1-dev text encoders and VAE
    clip_tokenizer: Any
    clip: nn.Module | None  # transformers CLIPTextModel
    t5_tokenizer: Any
    t5: nn.Module | None  # transformers T5EncoderModel
    vae: nn.Module | None  # diffusers AutoencoderKL
    checkpoint_hash: str  # stable hash of the checkpoint files (provenance "model revision")
    special_token_ids: dict[str, int]  # boi, eoi, image_pad, im_start, im_end, eos, pad

    def loaded(self) -> frozenset[str]:
        """The names (model.plan.COMPONENTS) of the components this stack holds."""
        from model.plan import COMPONENTS

        heads = self.vision_head is not None
        return frozenset(
            c
            for c in COMPONENTS
            if c in ("ar", "vit") or (c == "ar_heads" and heads) or getattr(self, c, None) is not None
        )

    @property
    def dtype(self) -> torch.dtype:
        """The precision the stack was loaded in (the AR's parameters)."""
        return next(p.dtype for p in self.ar.parameters() if p.is_floating_point())
