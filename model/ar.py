"""The AR stage, batched: prompts, text prefix up to BOI, the one-pass 81 image embeddings.

See docs/model.md#ar-stage.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from model.components import Components
from model.config import (
    EDIT_TEMPLATE,
    GENERATION_TEMPLATES,
    IMAGE_FACTOR,
    IMAGE_PLACEHOLDER,
    NUM_IMAGE_TOKENS,
    SYSTEM_PROMPT,
    TARGET_GRID_THW,
    UNDERSTAND_MAX_PIXELS,
    VISION_PLACEHOLDER,
)
from model.requests import MAX_ASPECT_RATIO
from model.speed import onload

MIN_PIXELS = 3136


# ---- input images (docs/model.md#input-images) -------------------------------------------------------------
def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = UNDERSTAND_MAX_PIXELS,
) -> tuple[int, int]:
    """Bounded size of an AR input image, as qwen_vl_utils 0.0.11 `smart_resize` (banker's rounding)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio must be at most {MAX_ASPECT_RATIO}, got {width}x{height}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def bound_image(image: Image.Image) -> Image.Image:
    """Resize an input image to its bounded size with BICUBIC (reference `bound_image`)."""
    image = image.convert("RGB")
    height, width = smart_resize(image.height, image.width)
    return image.resize((width, height), Image.BICUBIC)


def num_image_pad_tokens(bounded: Image.Image) -> int:
    """Merged ViT tokens (= image_pad tokens in the prompt) of a bounded image."""
    return (bounded.height // IMAGE_FACTOR) * (bounded.width // IMAGE_FACTOR)


# ---- prompts (docs/model.md#prompts) -----------------------------------------------------------------------
@dataclass
class ARPrompt:
    """One templated AR prompt (ends with `<|im_start|>assistant\\n`) and its bounded input image, if any."""

    text: str
    image: Image.Image | None = None  # already bounded (docs/model.md#input-images)


def chat(user_text: str) -> str:
    """The Qwen2.5-VL chat template with the default system message and a generation prompt."""
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"
    )


def _image_item(bounded: Image.Image) -> str:
    return VISION_PLACEHOLDER.replace("<|image_pad|>", "<|image_pad|>" * num_image_pad_tokens(bounded))


def generation_prompt(prompt: str, language: str) -> ARPrompt:
    """Text-to-image prompt in English or Chinese."""
    return ARPrompt(chat(GENERATION_TEMPLATES[language].format(prompt=prompt)))


def editing_prompt(instruction: str, image: Image.Image) -> ARPrompt:
    """Editing prompt `<image> instruction` with the bounded input image expanded to N image_pad tokens."""
    bounded = bound_image(image)
    user = EDIT_TEMPLATE.replace(IMAGE_PLACEHOLDER, _image_item(bounded), 1).format(instruction=instruction)
    return ARPrompt(chat(user), bounded)


def understanding_prompt(instruction: str, image: Image.Image) -> ARPrompt:
    """Understanding prompt: content [image, text], concatenated."""
    bounded = bound_image(image)
    return ARPrompt(chat(_image_item(bounded) + instruction), bounded)


# ---- the stage -----------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Token ids of a batch of prompts and the ViT features of their input images (one ViT call)."""

    ids: list[list[int]]
    features: list[torch.Tensor | None]  # per sample: [n_in, D] or None
    grids: list[torch.Tensor | None]  # per sample: [1, 3] (t, h, w) ViT patch grid or None


@dataclass
class Decoded:
    """New tokens of one sample of a greedy decode, and whether it stopped on a success token."""

    tokens: list[int]
    ok: bool


class ARStage:
    """Batched Qwen2.5-VL passes with explicit, per-sample M-RoPE positions and no state on the module."""

    def __init__(
        self, components: Components, device: torch.device, repetition_penalty: float | None = None
    ) -> None:
        self.c, self.device = components, device
        self.ids = components.special_token_ids
        self.lm = components.ar.model.language_model
        generation_config = getattr(components.ar, "generation_config", None)
        if repetition_penalty is None and generation_config is not None:
            repetition_penalty = generation_config.repetition_penalty
        self.repetition_penalty = repetition_penalty or 1.0
        params = inspect.signature(self.lm.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.heads = template_heads(components.tokenizer, self.ids["image_pad"])
        self._head_kv: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.c.dtype

    # -- inputs
    def vit_inputs(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [sum patches, 1176] and image_grid_thw [n, 3] of images at their final size."""
        out = self.c.image_processor(images=images, do_resize=False, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    @torch.no_grad()
    def vit_features(self, images: list[Image.Image]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Merged ViT features of all images in ONE call: ([n_i, D] per image, grids [n, 3])."""
        pixel_values, grids = self.vit_inputs(images)
        onload(self.c.ar)
        visual = self.c.ar.model.visual
        pixel_values = pixel_values.to(self.device, visual.dtype)
        merged = visual(pixel_values, grid_thw=grids.to(self.device)).pooler_output  # [sum n_i, D]
        sizes = (grids.prod(-1) // visual.spatial_merge_size**2).tolist()
        return list(torch.split(merged.to(self.dtype), sizes)), grids

    def encode(self, prompts: list[ARPrompt]) -> Encoded:
        """Tokenize prompts and encode all their input images in one ViT call."""
        ids = [self.c.tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
        with_image = [i for i, p in enumerate(prompts) if p.image is not None]
        features: list[torch.Tensor | None] = [None] * len(prompts)
        grids: list[torch.Tensor | None] = [None] * len(prompts)
        if with_image:
            feats, grid_rows = self.vit_features([prompts[i].image for i in with_image])  # type: ignore[misc]
            for k, i in enumerate(with_image):
                features[i], grids[i] = feats[k], grid_rows[k : k + 1]
        for i, seq in enumerate(ids):
            n_in = 0 if features[i] is None else features[i].shape[0]  # type: ignore[union-attr]
            if (found := seq.count(self.ids["image_pad"])) != n_in:
                raise ValueError(f"prompt {i} has {found} image tokens, expected {n_in}")
        return Encoded(ids, features, grids)

    # -- batched tensors
    def _batch(
        self, enc: Encoded, seqs: list[list[int]], generated_image: bool, head_len: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded inputs_embeds [B,L,D], attention mask [B,L], M-RoPE position ids [3,B,L], ids [B,L].

        Padding goes after the first `head_len` tokens (a head all rows share), i.e. on the left when 0.
        Image spans are marked from the known layout (input-image slots of the prompt, the last 81 slots),
        never from the ids, so an image_pad the model wrote itself stays a text token.
        """
        B, L = len(seqs), max(len(s) for s in seqs)  # noqa: N806 - tensor shape names
        ids = torch.full((B, L), self.ids["pad"], dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        mm_types = torch.zeros(B, L, dtype=torch.int)  # 1 = image token (input image or generated image)
        grids: list[torch.Tensor] = []
        for i, seq in enumerate(seqs):
            start = L - len(seq)  # padding width of this row
            ids[i, :head_len] = torch.tensor(seq[:head_len], dtype=torch.long)
            ids[i, head_len + start :] = torch.tensor(seq[head_len:])
            mask[i, :head_len] = 1
            mask[i, head_len + start :] = 1
            if enc.grids[i] is not None:
                n_in = enc.features[i].shape[0]  # type: ignore[union-attr]
                prompt_ids = torch.tensor(enc.ids[i])
                slots = (prompt_ids == self.ids["image_pad"]).nonzero().flatten()[:n_in] + start
                mm_types[i, slots] = 1
                grids.append(enc.grids[i])  # type: ignore[arg-type]
            if generated_image:
                mm_types[i, -NUM_IMAGE_TOKENS:] = 1
                grids.append(torch.tensor([TARGET_GRID_THW]))
        ids, mask, mm_types = ids.to(self.device), mask.to(self.device), mm_types.to(self.device)
        embeds = self.lm.embed_tokens(ids)  # [B, L, D]
        input_slots = mm_types.bool()
        if generated_image:
            input_slots[:, -NUM_IMAGE_TOKENS:] = False
        feats = [f for f in enc.features if f is not None]
        if feats:
            embeds[input_slots] = torch.cat(feats).to(embeds.dtype)
        if generated_image:
            embeds[:, -NUM_IMAGE_TOKENS:] = self.c.image_prefill_embeds.weight.to(embeds.dtype)
        image_grid_thw = torch.cat(grids).to(self.device) if grids else None
        positions, _ = self.c.ar.model.get_rope_index(
            ids, mm_token_type_ids=mm_types, image_grid_thw=image_grid_thw, attention_mask=mask
        )  # [3, B, L]
        return embeds, mask, positions, ids

    def _forward(self, embeds, mask, positions, cache=None):  # type: ignore[no-untyped-def]
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kw: cache},
        )
        return out.last_hidden_state, getattr(out, self._cache_kw)

    # -- phase A: greedy decoding (natural prefix, understanding)
    @torch.no_grad()
    def greedy(
        self, enc: Encoded, max_new_tokens: list[int], success_ids: set[int], stop_ids: set[int]
    ) -> list[Decoded]:
        """Batched greedy decoding with a KV cache; vision_end is masked at every step.
        See docs/model.md#reference-decoding.

        A sample stops on a success token (kept, ok=True), on a stop token (dropped, ok=False if success_ids
        is non-empty) or at its token limit (ok=False if success_ids is non-empty).
        """
        B = len(enc.ids)  # noqa: N806 - tensor shape name
        onload(self.c.ar)
        embeds, mask, positions, ids = self._batch(enc, enc.ids, generated_image=False)
        next_pos = positions.amax(dim=(0, 2)) + 1  # [B]: text position of the first new token
        first_real = ids.gather(1, (mask == 0).sum(1, keepdim=True))  # [B, 1]
        history = torch.where(mask.bool(), ids, first_real)  # pads -> a real token of the row (penalty)
        hidden, cache = self._forward(embeds, mask, positions)
        out: list[list[int]] = [[] for _ in range(B)]
        ok = [not success_ids] * B
        done = [False] * B
        for step in range(max(max_new_tokens)):
            logits = self.c.ar.lm_head(hidden[:, -1]).float()  # [B, V]
            if self.repetition_penalty != 1.0:
                score = logits.gather(1, history)
                score = torch.where(
                    score < 0, score * self.repetition_penalty, score / self.repetition_penalty
                )
                logits = logits.scatter(1, history, score)
            logits[:, self.ids["eoi"]] = float("-inf")
            tokens = logits.argmax(-1)  # [B]
            for i, tok in enumerate(tokens.tolist()):
                if done[i]:
                    continue
                if tok in success_ids:
                    out[i].append(tok)
                    ok[i], done[i] = True, True
                elif tok in stop_ids:
                    done[i] = True
                else:
                    out[i].append(tok)
                    done[i] = len(out[i]) >= max_new_tokens[i]
            if all(done):
                break
            tokens = tokens.masked_fill(torch.tensor(done, device=self.device), self.ids["pad"])
            history = torch.cat([history, tokens[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=self.device)], dim=1)
            step_pos = (next_pos + step).view(1, B, 1).expand(3, B, 1)  # [3, B, 1]
            hidden, cache = self._forward(self.lm.embed_tokens(tokens[:, None]), mask, step_pos, cache)
        return [Decoded(t, k) for t, k in zip(out, ok, strict=True)]

    # -- phase B: the one-pass image block (docs/model.md#one-pass-image-embeddings, #batching)
    @torch.no_grad()
    def image_embeddings(
        self, enc: Encoded, prefixes: list[list[int]], reuse_head: bool = True
    ) -> torch.Tensor:
        """[B, 81, D] vision_head outputs at [BOI, IMG_0..IMG_79] of [prompt, prefix..BOI, 81 x image_pad].

        One forward over the batch. The template head every row starts with (system message, user header,
        template text) is not recomputed: its keys/values are computed once per stage and reused
        (`reuse_head`), the same tensors at the same positions. IMG_80 is dropped: its output is unused.
        """
        if any(not p or p[-1] != self.ids["boi"] for p in prefixes):
            raise ValueError("every prefix must end with the BOI token")
        pad = [self.ids["image_pad"]] * NUM_IMAGE_TOKENS
        seqs = [ids + prefix + pad for ids, prefix in zip(enc.ids, prefixes, strict=True)]
        head = self.shared_head(seqs) if reuse_head else ()
        onload(self.c.ar)
        embeds, mask, positions, _ = self._batch(enc, seqs, generated_image=True, head_len=len(head))
        mask = None if bool(mask.all()) else mask  # no padding: plain causal attention
        cache = self._head_cache(head, len(seqs)) if head else None
        out = self.lm(
            inputs_embeds=embeds[:, len(head) : -1],
            attention_mask=None if mask is None else mask[:, :-1],
            position_ids=positions[:, :, len(head) : -1],
            use_cache=cache is not None,
            **{self._cache_kw: cache},
        )
        hidden = out.last_hidden_state[:, -NUM_IMAGE_TOKENS:]  # [B, 81, D]
        return self.c.vision_head(hidden)

    def shared_head(self, seqs: list[list[int]]) -> tuple[int, ...]:
        """The longest known template head that every sequence starts with (ids), or ()."""
        for head in self.heads:
            if all(len(s) > len(head) and tuple(s[: len(head)]) == head for s in seqs):
                return head
        return ()

    def _head_cache(self, head: tuple[int, ...], batch: int) -> Any:
        """A DynamicCache holding the head's keys/values for `batch` rows (computed on first use)."""
        from transformers.cache_utils import DynamicCache

        if head not in self._head_kv:
            ids = torch.tensor([head], device=self.device)
            positions = torch.arange(len(head), device=self.device).view(1, 1, -1).expand(3, 1, -1)
            out = self.lm(inputs_embeds=self.lm.embed_tokens(ids), position_ids=positions, use_cache=True)
            layers = getattr(out, self._cache_kw).layers
            self._head_kv[head] = [(layer.keys, layer.values) for layer in layers]
        cache = DynamicCache()
        for index, (keys, values) in enumerate(self._head_kv[head]):
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), index)
        return cache


def template_heads(tokenizer: Any, image_pad: int) -> list[tuple[int, ...]]:
    """Token ids every prompt of each template starts with, longest first.

    Two probe prompts show where the per-request text begins (BPE may merge across that boundary, so
    rows are checked against the head before it is used); the head stops before any image token.
    """
    edit_user = EDIT_TEMPLATE.replace(IMAGE_PLACEHOLDER, VISION_PLACEHOLDER)
    users = [*GENERATION_TEMPLATES.values(), edit_user]
    heads = set()
    for template in users:
        probes = [
            tokenizer(chat(template.format(prompt=x, instruction=x)), add_special_tokens=False)["input_ids"]
            for x in ("a", "1")
        ]
        n = 0
        while n < min(map(len, probes)) and probes[0][n] == probes[1][n] and probes[0][n] != image_pad:
            n += 1
        if n:
            heads.add(tuple(probes[0][:n]))
    return sorted(heads, key=len, reverse=True)
