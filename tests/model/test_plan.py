"""The memory plan against the libraries' own full-size modules (meta device) and the tiny checkpoint."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from click.testing import CliRunner
from torch import nn

from model.plan import (
    checkpoint_tensors,
    components_for,
    format_plan,
    make_plan,
    reference_tensors,
    resident_bytes,
)

ALL = ("generate", "edit", "understand")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def meta_counts() -> dict[str, int]:
    """Parameter counts of the full-size transformers/diffusers modules, built without memory."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        T5Config,
        T5EncoderModel,
    )

    from model.config import MergerConfig
    from model.merger import ImageEmbeddingMerger

    text = dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    )
    vision = dict(hidden_size=1280, out_hidden_size=3584, depth=32, intermediate_size=3420, num_heads=16)
    with init_empty_weights():
        ar = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
        )
        dit = FluxTransformer2DModel(guidance_embeds=True)  # the defaults are FLUX.1-dev's
        t5_config = T5Config(
            d_model=4096,
            d_ff=10240,
            d_kv=64,
            num_heads=64,
            num_layers=24,
            vocab_size=32128,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                vocab_size=49408,
            )
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
        merger = ImageEmbeddingMerger(MergerConfig())
        adapter = nn.Sequential(
            nn.Linear(3584, 4096), nn.LayerNorm(4096), nn.ReLU(), nn.Linear(4096, 4096), nn.LayerNorm(4096)
        )
    with torch.device("meta"):  # (init_empty_weights skips tying shared to encoder.embed_tokens)
        t5 = T5EncoderModel(t5_config)
    vit = _count(ar.model.visual)
    return {
        "ar": _count(ar) - vit,
        "vit": vit,
        "ar_heads": 3584 * 3584 + 81 * 3584,
        "gen_dit": _count(dit),
        "adapter": _count(adapter),
        "edit_dit": _count(dit),
        "merger": _count(merger),
        "clip": _count(clip),
        "t5": _count(t5),
        "vae": _count(vae),
    }


def test_reference_shapes_match_the_full_size_architectures(meta_counts: dict[str, int]) -> None:
    counts: Counter[str] = Counter()
    for t in reference_tensors():
        counts[t.component] += t.numel
    assert dict(counts) == meta_counts
    # the sizes the issue quotes for bf16: AR with ViT ~16.6 GB, each DiT ~23.8 GB, T5 ~9.5 GB
    assert round(2 * (counts["ar"] + counts["vit"]) / 1e9, 1) == 16.6
    assert round(2 * counts["gen_dit"] / 1e9, 1) == 23.8
    assert round(2 * counts["t5"] / 1e9, 1) == 9.5


@pytest.mark.parametrize(
    ("tasks", "resident", "expected"),
    [
        (("understand",), False, {"ar", "vit"}),
        (("generate",), False, {"ar", "vit", "ar_heads", "gen_dit", "adapter", "vae"}),
        (("generate",), True, {"ar", "vit", "ar_heads", "gen_dit", "adapter", "vae", "clip", "t5"}),
        (ALL, False, {"ar", "vit", "ar_heads", "gen_dit", "adapter", "edit_dit", "merger", "vae"}),
    ],
)
def test_reference_plan_at_bf16_sums_the_components(
    meta_counts: dict[str, int], tasks: tuple[str, ...], resident: bool, expected: set[str]
) -> None:
    plan = make_plan(reference_tensors(), tasks, resident_text_encoders=resident)
    (device,) = plan.devices
    assert set(device.components) == expected
    assert device.total_bytes == 2 * sum(meta_counts[c] for c in expected)
    if not resident and "gen_dit" in expected:
        assert plan.host_components == {"clip": 2 * meta_counts["clip"], "t5": 2 * meta_counts["t5"]}


def test_tensor_parallel_two_halves_the_sharded_layers_only(meta_counts: dict[str, int]) -> None:
    one = make_plan(reference_tensors(), ALL).devices[0].components
    two = make_plan(reference_tensors(), ALL, tp=2)
    assert [d.device for d in two.devices] == ["cuda:0", "cuda:1"]
    assert two.devices[0].components == two.devices[1].components
    per_rank = two.devices[0].components
    # replicated: ViT, heads, adapter, merger, VAE; the AR keeps its embedding, norms and biases of o/down
    for name in ("vit", "ar_heads", "adapter", "merger", "vae"):
        assert per_rank[name] == one[name]
    replicated = 2 * (152064 * 3584 + 28 * 2 * 3584 + 3584)  # embedding and RMSNorm weights
    assert per_rank["ar"] == (one["ar"] - replicated) // 2 + replicated
    assert 0.5 < per_rank["gen_dit"] / one["gen_dit"] < 0.7  # AdaLN modulation and embedders replicated


def test_fp8_dit_stores_block_matrices_in_one_byte() -> None:
    bf16 = make_plan(reference_tensors(), ("generate",)).devices[0].components["gen_dit"]
    fp8 = make_plan(reference_tensors(), ("generate",), fp8_dit=True).devices[0].components["gen_dit"]
    assert 0.5 < fp8 / bf16 < 0.52
    with pytest.raises(ValueError, match="not supported together with tensor parallelism"):
        make_plan(reference_tensors(), ("generate",), tp=2, fp8_dit=True)


def test_edit_only_worker_without_generation_decoder() -> None:
    assert "gen_dit" in components_for(["edit"])
    assert "gen_dit" not in components_for(["edit"], edit_decoders=["edit"])
    assert components_for(["understand"]) == ("ar", "vit")
    with pytest.raises(ValueError, match="tasks must be"):
        components_for(["paint"])


def test_plan_of_the_tiny_checkpoint_equals_what_loading_holds(tiny_dir: Path) -> None:
    from model.checkpoint import load_components

    loaded = resident_bytes(load_components(tiny_dir, "cpu", torch.float32))
    plan = make_plan(checkpoint_tensors(tiny_dir), ALL, dtype="fp32", resident_text_encoders=True)
    assert plan.devices[0].components == loaded


def test_cli_prints_a_table_and_json() -> None:
    from nexusgen.cli import main

    runner = CliRunner()
    table = runner.invoke(main, ["plan", "--tasks", "generate", "--reference-sizes"])
    assert table.exit_code == 0, table.output
    assert "gen_dit" in table.output and "cuda:0" in table.output and "t5 (host, on demand)" in table.output
    out = runner.invoke(
        main, ["plan", "--tasks", "generate,edit,understand", "--tp", "2", "--reference-sizes", "--json"]
    )
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert [d["device"] for d in doc["devices"]] == ["cuda:0", "cuda:1"]
    first = doc["devices"][0]
    assert first["total_bytes"] == sum(first["components"].values())
    assert first["total_bytes"] == make_plan(reference_tensors(), ALL, tp=2).devices[0].total_bytes
    bad = runner.invoke(main, ["plan", "--tasks", "generate"])
    assert bad.exit_code != 0 and "--model-dir" in bad.output
    assert "total" in format_plan(make_plan(reference_tensors(), ("understand",)))
