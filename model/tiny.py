"""Write a tiny random Nexus-Gen V2 checkpoint in the official layout (same files, key names and formats).

Modules are built at tiny size with transformers/diffusers, then their state dicts are converted BACK to the
official names (4.49 Qwen2.5-VL, DiffSynth FluxDiT, BFL/LDM VAE), so loading it tests the real conversion.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.config import (
    AR_INDEX_FILE,
    AR_SUBDIR,
    EDIT_DECODER_FILE,
    EDIT_PREFIXES,
    FLUX_SUBDIR,
    GENERATION_DECODER_FILE,
    GENERATION_PREFIXES,
    GENERATION_TEMPLATES,
    IMAGE_PREFILL_KEY,
    NUM_IMAGE_TOKENS,
    QWEN_SPECIAL_TOKENS,
    VAE_FILE,
    VAE_LATENT_CHANNELS,
    VAE_SCALING_FACTOR,
    VAE_SHIFT_FACTOR,
    VISION_HEAD_KEY,
    MergerConfig,
    TinySizes,
    flux_dit_config,
    vae_norm_groups,
)
from model.merger import ImageEmbeddingMerger

# transformers' Qwen2Tokenizer pre-tokenizer split (kept identical so the trained merges apply)
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CORPUS = [
    "system\nYou are a helpful assistant.\nuser\nassistant\n",
    "A photo of a cat sitting on a red sofa in the sun.",
    "A watercolor painting of mountains and a lake at dawn, with birds flying over the water.",
    "Make the sky blue. Remove the person. Add a hat to the dog. Change the car to green.",
    "Describe this image in detail. What is in the picture? There is a tree, a house and a road.",
    "一只猫坐在红色的沙发上。一幅山水画，湖面上有飞鸟。把天空变成蓝色。描述这张图片。",
    "请给狗加一顶帽子。图片中有一棵树、一座房子和一条路。日出时分的城市街道。",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,:;'\"()[]{}<>-_/\\",
    *GENERATION_TEMPLATES.values(),
    *GENERATION_PREFIXES.values(),
    *EDIT_PREFIXES.values(),
]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _jitter_constant_params(module: nn.Module, std: float = 0.05) -> None:
    """Make all-ones / all-zeros norm weights and biases random, so a swapped key cannot go unnoticed."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1 and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn_like(p) * std)


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


# ---- Qwen2.5-VL tokenizer ---------------------------------------------------------------------------


def _write_qwen_tokenizer(out: Path, sizes: TinySizes) -> dict[str, int]:
    """Train a small byte-level BPE with the Qwen pre-tokenizer; return the special-token ids."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=sizes.bpe_vocab,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json, merges.txt
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    flags = dict.fromkeys(("lstrip", "normalized", "rstrip", "single_word"), False) | {"special": True}
    added = {str(i): {"content": t} | flags for t, i in ids.items()}
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>",)],
            "bos_token": None,
            "chat_template": QWEN_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    ids["__len__"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


# ---- Qwen2.5-VL AR model (4.49 flat config and key names) --------------------------------------------


def _ar_config(sizes: TinySizes, ids: dict[str, int]) -> dict:
    vocab = -(-ids["__len__"] // 64) * 64  # padded like the real 152064 > len(tokenizer)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": sizes.ar_hidden,
        "initializer_range": 0.02,
        "intermediate_size": sizes.ar_intermediate,
        "max_position_embeddings": 128000,
        "max_window_layers": sizes.ar_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": sizes.ar_heads,
        "num_hidden_layers": sizes.ar_layers,
        "num_key_value_heads": sizes.ar_kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {
            "type": "default",
            "rope_type": "default",
            "mrope_section": list(sizes.mrope_section),
        },
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.49.0",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": vocab,
        "vision_config": {
            "depth": sizes.vit_depth,
            "hidden_act": "silu",
            "hidden_size": sizes.vit_hidden,
            "intermediate_size": sizes.vit_intermediate,
            "num_heads": sizes.vit_heads,
            "in_chans": 3,
            "out_hidden_size": sizes.ar_hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [sizes.vit_depth - 1],
            "tokens_per_second": 2,
            "model_type": "qwen2_5_vl",
        },
    }


def _to_legacy_ar_key(key: str) -> str:
    """transformers 5.x key -> 4.49 key (the inverse of the class-name conversion mapping)."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key == "lm_head.weight":
        return key
    raise ValueError(f"unexpected Qwen2.5-VL key {key}")


def _write_ar_weights(out: Path, config: dict, seed: int) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d = config["hidden_size"]
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
        sd = {_to_legacy_ar_key(k): v for k, v in model.state_dict().items()}
        sd[VISION_HEAD_KEY] = torch.randn(d, d) * d**-0.5
        sd[IMAGE_PREFILL_KEY] = torch.randn(NUM_IMAGE_TOKENS, d) * 0.02
    first = {k for k in sd if k.startswith("visual.") or k == "model.embed_tokens.weight"}
    _write_two_shards(out, _contiguous(sd), first)
    _write_json(out / "config.json", config)


def _write_two_shards(out: Path, sd: dict[str, torch.Tensor], first: set[str]) -> None:
    """model-0000{1,2}-of-00002.safetensors (`first` keys in shard 1) + model.safetensors.index.json."""
    weight_map: dict[str, str] = {}
    for i, keys in enumerate((sorted(first), sorted(set(sd) - first)), start=1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in keys}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    _write_json(out / AR_INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_ar_side_files(out: Path, config: dict) -> None:
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": config["bos_token_id"],
            "do_sample": True,
            "eos_token_id": [config["eos_token_id"], config["pad_token_id"]],
            "pad_token_id": config["pad_token_id"],
            "repetition_penalty": 1.05,
            "temperature": 0.1,
            "top_k": 1,
            "top_p": 0.001,
            "transformers_version": "4.49.0",
        },
    )
    _write_json(
        out / "preprocessor_config.json",
        {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "image_processor_type": "Qwen2VLImageProcessor",
            "max_pixels": 12845056,
            "merge_size": 2,
            "min_pixels": 3136,
            "patch_size": 14,
            "processor_class": "Qwen2_5_VLProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "temporal_patch_size": 2,
        },
    )


# ---- decoders (DiffSynth FluxDiT names) ---------------------------------------------------------------

_DS_GLOBAL = {
    "time_text_embed.timestep_embedder.linear_1": "time_embedder.timestep_embedder.0",
    "time_text_embed.timestep_embedder.linear_2": "time_embedder.timestep_embedder.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_embedder.timestep_embedder.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_embedder.timestep_embedder.2",
    "time_text_embed.text_embedder.linear_1": "pooled_text_embedder.0",
    "time_text_embed.text_embedder.linear_2": "pooled_text_embedder.2",
    "context_embedder": "context_embedder",
    "x_embedder": "x_embedder",
    "norm_out.linear": "final_norm_out.linear",
    "proj_out": "final_proj_out",
}
_DS_DOUBLE = {
    "norm1.linear": "norm1_a.linear",
    "norm1_context.linear": "norm1_b.linear",
    "attn.to_out.0": "attn.a_to_out",
    "attn.to_add_out": "attn.b_to_out",
    "ff.net.0.proj": "ff_a.0",
    "ff.net.2": "ff_a.2",
    "ff_context.net.0.proj": "ff_b.0",
    "ff_context.net.2": "ff_b.2",
    "attn.norm_q": "attn.norm_q_a",
    "attn.norm_k": "attn.norm_k_a",
    "attn.norm_added_q": "attn.norm_q_b",
    "attn.norm_added_k": "attn.norm_k_b",
}
_DS_SINGLE = {
    "norm.linear": "norm.linear",
    "attn.norm_q": "norm_q_a",
    "attn.norm_k": "norm_k_a",
    "proj_out": "proj_out",
}


def diffusers_dit_to_ds(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> DiffSynth FluxDiT names (DS `from_diffusers`)."""
    out: dict[str, torch.Tensor] = {}
    for name, param in sd.items():
        prefix, suffix = name.rsplit(".", 1)
        if prefix in _DS_GLOBAL:
            out[f"{_DS_GLOBAL[prefix]}.{suffix}"] = param
            continue
        kind, idx, middle = prefix.split(".", 2)
        if kind == "transformer_blocks":
            base = f"blocks.{idx}"
            if middle in _DS_DOUBLE:
                out[f"{base}.{_DS_DOUBLE[middle]}.{suffix}"] = param
            elif middle in ("attn.to_q", "attn.add_q_proj"):
                side = "a" if middle == "attn.to_q" else "b"
                names = (
                    ("to_q", "to_k", "to_v") if side == "a" else ("add_q_proj", "add_k_proj", "add_v_proj")
                )
                parts = [sd[f"{kind}.{idx}.attn.{n}.{suffix}"] for n in names]
                out[f"{base}.attn.{side}_to_qkv.{suffix}"] = torch.cat(parts, dim=0)
            elif middle not in ("attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj"):
                raise ValueError(f"no DiffSynth name for {name}")
        elif kind == "single_transformer_blocks":
            base = f"single_blocks.{idx}"
            if middle in _DS_SINGLE:
                out[f"{base}.{_DS_SINGLE[middle]}.{suffix}"] = param
            elif middle == "attn.to_q":
                names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
                parts = [sd[f"{kind}.{idx}.{n}.{suffix}"] for n in names]
                out[f"{base}.to_qkv_mlp.{suffix}"] = torch.cat(parts, dim=0)
            elif middle not in ("attn.to_k", "attn.to_v", "proj_mlp"):
                raise ValueError(f"no DiffSynth name for {name}")
        else:
            raise ValueError(f"no DiffSynth name for {name}")
    return out


def _tiny_dit(sizes: TinySizes, seed: int) -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    with _seeded(seed):
        dit = FluxTransformer2DModel(
            **flux_dit_config(
                head_dim=sizes.dit_head_dim,
                heads=sizes.dit_heads,
                layers=sizes.dit_layers,
                single_layers=sizes.dit_single_layers,
                joint_dim=sizes.joint_dim,
                pooled_dim=sizes.clip_hidden,
                in_channels=4 * VAE_LATENT_CHANNELS,
            )
        )
        _jitter_constant_params(dit)
    return {"pipe.dit." + k: v for k, v in diffusers_dit_to_ds(dit.state_dict()).items()}


def _write_decoders(out: Path, sizes: TinySizes, config: dict, seed: int) -> None:
    d, j = sizes.ar_hidden, sizes.joint_dim
    with _seeded(seed + 3):
        adapter = nn.Sequential(nn.Linear(d, j), nn.LayerNorm(j), nn.ReLU(), nn.Linear(j, j), nn.LayerNorm(j))
        _jitter_constant_params(adapter)
    gen = _tiny_dit(sizes, seed + 4) | {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
    torch.save(_contiguous(gen), out / GENERATION_DECODER_FILE)
    merger_config = MergerConfig(
        hidden_size=d,
        num_attention_heads=sizes.ar_heads,
        num_key_value_heads=sizes.ar_kv_heads,
        head_dim=d // sizes.ar_heads,
        intermediate_size=sizes.ar_intermediate,
        out_channels=j,
        rms_norm_eps=config["rms_norm_eps"],
        rope_theta=config["rope_theta"],
        mrope_section=sizes.mrope_section,
    )
    with _seeded(seed + 5):
        merger = ImageEmbeddingMerger(merger_config)
        _jitter_constant_params(merger)
    edit = _tiny_dit(sizes, seed + 6) | {f"embedding_merger.{k}": v for k, v in merger.state_dict().items()}
    torch.save(_contiguous(edit), out / EDIT_DECODER_FILE)


# ---- FLUX.1-dev text encoders and VAE ----------------------------------------------------------------


def _write_clip(flux: Path, sizes: TinySizes, seed: int) -> None:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": i + len(alphabet) for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tokenizer.save_pretrained(str(flux / "tokenizer"))
    tokenizer.backend_tokenizer.model.save(str(flux / "tokenizer"))  # vocab.json, merges.txt
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=sizes.clip_hidden,
        intermediate_size=2 * sizes.clip_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=sizes.clip_hidden,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    with _seeded(seed):
        clip = CLIPTextModel(config)
        _jitter_constant_params(clip)
    clip.save_pretrained(str(flux / "text_encoder"))


def _write_t5(flux: Path, sizes: TinySizes, seed: int) -> None:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    words = sorted({w.strip(".,!?:;").lower() for line in CORPUS[:4] for w in line.split()} - {""})
    chars = sorted({c for line in CORPUS for c in line if not c.isspace()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0 - 0.01 * i) for i, w in enumerate(words)]
    pieces += [(c, -6.0 - 0.001 * i) for i, c in enumerate(chars)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=512)
    tokenizer.save_pretrained(str(flux / "tokenizer_2"))
    config = T5Config(
        vocab_size=-(-len(tokenizer) // 8) * 8,
        d_model=sizes.joint_dim,
        d_kv=8,
        d_ff=2 * sizes.joint_dim,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with _seeded(seed):
        t5 = T5EncoderModel(config)
        _jitter_constant_params(t5)
    out = flux / "text_encoder_2"
    t5.save_pretrained(str(out))  # config.json + the tied-weight-aware state dict
    single = out / "model.safetensors"
    sd = load_file(str(single))
    single.unlink()
    _write_two_shards(out, sd, {k for k in sd if k.startswith("shared.")})  # as FLUX.1-dev: 2 shards


_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def diffusers_vae_to_ldm(sd: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> BFL/LDM `ae.safetensors` names (attention as 1x1 convs)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = (
            new.replace("down_blocks.", "down.")
            .replace(".resnets.", ".block.")
            .replace(".downsamplers.0.", ".downsample.")
        )
        new = new.replace(".upsamplers.0.", ".upsample.")
        if ".up_blocks." in new:
            head, rest = new.split(".up_blocks.", 1)
            idx, tail = rest.split(".", 1)
            new = f"{head}.up.{num_blocks - 1 - int(idx)}.{tail}"
        if ".mid_block." in new:
            new = new.replace(".mid_block.block.0.", ".mid.block_1.").replace(
                ".mid_block.block.1.", ".mid.block_2."
            )
            new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for a, b in (
                ("group_norm", "norm"),
                ("to_q", "q"),
                ("to_k", "k"),
                ("to_v", "v"),
                ("to_out.0", "proj_out"),
            ):
                new = new.replace(f".attn_1.{a}.", f".attn_1.{b}.")
            if ".attn_1." in new and new.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]
        out[new] = value
    return out


def _write_vae(flux: Path, sizes: TinySizes, seed: int) -> None:
    from diffusers import AutoencoderKL

    n = len(sizes.vae_channels)
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=sizes.vae_channels,
            layers_per_block=1,
            latent_channels=VAE_LATENT_CHANNELS,
            norm_num_groups=vae_norm_groups(sizes.vae_channels),
            scaling_factor=VAE_SCALING_FACTOR,
            shift_factor=VAE_SHIFT_FACTOR,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        _jitter_constant_params(vae)
    save_file(_contiguous(diffusers_vae_to_ldm(vae.state_dict(), n)), str(flux / VAE_FILE))


def _check_replaceable(root: Path) -> None:
    """Refuse to replace anything but a previous tiny checkpoint (never delete real weights)."""
    config = root / AR_SUBDIR / "config.json"
    if (root / AR_SUBDIR).exists() and not config.is_file():
        raise ValueError(f"{root / AR_SUBDIR} exists and is not a tiny checkpoint; refusing to replace it")
    if config.is_file() and json.loads(config.read_text()).get("hidden_size") != TinySizes().ar_hidden:
        raise ValueError(f"{root} holds a real (non-tiny) checkpoint; refusing to replace it")
    if (root / FLUX_SUBDIR).exists() and not config.is_file():
        raise ValueError(f"{root / FLUX_SUBDIR} exists without a tiny {AR_SUBDIR}/; refusing to replace it")


def write_tiny_checkpoint(dir: str | Path, seed: int = 0) -> Path:  # noqa: A002 - DIR, as documented
    """Write DIR/Nexus-GenV2/ and DIR/FLUX/FLUX.1-dev/ with tiny random weights, deterministic from `seed`.

    Files are written to a staging folder inside DIR and moved into place at the end, so an interrupted
    run never leaves a half-written checkpoint; a previous tiny checkpoint in DIR is replaced.
    """
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    _check_replaceable(root)
    stage = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        ar_dir, flux_dir = stage / AR_SUBDIR, stage / FLUX_SUBDIR
        ar_dir.mkdir(parents=True)
        flux_dir.mkdir(parents=True)
        sizes = TinySizes()
        ids = _write_qwen_tokenizer(ar_dir, sizes)
        config = _ar_config(sizes, ids)
        _write_ar_weights(ar_dir, config, seed * 100 + 1)
        _write_ar_side_files(ar_dir, config)
        _write_decoders(ar_dir, sizes, config, seed * 100 + 2)
        _write_clip(flux_dir, sizes, seed * 100 + 10)
        _write_t5(flux_dir, sizes, seed * 100 + 11)
        _write_vae(flux_dir, sizes, seed * 100 + 12)
        for sub in (AR_SUBDIR, FLUX_SUBDIR):
            target = root / sub
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            (stage / sub).rename(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return root
