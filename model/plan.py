"""Memory plan: the bytes each component keeps resident on each device, from tensor shapes alone.

Shapes come from a checkpoint's file headers (safetensors headers, the decoder pickles memory-mapped)
or, with `reference_tensors()`, from the published Nexus-GenV2 + FLUX.1-dev configurations. No weight
is read. Tensor parallelism follows model/engine.py: the AR decoder layers and lm_head, and the DiTs'
attention and feed-forward Linears are split over the ranks; everything else is replicated.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    NUM_IMAGE_TOKENS,
    VAE_FILE,
    VISION_HEAD_KEY,
)
from model.requests import DECODERS

COMPONENTS = ("ar", "vit", "ar_heads", "gen_dit", "adapter", "edit_dit", "merger", "clip", "t5", "vae")
TEXT_ENCODERS = ("clip", "t5")
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}


def components_for(tasks: Iterable[str], edit_decoders: Iterable[str] = DECODERS) -> tuple[str, ...]:
    """The components a worker serving `tasks` loads, in COMPONENTS order.

    understand: the AR and its ViT; generate: + heads, generation DiT, adapter, VAE, CLIP, T5;
    edit: + heads, editing DiT, merger, VAE, CLIP, T5, and the generation DiT and adapter only when
    edits may ask for `decoder: generation` (`edit_decoders`).
    """
    tasks, decoders = set(tasks), set(edit_decoders)
    unknown = tasks - {"generate", "edit", "understand"}
    if unknown or not tasks:
        raise ValueError(f"tasks must be some of generate, edit, understand; got {sorted(tasks)}")
    if decoders - set(DECODERS) or not decoders:
        raise ValueError(f"edit decoders must be some of {DECODERS}; got {sorted(decoders)}")
    need = {"ar", "vit"}
    if tasks & {"generate", "edit"}:
        need |= {"ar_heads", "vae", "clip", "t5"}
    if "generate" in tasks or ("edit" in tasks and "generation" in decoders):
        need |= {"gen_dit", "adapter"}
    if "edit" in tasks and "edit" in decoders:
        need |= {"edit_dit", "merger"}
    return tuple(c for c in COMPONENTS if c in need)


# ---- tensors: (component, name in the official layout, shape) ------------------------------------------
@dataclass(frozen=True)
class Tensor:
    component: str
    name: str  # official key (4.49 Qwen, DiffSynth FluxDiT without `pipe.dit.`, HF T5/CLIP, BFL VAE)
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON): no tensor data."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def _safetensors_shapes(folder: Path, single: str, index: str) -> dict[str, tuple[int, ...]]:
    """Shapes of a (possibly sharded) safetensors model in `folder`."""
    files = [single]
    if (folder / index).is_file():
        files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        if not (folder / name).is_file():
            raise ValueError(f"missing {folder / name}")
        shapes |= {k: tuple(v["shape"]) for k, v in _safetensors_header(folder / name).items()}
    return shapes


def _pickle_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of a torch pickle, memory-mapped: only the zip directory and the pickle are read."""
    import torch

    if not path.is_file():
        raise ValueError(f"missing {path}")
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def checkpoint_tensors(path: str | Path) -> list[Tensor]:
    """Every tensor of a checkpoint in the official layout (DIR with Nexus-GenV2/ and FLUX/FLUX.1-dev/)."""
    from model.checkpoint import resolve_checkpoint_dir

    root = resolve_checkpoint_dir(path)
    ar_dir, flux_dir = root / AR_SUBDIR, root / FLUX_SUBDIR
    out: list[Tensor] = []
    for name, shape in _safetensors_shapes(ar_dir, "model.safetensors", AR_INDEX_FILE).items():
        component = "vit" if name.startswith("visual.") else "ar"
        out.append(
            Tensor("ar_heads" if name in (VISION_HEAD_KEY, IMAGE_PREFILL_KEY) else component, name, shape)
        )
    for file, other, other_prefix in (
        (GENERATION_DECODER_FILE, "adapter", ADAPTER_PREFIX),
        (EDIT_DECODER_FILE, "merger", MERGER_PREFIX),
    ):
        dit = "gen_dit" if other == "adapter" else "edit_dit"
        for name, shape in _pickle_shapes(ar_dir / file).items():
            if name.startswith(DIT_PREFIX):
                out.append(Tensor(dit, name.removeprefix(DIT_PREFIX), shape))
            else:
                out.append(Tensor(other, name.removeprefix(other_prefix), shape))
    for component, sub in (("clip", "text_encoder"), ("t5", "text_encoder_2")):
        shapes = _safetensors_shapes(flux_dir / sub, "model.safetensors", "model.safetensors.index.json")
        out += [Tensor(component, k, s) for k, s in shapes.items()]
    out += [Tensor("vae", k, tuple(v["shape"])) for k, v in _safetensors_header(flux_dir / VAE_FILE).items()]
    return out


# ---- the published shapes ------------------------------------------------------------------------------
def _linear(prefix: str, n_out: int, n_in: int, bias: bool = True) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{prefix}.weight", (n_out, n_in)
    if bias:
        yield f"{prefix}.bias", (n_out,)


def _qwen_ar(d: int = 3584, layers: int = 28, inter: int = 18944, kv: int = 512, vocab: int = 152064):
    """Qwen2.5-VL-7B language model + lm_head in 4.49 names (GQA: 4 KV heads of 128)."""
    yield "model.embed_tokens.weight", (vocab, d)
    for i in range(layers):
        p = f"model.layers.{i}"
        yield from _linear(f"{p}.self_attn.q_proj", d, d)
        yield from _linear(f"{p}.self_attn.k_proj", kv, d)
        yield from _linear(f"{p}.self_attn.v_proj", kv, d)
        yield from _linear(f"{p}.self_attn.o_proj", d, d, bias=False)
        for name in ("gate_proj", "up_proj"):
            yield from _linear(f"{p}.mlp.{name}", inter, d, bias=False)
        yield from _linear(f"{p}.mlp.down_proj", d, inter, bias=False)
        yield f"{p}.input_layernorm.weight", (d,)
        yield f"{p}.post_attention_layernorm.weight", (d,)
    yield "model.norm.weight", (d,)
    yield "lm_head.weight", (vocab, d)


def _qwen_vit(width: int = 1280, depth: int = 32, inter: int = 3420, out: int = 3584, patch: int = 14):
    """The Qwen2.5-VL ViT: Conv3d patch embedding (temporal 2), 32 blocks, 2x2 patch merger."""
    yield "visual.patch_embed.proj.weight", (width, 3, 2, patch, patch)
    for i in range(depth):
        p = f"visual.blocks.{i}"
        yield f"{p}.norm1.weight", (width,)
        yield f"{p}.norm2.weight", (width,)
        yield from _linear(f"{p}.attn.qkv", 3 * width, width)
        yield from _linear(f"{p}.attn.proj", width, width)
        yield from _linear(f"{p}.mlp.gate_proj", inter, width)
        yield from _linear(f"{p}.mlp.up_proj", inter, width)
        yield from _linear(f"{p}.mlp.down_proj", width, inter)
    merged = 4 * width
    yield "visual.merger.ln_q.weight", (width,)
    yield from _linear("visual.merger.mlp.0", merged, merged)
    yield from _linear("visual.merger.mlp.2", out, merged)


def _flux_dit(inner: int = 3072, joint: int = 4096, pooled: int = 768, double: int = 19, single: int = 38):
    """FLUX.1-dev DiT in DiffSynth names (fused qkv), head_dim 128, MLP ratio 4, guidance embedder."""
    head, mlp = 128, 4 * inner
    for name in ("time_embedder", "guidance_embedder"):
        yield from _linear(f"{name}.timestep_embedder.0", inner, 256)
        yield from _linear(f"{name}.timestep_embedder.2", inner, inner)
    yield from _linear("pooled_text_embedder.0", inner, pooled)
    yield from _linear("pooled_text_embedder.2", inner, inner)
    yield from _linear("context_embedder", inner, joint)
    yield from _linear("x_embedder", inner, 64)
    for i in range(double):
        p = f"blocks.{i}"
        for s in ("a", "b"):
            yield from _linear(f"{p}.norm1_{s}.linear", 6 * inner, inner)
            yield from _linear(f"{p}.attn.{s}_to_qkv", 3 * inner, inner)
            yield f"{p}.attn.norm_q_{s}.weight", (head,)
            yield f"{p}.attn.norm_k_{s}.weight", (head,)
            yield from _linear(f"{p}.attn.{s}_to_out", inner, inner)
            yield from _linear(f"{p}.ff_{s}.0", mlp, inner)
            yield from _linear(f"{p}.ff_{s}.2", inner, mlp)
    for i in range(single):
        p = f"single_blocks.{i}"
        yield from _linear(f"{p}.norm.linear", 3 * inner, inner)
        yield from _linear(f"{p}.to_qkv_mlp", 3 * inner + mlp, inner)
        yield f"{p}.norm_q_a.weight", (head,)
        yield f"{p}.norm_k_a.weight", (head,)
        yield from _linear(f"{p}.proj_out", inner, inner + mlp)
    yield from _linear("final_norm_out.linear", 2 * inner, inner)
    yield from _linear("final_proj_out", 64, inner)


def _adapter(d: int = 3584, joint: int = 4096):
    yield from _linear("0", joint, d)
    yield from _linear("1", joint, 1)  # LayerNorm weight and bias: [joint] each
    yield from _linear("3", joint, joint)
    yield from _linear("4", joint, 1)


def _merger(d: int = 3584, kv: int = 512, inter: int = 18944, out: int = 4096, expand: int = 4):
    """The editing ImageEmbeddingMerger: one Qwen2.5 decoder layer and the RMSNorm/SiLU projector."""
    yield from _linear("layers.0.self_attn.q_proj", d, d)
    yield from _linear("layers.0.self_attn.k_proj", kv, d)
    yield from _linear("layers.0.self_attn.v_proj", kv, d)
    yield from _linear("layers.0.self_attn.o_proj", d, d, bias=False)
    for name in ("gate_proj", "up_proj"):
        yield from _linear(f"layers.0.mlp.{name}", inter, d, bias=False)
    yield from _linear("layers.0.mlp.down_proj", d, inter, bias=False)
    yield "layers.0.input_layernorm.weight", (d,)
    yield "layers.0.post_attention_layernorm.weight", (d,)
    yield "projector.0.weight", (d,)
    yield from _linear("projector.1", expand * out, d)
    yield "projector.2.weight", (expand * out,)
    yield from _linear("projector.4", out, expand * out)
    yield "projector.5.weight", (out,)


def _t5_xxl(d: int = 4096, ff: int = 10240, layers: int = 24, heads: int = 64, vocab: int = 32128):
    """T5 v1.1 XXL encoder (gated-GELU FF, no biases, relative attention bias in block 0 only)."""
    yield "shared.weight", (vocab, d)
    for i in range(layers):
        p = f"encoder.block.{i}.layer"
        for name in ("q", "k", "v", "o"):
            yield f"{p}.0.SelfAttention.{name}.weight", (d, d)
        if i == 0:
            yield f"{p}.0.SelfAttention.relative_attention_bias.weight", (32, heads)
        yield f"{p}.0.layer_norm.weight", (d,)
        yield f"{p}.1.DenseReluDense.wi_0.weight", (ff, d)
        yield f"{p}.1.DenseReluDense.wi_1.weight", (ff, d)
        yield f"{p}.1.DenseReluDense.wo.weight", (d, ff)
        yield f"{p}.1.layer_norm.weight", (d,)
    yield "encoder.final_layer_norm.weight", (d,)


def _clip_l(d: int = 768, inter: int = 3072, layers: int = 12, vocab: int = 49408, positions: int = 77):
    """CLIP ViT-L/14 text encoder (FLUX.1-dev text_encoder)."""
    yield "text_model.embeddings.token_embedding.weight", (vocab, d)
    yield "text_model.embeddings.position_embedding.weight", (positions, d)
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from _linear(f"{p}.self_attn.{name}", d, d)
        yield from _linear(f"{p}.layer_norm1", d, 1)
        yield from _linear(f"{p}.mlp.fc1", inter, d)
        yield from _linear(f"{p}.mlp.fc2", d, inter)
        yield from _linear(f"{p}.layer_norm2", d, 1)
    yield from _linear("text_model.final_layer_norm", d, 1)


def _conv(prefix: str, n_out: int, n_in: int, k: int = 3) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{prefix}.weight", (n_out, n_in, k, k)
    yield f"{prefix}.bias", (n_out,)


def _resnet(prefix: str, n_in: int, n_out: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield from _linear(f"{prefix}.norm1", n_in, 1)
    yield from _conv(f"{prefix}.conv1", n_out, n_in)
    yield from _linear(f"{prefix}.norm2", n_out, 1)
    yield from _conv(f"{prefix}.conv2", n_out, n_out)
    if n_in != n_out:
        yield from _conv(f"{prefix}.nin_shortcut", n_out, n_in, k=1)


def _vae_mid(prefix: str, c: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield from _resnet(f"{prefix}.mid.block_1", c, c)
    yield from _linear(f"{prefix}.mid.attn_1.norm", c, 1)
    for name in ("q", "k", "v", "proj_out"):
        yield from _conv(f"{prefix}.mid.attn_1.{name}", c, c, k=1)
    yield from _resnet(f"{prefix}.mid.block_2", c, c)


def _flux_vae(channels: tuple[int, ...] = (128, 256, 512, 512), layers: int = 2, latent: int = 16):
    """The FLUX.1-dev autoencoder in BFL/LDM names (no quant convs)."""
    yield from _conv("encoder.conv_in", channels[0], 3)
    c_in = channels[0]
    for i, c in enumerate(channels):
        for j in range(layers):
            yield from _resnet(f"encoder.down.{i}.block.{j}", c_in if j == 0 else c, c)
        if i < len(channels) - 1:
            yield from _conv(f"encoder.down.{i}.downsample.conv", c, c)
        c_in = c
    yield from _vae_mid("encoder", channels[-1])
    yield from _linear("encoder.norm_out", channels[-1], 1)
    yield from _conv("encoder.conv_out", 2 * latent, channels[-1])
    yield from _conv("decoder.conv_in", channels[-1], latent)
    yield from _vae_mid("decoder", channels[-1])
    c_in = channels[-1]
    for i, c in reversed(list(enumerate(channels))):
        for j in range(layers + 1):
            yield from _resnet(f"decoder.up.{i}.block.{j}", c_in if j == 0 else c, c)
        if i > 0:
            yield from _conv(f"decoder.up.{i}.upsample.conv", c, c)
        c_in = c
    yield from _linear("decoder.norm_out", channels[0], 1)
    yield from _conv("decoder.conv_out", 3, channels[0])


def _squeeze(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Norm parameters written as `_linear(prefix, n, 1)` are [n]-vectors, not [n, 1] matrices."""
    for name, shape in shapes:
        yield name, tuple(s for s in shape if s != 1) if len(shape) == 2 and shape[1] == 1 else shape


def reference_tensors() -> list[Tensor]:
    """The published Nexus-GenV2 (Qwen2.5-VL-7B + heads + two FLUX.1-dev DiTs) and FLUX.1-dev shapes."""
    d = 3584
    parts: list[tuple[str, Iterable[tuple[str, tuple[int, ...]]]]] = [
        ("ar", _qwen_ar(d)),
        ("vit", _qwen_vit(out=d)),
        ("ar_heads", [(VISION_HEAD_KEY, (d, d)), (IMAGE_PREFILL_KEY, (NUM_IMAGE_TOKENS, d))]),
        ("gen_dit", _flux_dit()),
        ("adapter", _adapter(d)),
        ("edit_dit", _flux_dit()),
        ("merger", _merger(d)),
        ("clip", _clip_l()),
        ("t5", _t5_xxl()),
        ("vae", _flux_vae()),
    ]
    return [Tensor(c, n, s) for c, shapes in parts for n, s in _squeeze(shapes)]


# ---- tensor parallel split and precision ---------------------------------------------------------------
_AR_COLUMN = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.(weight|bias)$")
_AR_ROW = re.compile(r"^(model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)|lm_head)\.weight$")
_DIT_COLUMN = re.compile(r"^(blocks\.\d+\.(attn\.[ab]_to_qkv|ff_[ab]\.0)|single_blocks\.\d+\.to_qkv_mlp)\.")
_DIT_ROW = re.compile(r"^(blocks\.\d+\.(attn\.[ab]_to_out|ff_[ab]\.2)|single_blocks\.\d+\.proj_out)\.weight$")
_DIT_BLOCK_LINEAR = re.compile(r"^(single_)?blocks\.\d+\..+\.weight$")


TP_GRAIN = 64  # DeepSpeed AutoTP splits lm_head's input features in multiples of this


def _grain_share(size: int, tp: int, rank: int) -> int:
    """Rank `rank`'s share of `size` features split in TP_GRAIN blocks (DeepSpeed's get_shard_size)."""
    if size < TP_GRAIN:
        return size // tp + (1 if rank < size % tp else 0)
    grains, rest = divmod(size, TP_GRAIN)
    return (grains // tp + (1 if rank < grains % tp else 0)) * TP_GRAIN + (rest if rank == tp - 1 else 0)


def shard_numel(t: Tensor, tp: int, rank: int = 0) -> int:
    """Elements of `t` rank `rank` holds under tensor parallelism `tp` (engine.py's split)."""
    if tp == 1:
        return t.numel
    if t.component == "ar" and t.name == "lm_head.weight":
        return t.shape[0] * _grain_share(t.shape[1], tp, rank)
    if t.component == "ar" and (_AR_COLUMN.match(t.name) or _AR_ROW.match(t.name)):
        return t.numel // tp
    if t.component in ("gen_dit", "edit_dit") and (_DIT_COLUMN.match(t.name) or _DIT_ROW.match(t.name)):
        return t.numel // tp
    return t.numel


def tensor_bytes(t: Tensor, tp: int, dtype_bytes: int, fp8_dit: bool, rank: int = 0) -> int:
    """Bytes of one rank's part of `t`: fp8 DiT block matrices take 1 byte plus a per-row scale."""
    n = shard_numel(t, tp, rank)
    if (
        fp8_dit
        and t.component in ("gen_dit", "edit_dit")
        and len(t.shape) == 2
        and _DIT_BLOCK_LINEAR.match(t.name)
    ):
        return n + t.shape[0] * dtype_bytes  # float8 weight + [out, 1] scale in the model dtype
    return n * dtype_bytes


# ---- the plan ------------------------------------------------------------------------------------------
@dataclass
class DevicePlan:
    device: str
    components: dict[str, int]  # component -> bytes resident on this device

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())


@dataclass
class Plan:
    tasks: tuple[str, ...]
    tp: int
    dtype: str
    fp8_dit: bool
    resident_text_encoders: bool
    source: str  # the checkpoint dir or "reference"
    devices: list[DevicePlan]
    host_components: dict[str, int] = field(default_factory=dict)  # kept in host memory, run on demand

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": [
                {"device": d.device, "components": d.components, "total_bytes": d.total_bytes}
                for d in self.devices
            ],
            "host": {"components": self.host_components, "total_bytes": sum(self.host_components.values())},
            "tasks": list(self.tasks),
            "tp": self.tp,
            "dtype": self.dtype,
            "fp8_dit": self.fp8_dit,
            "resident_text_encoders": self.resident_text_encoders,
            "source": self.source,
        }


def make_plan(
    tensors: list[Tensor],
    tasks: Iterable[str],
    *,
    tp: int = 1,
    dtype: str = "bf16",
    fp8_dit: bool = False,
    resident_text_encoders: bool = False,
    devices: list[str] | None = None,
    edit_decoders: Iterable[str] = DECODERS,
    source: str = "reference",
) -> Plan:
    """Bytes per component per device for a worker serving `tasks` over `tp` ranks."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if tp < 1:
        raise ValueError(f"tensor parallel size must be at least 1, got {tp}")
    if fp8_dit and tp > 1:
        raise ValueError("fp8 DiTs are not supported together with tensor parallelism")
    devices = devices or [f"cuda:{r}" for r in range(tp)]
    if len(devices) != tp:
        raise ValueError(f"{len(devices)} devices for tensor parallel size {tp}")
    wanted = components_for(tasks, edit_decoders)
    size = DTYPE_BYTES[dtype]
    ranks: list[dict[str, int]] = []
    for rank in range(tp):
        held = dict.fromkeys(wanted, 0)
        for t in tensors:
            if t.component in held:
                held[t.component] += tensor_bytes(t, tp, size, fp8_dit, rank)
        ranks.append(held)
    host = {}
    if not resident_text_encoders:  # replicated: rank 0's figures are every rank's
        host = {c: ranks[0][c] for c in TEXT_ENCODERS if c in ranks[0]}
        ranks = [{c: n for c, n in held.items() if c not in TEXT_ENCODERS} for held in ranks]
    return Plan(
        tasks=tuple(sorted(set(tasks))),
        tp=tp,
        dtype=dtype,
        fp8_dit=fp8_dit,
        resident_text_encoders=resident_text_encoders,
        source=source,
        devices=[DevicePlan(dev, held) for dev, held in zip(devices, ranks, strict=True)],
        host_components=host,
    )


def format_plan(plan: Plan) -> str:
    """A table: one row per component, one column per device (GiB, or MiB for small stacks), totals last."""
    big = max(d.total_bytes for d in plan.devices) >= 2**30
    unit, scale = ("GiB", 2**30) if big else ("MiB", 2**20)

    def size(n: int) -> str:
        return f"{n / scale:.2f}"

    names = list(plan.devices[0].components)
    head = ["component", *[d.device for d in plan.devices]]
    rows = [[c, *[size(d.components[c]) for d in plan.devices]] for c in names]
    rows.append(["total", *[size(d.total_bytes) for d in plan.devices]])
    for c, n in plan.host_components.items():
        rows.append(
            [f"{c} (host, on demand)", *[size(n) if i == 0 else "" for i in range(len(plan.devices))]]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        f"plan: tasks {','.join(plan.tasks)}, tp {plan.tp}, {plan.dtype}"
        f"{', fp8 DiT' if plan.fp8_dit else ''}, text encoders "
        f"{'resident' if plan.resident_text_encoders else 'on demand'}; {unit} per device ({plan.source})"
    ]
    for r in [head, *rows]:
        lines.append(
            "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def resident_bytes(components: Any) -> dict[str, int]:
    """Bytes of parameters and persistent buffers each loaded component holds (what the plan predicts)."""
    groups: dict[str, list[Any]] = {}
    for name in COMPONENTS:
        if name == "vit":
            ar = getattr(components, "ar", None)
            groups[name] = [] if ar is None else [ar.model.visual]
        elif name == "ar_heads":
            groups[name] = [
                m for m in (components.vision_head, components.image_prefill_embeds) if m is not None
            ]
        else:
            module = getattr(components, name, None)
            groups[name] = [] if module is None else [module]
    vit_ids = {id(t) for m in groups["vit"] for t in _state_tensors(m)}
    out = {}
    for name, modules in groups.items():
        tensors = {id(t): t for m in modules for t in _state_tensors(m)}
        if name == "ar":
            tensors = {k: t for k, t in tensors.items() if k not in vit_ids}
        if modules:
            out[name] = sum(t.numel() * t.element_size() for t in tensors.values())
    return out


def _state_tensors(module: Any) -> Iterator[Any]:
    for sub in module.modules():
        yield from (p for p in sub._parameters.values() if p is not None)
        skip = sub._non_persistent_buffers_set
        yield from (b for n, b in sub._buffers.items() if b is not None and n not in skip)
