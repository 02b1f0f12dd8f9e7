"""Speed options and the step cache on the tiny checkpoint (CPU, fp32): each against the plain path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from model import GenerateRequest, NexusGen
from model.decoders import Conditioning, DenoiseJob, denoise, dit_velocity, flow_sigmas, image_ids
from model.pipeline import bucket_of
from model.speed import FP8_ERROR, SpeedOptions, check_options, compile_regional
from model.step_cache import StepCache

STEPS = 8


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> NexusGen:
    torch.set_num_threads(1)
    return NexusGen.from_pretrained(str(tiny_dir), device="cpu", prefix_mode="forced")


def pixels(result) -> np.ndarray:  # type: ignore[no-untyped-def]
    assert result.error is None, result.error
    return np.asarray(result.image).astype(int)


# ---- option checks --------------------------------------------------------------------------------------
def test_fp8_is_refused_on_cpu_with_a_clear_error(tiny_dir: Path) -> None:
    with pytest.raises(
        ValueError, match=r"fp8 DiTs need a CUDA GPU with fp8 tensor cores.*the device is cpu"
    ):
        NexusGen.from_pretrained(str(tiny_dir), device="cpu", dit_precision="fp8")


def test_the_worker_refuses_fp8_on_cpu_at_start() -> None:
    from core.settings import Settings
    from worker.execute import check_speed_options

    with pytest.raises(ValueError, match=re.escape(FP8_ERROR)):
        check_speed_options(Settings.from_env({"NEXUSGEN_DIT_PRECISION": "fp8"}))
    check_speed_options(Settings.from_env({"NEXUSGEN_COMPILE": "regional", "NEXUSGEN_OFFLOAD": "group"}))


def test_unknown_option_values_are_refused() -> None:
    from core.settings import Settings

    with pytest.raises(ValueError, match="compile must be one of"):
        SpeedOptions(compile="max")
    for name in ("NEXUSGEN_COMPILE", "NEXUSGEN_DIT_PRECISION", "NEXUSGEN_OFFLOAD"):
        with pytest.raises(ValueError, match=name):
            Settings.from_env({name: "fastest"})
    settings = Settings.from_env({"NEXUSGEN_OFFLOAD": "model", "NEXUSGEN_COMPILE": "regional"})
    assert (settings.offload, settings.compile, settings.dit_precision) == ("model", "regional", "bf16")
    assert Settings.from_env(settings.to_env()) == settings
    with pytest.raises(ValueError, match="torch engine only"):
        check_options(SpeedOptions(offload="model"), "cpu", "deepspeed")


# ---- offload --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["model", "group"])
def test_offload_gives_the_same_image_through_the_library_hooks(
    pipe: NexusGen, tiny_dir: Path, mode: str
) -> None:
    request = GenerateRequest("a red cube", width=64, height=64, steps=2, cfg_scale=2.0, seed=5)
    offloaded = NexusGen.from_pretrained(str(tiny_dir), device="cpu", prefix_mode="forced", offload=mode)
    c = offloaded.components
    if mode == "model":  # accelerate's CpuOffload hook on each big module, chained in call order
        assert all(hasattr(getattr(c, name), "_hf_hook") for name in ("ar", "gen_dit", "vae", "t5"))
        assert len(offloaded.offload_hooks or []) == 6
    else:  # diffusers' group-offloading hooks on the leaf layers
        assert hasattr(c.ar.model.language_model.layers[0].mlp.up_proj, "_diffusers_hook")
        assert hasattr(c.gen_dit.transformer_blocks[0].attn.to_q, "_diffusers_hook")
    result = offloaded.generate([request])[0]
    assert np.array_equal(pixels(result), pixels(pipe.generate([request])[0]))
    assert result.provenance["speed_options"]["offload"] == mode


# ---- regional compile -----------------------------------------------------------------------------------
@pytest.mark.slow  # inductor compiles C++ for each block class: about 80 CPU-seconds
def test_regional_compile_matches_eager_within_1e_4(tiny_dir: Path) -> None:
    """torch.compile of the DiT blocks and AR layers (one block class each) vs eager, same inputs."""
    torch.set_num_threads(1)
    pipe = NexusGen.from_pretrained(str(tiny_dir), device="cpu", prefix_mode="forced")
    prompts = [GenerateRequest("a cat", width=64, height=64, steps=2, cfg_scale=1.0, seed=s) for s in (1, 2)]

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        from model.ar import generation_prompt
        from model.config import GENERATION_PREFIXES

        ar_prompts = [generation_prompt(r.prompt, "en") for r in prompts]
        enc, prefixes, _ = pipe._prefixes(ar_prompts, [GENERATION_PREFIXES["en"]] * 2)
        embeds = pipe.ar.image_embeddings(enc, prefixes)
        positive, _ = pipe.gen_decoder.conditioning(embeds, 1.0, [])
        job = DenoiseJob([0, 1], [1, 2], positive, None, 64, 64, 2, 1.0, 3.5)
        latents, _ = denoise(pipe.components.gen_dit, job, 8, 16, torch.device("cpu"))
        return embeds, latents

    eager = run()
    compile_regional(pipe.components)
    assert hasattr(pipe.components.gen_dit.transformer_blocks[0], "_compiled_call_impl")
    compiled = run()
    for ref, out in zip(eager, compiled, strict=True):
        assert (out - ref).abs().max().item() <= 1e-4


# ---- step cache ----------------------------------------------------------------------------------------
def _dit_inputs(pipe: NexusGen, batch: int, seed: int = 0):  # type: ignore[no-untyped-def]
    dit = pipe.components.gen_dit
    gen = torch.Generator().manual_seed(seed)
    cond = Conditioning(
        torch.randn(batch, 81, dit.config.joint_attention_dim, generator=gen),
        torch.zeros(81, 3),
        torch.randn(batch, dit.config.pooled_projection_dim, generator=gen),
    )
    packed = torch.randn(batch, 16, dit.config.in_channels, generator=gen)
    return dit, packed, cond, torch.full((batch,), 3.5), image_ids(8, 8)


def test_step_cache_with_threshold_0_is_bit_identical_to_the_plain_dit(pipe: NexusGen) -> None:
    dit, packed, cond, guidance, ids = _dit_inputs(pipe, 2)
    cache = StepCache(0.0, STEPS, 2)
    for sigma in flow_sigmas(STEPS)[:3]:
        plain = dit_velocity(dit, packed, cond, sigma, guidance, ids)
        cached = dit_velocity(dit, packed, cond, sigma, guidance, ids, cache)
        assert torch.equal(plain, cached)
    assert cache.blocks_skipped == 0 and cache.block_evaluations == 3 * 2 * 2  # steps x rows x blocks
    request = GenerateRequest("a cat", width=64, height=64, steps=3, cfg_scale=1.0, seed=3)
    off, zero = pipe.generate(
        [request, GenerateRequest("a cat", 64, 64, 3, 1.0, seed=3, cache_threshold=0.0)]
    )
    assert np.array_equal(pixels(off), pixels(zero)) and "step_cache" not in off.provenance


class BlockCounter:
    """Rows pushed through each DiT block (a block called on k rows counts k evaluations)."""

    def __init__(self, dit: torch.nn.Module) -> None:
        self.rows = 0
        self.handles = [
            block.register_forward_pre_hook(self._count, with_kwargs=True)
            for block in (*dit.transformer_blocks, *dit.single_transformer_blocks)
        ]

    def _count(self, _module, _args, kwargs) -> None:  # type: ignore[no-untyped-def]
        self.rows += kwargs["hidden_states"].shape[0]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# The tolerance of the cached image against the uncached one on the tiny checkpoint (random weights,
# 8 steps, 64², threshold 0.6: 5 of 8 steps skipped): mean |pixel difference| <= 2 of 255 levels
# (measured 0.37).
CACHE_MEAN_PIXEL_TOLERANCE = 2.0


def test_step_cache_skips_a_counted_number_of_block_evaluations_within_tolerance(pipe: NexusGen) -> None:
    dit = pipe.components.gen_dit
    n_blocks = len(dit.transformer_blocks) + len(dit.single_transformer_blocks)
    requests = [
        GenerateRequest("a red cube", 64, 64, STEPS, 1.0, seed=s, cache_threshold=0.6) for s in (1, 2)
    ]
    counter = BlockCounter(dit)
    try:
        cached = pipe.generate(requests)
    finally:
        counter.remove()
    stats = cached[0].provenance["step_cache"]
    skipped = [r.provenance["step_cache"]["skipped_steps"] for r in cached]
    full = 2 * STEPS * n_blocks  # rows x steps x blocks without the cache
    assert sum(skipped) > 0 and all(s <= STEPS - 2 for s in skipped)  # first and last steps always run
    assert stats["batch_blocks_skipped"] == sum(skipped) * n_blocks
    assert counter.rows == stats["batch_block_evaluations"] == full - sum(skipped) * n_blocks
    plain = pipe.generate([GenerateRequest("a red cube", 64, 64, STEPS, 1.0, seed=s) for s in (1, 2)])
    for a, b in zip(cached, plain, strict=True):
        diff = np.abs(pixels(a) - pixels(b)).mean()
        assert diff <= CACHE_MEAN_PIXEL_TOLERANCE, diff
    print(f"step cache 0.6: skipped steps {skipped} of {STEPS}; mean |pixel diff| vs uncached", diff)


def test_step_cache_decides_per_request_not_per_batch(pipe: NexusGen) -> None:
    request = GenerateRequest("a red cube", 64, 64, STEPS, 1.0, seed=1, cache_threshold=0.6)
    alone = pipe.generate([request])[0]
    mates = [GenerateRequest(f"a scene number {k} with many details", 64, 64, STEPS, 1.0, seed=9 + k,
                             cache_threshold=0.6) for k in range(2)]  # fmt: skip
    batched = pipe.generate([*mates, request])[2]
    assert (
        batched.provenance["step_cache"]["skipped_steps"] == alone.provenance["step_cache"]["skipped_steps"]
    )
    assert np.abs(pixels(alone) - pixels(batched)).max() <= 1


def test_cache_threshold_joins_the_bucket_and_is_bounded() -> None:
    from core.jobs import bucket_key
    from core.submit import SubmitError, normalize_params
    from model import validate_request

    a, b = GenerateRequest("x"), GenerateRequest("x", cache_threshold=0.4)
    assert bucket_of(a) != bucket_of(b)
    params = normalize_params("generate", {"cache_threshold": 0.4, "seed": 1})
    assert bucket_key("generate", params).endswith("|cache0.4")
    assert "cache" not in bucket_key("generate", normalize_params("generate", {"seed": 1}))
    with pytest.raises(SubmitError, match="cache_threshold must be a number from 0 to 1"):
        normalize_params("edit", {"cache_threshold": 1.5})
    with pytest.raises(ValueError, match="cache_threshold"):
        validate_request(GenerateRequest("x", cache_threshold=-0.1))
    with pytest.raises(ValueError, match="cache threshold"):
        NexusGen.__new__(NexusGen)._check([a, b], GenerateRequest)


def test_canceling_a_row_mid_loop_keeps_the_cache_aligned(pipe: NexusGen) -> None:
    dit, _, cond, _, _ = _dit_inputs(pipe, 3)
    job = DenoiseJob([0, 1, 2], [1, 2, 3], cond, None, 64, 64, STEPS, 1.0, 3.5, cache_threshold=0.6)
    steps_seen: dict[int, int] = {}
    latents, kept = denoise(
        dit, job, 8, 16, torch.device("cpu"),
        on_step=lambda i, s, n: steps_seen.__setitem__(i, s),
        should_cancel=lambda i: i == 1 and steps_seen.get(1, 0) >= 3,
    )  # fmt: skip
    assert kept == [0, 2] and latents.shape[0] == 2 and steps_seen[0] == STEPS
    assert set(job.stats["skipped_steps"]) == {0, 1, 2}
