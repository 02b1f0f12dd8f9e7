"""Tiny checkpoint in the official layout -> load_components: true round trip, strictness, determinism."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import checkpoint_hash, load_components
from model.components import Components
from model.config import AR_SUBDIR, FLUX_SUBDIR, NUM_IMAGE_TOKENS, SPECIAL_TOKENS, TinySizes
from model.tiny import diffusers_dit_to_ds, diffusers_vae_to_ldm, write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint: Path) -> Path:
    """The session's tiny checkpoint (seed 0); tests that alter files work on a copy."""
    torch.set_num_threads(1)
    return tiny_checkpoint


@pytest.fixture(scope="module")
def components(tiny_dir: Path) -> Components:
    return load_components(tiny_dir)


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    for key, value in expected.items():
        assert actual[key].shape == value.shape, f"{what}: {key}"
        assert torch.equal(actual[key].float(), value.float()), f"{what}: {key} differs"


def _shards(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_official_layout_files(tiny_dir: Path) -> None:
    ar, flux = tiny_dir / AR_SUBDIR, tiny_dir / FLUX_SUBDIR
    for name in (
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "preprocessor_config.json",
        "generation_config.json",
        "generation_decoder.bin",
        "edit_decoder.bin",
    ):
        assert (ar / name).is_file(), name
    assert len(list(ar.glob("model-*-of-*.safetensors"))) >= 2
    assert len(list((flux / "text_encoder_2").glob("model-*-of-*.safetensors"))) == 2
    for name in (
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "ae.safetensors",
    ):
        assert (flux / name).is_file(), name
    config = json.loads((ar / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and "text_config" not in config  # 4.49 flat layout
    assert (
        sum(config["rope_scaling"]["mrope_section"]) * 2
        == config["hidden_size"] // config["num_attention_heads"]
    )
    weight_map = json.loads((ar / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"vision_head.weight", "image_prefill_embeds.weight", "lm_head.weight"} <= set(weight_map)
    assert any(k.startswith("visual.blocks.") for k in weight_map)
    assert any(k.startswith("model.layers.") for k in weight_map)
    total = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert total < 40 << 20


def test_every_component_field_is_set(components: Components, tiny_dir: Path) -> None:
    for field in dataclasses.fields(Components):
        assert getattr(components, field.name) is not None, field.name
    ids = components.special_token_ids
    assert set(ids) == set(SPECIAL_TOKENS)
    assert set(ids) >= {"boi", "eoi", "image_pad", "im_start", "im_end", "eos", "pad"}
    config = components.ar.config
    assert ids["boi"] == config.vision_start_token_id
    assert ids["image_pad"] == config.image_token_id
    assert ids["eoi"] == config.vision_end_token_id
    assert ids["eos"] == ids["im_end"] != ids["pad"]
    assert components.checkpoint_hash == checkpoint_hash(tiny_dir)
    d = TinySizes().ar_hidden
    assert tuple(components.vision_head.weight.shape) == (d, d)
    assert tuple(components.image_prefill_embeds.weight.shape) == (NUM_IMAGE_TOKENS, d)


def test_tokenizer_roles_and_languages(components: Components) -> None:
    tok = components.tokenizer
    for role, token in SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == components.special_token_ids[role]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Generate an image of a cat. 生成一只猫的图像。"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(components.special_token_ids["im_start"]) == 3
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    assert tok(pad)["input_ids"] == [components.special_token_ids[r] for r in ("boi", "image_pad", "eoi")]
    assert max(ids) < components.ar.config.text_config.vocab_size


def test_ar_round_trip(components: Components, tiny_dir: Path) -> None:
    stored = _shards(tiny_dir / AR_SUBDIR)
    loaded = {}
    for key, value in components.ar.state_dict().items():
        legacy = "visual." + key[len("model.visual.") :] if key.startswith("model.visual.") else key
        legacy = (
            "model." + key[len("model.language_model.") :]
            if key.startswith("model.language_model.")
            else legacy
        )
        loaded[legacy] = value
    loaded["vision_head.weight"] = components.vision_head.weight
    loaded["image_prefill_embeds.weight"] = components.image_prefill_embeds.weight
    _assert_same(loaded, stored, "AR")


def test_decoders_round_trip(components: Components, tiny_dir: Path) -> None:
    for file, dit, extra_prefix, extra in (
        ("generation_decoder.bin", components.gen_dit, "adapter.", components.adapter),
        ("edit_decoder.bin", components.edit_dit, "embedding_merger.", components.merger),
    ):
        stored = torch.load(tiny_dir / AR_SUBDIR / file, weights_only=True)
        loaded = {"pipe.dit." + k: v for k, v in diffusers_dit_to_ds(dit.state_dict()).items()}
        loaded |= {extra_prefix + k: v for k, v in extra.state_dict().items()}
        _assert_same(loaded, stored, file)
    # one fused tensor checked by hand: q, k, v rows of the DS a_to_qkv
    stored = torch.load(tiny_dir / AR_SUBDIR / "generation_decoder.bin", weights_only=True)
    qkv = stored["pipe.dit.blocks.0.attn.a_to_qkv.weight"]
    attn = components.gen_dit.transformer_blocks[0].attn
    assert torch.equal(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]), qkv)


def test_flux_parts_round_trip(components: Components, tiny_dir: Path) -> None:
    flux = tiny_dir / FLUX_SUBDIR
    ldm = load_file(str(flux / "ae.safetensors"))
    assert "encoder.mid.attn_1.q.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    assert not any("quant_conv" in k for k in ldm)
    n = len(components.vae.config.block_out_channels)
    _assert_same(diffusers_vae_to_ldm(components.vae.state_dict(), n), ldm, "ae.safetensors")
    assert components.vae.config.latent_channels == 16
    _assert_same(components.clip.state_dict(), _shards(flux / "text_encoder"), "text_encoder")
    t5 = {k: v for k, v in components.t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    _assert_same(t5, _shards(flux / "text_encoder_2"), "text_encoder_2")


def test_modules_run(components: Components) -> None:
    d = TinySizes().ar_hidden
    pixels = components.image_processor(images=[_image(56, 56)], return_tensors="pt")
    grid = pixels["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]
    out = components.ar.model.visual(pixels["pixel_values"], grid_thw=grid)
    assert tuple(out.pooler_output.shape) == (16 // 4, d)  # merged features [N/4, D]
    clip_ids = components.clip_tokenizer(
        [""], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    assert tuple(components.clip(clip_ids).pooler_output.shape) == (1, TinySizes().clip_hidden)
    t5_ids = components.t5_tokenizer(
        ["a cat"], padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    assert tuple(components.t5(t5_ids).last_hidden_state.shape) == (1, 16, TinySizes().joint_dim)
    latents = torch.randn(1, 16, 4, 4)
    assert tuple(components.vae.decode(latents).sample.shape) == (1, 3, 32, 32)


def _image(w: int, h: int):
    from PIL import Image

    return Image.new("RGB", (w, h), (120, 30, 200))


def _copy(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))


@pytest.mark.parametrize("file", ["generation_decoder.bin", "edit_decoder.bin"])
def test_strict_decoder_missing_and_unexpected(tiny_dir: Path, tmp_path: Path, file: str) -> None:
    root = _copy(tiny_dir, tmp_path)
    path = root / AR_SUBDIR / file
    original = torch.load(path, weights_only=True)
    sd = dict(original)
    del sd["pipe.dit.single_blocks.0.norm_k_a.weight"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match=rf"{file}.*missing.*pipe\.dit\.single_blocks\.0\.norm_k_a\.weight"):
        load_components(root)
    sd = dict(original) | {"pipe.dit.blocks.0.attn.bogus.weight": torch.zeros(2)}
    torch.save(sd, path)
    with pytest.raises(ValueError, match=rf"{file}.*unexpected.*pipe\.dit\.blocks\.0\.attn\.bogus\.weight"):
        load_components(root)
    sd = dict(original) | {"something_else.weight": torch.zeros(2)}
    torch.save(sd, path)
    with pytest.raises(ValueError, match=rf"{file}.*unexpected.*something_else\.weight"):
        load_components(root)
    head = "adapter.3.bias" if file.startswith("generation") else "embedding_merger.projector.5.weight"
    sd = {k: v for k, v in original.items() if k != head}
    torch.save(sd, path)
    with pytest.raises(ValueError, match=rf"{file}.*missing.*{head}"):
        load_components(root)


def test_strict_vae_and_ar(tiny_dir: Path, tmp_path: Path) -> None:
    root = _copy(tiny_dir, tmp_path)
    ae = root / FLUX_SUBDIR / "ae.safetensors"
    original = load_file(str(ae))
    save_file(original | {"decoder.bogus.weight": torch.zeros(2)}, str(ae))
    with pytest.raises(ValueError, match=r"ae\.safetensors.*unexpected.*decoder\.bogus\.weight"):
        load_components(root)
    save_file({k: v for k, v in original.items() if k != "decoder.up.0.block.0.conv1.bias"}, str(ae))
    with pytest.raises(
        ValueError, match=r"ae\.safetensors.*missing.*decoder\.up_blocks\.3\.resnets\.0\.conv1\.bias"
    ):
        load_components(root)
    save_file(original, str(ae))

    index = json.loads((root / AR_SUBDIR / "model.safetensors.index.json").read_text())
    shard = root / AR_SUBDIR / index["weight_map"]["model.norm.weight"]
    tensors = load_file(str(shard))
    save_file(
        {k: v for k, v in tensors.items() if k != "model.norm.weight"}, str(shard), metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match=r"Nexus-GenV2.*missing.*norm\.weight"):
        load_components(root)
    save_file(tensors | {"model.bogus.weight": torch.zeros(2)}, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"Nexus-GenV2.*unexpected.*bogus\.weight"):
        load_components(root)
    save_file(
        {k: v for k, v in tensors.items() if k != "vision_head.weight"}, str(shard), metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match=r"vision_head\.weight"):
        load_components(root)


def test_checkpoint_dir_errors(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="Nexus-GenV2"):
        load_components(tmp_path)
    assert load_components(tiny_dir / AR_SUBDIR).checkpoint_hash == checkpoint_hash(tiny_dir)


def test_deterministic_from_seed(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    assert checkpoint_hash(again) == checkpoint_hash(tiny_dir)
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    assert checkpoint_hash(other) != checkpoint_hash(tiny_dir)


def test_load_in_bfloat16(tiny_dir: Path) -> None:
    loaded = load_components(tiny_dir, dtype=torch.bfloat16)
    for name in (
        "ar",
        "vision_head",
        "image_prefill_embeds",
        "gen_dit",
        "adapter",
        "edit_dit",
        "merger",
        "clip",
        "t5",
        "vae",
    ):
        module = getattr(loaded, name)
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
        assert not any(p.is_meta for p in module.parameters()), name
    assert loaded.merger.inv_freq.dtype == torch.bfloat16  # rounded like the reference's `.to(bf16)`


def test_configs_inferred_from_real_flux_shapes() -> None:
    """FLUX.1-dev / Nexus-GenV2 sizes (meta tensors, no memory): the inferred configs are the real ones."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import Qwen2_5_VLTextConfig

    from model.checkpoint import build_dit, build_merger, infer_dit_config, infer_vae_config
    from model.config import MergerConfig
    from model.merger import ImageEmbeddingMerger

    with init_empty_weights():
        dit = FluxTransformer2DModel(guidance_embeds=True)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        merger = ImageEmbeddingMerger(MergerConfig())
    ds = diffusers_dit_to_ds(dit.state_dict())
    assert tuple(ds["single_blocks.0.to_qkv_mlp.weight"].shape) == (21504, 3072)
    config = infer_dit_config(ds, "edit_decoder.bin")
    assert config == {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }
    assert sorted(build_dit(ds, "edit_decoder.bin").state_dict()) == sorted(dit.state_dict())
    vae_config = infer_vae_config(diffusers_vae_to_ldm(vae.state_dict(), 4), "ae.safetensors")
    assert vae_config["block_out_channels"] == [128, 256, 512, 512]
    assert (vae_config["layers_per_block"], vae_config["norm_num_groups"], vae_config["latent_channels"]) == (
        2,
        32,
        16,
    )
    assert not vae_config["use_quant_conv"] and not vae_config["use_post_quant_conv"]
    text = Qwen2_5_VLTextConfig(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    shapes = {k: tuple(v.shape) for k, v in merger.state_dict().items()}  # docs/model.md#editing-merger table
    assert shapes["layers.0.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["layers.0.mlp.down_proj.weight"] == (3584, 18944)
    assert shapes["projector.1.weight"] == (16384, 3584) and shapes["projector.2.weight"] == (16384,)
    assert shapes["projector.4.weight"] == (4096, 16384) and shapes["projector.5.weight"] == (4096,)
    assert build_merger(merger.state_dict(), text, "edit_decoder.bin").config == MergerConfig()


def test_vae_config_json_is_used_when_present(tiny_dir: Path, tmp_path: Path, components: Components) -> None:
    root = _copy(tiny_dir, tmp_path)
    config = dict(components.vae.config) | {"scaling_factor": 0.5}
    (root / FLUX_SUBDIR / "vae").mkdir()
    (root / FLUX_SUBDIR / "vae" / "config.json").write_text(json.dumps(config))
    assert load_components(root).vae.config.scaling_factor == 0.5


def test_missing_flux_side_files_are_named(tiny_dir: Path, tmp_path: Path) -> None:
    root = _copy(tiny_dir, tmp_path)
    (root / FLUX_SUBDIR / "text_encoder" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"text_encoder/config\.json"):
        load_components(root)
    shutil.rmtree(root / FLUX_SUBDIR / "tokenizer_2")
    with pytest.raises(ValueError, match=r"tokenizer_2/tokenizer_config\.json"):
        load_components(root)


def test_rewrite_replaces_a_tiny_checkpoint_but_never_real_weights(tmp_path: Path, tiny_dir: Path) -> None:
    root = _copy(tiny_dir, tmp_path)
    (root / AR_SUBDIR / "stale.txt").write_text("old")
    write_tiny_checkpoint(root, seed=0)
    assert not (root / AR_SUBDIR / "stale.txt").exists()
    assert checkpoint_hash(root) == checkpoint_hash(tiny_dir)
    assert {p.name for p in root.iterdir()} == {"FLUX", "Nexus-GenV2"}  # no staging folder left
    config_path = root / AR_SUBDIR / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"hidden_size": 3584}))
    with pytest.raises(ValueError, match="refusing"):
        write_tiny_checkpoint(root, seed=0)
    assert config_path.is_file()
