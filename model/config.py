"""Constants of the Nexus-Gen V2 stack: file layout, special-token roles, prompts, decoder defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# ---- checkpoint layout (as the reference download_models.py lays it out) --------------------------------
AR_SUBDIR = "Nexus-GenV2"  # Qwen2.5-VL (4.49 layout) + tokenizer + processor + the two decoder .bin files
FLUX_SUBDIR = "FLUX/FLUX.1-dev"  # text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, ae.safetensors
GENERATION_DECODER_FILE = "generation_decoder.bin"
EDIT_DECODER_FILE = "edit_decoder.bin"
VAE_FILE = "ae.safetensors"
AR_INDEX_FILE = "model.safetensors.index.json"
DIT_PREFIX = "pipe.dit."  # DiffSynth FluxDiT keys inside both .bin files
ADAPTER_PREFIX = "adapter."  # generation decoder: Linear LN ReLU Linear LN
MERGER_PREFIX = "embedding_merger."  # editing decoder: ImageEmbeddingMerger
VISION_HEAD_KEY = "vision_head.weight"  # [D, D], no bias
IMAGE_PREFILL_KEY = "image_prefill_embeds.weight"  # [81, D]

# ---- special tokens, by role (ids are read from the tokenizer/config, never hard-coded) ----------------
SPECIAL_TOKENS: dict[str, str] = {
    "boi": "<|vision_start|>",  # the model generates it to start an image
    "eoi": "<|vision_end|>",  # inserted after the 81 image tokens; never sampled
    "image_pad": "<|image_pad|>",  # placeholder for input images and the 81 generated positions
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "eos": "<|im_end|>",  # config eos_token_id
    "pad": "<|endoftext|>",  # config pad_token_id
}
# every special token the Qwen2.5-VL tokenizer carries that the tiny checkpoint reproduces, in id order
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# ---- prompts (docs/model.md#prompts) -----------------------------------------------------------------------
SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"  # literal marker in user text, replaced by VISION_PLACEHOLDER
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
GENERATION_TEMPLATES: dict[str, str] = {
    "en": "Generate an image according to the following description: {prompt}",
    "zh": "根据以下描述生成一张图像：{prompt}",
}
EDIT_TEMPLATE = "<image> {instruction}"
# assistant text the model was trained to write before BOI (forced-prefix mode)
GENERATION_PREFIXES: dict[str, str] = {
    "en": "Here is an image based on the description: ",
    "zh": "这是根据您的描述生成的图像：",
}
EDIT_PREFIXES: dict[str, str] = {
    "en": "Here is the image: ",
    "zh": "以下为编辑后的图像：",
}

# ---- image tokens and grids (docs/model.md#ar-stage, #input-images, #editing-merger) -----------------------
NUM_IMAGE_TOKENS = 81  # 9x9 merged ViT tokens of a 252x252 image
TARGET_GRID_THW = (1, 18, 18)  # ViT patch grid of the generated image (LLM grid 1x9x9)
REF_GRID_THW = (1, 36, 36)  # ViT patch grid of the editing reference (504x504 -> 324 tokens)
NUM_REF_TOKENS = 324
TARGET_IMAGE_SIZE = 252
REF_IMAGE_SIZE = 504
TARGET_EMBED_SIZE = 18  # constants of the editing txt_ids (docs/model.md#editing-text-ids)
REF_EMBED_SIZE = 36
MERGER_BASE_GRID = 72  # the merger's mrope positions live on a 72x72 grid (docs/model.md#editing-merger)
UNDERSTAND_MAX_PIXELS = 262640  # AR input images are bounded to this many pixels (docs/model.md#input-images)
IMAGE_FACTOR = 28  # patch 14 x merge 2

# ---- FLUX decoders (docs/model.md#generation-decoder) ------------------------------------------------------
VAE_LATENT_CHANNELS = 16  # packing (C 2 2 -> 64) depends on it
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
VAE_DOWNSAMPLE = 8
SIZE_MULTIPLE = 16  # output H, W are rounded up to this
SCHEDULER_SHIFT = 3.0
SIGMA_MIN = 0.003 / 1.002
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_GUIDANCE = 3.5
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


def rope_axes_for_head_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX rope axes from the DiT head dim, all even (diffusers asserts it).

    (16, 56, 56) at head_dim 128 (FLUX.1-dev), (4, 6, 6) at 16 (tiny).
    """
    if head_dim % 16:
        raise ValueError(f"DiT head_dim {head_dim} is not a multiple of 16")
    spatial = 2 * (7 * head_dim // 32)
    return head_dim - 2 * spatial, spatial, spatial


def flux_dit_config(
    *,
    head_dim: int,
    heads: int,
    layers: int,
    single_layers: int,
    joint_dim: int,
    pooled_dim: int,
    in_channels: int = 64,
    out_channels: int | None = None,
    guidance: bool = True,
) -> dict[str, Any]:
    """FluxTransformer2DModel kwargs with the FLUX.1-dev conventions (patch 1, rope axes from head dim)."""
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": layers,
        "num_single_layers": single_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": joint_dim,
        "pooled_projection_dim": pooled_dim,
        "guidance_embeds": guidance,
        "axes_dims_rope": rope_axes_for_head_dim(head_dim),
    }


def vae_norm_groups(block_out_channels: list[int] | tuple[int, ...]) -> int:
    """GroupNorm groups of a VAE (not stored in ae.safetensors): 32 for FLUX, gcd-limited for tiny widths."""
    return math.gcd(32, *block_out_channels)


@dataclass(frozen=True)
class MergerConfig:
    """Hyper-parameters of the editing ImageEmbeddingMerger (the Nexus-GenV2 text config).

    See docs/model.md#editing-merger.
    """

    hidden_size: int = 3584
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 18944
    out_channels: int = 4096
    expand_ratio: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    base_grid: int = MERGER_BASE_GRID


@dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny random checkpoint (`model.tiny`); the whole checkpoint stays a few MB."""

    ar_hidden: int = 64
    ar_layers: int = 2
    ar_heads: int = 4
    ar_kv_heads: int = 2
    ar_intermediate: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2 = 8
    vit_depth: int = 2
    vit_hidden: int = 32
    vit_heads: int = 2
    vit_intermediate: int = 64
    dit_head_dim: int = 16
    dit_heads: int = 2
    dit_layers: int = 1
    dit_single_layers: int = 1
    joint_dim: int = 32  # J: adapter/merger output, T5 d_model, DiT context width
    clip_hidden: int = 32
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)
    bpe_vocab: int = 600  # trained byte-level BPE size, before the special tokens
