"""NexusGen end to end on the on-disk tiny checkpoint (CPU, fp32): generate, edit, understand, failures."""

from __future__ import annotations

import copy
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import EditRequest, GenerateRequest, NexusGen, UnderstandRequest, validate_request
from model.config import SPECIAL_TOKENS
from model.decoders import (
    dit_velocity,
    draw_noise,
    edit_text_ids,
    flow_sigmas,
    image_ids,
    pack_latents,
    unpack_latents,
)
from model.pipeline import parse_dtype


@pytest.fixture(scope="module")
def forced(tiny_dir: Path) -> NexusGen:
    torch.set_num_threads(1)
    return NexusGen.from_pretrained(str(tiny_dir), device="cpu", prefix_mode="forced", max_prefix_tokens=8)


@pytest.fixture(scope="module")
def natural(forced: NexusGen) -> NexusGen:
    return NexusGen(forced.components, "cpu", prefix_mode="natural", max_prefix_tokens=8)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


FAST = {"steps": 2}


# ---- building blocks ------------------------------------------------------------------------------------
def test_schedule_packing_noise_and_edit_ids() -> None:
    sigmas = flow_sigmas(50)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 51
    assert sigmas[1].item() == pytest.approx(0.99312, abs=1e-5)
    assert sigmas[49].item() == pytest.approx(0.0089286, abs=1e-6)
    latents = torch.randn(2, 16, 8, 12)
    assert pack_latents(latents).shape == (2, 24, 64)
    assert torch.equal(unpack_latents(pack_latents(latents), 8, 12), latents)
    batch = draw_noise([5, 6], 16, 8, 8, torch.device("cpu"), torch.float32)
    assert torch.equal(batch[1:], draw_noise([6], 16, 8, 8, torch.device("cpu"), torch.float32))
    ids = edit_text_ids(64, 64, torch.bfloat16)  # 512² with a bf16 DiT: rounded like the reference
    assert ids.shape == (405, 3)
    assert ids[:9, 2].tolist() == [0, 3.5625, 7.125, 10.6875, 14.25, 17.75, 21.375, 24.875, 28.5]
    assert ids[:81, 0].eq(0).all() and ids[81:, 0].eq(1).all()
    assert ids[81 + 17, 2].item() == 30.25


def test_fp32_edit_text_ids_are_the_unrounded_grid() -> None:
    h, w = 64, 96  # latent of 768x512
    ids = edit_text_ids(h, w, torch.float32)
    r, c = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
    target = torch.stack([torch.zeros(81), r.flatten() * h / 18, c.flatten() * w / 18], dim=1)
    r, c = torch.meshgrid(torch.arange(18.0), torch.arange(18.0), indexing="ij")
    ref = torch.stack([torch.ones(324), r.flatten() * h / 36, c.flatten() * w / 36], dim=1)
    assert torch.equal(ids, torch.cat([target, ref]))
    assert ids[1, 2].item() == pytest.approx(96 / 18, abs=1e-6)  # 5.333..., bf16 would give 5.34375


def test_fp32_editing_decoder_passes_the_unrounded_ids(forced: NexusGen) -> None:
    d = forced.components.vision_head.in_features
    cond = forced.edit_decoder.conditioning(torch.zeros(1, 81, d), [noise_image(64, 64)], 512, 512, 8)
    assert torch.equal(cond.txt_ids, edit_text_ids(64, 64, torch.float32))
    assert cond.txt_ids[1, 2].item() == pytest.approx(64 / 18, abs=1e-6)


def test_dit_sees_the_fp32_timestep_in_bf16(forced: NexusGen) -> None:
    """Diffusers would round σ to bf16 before ×1000; the sinusoid must get 1000·σ in fp32.

    See docs/model.md#numerics.
    """
    dit = copy.deepcopy(forced.components.gen_dit).to(torch.bfloat16)
    seen: list[torch.Tensor] = []
    dit.time_text_embed.time_proj.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    sigma = flow_sigmas(50)[1]
    packed = torch.randn(2, 16, 64, dtype=torch.bfloat16)
    cond = forced.gen_decoder.conditioning(
        torch.zeros(2, 81, forced.components.vision_head.in_features), 1.0, []
    )[0]
    cond = cond.to(torch.device("cpu"), torch.bfloat16)
    guidance = torch.full((2,), 3.5, dtype=torch.bfloat16)
    velocity = dit_velocity(dit, packed, cond, sigma, guidance, image_ids(8, 8))
    assert velocity.shape == packed.shape and velocity.dtype == torch.bfloat16
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], (sigma * 1000).expand(2))
    assert seen[1].tolist() == [3504.0, 3504.0]  # guidance stays bf16-rounded, as in DS
    assert not dit.time_text_embed._forward_pre_hooks  # the hook is removed after the call


# ---- generate -------------------------------------------------------------------------------------------
def test_generate_en_and_zh_at_two_sizes(forced: NexusGen) -> None:
    seen: list[tuple] = []
    square = forced.generate(
        [
            GenerateRequest("a cat on a sofa", 256, 256, seed=1, **FAST),
            GenerateRequest("一只猫", 256, 256, **FAST),
        ],
        progress=lambda *event: seen.append(event),
    )
    wide = forced.generate([GenerateRequest("一只猫", width=512, height=256, language="zh", seed=3, **FAST)])
    assert [r.image.size for r in square + wide] == [(256, 256), (256, 256), (512, 256)]
    assert all(r.error is None and r.image.mode == "RGB" for r in square + wide)
    first = square[0].provenance
    assert first["seed"] == 1 and isinstance(square[1].provenance["seed"], int)  # random seed recorded
    assert first["checkpoint_hash"] == forced.checkpoint_hash and first["batch_size"] == 2
    assert first["decoder"] == "generation" and first["prefix_mode"] == "forced"
    assert first["prefix_text"] == "Here is an image based on the description: "
    assert wide[0].provenance["prefix_text"] == "这是根据您的描述生成的图像："
    assert {"ar_prefix_s", "ar_image_tokens_s", "denoise_s", "decode_s"} <= set(first["timings"])
    assert first["params"]["prompt"] == "a cat on a sofa" and first["params"]["cfg_scale"] == 3.0
    assert (0, "denoising", 2, 2) in seen and (1, "decoding", None, None) in seen


def test_same_seed_same_image_alone_or_in_a_batch(forced: NexusGen) -> None:
    request = GenerateRequest("a cat", width=512, height=256, seed=7, **FAST)
    alone = forced.generate([request])[0]
    batch = forced.generate(
        [
            GenerateRequest(
                "a watercolor painting of mountains and a lake at dawn", 512, 256, seed=3, **FAST
            ),
            request,
            GenerateRequest("一只猫", 512, 256, seed=9, language="zh", **FAST),
        ]
    )
    again = forced.generate([request])[0]
    assert png(again.image) == png(alone.image)  # deterministic
    # Batch mates change only float rounding (GEMM shapes, padded attention), never the noise or the maths:
    # the AR embeddings agree within 1e-5 (test_ar.py), and the pixels at most by one LSB in a few places.
    a, b = np.asarray(alone.image, dtype=int), np.asarray(batch[1].image, dtype=int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3
    assert png(batch[0].image) != png(batch[1].image)


def test_generate_rejects_mixed_buckets_and_bad_requests(forced: NexusGen) -> None:
    with pytest.raises(ValueError, match="share"):
        forced.generate([GenerateRequest("a", 256, 256, **FAST), GenerateRequest("b", 512, 256, **FAST)])
    with pytest.raises(ValueError, match="width"):
        forced.generate([GenerateRequest("a", 250, 256, **FAST)])
    with pytest.raises(ValueError, match="no requests"):
        forced.generate([])


# ---- natural prefix, cancel -----------------------------------------------------------------------------
def test_natural_mode_without_boi_fails_alone_and_forced_succeeds(
    natural: NexusGen, forced: NexusGen
) -> None:
    requests = [
        GenerateRequest("a cat", 256, 256, seed=1, **FAST),
        GenerateRequest("a dog", 256, 256, **FAST),
    ]
    results = natural.generate(requests)
    assert [r.error.code for r in results] == ["no_image_token", "no_image_token"]  # type: ignore[union-attr]
    assert results[0].image is None and results[0].provenance["prefix_mode"] == "natural"
    assert results[0].provenance["prefix_text"]  # what the model wrote instead, for the record
    assert all(r.image is not None for r in forced.generate(requests))


def head_that_always_writes(stage_components, token: str):  # type: ignore[no-untyped-def]
    """A copy of the stack whose lm_head always picks `token` (zero weights, one-hot bias)."""
    components = copy.deepcopy(stage_components)
    old = components.ar.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[components.tokenizer.convert_tokens_to_ids(token)] = 10.0
    components.ar.lm_head = head
    return components


def test_natural_mode_that_writes_boi_feeds_the_one_pass(forced: NexusGen) -> None:
    components = head_that_always_writes(forced.components, SPECIAL_TOKENS["boi"])
    natural = NexusGen(components, "cpu", prefix_mode="natural", max_prefix_tokens=8)
    results = natural.generate(
        [GenerateRequest("a cat", 256, 256, seed=1, **FAST), GenerateRequest("b", 256, 256, **FAST)]
    )
    assert all(r.error is None and r.image is not None for r in results)
    assert results[0].provenance["prefix_text"] == ""  # BOI right away


def test_understand_stops_at_eos(forced: NexusGen) -> None:
    components = head_that_always_writes(forced.components, SPECIAL_TOKENS["im_end"])
    result = NexusGen(components, "cpu").understand([UnderstandRequest("what?", noise_image(64, 64))])[0]
    assert result.text == "" and result.provenance["new_tokens"] == 0


def test_cancel_drops_one_request_and_keeps_the_others(forced: NexusGen) -> None:
    events: list[tuple] = []

    def should_cancel(index: int) -> bool:
        return index == 1 and (1, "denoising", 1, 3) in events

    requests = [GenerateRequest("a", 256, 256, steps=3, seed=s) for s in range(3)]
    results = forced.generate(requests, progress=lambda *e: events.append(e), should_cancel=should_cancel)
    assert results[1].error is not None and results[1].error.code == "canceled" and results[1].image is None
    assert results[0].image is not None and results[2].image is not None
    assert (1, "denoising", 2, 3) not in events and (2, "denoising", 3, 3) in events
    solo = forced.generate([requests[2]])[0]
    assert np.abs(np.asarray(solo.image, dtype=int) - np.asarray(results[2].image, dtype=int)).max() <= 1


# ---- edit, understand -----------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["edit", "generation"])
def test_edit_with_both_decoders(forced: NexusGen, decoder: str) -> None:
    requests = [
        EditRequest("make the sky blue", noise_image(300, 200), 256, 256, seed=1, decoder=decoder, **FAST),
        EditRequest(
            "给狗加一顶帽子", noise_image(64, 96, 1), 256, 256, decoder=decoder, language="zh", **FAST
        ),
    ]
    results = forced.edit(requests)
    assert [r.image.size for r in results] == [(256, 256), (256, 256)]
    assert results[0].provenance["decoder"] == decoder
    assert results[0].provenance["prefix_text"] == "Here is the image: "
    assert results[1].provenance["prefix_text"] == "以下为编辑后的图像："
    assert results[0].provenance["params"]["image_size"] == [300, 200]


def test_edit_output_size_is_the_requested_one(forced: NexusGen) -> None:
    result = forced.edit([EditRequest("crop", noise_image(100, 100), width=512, height=256, seed=0, **FAST)])[
        0
    ]
    assert result.image.size == (512, 256)


def test_understand_returns_text(forced: NexusGen) -> None:
    requests = [
        UnderstandRequest("Describe this image.", noise_image(120, 80), max_new_tokens=6),
        UnderstandRequest("What is in the picture?", noise_image(64, 64, 2), max_new_tokens=3),
    ]
    results = forced.understand(requests)
    assert all(isinstance(r.text, str) and r.error is None for r in results)
    assert results[0].provenance["new_tokens"] <= 6 and results[1].provenance["new_tokens"] <= 3
    alone = forced.understand(requests[:1])[0]
    assert alone.text == results[0].text
    assert "<|" not in results[0].text  # special tokens skipped


# ---- validate_request -----------------------------------------------------------------------------------
GOOD_IMAGE = noise_image(64, 64)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GenerateRequest("   "), "prompt must be a non-empty"),
        (GenerateRequest("x" * 5000), "longer than"),
        (GenerateRequest("a <|vision_start|> b"), "special-token"),
        (GenerateRequest("a", width=500), "width must be a multiple of 16"),
        (GenerateRequest("a", height=48), "height"),
        (GenerateRequest("a", height=72), "height"),
        (GenerateRequest("a", width=4096), "width"),
        (GenerateRequest("a", steps=0), "steps"),
        (GenerateRequest("a", steps=101), "steps"),
        (GenerateRequest("a", cfg_scale=0.5), "cfg_scale"),
        (GenerateRequest("a", seed=-1), "seed"),
        (GenerateRequest("a", language="fr"), "language"),  # type: ignore[arg-type]
        (EditRequest("a", GOOD_IMAGE, decoder="flux"), "decoder"),  # type: ignore[arg-type]
        (EditRequest("a", Image.new("RGB", (0, 0))), "zero size"),
        (EditRequest("a", "not an image"), "PIL image"),  # type: ignore[arg-type]
        (EditRequest("", GOOD_IMAGE), "instruction"),
        (UnderstandRequest("a", GOOD_IMAGE, max_new_tokens=0), "max_new_tokens"),
        (UnderstandRequest("a", Image.new("RGB", (1, 400))), "aspect ratio"),
    ],
)
def test_validate_request_errors(request_, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        validate_request(request_)


def test_validate_request_corrupt_image() -> None:
    buffer = io.BytesIO()
    noise_image(64, 64).save(buffer, format="PNG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[:200]))
    with pytest.raises(ValueError, match="corrupt"):
        validate_request(EditRequest("a", truncated))


def test_64x64_generation_works_in_the_model_while_the_api_keeps_256(forced: NexusGen) -> None:
    from core.submit import SubmitError, normalize_params

    results = forced.generate([GenerateRequest("a cat", width=64, height=64, seed=1, cfg_scale=1.0, **FAST)])
    assert results[0].error is None and results[0].image.size == (64, 64)
    validate_request(GenerateRequest("a", width=80, height=2048))
    with pytest.raises(SubmitError, match="from 256 to 2048"):
        normalize_params("generate", {"width": 64, "height": 64})


def test_every_boundary_the_api_accepts_the_model_accepts() -> None:
    from core.params import SIDE
    from core.submit import normalize_params

    for side in (SIDE.low, SIDE.high):
        for task, kind in (("generate", GenerateRequest), ("edit", EditRequest)):
            for extreme in ({}, {"cfg_scale": 30, "guidance": 30, "cache_threshold": 1, "steps": 100}):
                params = normalize_params(task, {"width": side, "height": side, **extreme})
                fields = {k: v for k, v in params.items() if k in kind.__dataclass_fields__}
                args = ("a",) if kind is GenerateRequest else ("a", GOOD_IMAGE)
                validate_request(kind(*args, **fields))


def test_validate_request_accepts_defaults() -> None:
    validate_request(GenerateRequest("a cat"))
    validate_request(replace(GenerateRequest("a cat"), width=2048, height=256, steps=100))
    validate_request(EditRequest("a", GOOD_IMAGE))
    validate_request(UnderstandRequest("a", GOOD_IMAGE))


def test_parse_dtype() -> None:
    assert parse_dtype(None, "cpu") == torch.float32 and parse_dtype(None, "cuda:0") == torch.bfloat16
    assert parse_dtype("bf16", "cpu") == torch.bfloat16 and parse_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype("int8", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_stack_on_cuda_in_bf16(tiny_dir: Path) -> None:
    pipe = NexusGen.from_pretrained(str(tiny_dir), device="cuda", prefix_mode="forced")
    assert pipe.dtype == torch.bfloat16
    image = noise_image(96, 64)
    generated = pipe.generate([GenerateRequest("a cat", 512, 256, seed=s, **FAST) for s in (1, 2)])
    edited = pipe.edit([EditRequest("make it blue", image, 256, 256, seed=3, **FAST)])
    text = pipe.understand([UnderstandRequest("what is it?", image, max_new_tokens=4)])
    assert [r.image.size for r in generated + edited] == [(512, 256), (512, 256), (256, 256)]
    assert isinstance(text[0].text, str)
