"""FLUX decoders: AR image embeddings -> DiT conditioning -> batched flow loop -> VAE -> images.

See docs/model.md#generation-decoder, #editing-merger.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.components import Components
from model.config import (
    CLIP_MAX_LENGTH,
    NUM_TRAIN_TIMESTEPS,
    REF_EMBED_SIZE,
    REF_IMAGE_SIZE,
    SCHEDULER_SHIFT,
    SIGMA_MIN,
    T5_MAX_LENGTH,
    TARGET_EMBED_SIZE,
)
from model.step_cache import StepCache, cached_blocks


# ---- schedule, latents, ids ------------------------------------------------------------------------------
def flow_sigmas(steps: int) -> torch.Tensor:
    """[steps + 1] static shift-3 sigmas of DS `FlowMatchScheduler`, with sigma_N = 0 appended.

    See docs/model.md#scheduler.
    """
    s = torch.linspace(1.0, SIGMA_MIN, steps, dtype=torch.float32)
    sigmas = SCHEDULER_SHIFT * s / (1 + (SCHEDULER_SHIFT - 1) * s)
    return torch.cat([sigmas, torch.zeros(1)])


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), C*4], channel-major in each token (diffusers `_pack_latents`)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), C*4] -> [B, C, h, w] (inverse of `pack_latents`)."""
    b, _, c4 = packed.shape
    packed = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return packed.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """[(h/2)(w/2), 3] DiT positions (0, row, col) of the packed latent tokens."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def edit_text_ids(h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """[405, 3] editing txt_ids: target (0, r·h/18, c·w/18), ref (1, r·h/36, c·w/36), as fp32 values.

    The grid is rounded to the DiT's compute `dtype`, as the reference does by building it in the latent
    dtype: bf16 runs see bf16-rounded positions (e.g. 3.5625 for 32/9), fp32 runs the exact grid.
    """
    rows = []
    for axis0, size in ((0.0, TARGET_EMBED_SIZE), (1.0, REF_EMBED_SIZE)):
        side = size // 2
        r = torch.arange(side, dtype=torch.float32).repeat_interleave(side)
        c = torch.arange(side, dtype=torch.float32).repeat(side)
        rows.append(torch.stack([torch.full_like(r, axis0), r * h / size, c * w / size], dim=1))
    return torch.cat(rows).to(dtype).float()


def latent_size(width: int, height: int, vae_scale: int) -> tuple[int, int]:
    """Latent (h, w) for an output size, with H, W rounded up to multiples of 2·vae_scale (16)."""
    multiple = 2 * vae_scale
    height = -(-height // multiple) * multiple
    width = -(-width // multiple) * multiple
    return height // vae_scale, width // vae_scale


def draw_noise(seeds: list[int], channels: int, h: int, w: int, device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """[B, C, h, w] noise, each sample from its own generator at shape (1, C, h, w) (batch-independent)."""
    out = []
    for seed in seeds:
        generator = torch.Generator(device=device).manual_seed(seed)
        out.append(torch.randn((1, channels, h, w), generator=generator, device=device, dtype=dtype))
    return torch.cat(out)


# ---- the shared flow loop -------------------------------------------------------------------------------
@dataclass
class Conditioning:
    """DiT text-side inputs of one branch: encoder states [B, S, J], txt_ids [S, 3], pooled [B, P]."""

    states: torch.Tensor
    txt_ids: torch.Tensor
    pooled: torch.Tensor

    def select(self, rows: torch.Tensor) -> Conditioning:
        return Conditioning(self.states[rows], self.txt_ids, self.pooled[rows])

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        return Conditioning(
            self.states.to(device, dtype), self.txt_ids.to(device), self.pooled.to(device, dtype)
        )


@dataclass
class DenoiseJob:
    """A bucket of samples to denoise together; `index` maps rows to request indices for the callbacks."""

    index: list[int]
    seeds: list[int]
    positive: Conditioning
    negative: Conditioning | None  # only when cfg_scale != 1
    width: int
    height: int
    steps: int
    cfg_scale: float
    guidance: float
    cache_threshold: float = 0.0  # 0: every step runs every block (the step cache is off)
    stats: dict[str, Any] = field(default_factory=dict)  # filled by `denoise`: step-cache counts


StepProgress = Callable[[int, int, int], None]  # (request index, step, total)
Cancel = Callable[[int], bool]


@torch.no_grad()
def denoise(
    dit: torch.nn.Module,
    job: DenoiseJob,
    vae_scale: int,
    channels: int,
    device: torch.device,
    on_step: StepProgress | None = None,
    should_cancel: Cancel | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Euler flow loop over the bucket; returns final latents [B', C, h, w] and the request indices kept.

    A request whose `should_cancel` turns true is dropped at the next step boundary; its mates continue.
    """
    dtype = dit_dtype(dit)
    h, w = latent_size(job.width, job.height, vae_scale)
    latents = draw_noise(job.seeds, channels, h, w, device, dtype)  # [B, C, h, w]
    img_ids = image_ids(h, w).to(device)
    sigmas = flow_sigmas(job.steps).to(device)
    keep = torch.arange(len(job.index), device=device)
    index = list(job.index)
    positive = job.positive.to(device, dtype)
    negative = None if job.negative is None else job.negative.to(device, dtype)
    caches: dict[str, StepCache] = {}
    if job.cache_threshold > 0:  # one cache per CFG branch, as the reference's TeaCache
        branches = ("positive",) if negative is None else ("positive", "negative")
        caches = {name: StepCache(job.cache_threshold, job.steps, len(index)) for name in branches}
    skipped = dict.fromkeys(index, 0)
    for step in range(job.steps):
        if should_cancel is not None:
            latents, keep, index = _drop_canceled(should_cancel, latents, keep, index, caches)
            if not index:
                break
        guidance = torch.full((latents.shape[0],), job.guidance, device=device, dtype=dtype)
        velocity = _guided_velocity(
            dit, job, pack_latents(latents), positive, negative, keep, sigmas[step], guidance, img_ids, caches
        )
        if "positive" in caches:
            for k, i in enumerate(index):
                skipped[i] = int(caches["positive"].skipped[k])
        # Euler in the latent dtype with an fp32 0-dim step, as DS does (a 0-dim tensor keeps bf16 results)
        latents = latents + unpack_latents(velocity, h, w) * (sigmas[step + 1] - sigmas[step])
        if on_step is not None:
            for i in index:
                on_step(i, step + 1, job.steps)
    if caches:
        job.stats = {
            "skipped_steps": skipped,  # request index -> steps whose blocks were skipped (positive branch)
            "block_evaluations": sum(c.block_evaluations for c in caches.values()),
            "blocks_skipped": sum(c.blocks_skipped for c in caches.values()),
        }
    return latents, index


def _drop_canceled(
    should_cancel: Cancel,
    latents: torch.Tensor,
    keep: torch.Tensor,
    index: list[int],
    caches: dict[str, StepCache],
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The rows of requests not canceled: their latents, conditioning rows and request indices."""
    alive = [k for k, i in enumerate(index) if not should_cancel(i)]
    if len(alive) == len(index):
        return latents, keep, index
    rows = torch.tensor(alive, dtype=torch.long, device=latents.device)
    for cache in caches.values():
        cache.select(alive)
    return latents[rows], keep[rows], [index[k] for k in alive]


def _guided_velocity(  # type: ignore[no-untyped-def]
    dit, job: DenoiseJob, packed, positive, negative, keep, sigma, guidance, img_ids, caches
):
    """The DiT's velocity for the packed latents [B, T, C*4]; with a negative, classifier-free guided."""
    velocity = dit_velocity(
        dit, packed, positive.select(keep), sigma, guidance, img_ids, caches.get("positive")
    )
    if negative is None:
        return velocity
    v_neg = dit_velocity(dit, packed, negative.select(keep), sigma, guidance, img_ids, caches.get("negative"))
    return v_neg + job.cfg_scale * (velocity - v_neg)


def dit_dtype(dit: torch.nn.Module) -> torch.dtype:
    """The DiT's compute dtype (diffusers reports it even when weights are stored in fp8 or offloaded)."""
    dtype = getattr(dit, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(dit.parameters()).dtype


def dit_velocity(dit, packed, cond: Conditioning, sigma, guidance, img_ids, cache=None):  # type: ignore[no-untyped-def]
    """One DiT call -> packed velocity. t = 1000·σ reaches the sinusoid in fp32, as in DS.
    See docs/model.md#numerics.

    With a `StepCache`, the blocks run only for the rows whose input changed enough (model.step_cache).
    """
    timestep = sigma.expand(packed.shape[0])  # [B] fp32

    def exact_timestep(_module, args):  # type: ignore[no-untyped-def]
        # diffusers rounds σ to the latent dtype before ×1000; the NG DiTs were trained on fp32 t
        return (timestep.float() * NUM_TRAIN_TIMESTEPS, *args[1:])

    handle = dit.time_text_embed.register_forward_pre_hook(exact_timestep)
    try:
        with cached_blocks(dit, cache):
            return dit(
                hidden_states=packed,
                encoder_hidden_states=cond.states,
                pooled_projections=cond.pooled,
                timestep=timestep.to(packed.dtype),
                guidance=guidance,
                img_ids=img_ids,
                txt_ids=cond.txt_ids,
                return_dict=False,
            )[0]
    finally:
        handle.remove()


@torch.no_grad()
def vae_decode(vae: torch.nn.Module, latents: torch.Tensor, device: torch.device) -> list[Image.Image]:
    """Decode one sample at a time (batch-independent, bounded memory); uint8 by truncation.

    See docs/model.md#latents-and-decode.
    """
    images = []
    scaling, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    for sample in latents:
        x = sample[None].to(device, vae.dtype) / scaling + shift
        pixels = vae.decode(x, return_dict=False)[0][0].float()  # [3, H, W] in [-1, 1]
        pixels = ((pixels / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)  # truncation, like DS
        images.append(Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())))
    return images


def vae_scale_factor(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ---- text encoders and conditioning ---------------------------------------------------------------------
class TextEncoders:
    """CLIP pooled and T5 states: "" (every request's) encoded once at load, others on demand.

    Unless `resident`, the encoders then leave the accelerator for host memory and come back only for
    the call of a request with a non-empty negative prompt: the same modules on the same device in the
    same precision, so outputs do not change, while T5-XXL's 9.5 GB stay off the device between calls.
    See docs/model.md#conditioning.
    """

    def __init__(self, components: Components, device: torch.device, resident: bool = False) -> None:
        self.c, self.device, self.resident = components, device, resident
        self._pooled: dict[str, torch.Tensor] = {}
        self._t5: dict[str, torch.Tensor] = {}
        if components.clip is not None:
            self.pooled("")
        if components.t5 is not None:
            self.t5("")
        if not resident and device.type != "cpu":
            for module in (components.clip, components.t5):
                if module is not None:
                    module.to("cpu")

    @contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if self.resident or self.device.type == "cpu" or next(module.parameters()).device == self.device:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def pooled(self, text: str) -> torch.Tensor:
        """[1, 768] CLIP-L pooled output (padding max_length 77, truncation, no attention mask)."""
        if text not in self._pooled:
            with self._on_device(self.c.clip) as clip:
                max_length = min(CLIP_MAX_LENGTH, clip.config.max_position_embeddings)
                tokens = self.c.clip_tokenizer(
                    [text], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
                ).input_ids.to(self.device)
                pooled = clip(tokens, output_hidden_states=False).pooler_output
            if text != "":
                return pooled
            self._pooled[text] = pooled
        return self._pooled[text]

    def negative(self, prompts: list[str]) -> Conditioning:
        """The CFG negative branch: T5(prompt) [B, 512, J], zero txt_ids, CLIP(prompt) pooled."""
        states = torch.cat([self.t5(p) for p in prompts])
        pooled = torch.cat([self.pooled(p) for p in prompts])
        return Conditioning(states, torch.zeros(states.shape[1], 3), pooled)

    @torch.no_grad()
    def t5(self, text: str) -> torch.Tensor:
        """[1, 512, J] T5 encoder states (padding max_length 512, truncation, no attention mask)."""
        if text not in self._t5:
            with self._on_device(self.c.t5) as t5:
                tokens = self.c.t5_tokenizer(
                    [text],
                    padding="max_length",
                    max_length=T5_MAX_LENGTH,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.device)
                states = t5(tokens).last_hidden_state
            if text != "":
                return states
            self._t5[text] = states
        return self._t5[text]


class GenerationDecoder:
    """adapter(AR embeddings) replaces the T5 tokens; optional CFG against T5/CLIP of the negative prompt."""

    def __init__(self, components: Components, text: TextEncoders) -> None:
        self.c, self.text = components, text

    @torch.no_grad()
    def conditioning(
        self, embeds: torch.Tensor, cfg_scale: float, negative_prompts: list[str]
    ) -> tuple[Conditioning, Conditioning | None]:
        """embeds [B, 81, D] -> positive (adapter, zero ids, CLIP("")) and the negative branch if cfg != 1."""
        adapter_dtype = next(self.c.adapter.parameters()).dtype
        states = self.c.adapter(embeds.to(adapter_dtype))  # [B, 81, J]
        b = states.shape[0]
        pooled = self.text.pooled("").expand(b, -1)
        positive = Conditioning(states, torch.zeros(states.shape[1], 3), pooled)
        return positive, None if cfg_scale == 1.0 else self.text.negative(negative_prompts)


class EditingDecoder:
    """merger(AR embeddings, reference ViT features of the original image at 504²) -> [B, 405, J].

    See docs/model.md#editing-merger.
    """

    def __init__(self, components: Components, text: TextEncoders, vit_features) -> None:  # type: ignore[no-untyped-def]
        self.c, self.text, self.vit_features = components, text, vit_features

    @torch.no_grad()
    def reference_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, 324, D]: the un-bounded original squashed to 504² with BILINEAR, one ViT call.

        See docs/model.md#reference-features.
        """
        squashed = [
            im.convert("RGB").resize((REF_IMAGE_SIZE, REF_IMAGE_SIZE), Image.BILINEAR) for im in images
        ]
        features, _ = self.vit_features(squashed)
        return torch.stack(features)

    @torch.no_grad()
    def conditioning(
        self, embeds: torch.Tensor, images: list[Image.Image], width: int, height: int, vae_scale: int
    ) -> Conditioning:
        ref = self.reference_embeddings(images).to(embeds.device)
        merger_dtype = next(self.c.merger.parameters()).dtype
        states = self.c.merger(embeds.to(merger_dtype), ref.to(merger_dtype))  # [B, 405, J]
        h, w = latent_size(width, height, vae_scale)
        pooled = self.text.pooled("").expand(states.shape[0], -1)
        return Conditioning(states, edit_text_ids(h, w, dit_dtype(self.c.edit_dit)), pooled)
