"""AR stage on the tiny checkpoint: prompts, bounded input images, one-pass image block vs step-by-step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.ar import ARStage, Encoded, editing_prompt, generation_prompt, smart_resize, understanding_prompt
from model.config import EDIT_PREFIXES, GENERATION_PREFIXES, NUM_IMAGE_TOKENS, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def components(tiny_dir: Path):  # type: ignore[no-untyped-def]
    from model.checkpoint import load_components

    torch.set_num_threads(1)
    return load_components(tiny_dir, "cpu", torch.float32)


@pytest.fixture(scope="module")
def stage(components) -> ARStage:  # type: ignore[no-untyped-def]
    return ARStage(components, torch.device("cpu"))


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def forced_prefix(stage: ARStage, text: str) -> list[int]:
    return stage.c.tokenizer(text + SPECIAL_TOKENS["boi"], add_special_tokens=False)["input_ids"]


# ---- bounded input size (docs/model.md#input-images) -------------------------------------------------------
@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [(512, 512, (504, 504)), (1024, 1024, (504, 504)), (768, 1024, (420, 588)), (1920, 1080, (672, 364))],
)
def test_smart_resize_matches_the_spec_examples(width: int, height: int, expected: tuple[int, int]) -> None:
    h, w = smart_resize(height, width)
    assert (w, h) == expected
    assert h * w <= 262640 and h % 28 == 0 and w % 28 == 0


def test_smart_resize_small_and_extreme_images() -> None:
    assert smart_resize(10, 10) == (56, 56)  # below min_pixels: scaled up, ceil
    assert smart_resize(42, 70) == (56, 56)  # banker's rounding: round(1.5) == 2, round(2.5) == 2
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300)


# ---- prompts (docs/model.md#prompts) -----------------------------------------------------------------------
def test_prompts_follow_the_templates(stage: ARStage) -> None:
    en = generation_prompt("a cat", "en").text
    assert en.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert en.endswith(
        "Generate an image according to the following description: a cat<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "根据以下描述生成一张图像：一只猫<|im_end|>" in generation_prompt("一只猫", "zh").text

    edit = editing_prompt("make it blue", noise_image(200, 300))
    assert edit.image is not None and edit.image.size == (196, 308)
    n = (196 // 28) * (308 // 28)
    assert f"user\n<|vision_start|>{'<|image_pad|>' * n}<|vision_end|> make it blue<|im_end|>" in edit.text
    understand = understanding_prompt("what is it?", noise_image(64, 64))
    assert "<|vision_end|>what is it?<|im_end|>" in understand.text

    enc = stage.encode([generation_prompt("a cat", "en"), edit])
    assert enc.features[0] is None and enc.features[1] is not None
    assert enc.features[1].shape[0] == n == enc.ids[1].count(stage.ids["image_pad"])
    assert enc.grids[1].tolist() == [[1, 308 // 14, 196 // 14]]


# ---- one pass == step by step (docs/model.md#one-pass-image-embeddings) ------------------------------------
def hand_positions(ids: list[int], image_pad: int, grid: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """By hand: text 1-D; an input image at s gets (s, s+row, s+col); the next text at s+max(gh, gw).

    See docs/model.md#image-positions.
    """
    positions, current, k = [], 0, 0
    while k < len(ids):
        if ids[k] == image_pad and grid is not None:
            gh, gw = int(grid[0, 1]) // 2, int(grid[0, 2]) // 2
            positions += [(current, current + r, current + c) for r in range(gh) for c in range(gw)]
            k, current = k + gh * gw, current + max(gh, gw)
        else:
            positions.append((current, current, current))
            k, current = k + 1, current + 1
    return positions


@torch.no_grad()
def stepwise_embeddings(stage: ARStage, enc: Encoded, i: int, prefix: list[int]) -> torch.Tensor:
    """The reference `_sample` loop at batch 1: prefill, then BOI and IMG_0..79 with a KV cache.

    See docs/model.md#reference-decoding.
    """
    c, lm, ids = stage.c, stage.lm, stage.ids
    seq = enc.ids[i] + prefix  # ends with BOI
    positions = hand_positions(seq, ids["image_pad"], enc.grids[i])
    embeds = lm.embed_tokens(torch.tensor([seq[:-1]]))
    if enc.features[i] is not None:
        embeds[0, torch.tensor(seq[:-1]) == ids["image_pad"]] = enc.features[i]
    out = lm(inputs_embeds=embeds, position_ids=torch.tensor(positions[:-1]).T[:, None], use_cache=True)
    cache = out.cache
    p = positions[-1][0]  # text position of BOI
    steps = [(lm.embed_tokens(torch.tensor([[ids["boi"]]])), (p, p, p))]
    for j in range(NUM_IMAGE_TOKENS - 1):
        steps.append((c.image_prefill_embeds.weight[j][None, None], (p + 1, p + 1 + j // 9, p + 1 + j % 9)))
    collected = []
    for embed, pos in steps:
        out = lm(
            inputs_embeds=embed, position_ids=torch.tensor(pos).view(3, 1, 1), cache=cache, use_cache=True
        )
        cache = out.cache
        collected.append(c.vision_head(out.last_hidden_state[:, -1]))
    return torch.stack(collected, dim=1)  # [1, 81, D]


def select(enc: Encoded, rows: list[int]) -> Encoded:
    return Encoded([enc.ids[i] for i in rows], [enc.features[i] for i in rows], [enc.grids[i] for i in rows])


def test_one_pass_equals_step_by_step_and_is_batch_invariant(stage: ARStage) -> None:
    prompts = [
        generation_prompt("a watercolor painting of mountains and a lake at dawn", "en"),
        editing_prompt("make the sky blue", noise_image(300, 200)),
        generation_prompt("一只猫", "zh"),
    ]
    prefixes = [
        forced_prefix(stage, GENERATION_PREFIXES["en"]),
        forced_prefix(stage, EDIT_PREFIXES["en"]),
        forced_prefix(stage, GENERATION_PREFIXES["zh"]),
    ]
    enc = stage.encode(prompts)
    assert len({len(ids) for ids in enc.ids}) == 3  # different lengths: left padding is exercised
    batched = stage.image_embeddings(enc, prefixes)
    assert batched.shape == (3, NUM_IMAGE_TOKENS, stage.c.vision_head.weight.shape[0])
    for i in range(3):
        reference = stepwise_embeddings(stage, enc, i, prefixes[i])
        alone = stage.image_embeddings(select(enc, [i]), [prefixes[i]])
        assert (alone - reference).abs().max() < 1e-4
        assert (batched[i : i + 1] - alone).abs().max() < 1e-5


def test_prefix_must_end_with_boi(stage: ARStage) -> None:
    enc = stage.encode([generation_prompt("a cat", "en")])
    with pytest.raises(ValueError, match="BOI"):
        stage.image_embeddings(enc, [[stage.ids["im_end"]]])


def test_greedy_is_batch_invariant_and_respects_limits(stage: ARStage) -> None:
    prompts = [
        generation_prompt("a cat", "en"),
        generation_prompt("a much longer prompt about a red sofa", "en"),
    ]
    enc = stage.encode(prompts)
    stop = {stage.ids["eos"], stage.ids["pad"]}
    both = stage.greedy(enc, [6, 3], {stage.ids["boi"]}, stop)
    alone = stage.greedy(select(enc, [0]), [6], {stage.ids["boi"]}, stop)
    assert both[0].tokens == alone[0].tokens
    assert len(both[1].tokens) <= 3
    assert stage.ids["eoi"] not in both[0].tokens + both[1].tokens  # vision_end is masked
