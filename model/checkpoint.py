"""Load the official Nexus-Gen V2 + FLUX.1-dev layout into transformers/diffusers modules (strict key checks).

Configs the official layout does not store (DiT, adapter, merger, VAE) are inferred from tensor shapes, so the
same code loads the real weights and the tiny checkpoint of `model.tiny`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from model.components import Components
from model.config import (
    ADAPTER_PREFIX,
    AR_INDEX_FILE,
    AR_SUBDIR,
    DIT_PREFIX,
    EDIT_DECODER_FILE,
    FLUX_SUBDIR,
    GENERATION_DECODER_FILE,
    IMAGE_PREFILL_KEY,
    MERGER_PREFIX,
    SPECIAL_TOKENS,
    VAE_FILE,
    VAE_SCALING_FACTOR,
    VAE_SHIFT_FACTOR,
    VISION_HEAD_KEY,
    MergerConfig,
    flux_dit_config,
    vae_norm_groups,
)
from model.merger import ImageEmbeddingMerger

# ---- DiffSynth FluxDiT -> diffusers FluxTransformer2DModel (docs/model.md#dit-key-names) -------------------
DIT_GLOBAL = {
    "time_embedder.timestep_embedder.0": "time_text_embed.timestep_embedder.linear_1",
    "time_embedder.timestep_embedder.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_embedder.timestep_embedder.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_embedder.timestep_embedder.2": "time_text_embed.guidance_embedder.linear_2",
    "pooled_text_embedder.0": "time_text_embed.text_embedder.linear_1",
    "pooled_text_embedder.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "x_embedder": "x_embedder",
    "final_norm_out.linear": "norm_out.linear",  # both (scale, shift): no swap
    "final_proj_out": "proj_out",
}
DIT_DOUBLE = {
    "norm1_a.linear": "norm1.linear",
    "norm1_b.linear": "norm1_context.linear",
    "attn.norm_q_a": "attn.norm_q",
    "attn.norm_k_a": "attn.norm_k",
    "attn.norm_q_b": "attn.norm_added_q",
    "attn.norm_k_b": "attn.norm_added_k",
    "attn.a_to_out": "attn.to_out.0",
    "attn.b_to_out": "attn.to_add_out",
    "ff_a.0": "ff.net.0.proj",
    "ff_a.2": "ff.net.2",
    "ff_b.0": "ff_context.net.0.proj",
    "ff_b.2": "ff_context.net.2",
}
DIT_DOUBLE_FUSED = {
    "attn.a_to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.b_to_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
DIT_SINGLE = {
    "norm.linear": "norm.linear",
    "norm_q_a": "attn.norm_q",
    "norm_k_a": "attn.norm_k",
    "proj_out": "proj_out",
}
DIT_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # to_qkv_mlp rows [D, D, D, 4D]
_BLOCK = re.compile(r"^(blocks|single_blocks)\.(\d+)\.(.+)$")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """DIR holding Nexus-GenV2/ and FLUX/FLUX.1-dev/; a path to DIR/Nexus-GenV2 itself is accepted too."""
    root = Path(path).expanduser()
    if not (root / AR_SUBDIR).is_dir() and root.name == AR_SUBDIR:
        root = root.parent
    for sub in (AR_SUBDIR, FLUX_SUBDIR):
        if not (root / sub).is_dir():
            raise ValueError(
                f"checkpoint dir {root} has no {sub}/ (expected DIR/{AR_SUBDIR} and DIR/{FLUX_SUBDIR})"
            )
    return root


def checkpoint_hash(root: Path) -> str:
    """Stable hash of the checkpoint files: names, sizes, content (small files whole, big ones head+tail)."""
    h = hashlib.sha256()
    files = sorted(p for sub in (AR_SUBDIR, FLUX_SUBDIR) for p in (root / sub).rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") or part == "__pycache__" for part in rel.split("/")):
            continue
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with p.open("rb") as f:
            if size <= 8 << 20:
                h.update(f.read())
            else:  # big weight files: safetensors header / zip directory live at the ends
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read())
    return h.hexdigest()[:16]


def _require(sd: dict[str, torch.Tensor], key: str, file: str, prefix: str = "") -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{file}: missing key {prefix}{key}")
    return sd[key]


def _fmt(keys: list[str], limit: int = 20) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(sorted(keys)[:limit]) + more


def _key_problems(missing: list[str], unexpected: list[str], mismatched: list[str]) -> list[str]:
    """One phrase per non-empty kind of key problem, for a loading error's message."""
    kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
    return [f"{kind}: {_fmt(keys)}" for kind, keys in kinds if keys]


def load_strict(
    module: nn.Module,
    sd: dict[str, torch.Tensor],
    file: str,
    describe: Callable[[str], str] | None = None,
) -> None:
    """Load `sd` into `module` (assign), raising ValueError naming `file` and the missing/unexpected keys.

    `describe(key)` maps a module key back to the file's own name for the message.
    """
    expected = module.state_dict()
    name = describe or (lambda k: k)
    missing = [name(k) for k in expected if k not in sd]
    unexpected = [name(k) for k in sd if k not in expected]
    wrong = [
        f"{name(k)} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in sd.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if problems := _key_problems(missing, unexpected, wrong):
        raise ValueError(f"{file}: " + "; ".join(problems))
    module.load_state_dict(sd, strict=True, assign=True)


def _split_prefixes(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...], file: str) -> list[dict]:
    parts: list[dict[str, torch.Tensor]] = [{} for _ in prefixes]
    unexpected = []
    for key, value in sd.items():
        for i, prefix in enumerate(prefixes):
            if key.startswith(prefix):
                parts[i][key[len(prefix) :]] = value
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(
            f"{file}: unexpected keys: {_fmt(unexpected)} (expected prefixes {', '.join(prefixes)})"
        )
    return parts


# ---- DiT ---------------------------------------------------------------------------------------------


def ds_dit_to_diffusers(sd: dict[str, torch.Tensor], file: str) -> dict[str, torch.Tensor]:
    """DiffSynth FluxDiT names (no `pipe.dit.`) -> diffusers names; fused qkv tensors are split.

    See docs/model.md#dit-key-names.
    """
    inner = _require(sd, "x_embedder.weight", file, DIT_PREFIX).shape[0]
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in sd.items():
        prefix, _, suffix = key.rpartition(".")
        m = _BLOCK.match(prefix)
        if prefix in DIT_GLOBAL:
            out[f"{DIT_GLOBAL[prefix]}.{suffix}"] = value
        elif m and m.group(1) == "blocks":
            base, middle = f"transformer_blocks.{m.group(2)}", m.group(3)
            if middle in DIT_DOUBLE:
                out[f"{base}.{DIT_DOUBLE[middle]}.{suffix}"] = value
            elif middle in DIT_DOUBLE_FUSED:
                for name, chunk in zip(DIT_DOUBLE_FUSED[middle], value.split(inner, dim=0), strict=True):
                    out[f"{base}.{name}.{suffix}"] = chunk
            else:
                unexpected.append(key)
        elif m:
            base, middle = f"single_transformer_blocks.{m.group(2)}", m.group(3)
            if middle in DIT_SINGLE:
                out[f"{base}.{DIT_SINGLE[middle]}.{suffix}"] = value
            elif middle == "to_qkv_mlp":
                sizes = [inner, inner, inner, value.shape[0] - 3 * inner]
                for name, chunk in zip(DIT_SINGLE_FUSED, value.split(sizes, dim=0), strict=True):
                    out[f"{base}.{name}.{suffix}"] = chunk
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"{file}: unexpected keys: {_fmt([DIT_PREFIX + k for k in unexpected])}")
    return out


def ds_dit_name(diffusers_key: str) -> str:
    """The official `pipe.dit.` key a diffusers DiT key comes from (for error messages)."""
    prefix, _, suffix = diffusers_key.rpartition(".")
    for ds, df in DIT_GLOBAL.items():
        if prefix == df:
            return f"{DIT_PREFIX}{ds}.{suffix}"
    m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", prefix)
    if m:
        double = m.group(1) == "transformer_blocks"
        base = f"{'blocks' if double else 'single_blocks'}.{m.group(2)}"
        names = DIT_DOUBLE if double else DIT_SINGLE
        for ds, df in names.items():
            if df == m.group(3):
                return f"{DIT_PREFIX}{base}.{ds}.{suffix}"
        fused = DIT_DOUBLE_FUSED.items() if double else [("to_qkv_mlp", DIT_SINGLE_FUSED)]
        for ds, parts in fused:
            if m.group(3) in parts:
                return f"{DIT_PREFIX}{base}.{ds}.{suffix}"
    return diffusers_key


def infer_dit_config(sd: dict[str, torch.Tensor], file: str) -> dict[str, Any]:
    """FluxTransformer2DModel kwargs from DiffSynth tensor shapes (19/38 blocks, head 128 for FLUX.1-dev)."""
    x = _require(sd, "x_embedder.weight", file, DIT_PREFIX)
    norms = [k for k in sd if k.endswith(("attn.norm_q_a.weight", "norm_q_a.weight"))]
    if not norms:
        raise ValueError(
            f"{file}: missing key {DIT_PREFIX}blocks.0.attn.norm_q_a.weight (cannot infer head_dim)"
        )
    head_dim = sd[sorted(norms)[0]].shape[0]

    def count(kind: str) -> int:
        idx = [int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and m.group(1) == kind]
        return max(idx) + 1 if idx else 0

    return flux_dit_config(
        head_dim=head_dim,
        heads=x.shape[0] // head_dim,
        layers=count("blocks"),
        single_layers=count("single_blocks"),
        joint_dim=_require(sd, "context_embedder.weight", file, DIT_PREFIX).shape[1],
        pooled_dim=_require(sd, "pooled_text_embedder.0.weight", file, DIT_PREFIX).shape[1],
        in_channels=x.shape[1],
        out_channels=_require(sd, "final_proj_out.weight", file, DIT_PREFIX).shape[0],
        guidance="guidance_embedder.timestep_embedder.0.weight" in sd,
    )


def build_dit(ds_sd: dict[str, torch.Tensor], file: str) -> nn.Module:
    """A diffusers FluxTransformer2DModel holding the DiffSynth-named weights `ds_sd`."""
    from diffusers import FluxTransformer2DModel

    config = infer_dit_config(ds_sd, file)
    with init_empty_weights():
        dit = FluxTransformer2DModel(**config)
    load_strict(dit, ds_dit_to_diffusers(ds_sd, file), file, describe=ds_dit_name)
    return dit


def build_adapter(sd: dict[str, torch.Tensor], file: str) -> nn.Sequential:
    """Generation adapter: Linear(D, J) LayerNorm ReLU Linear(J, J) LayerNorm.

    See docs/model.md#generation-decoder.
    """
    w0 = _require(sd, "0.weight", file, ADAPTER_PREFIX)
    w3 = _require(sd, "3.weight", file, ADAPTER_PREFIX)
    with init_empty_weights():  # parameters on meta: the real adapter is ~31M, the merger ~0.36B
        adapter = nn.Sequential(
            nn.Linear(w0.shape[1], w0.shape[0]),
            nn.LayerNorm(w0.shape[0]),
            nn.ReLU(),
            nn.Linear(w3.shape[1], w3.shape[0]),
            nn.LayerNorm(w3.shape[0]),
        )
    load_strict(adapter, sd, file, describe=lambda k: ADAPTER_PREFIX + k)
    return adapter


def build_merger(sd: dict[str, torch.Tensor], text_config: Any, file: str) -> ImageEmbeddingMerger:
    """Editing merger; attention hyper-parameters come from the AR text config, widths from the shapes."""
    d = _require(sd, "projector.0.weight", file, MERGER_PREFIX).shape[0]
    out = _require(sd, "projector.4.weight", file, MERGER_PREFIX).shape[0]
    wide = _require(sd, "projector.1.weight", file, MERGER_PREFIX).shape[0]
    if wide % out:
        raise ValueError(f"{file}: merger projector width {wide} is not a multiple of its output {out}")
    if d != text_config.hidden_size:
        raise ValueError(f"{file}: merger width {d} != AR hidden_size {text_config.hidden_size}")
    rope = text_config.rope_parameters or {}
    heads = text_config.num_attention_heads
    config = MergerConfig(
        hidden_size=d,
        num_attention_heads=heads,
        num_key_value_heads=text_config.num_key_value_heads,
        head_dim=getattr(text_config, "head_dim", None) or d // heads,
        intermediate_size=_require(sd, "layers.0.mlp.gate_proj.weight", file, MERGER_PREFIX).shape[0],
        out_channels=out,
        expand_ratio=wide // out,
        rms_norm_eps=text_config.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", 1e6)),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
    )
    with init_empty_weights():
        merger = ImageEmbeddingMerger(config)
    load_strict(merger, sd, file, describe=lambda k: MERGER_PREFIX + k)
    return merger


# ---- VAE ---------------------------------------------------------------------------------------------


def infer_vae_config(sd: dict[str, torch.Tensor], file: str) -> dict[str, Any]:
    """AutoencoderKL kwargs from BFL/LDM tensor shapes; FLUX scaling/shift constants."""
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
    if not blocks:
        raise ValueError(f"{file}: no encoder.down.N.* keys (not a BFL/LDM VAE)")
    channels = [_require(sd, f"encoder.down.{i}.block.0.conv1.weight", file).shape[0] for i in blocks]
    layers = len({m.group(1) for k in sd if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))})
    n = len(channels)
    return {
        "in_channels": _require(sd, "encoder.conv_in.weight", file).shape[1],
        "out_channels": _require(sd, "decoder.conv_out.weight", file).shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": _require(sd, "encoder.conv_out.weight", file).shape[0] // 2,
        "norm_num_groups": vae_norm_groups(channels),
        "scaling_factor": VAE_SCALING_FACTOR,
        "shift_factor": VAE_SHIFT_FACTOR,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }


def build_vae(flux_dir: Path) -> nn.Module:
    """diffusers AutoencoderKL from `ae.safetensors` via diffusers' LDM converter.

    See docs/model.md#vae-clip-t5.
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = flux_dir / VAE_FILE
    file = f"{FLUX_SUBDIR}/{VAE_FILE}"
    if not path.is_file():
        raise ValueError(f"missing {path}")
    ldm = load_file(str(path))
    config_file = flux_dir / "vae" / "config.json"
    if config_file.is_file():
        config = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
    else:
        config = infer_vae_config(ldm, file)
    converted = convert_ldm_vae_checkpoint(ldm, config)
    # the converter silently drops names it does not know: account for every tensor
    source = {v.data_ptr(): k for k, v in ldm.items()}
    origin = {k: source.get(v.data_ptr(), k) for k, v in converted.items()}
    dropped = sorted(set(ldm) - set(origin.values()))
    if dropped:
        raise ValueError(f"{file}: unexpected keys: {_fmt(dropped)}")
    with init_empty_weights():
        vae = AutoencoderKL(**config)
    load_strict(vae, converted, file, describe=lambda k: origin.get(k, k))
    return vae


# ---- AR model, tokenizers, text encoders ---------------------------------------------------------------


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence the libraries' load reports (we check missing/unexpected keys ourselves)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(levels[0])
        if bars:
            transformers_logging.enable_progress_bar()
        diffusers_logging.set_verbosity(levels[1])


def _loading_problems(info: dict[str, Any], allowed_unexpected: set[str]) -> list[str]:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if k not in allowed_unexpected)
    mismatched = [str(m) for m in info.get("mismatched_keys") or []]
    return _key_problems(missing, unexpected, mismatched)


def _require_files(folder: Path, names: tuple[str, ...]) -> None:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"checkpoint is missing {', '.join(str(folder / n) for n in missing)}; besides what the "
            "reference download_models.py fetches, FLUX.1-dev's tokenizer/, tokenizer_2/ and "
            "text_encoder/config.json are needed"
        )


def _load_pretrained(
    cls: Any, folder: Path, file: str, dtype: torch.dtype, allowed: set[str] = frozenset()
) -> Any:
    _require_files(folder, ("config.json",))
    model, info = cls.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    problems = _loading_problems(info, set(allowed))
    if problems:
        raise ValueError(f"{file}: " + "; ".join(problems))
    return model


def _ar_extra_tensors(ar_dir: Path) -> dict[str, torch.Tensor]:
    """vision_head and image_prefill_embeds, read from the shard the index names."""
    index_path = ar_dir / AR_INDEX_FILE
    if not index_path.is_file():
        raise ValueError(f"missing {index_path}")
    weight_map = json.loads(index_path.read_text())["weight_map"]
    out = {}
    for key in (VISION_HEAD_KEY, IMAGE_PREFILL_KEY):
        if key not in weight_map:
            raise ValueError(f"{AR_SUBDIR}/{AR_INDEX_FILE}: missing key {key}")
        shard = weight_map[key]
        with safe_open(str(ar_dir / shard), framework="pt") as f:
            if key not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise ValueError(f"{AR_SUBDIR}/{shard}: missing key {key} (named by {AR_INDEX_FILE})")
            out[key] = f.get_tensor(key)
    return out


def _special_token_ids(tokenizer: Any, ar_config: Any) -> dict[str, int]:
    ids = {role: tokenizer.convert_tokens_to_ids(tok) for role, tok in SPECIAL_TOKENS.items()}
    bad = [
        t for r, t in SPECIAL_TOKENS.items() if ids[r] is None or tokenizer.convert_ids_to_tokens(ids[r]) != t
    ]
    if bad:
        raise ValueError(
            f"{AR_SUBDIR}/tokenizer.json: special tokens not in the vocabulary: {', '.join(bad)}"
        )
    for role, attr in (
        ("boi", "vision_start_token_id"),
        ("eoi", "vision_end_token_id"),
        ("image_pad", "image_token_id"),
    ):
        if getattr(ar_config, attr, ids[role]) != ids[role]:
            raise ValueError(
                f"{AR_SUBDIR}/config.json: {attr}={getattr(ar_config, attr)} but the tokenizer has "
                f"{SPECIAL_TOKENS[role]}={ids[role]}"
            )
    return ids


def _load_decoder_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"missing {path}")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:  # pre-1.6 (non-zip) pickles cannot be memory-mapped: read them whole
        if "mmap" not in str(exc):
            raise
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path.name}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def load_components(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    parts: Iterable[str] | None = None,
) -> Components:
    """Load the modules of the stack from DIR (Nexus-GenV2/ + FLUX/FLUX.1-dev/), strict, onto `device`.

    `parts` names the components to load (model.plan.COMPONENTS; default all); the AR and its ViT are
    always loaded, the others not named stay None and their files are not read.
    """
    from model.plan import COMPONENTS

    root = resolve_checkpoint_dir(path)
    wanted = set(COMPONENTS if parts is None else parts) | {"ar", "vit"}
    if unknown := wanted - set(COMPONENTS):
        raise ValueError(f"unknown components {sorted(unknown)}; expected some of {COMPONENTS}")
    with _quiet_libraries():
        return _load(root, device, dtype, wanted)


def _load(root: Path, device: str | torch.device, dtype: torch.dtype, parts: set[str]) -> Components:
    """1. the AR with its tokenizer and image processor; 2. its image-token heads; 3. the decoders;
    4. the FLUX text encoders and VAE; 5. every module onto `device` in `dtype`. Parts not named stay None."""
    ar_dir, flux_dir = root / AR_SUBDIR, root / FLUX_SUBDIR
    tokenizer, image_processor, ar = _load_ar(ar_dir, dtype)
    heads = _load_ar_heads(ar_dir, ar.config.text_config.hidden_size, parts)
    decoders = _load_decoders(ar_dir, ar.config.text_config, parts)
    flux = _load_flux(flux_dir, dtype, parts)
    modules = [ar, *heads.values(), *decoders.values(), flux["clip"], flux["t5"], flux["vae"]]
    _place(ar, [m for m in modules if m is not None], device, dtype)
    return Components(
        tokenizer=tokenizer,
        image_processor=image_processor,
        ar=ar,
        **heads,
        **decoders,
        **flux,
        checkpoint_hash=checkpoint_hash(root),
        special_token_ids=_special_token_ids(tokenizer, ar.config),
    )


def _load_ar(ar_dir: Path, dtype: torch.dtype) -> tuple[Any, Any, nn.Module]:
    """The AR (Qwen2.5-VL) with its tokenizer and image processor; its two extra tensors are allowed."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessorPil

    _require_files(ar_dir, ("tokenizer_config.json", "preprocessor_config.json", "config.json"))
    tokenizer = Qwen2Tokenizer.from_pretrained(str(ar_dir))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(ar_dir))
    ar = _load_pretrained(
        Qwen2_5_VLForConditionalGeneration,
        ar_dir,
        f"{AR_SUBDIR}/{AR_INDEX_FILE}",
        dtype,
        allowed={VISION_HEAD_KEY, IMAGE_PREFILL_KEY},
    )
    return tokenizer, image_processor, ar


def _load_ar_heads(ar_dir: Path, d: int, parts: set[str]) -> dict[str, nn.Module | None]:
    """The image-token heads (vision_head, image_prefill_embeds), checked always, built for generation and
    editing only ("ar_heads")."""
    extra = _ar_extra_tensors(ar_dir)
    head, prefill = extra[VISION_HEAD_KEY], extra[IMAGE_PREFILL_KEY]
    if tuple(head.shape) != (d, d) or prefill.ndim != 2 or prefill.shape[1] != d:
        raise ValueError(
            f"{AR_SUBDIR}: vision_head {tuple(head.shape)} / image_prefill_embeds "
            f"{tuple(prefill.shape)} do not match hidden_size {d}"
        )
    if "ar_heads" not in parts:
        return {"vision_head": None, "image_prefill_embeds": None}
    vision_head = nn.Linear(d, d, bias=False, device="meta")
    vision_head.weight = nn.Parameter(head, requires_grad=False)
    image_prefill_embeds = nn.Embedding(prefill.shape[0], d, device="meta")
    image_prefill_embeds.weight = nn.Parameter(prefill, requires_grad=False)
    return {"vision_head": vision_head, "image_prefill_embeds": image_prefill_embeds}


def _load_decoders(ar_dir: Path, text_config: Any, parts: set[str]) -> dict[str, nn.Module | None]:
    """The generation decoder (gen_dit + adapter) and the edit decoder (edit_dit + merger), as named."""
    decoders: dict[str, nn.Module | None] = dict.fromkeys(("gen_dit", "adapter", "edit_dit", "merger"))
    if {"gen_dit", "adapter"} & parts:
        gen_file = f"{AR_SUBDIR}/{GENERATION_DECODER_FILE}"
        dit_sd, adapter_sd = _split_prefixes(
            _load_decoder_file(ar_dir / GENERATION_DECODER_FILE), (DIT_PREFIX, ADAPTER_PREFIX), gen_file
        )
        decoders["gen_dit"], decoders["adapter"] = (
            build_dit(dit_sd, gen_file),
            build_adapter(adapter_sd, gen_file),
        )
    if {"edit_dit", "merger"} & parts:
        edit_file = f"{AR_SUBDIR}/{EDIT_DECODER_FILE}"
        dit_sd, merger_sd = _split_prefixes(
            _load_decoder_file(ar_dir / EDIT_DECODER_FILE), (DIT_PREFIX, MERGER_PREFIX), edit_file
        )
        decoders["edit_dit"] = build_dit(dit_sd, edit_file)
        decoders["merger"] = build_merger(merger_sd, text_config, edit_file)
    return decoders


def _load_flux(flux_dir: Path, dtype: torch.dtype, parts: set[str]) -> dict[str, Any]:
    """FLUX.1-dev's CLIP and T5 text encoders (with their tokenizers) and its VAE, as named."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    flux: dict[str, Any] = dict.fromkeys(("clip_tokenizer", "clip", "t5_tokenizer", "t5", "vae"))
    tokenizers = {"clip": "tokenizer/tokenizer_config.json", "t5": "tokenizer_2/tokenizer_config.json"}
    _require_files(flux_dir, tuple(f for part, f in tokenizers.items() if part in parts))
    if "clip" in parts:
        flux["clip_tokenizer"] = CLIPTokenizer.from_pretrained(str(flux_dir / "tokenizer"))
        flux["clip"] = _load_pretrained(
            CLIPTextModel, flux_dir / "text_encoder", f"{FLUX_SUBDIR}/text_encoder", dtype
        )
    if "t5" in parts:
        flux["t5_tokenizer"] = T5Tokenizer.from_pretrained(str(flux_dir / "tokenizer_2"))
        flux["t5"] = _load_pretrained(
            T5EncoderModel, flux_dir / "text_encoder_2", f"{FLUX_SUBDIR}/text_encoder_2", dtype
        )
    if "vae" in parts:
        flux["vae"] = build_vae(flux_dir)
    return flux


def _place(ar: nn.Module, modules: list[nn.Module], device: str | torch.device, dtype: torch.dtype) -> None:
    """Every module onto `device` in `dtype`, in eval mode, no gradients; the AR's rotary buffers stay fp32.

    The reference loads the AR with from_pretrained(torch_dtype=bf16), which leaves the rotary inv_freq
    buffers in fp32; a plain .to(bf16) would round them and blur positions far into a sequence.
    """
    rotary_fp32 = {name: buf.clone() for name, buf in ar.named_buffers() if name.endswith("inv_freq")}
    for module in modules:
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    for name, buf in rotary_fp32.items():
        owner_name, attr = name.rsplit(".", 1)
        ar.get_submodule(owner_name).register_buffer(
            attr, buf.to(device=device, dtype=torch.float32), persistent=False
        )


__all__ = ["checkpoint_hash", "ds_dit_to_diffusers", "load_components", "resolve_checkpoint_dir"]
