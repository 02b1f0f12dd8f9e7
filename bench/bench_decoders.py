"""Decoder throughput (DiT flow loop + VAE decode) at batch 1, 4 and 8 on a small random FLUX DiT.

The DiT (default 8 heads x 64, 2 double + 4 single blocks) is built at that size with random weights; the
VAE is the tiny checkpoint's (16 latent channels). Conditioning is random [B, 81, J] with cfg 1, as the
generation decoder feeds it. Run: `python -m bench.bench_decoders`.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.common import (
    KEYS,
    base_parser,
    environment,
    setup,
    summarize,
    table,
    timed,
    tiny_components,
    write_result,
)
from model.config import NUM_IMAGE_TOKENS, flux_dit_config
from model.decoders import Conditioning, DenoiseJob, denoise, vae_decode, vae_scale_factor

BATCHES = (1, 4, 8)


def small_dit(device: torch.device, dtype: torch.dtype, args: Any, channels: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    dit = FluxTransformer2DModel(
        **flux_dit_config(
            head_dim=args.head_dim,
            heads=args.heads,
            layers=args.layers,
            single_layers=args.single_layers,
            joint_dim=args.joint_dim,
            pooled_dim=args.joint_dim,
            in_channels=channels * 4,
        )
    )
    return dit.to(device, dtype).eval().requires_grad_(False)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="output width = height")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--single-layers", type=int, default=4)
    parser.add_argument("--joint-dim", type=int, default=256)
    args = parser.parse_args()
    runs = args.runs or 3
    device, dtype = setup(args)
    vae = tiny_components(device, dtype).vae
    channels, scale = vae.config.latent_channels, vae_scale_factor(vae)
    dit = small_dit(device, dtype, args, channels)

    def job(batch: int) -> DenoiseJob:
        gen = torch.Generator().manual_seed(batch)
        cond = Conditioning(
            torch.randn(batch, NUM_IMAGE_TOKENS, args.joint_dim, generator=gen),
            torch.zeros(NUM_IMAGE_TOKENS, 3),
            torch.randn(batch, args.joint_dim, generator=gen),
        )
        return DenoiseJob(
            list(range(batch)), list(range(batch)), cond, None, args.size, args.size, args.steps, 1.0, 3.5
        )

    def run(batch: int) -> tuple[float, float, float, float]:
        """(DiT wall, DiT CPU, VAE wall, VAE CPU) seconds of one bucket."""
        dit_wall, dit_cpu, (latents, _) = timed(
            lambda: denoise(dit, job(batch), scale, channels, device), device
        )
        vae_wall, vae_cpu, images = timed(lambda: vae_decode(vae, latents, device), device)
        assert len(images) == batch and images[0].size == (args.size, args.size)
        return dit_wall, dit_cpu, vae_wall, vae_cpu

    run(1)  # warm-up
    times: dict[int, list[tuple[float, float, float, float]]] = {b: [] for b in BATCHES}
    for _ in range(runs):  # interleaved, so drift hits every batch size alike
        for batch in BATCHES:
            times[batch].append(run(batch))

    figures: dict[int, dict[str, Any]] = {}
    for batch in BATCHES:
        total = summarize([(t[0] + t[2], t[1] + t[3]) for t in times[batch]])
        figures[batch] = {
            "dit": summarize([(t[0], t[1]) for t in times[batch]]),
            "vae": summarize([(t[2], t[3]) for t in times[batch]]),
            "total": total,
            "images_per_s": {k: batch / total[k] for k in KEYS},
        }
    for batch in BATCHES:
        figures[batch]["ratio_vs_batch_1"] = {
            k: figures[batch]["images_per_s"][k] / figures[1]["images_per_s"][k] for k in KEYS
        }

    print(
        f"decoders: DiT {args.heads}x{args.head_dim}, {args.layers}+{args.single_layers} blocks, "
        f"{args.size}², {args.steps} steps, {device} ({dtype}), {runs} runs"
    )
    rows = []
    for b, f in figures.items():
        rates = [f"{f['images_per_s'][k]:.3g} ({f['ratio_vs_batch_1'][k]:.2f}x)" for k in KEYS]
        rows.append([b, f["dit"]["wall_median_s"], f["vae"]["wall_median_s"], *rates])
    header = ["batch", "DiT loop s", "VAE s", "images/s median wall", "min wall", "per CPU-s (median)"]
    print(table(rows, header))
    print("(x: vs batch 1; CPU = process CPU seconds over all threads, independent of other processes' load)")
    write_result(
        "bench_decoders",
        {
            "config": {
                k: getattr(args, k)
                for k in ("size", "steps", "heads", "head_dim", "layers", "single_layers", "joint_dim")
            },
            "runs": runs,
            "environment": environment(device),
            "dtype": str(dtype),
            "batches": {str(b): f for b, f in figures.items()},
        },
    )


if __name__ == "__main__":
    main()
