"""The loaded Nexus-Gen stack as plain transformers / diffusers modules (what checkpoint.py returns)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass
class Components:
    """Every module and tokenizer the pipelines need; built by `model.checkpoint.load_components`."""

    # autoregressive model (Qwen2.5-VL) and the two Nexus-Gen heads
    tokenizer: Any  # Qwen2 tokenizer (fast) with the Qwen special tokens at their roles
    image_processor: Any  # transformers Qwen2VLImageProcessor
    ar: nn.Module  # transformers Qwen2_5_VLForConditionalGeneration
    vision_head: nn.Linear  # [D, D], no bias
    image_prefill_embeds: nn.Embedding  # [81, D]
    # generation decoder
    gen_dit: nn.Module  # diffusers FluxTransformer2DModel
    adapter: (
        nn.Sequential
    )  # Linear(D,4096) LayerNorm ReLU Linear LayerNorm (sizes scaled in the tiny checkpoint)
    # editing decoder
    edit_dit: nn.Module  # diffusers FluxTransformer2DModel
    merger: nn.Module  # model.merger.ImageEmbeddingMerger
    # FLUX.1-dev text encoders and VAE
    clip_tokenizer: Any
    clip: nn.Module  # transformers CLIPTextModel
    t5_tokenizer: Any
    t5: nn.Module  # transformers T5EncoderModel
    vae: nn.Module  # diffusers AutoencoderKL
    checkpoint_hash: str  # stable hash of the checkpoint files (provenance "model revision")
    special_token_ids: dict[str, int]  # boi, eoi, image_pad, im_start, im_end, eos, pad
