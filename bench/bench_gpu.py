"""Full-size benchmark of every speed option: Nexus-Gen V2 at its real sizes with random bf16 weights.

The stack is built directly on the device (modules constructed under `torch.device(DEVICE)` in bf16; no
weights are read): Qwen2.5-VL-7B (28 layers, hidden 3584, the 32-layer ViT) with `vision_head` and
`image_prefill_embeds`, both FLUX.1-dev DiTs (19 double + 38 single blocks, 24 heads x 128), the adapter,
the editing merger and the FLUX VAE (8.29 B + 2 x 11.90 B + 0.36 B + 0.08 B parameters, about 65 GB).
Tokenizers and processor come from the tiny checkpoint (its ids are valid in the real vocabulary). The
CFG negative branch uses cached T5("")/CLIP("") states of the real shapes ([1, 512, 4096], [1, 768]),
as the service does after its first batch.

Per configuration (task x size x batch x option) one pipeline call with `--probe-steps` steps is timed
stage by stage (AR, conditioning, each denoising step synchronised, VAE); seconds per image at 28 and 50
steps are AR + conditioning + steps x median step + VAE, over the batch. The step cache configurations
run a real `--cache-steps` loop (random weights: the skip rate is not the real model's).

FLOPs per DiT evaluation (documented, used for the fraction of the bf16 peak), with D = 3072, N = image
tokens (H/16)(W/16) + text tokens (81 generation, 405 editing, 512 for the CFG negative branch):
each of the 19 double blocks does 2 x 12 D^2 per token for each stream (qkv 3D^2, out D^2, MLP 8D^2) and
joint attention 4 N^2 D; each of the 38 single blocks 2 x 12 D^2 per token (qkv 3D^2, MLP in 4D^2, out
5D^2) and 4 N^2 D; plus x_embedder / proj_out (2 x 64 x D per image token) and context_embedder (2 x 4096
x D per text token). The AdaLN modulations are per sample, not per token, and are left out. At 1024²
with 81 text tokens that is 66.2 TFLOP per evaluation.

Run: `python -m bench.bench_gpu --device cuda [--budget-s 420] [--out DIR]`; `--preset small` runs the same
code on CPU at tiny sizes. Writes DIR/gpu.json (gpu-small.json) and a PNG of images/s against batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from bench.common import RESULTS_DIR, environment, median, tiny_components
from model.config import (
    NUM_IMAGE_TOKENS,
    NUM_REF_TOKENS,
    T5_MAX_LENGTH,
    VAE_SCALING_FACTOR,
    VAE_SHIFT_FACTOR,
    MergerConfig,
    flux_dit_config,
    vae_norm_groups,
)
from model.merger import ImageEmbeddingMerger
from model.pipeline import NexusGen
from model.requests import EditRequest, GenerateRequest
from model.speed import SpeedOptions, apply_speed_options, check_fp8_support

STEP_COUNTS = (28, 50)
TASKS = ("generate_cfg1", "generate_cfg3", "edit")
OPTIONS: dict[str, dict[str, Any]] = {  # name -> speed options and step cache threshold
    "baseline": {},  # the stack dtype (bf16 on CUDA), eager, no cache, no offload
    "compile": {"compile": "regional"},
    "fp8": {"dit_precision": "fp8"},
    "cache": {"cache_threshold": 0.4},
    "offload_model": {"offload": "model"},
    "offload_group": {"offload": "group"},
    "compile+fp8": {"compile": "regional", "dit_precision": "fp8"},
    "compile+fp8+cache": {"compile": "regional", "dit_precision": "fp8", "cache_threshold": 0.4},
}
# bf16 dense tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity)
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Module sizes and the measurement grid."""

    ar_hidden: int
    ar_layers: int
    ar_heads: int
    ar_kv_heads: int
    ar_intermediate: int
    mrope_section: tuple[int, int, int]
    vit_depth: int
    vit_hidden: int
    vit_heads: int
    vit_intermediate: int
    dit_head_dim: int
    dit_heads: int
    dit_layers: int
    dit_single_layers: int
    joint_dim: int
    pooled_dim: int
    vae_channels: tuple[int, ...]
    ar_vocab: int | None  # None: the tiny tokenizer's
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    probe_steps: int
    cache_steps: int


FULL = Preset(
    3584, 28, 28, 4, 18944, (16, 24, 24), 32, 1280, 16, 3420,
    128, 24, 19, 38, 4096, 768, (128, 256, 512, 512), ar_vocab=152064,
    sizes=(512, 1024), batches=(1, 4, 8), probe_steps=3, cache_steps=28,
)  # fmt: skip
SMALL = Preset(
    64, 2, 4, 2, 128, (2, 3, 3), 2, 32, 2, 64,
    16, 2, 1, 1, 32, 32, (8, 16, 16, 16), ar_vocab=None,
    sizes=(64, 128), batches=(1, 2), probe_steps=2, cache_steps=8,
)  # fmt: skip
PRESETS = {"full": FULL, "small": SMALL}


# ---- building the stack on the device -------------------------------------------------------------------
def build_pipeline(
    preset: Preset, device: torch.device, dtype: torch.dtype, options: SpeedOptions
) -> NexusGen:
    """NexusGen over random weights of the preset's sizes, created on `device`; speed options applied."""
    components = build_components(preset, device, dtype)
    hooks = apply_speed_options(components, options, device)
    pipe = NexusGen(components, device, prefix_mode="forced", options=options, offload_hooks=hooks)
    gen = torch.Generator().manual_seed(1)  # cached T5("") / CLIP("") at the real shapes
    pipe.text._t5[""] = torch.randn(1, T5_MAX_LENGTH, preset.joint_dim, generator=gen).to(device, dtype)
    pipe.text._pooled[""] = torch.randn(1, preset.pooled_dim, generator=gen).to(device, dtype)
    return pipe


def build_components(preset: Preset, device: torch.device, dtype: torch.dtype) -> Any:
    """The stack's modules at the preset's sizes with random weights, constructed on `device` in `dtype`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = tiny_components(torch.device("cpu"), torch.float32)  # tokenizers, processor, ids, text encoders
    config = base.ar.config
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.num_hidden_layers = preset.ar_hidden, preset.ar_layers
    text.num_attention_heads, text.num_key_value_heads = preset.ar_heads, preset.ar_kv_heads
    text.intermediate_size, text.head_dim = preset.ar_intermediate, preset.ar_hidden // preset.ar_heads
    text.layer_types = ["full_attention"] * preset.ar_layers
    text.max_window_layers = preset.ar_layers
    text.rope_parameters["mrope_section"] = list(preset.mrope_section)
    text.vocab_size = preset.ar_vocab or text.vocab_size
    vision.depth, vision.hidden_size, vision.num_heads = preset.vit_depth, preset.vit_hidden, preset.vit_heads
    vision.intermediate_size, vision.out_hidden_size = preset.vit_intermediate, preset.ar_hidden
    vision.fullatt_block_indexes = [i for i in (7, 15, 23, 31) if i < preset.vit_depth] or [
        preset.vit_depth - 1
    ]
    d, j = preset.ar_hidden, preset.joint_dim
    dit_kwargs = flux_dit_config(
        head_dim=preset.dit_head_dim, heads=preset.dit_heads, layers=preset.dit_layers,
        single_layers=preset.dit_single_layers, joint_dim=j, pooled_dim=preset.pooled_dim,
    )  # fmt: skip
    channels = list(preset.vae_channels)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad():
            ar = Qwen2_5_VLForConditionalGeneration(config)
            components = dataclasses.replace(
                base,
                ar=ar,
                vision_head=nn.Linear(d, d, bias=False),
                image_prefill_embeds=nn.Embedding(NUM_IMAGE_TOKENS, d),
                gen_dit=FluxTransformer2DModel(**dit_kwargs),
                edit_dit=FluxTransformer2DModel(**dit_kwargs),
                adapter=nn.Sequential(
                    nn.Linear(d, j), nn.LayerNorm(j), nn.ReLU(), nn.Linear(j, j), nn.LayerNorm(j)
                ),
                merger=ImageEmbeddingMerger(
                    MergerConfig(
                        hidden_size=d, num_attention_heads=preset.ar_heads,
                        num_key_value_heads=preset.ar_kv_heads, head_dim=d // preset.ar_heads,
                        intermediate_size=preset.ar_intermediate, out_channels=j,
                        mrope_section=preset.mrope_section,
                    )
                ),
                vae=AutoencoderKL(
                    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(channels),
                    up_block_types=["UpDecoderBlock2D"] * len(channels), block_out_channels=channels,
                    layers_per_block=2, latent_channels=16, norm_num_groups=vae_norm_groups(channels),
                    scaling_factor=VAE_SCALING_FACTOR, shift_factor=VAE_SHIFT_FACTOR,
                    use_quant_conv=False, use_post_quant_conv=False,
                ),
            )  # fmt: skip
    finally:
        torch.set_default_dtype(previous)
    for module in (components.ar, components.gen_dit, components.edit_dit, components.vae, components.merger):
        module.eval().requires_grad_(False)
    for module in (components.vision_head, components.image_prefill_embeds, components.adapter):
        module.requires_grad_(False)
    return dataclasses.replace(components, clip=base.clip.to(device), t5=base.t5.to(device))


# ---- FLOPs ----------------------------------------------------------------------------------------------
def dit_flops(preset: Preset, size: int, text_tokens: int) -> float:
    """FLOPs of one DiT evaluation of one sample (the formula of the module docstring)."""
    d = preset.dit_heads * preset.dit_head_dim
    image = (size // 16) ** 2
    n = image + text_tokens
    per_block = 24 * d * d * n + 4 * n * n * d
    embed = 2 * 2 * 64 * d * image + 2 * preset.joint_dim * d * text_tokens
    return float((preset.dit_layers + preset.dit_single_layers) * per_block + embed)


def step_flops(preset: Preset, task: str, size: int, batch: int) -> float:
    """FLOPs of one denoising step of the batch (both CFG branches when cfg != 1)."""
    text = NUM_IMAGE_TOKENS + NUM_REF_TOKENS if task == "edit" else NUM_IMAGE_TOKENS
    flops = dit_flops(preset, size, text)
    if task == "generate_cfg3":
        flops += dit_flops(preset, size, T5_MAX_LENGTH)
    return batch * flops


def peak_tflops(device: torch.device) -> dict[str, float | None]:
    """The data-sheet bf16 peak of this GPU (if known) and a measured 8192³ bf16 matmul rate."""
    if device.type != "cuda":
        return {"datasheet": None, "measured_matmul": None}
    name = torch.cuda.get_device_name(device)
    sheet = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize(device)
    measured = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    return {"datasheet": sheet, "measured_matmul": round(measured, 1)}


# ---- measuring ------------------------------------------------------------------------------------------
def requests_for(task: str, size: int, batch: int, steps: int, threshold: float) -> list[Any]:
    common = {"width": size, "height": size, "steps": steps, "cache_threshold": threshold}
    if task == "edit":
        image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (size, size, 3), dtype=np.uint8))
        return [
            EditRequest(f"make it blue {i}", image, cfg_scale=1.0, seed=i, **common) for i in range(batch)
        ]
    cfg = 3.0 if task == "generate_cfg3" else 1.0
    return [GenerateRequest(f"a red cube number {i}", cfg_scale=cfg, seed=i, **common) for i in range(batch)]


def run_config(pipe: NexusGen, preset: Preset, task: str, size: int, batch: int, threshold: float) -> dict:
    """Time one pipeline call; step times are synchronised per step through the progress callback."""
    device = pipe.device
    steps = preset.cache_steps if threshold > 0 else preset.probe_steps
    marks: list[float] = []

    def progress(index: int, stage: str, step: int | None, _total: int | None) -> None:
        if stage == "denoising" and index == 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks.append(time.perf_counter())

    call = pipe.edit if task == "edit" else pipe.generate
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    results = call(requests_for(task, size, batch, steps, threshold), progress=progress)
    wall = time.perf_counter() - start
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{task} {size}² batch {batch}: {errors[0]}")
    timings = results[0].provenance["timings"]
    step_times = np.diff(marks).tolist()
    first_step = timings["denoise_s"] - sum(step_times)  # includes warm-up/compile of a new shape
    step_s = median(step_times) if step_times else first_step
    fixed = timings.get("ar_prefix_s", 0) + timings["ar_image_tokens_s"] + timings["conditioning_s"]
    out: dict[str, Any] = {
        "status": "measured",
        "call_wall_s": round(wall, 4),
        "ar_s": round(timings.get("ar_prefix_s", 0) + timings["ar_image_tokens_s"], 4),
        "conditioning_s": round(timings["conditioning_s"], 4),
        "first_step_s": round(first_step, 4),
        "step_s": round(step_s, 5),
        "decode_s": round(timings["decode_s"], 4),
        "peak_memory_gb": (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
        ),
    }
    if threshold > 0:  # the measured loop, skipped steps included
        cache = results[0].provenance["step_cache"]
        total = cache["batch_block_evaluations"] + cache["batch_blocks_skipped"]
        out["cache_blocks_skipped_fraction"] = round(cache["batch_blocks_skipped"] / total, 4)
        out["cache_loop_s"] = round(timings["denoise_s"], 4)
        step_s = timings["denoise_s"] / steps  # average over computed and skipped steps
        out["step_s"] = round(step_s, 5)
    out["per_steps"] = {}
    for n in STEP_COUNTS:
        seconds = fixed + n * step_s + timings["decode_s"]
        out["per_steps"][str(n)] = {
            "seconds_per_image": round(seconds / batch, 4),
            "images_per_s": round(batch / seconds, 4),
        }
    return out


def plan(preset: Preset) -> list[tuple[str, str, int, int]]:
    """Every (option, task, size, batch), in the order they are measured (most telling first)."""
    order = [
        "baseline",
        "cache",
        "compile",
        "compile+fp8",
        "compile+fp8+cache",
        "fp8",
        "offload_model",
        "offload_group",
    ]
    big = max(preset.sizes)
    configs = []
    for option in order:  # grouped by option: one build (or in-place change) per option
        for task in TASKS:
            for size in sorted(preset.sizes, key=lambda s: s != big):
                for batch in preset.batches:
                    configs.append((option, task, size, batch))
    return configs


def refused(option: str, device: torch.device, compile_on_cpu: bool) -> str | None:
    spec = OPTIONS[option]
    if spec.get("dit_precision") == "fp8":
        try:
            check_fp8_support(device)
        except ValueError as exc:
            return str(exc)
    if spec.get("compile") and device.type == "cpu" and not compile_on_cpu:
        return (
            "compile on CPU takes minutes per shape; tests/model/test_speed.py checks it (--compile-on-cpu)"
        )
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--device", default=None, help="default: cuda for full, cpu for small")
    parser.add_argument("--budget-s", type=float, default=None, help="stop measuring after this many seconds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma list of options to measure")
    parser.add_argument("--compile-on-cpu", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (small preset)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = torch.device(args.device or ("cuda" if args.preset == "full" else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    wanted = set(args.options.split(","))
    name = "gpu" if args.preset == "full" else f"gpu-{args.preset}"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "preset": args.preset,
        "sizes": dataclasses.asdict(preset),
        "dtype": str(dtype),
        "load_average_start": Path("/proc/loadavg").read_text().split()[:3],
        "peak_bf16_tflops": peak_tflops(device),
        "flops_note": "DiT FLOPs per step from dit_flops() (module docstring); AR and VAE not counted",
        "configurations": [],
    }

    def write() -> None:
        result["environment"] = environment(device)
        result["elapsed_s"] = round(time.perf_counter() - started, 1)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")

    pipe: NexusGen | None = None
    built_for: str | None = None
    for option, task, size, batch in plan(preset):
        spec = OPTIONS[option]
        entry: dict[str, Any] = {
            "option": option, "task": task, "size": size, "batch": batch,
            "speed_options": {k: v for k, v in spec.items() if k != "cache_threshold"},
            "cache_threshold": spec.get("cache_threshold", 0.0),
            "dit_flops_per_step": step_flops(preset, task, size, batch),
        }  # fmt: skip
        reason = refused(option, device, args.compile_on_cpu)
        over_budget = args.budget_s is not None and time.perf_counter() - started > args.budget_s
        if option not in wanted or reason or over_budget:
            entry |= {"status": "not_run", "reason": reason or ("budget" if over_budget else "not selected")}
            result["configurations"].append(entry)
            continue
        options = SpeedOptions(**{k: v for k, v in spec.items() if k != "cache_threshold"})
        if built_for != repr(options):
            pipe = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            pipe = build_pipeline(preset, device, dtype, options)
            print(f"built the stack for {options.describe()} in {time.perf_counter() - t0:.1f} s", flush=True)
            built_for = repr(options)
        assert pipe is not None
        try:
            entry |= run_config(pipe, preset, task, size, batch, entry["cache_threshold"])
        except torch.OutOfMemoryError as exc:
            entry |= {"status": "out_of_memory", "reason": str(exc).splitlines()[0]}
        if entry["status"] == "measured":
            achieved = entry["dit_flops_per_step"] / entry["step_s"] / 1e12
            entry["dit_tflops"] = round(achieved, 2)
            sheet = result["peak_bf16_tflops"]["datasheet"]
            entry["fraction_of_bf16_peak"] = None if sheet is None else round(achieved / sheet, 4)
            rate = entry["per_steps"]["28"]["images_per_s"]
            print(f"{option:>18} {task:>13} {size:>4}² b{batch}: step {entry['step_s']:.4f} s, "
                  f"{rate:.3f} images/s at 28 steps", flush=True)  # fmt: skip
        result["configurations"].append(entry)
        write()
    result["load_average_end"] = Path("/proc/loadavg").read_text().split()[:3]
    write()
    plot(result, args.out / f"{name}.png")
    print(f"wrote {args.out / f'{name}.json'} and {name}.png")


def plot(result: dict[str, Any], path: Path) -> None:
    """images/s at 28 steps against batch, one line per option, one panel per size (generation, cfg 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [
        c for c in result["configurations"] if c["status"] == "measured" and c["task"] == "generate_cfg1"
    ]
    sizes = sorted({c["size"] for c in result["configurations"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for option in OPTIONS:
            points = sorted((c["batch"], c["per_steps"]["28"]["images_per_s"]) for c in measured
                            if c["option"] == option and c["size"] == size)  # fmt: skip
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=option)
        ax.set_title(f"generation, cfg 1, {size}², 28 steps ({result['preset']} preset)")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
