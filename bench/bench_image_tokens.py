"""Image-token stage: reference-style 81 KV-cache decode steps at batch 1 vs one forward (§2.3, §2.5).

A "small" random Qwen2.5-VL (default hidden 512, 6 layers) with the tiny checkpoint's tokenizer. Reports
forward passes and median wall time of both (interleaved runs), the largest difference between their
embeddings, and one-pass throughput at batch 1 vs batch 8. Run: `python -m bench.bench_image_tokens`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from bench.common import KEYS, base_parser, environment, setup, summarize, table, timed, write_result
from model.ar import ARStage, Encoded, generation_prompt
from model.config import GENERATION_PREFIXES, NUM_IMAGE_TOKENS

PROMPTS = [
    "a red cube on a wooden table",
    "a lighthouse on a cliff at dusk, oil painting",
    "two cats sleeping on a sofa",
    "a bowl of ramen with a soft-boiled egg, top view, studio light",
    "a snowy mountain village",
    "an astronaut riding a horse on the moon, photorealistic, wide angle, dramatic shadows",
    "a watercolor map of an island",
    "a bicycle leaning on a brick wall",
]


def small_stage(device: torch.device, dtype: torch.dtype, args: Any) -> ARStage:
    """ARStage over a random Qwen2.5-VL of the requested size (tokenizer and ids from the tiny checkpoint)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from bench.common import tiny_components

    base = tiny_components(device, dtype)
    config = copy.deepcopy(base.ar.config)
    text = config.text_config
    head_dim = args.hidden // args.heads
    if head_dim % 8:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 8 (M-RoPE sections)")
    text.hidden_size, text.num_hidden_layers = args.hidden, args.layers
    text.num_attention_heads, text.num_key_value_heads = args.heads, args.kv_heads
    text.intermediate_size = args.intermediate
    text.layer_types = ["full_attention"] * args.layers
    text.max_window_layers = args.layers
    half = head_dim // 2  # mrope_section sums to head_dim / 2, split 1/4 : 3/8 : 3/8 like (16, 24, 24)
    text.rope_parameters["mrope_section"] = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    config.vision_config.out_hidden_size = args.hidden
    torch.manual_seed(0)
    ar = Qwen2_5_VLForConditionalGeneration(config).to(device, dtype).eval().requires_grad_(False)
    components = dataclasses.replace(
        base,
        ar=ar,
        vision_head=nn.Linear(args.hidden, args.hidden, bias=False).to(device, dtype).requires_grad_(False),
        image_prefill_embeds=nn.Embedding(NUM_IMAGE_TOKENS, args.hidden)
        .to(device, dtype)
        .requires_grad_(False),
    )
    return ARStage(components, device)


@torch.no_grad()
def stepwise_image_embeddings(stage: ARStage, enc: Encoded, prefix: list[int]) -> torch.Tensor:
    """Reference-style (§2.3) at batch 1: prefill up to BOI, then 81 decode steps with a KV cache.

    Step k feeds BOI (k = 0) or image_prefill_embeds[k-1] at its M-RoPE position, appends
    vision_head(h) and computes the logits like the reference does (their argmax is forced anyway).
    The reference runs one more step for IMG_80, whose output it drops; it is not counted here.
    """
    if len(enc.ids) != 1:
        raise ValueError("the reference path runs at batch size 1 only (§7 #1)")
    seq = enc.ids[0] + prefix + [stage.ids["image_pad"]] * NUM_IMAGE_TOKENS
    embeds, mask, positions, _ = stage._batch(enc, [seq], generated_image=True)  # [1,L,D], [1,L], [3,1,L]
    boi = len(seq) - NUM_IMAGE_TOKENS - 1
    kw = getattr(stage, "_cache_kw", "past_key_values")  # "cache" in transformers >= 5.2x
    out = stage.lm(
        inputs_embeds=embeds[:, :boi],
        attention_mask=mask[:, :boi],
        position_ids=positions[:, :, :boi],
        use_cache=True,
    )
    cache, collected = getattr(out, kw), []
    for k in range(NUM_IMAGE_TOKENS):
        p = boi + k
        out = stage.lm(
            inputs_embeds=embeds[:, p : p + 1],
            attention_mask=mask[:, : p + 1],
            position_ids=positions[:, :, p : p + 1],
            use_cache=True,
            **{kw: cache},
        )
        cache, hidden = getattr(out, kw), out.last_hidden_state[:, -1]  # [1, D]
        collected.append(stage.c.vision_head(hidden))
        stage.c.ar.lm_head(hidden).argmax(-1)
    return torch.stack(collected, dim=1)  # [1, 81, D]


class ForwardCounter:
    """Counts calls of the language model's forward."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, _module: nn.Module, _args: Any) -> None:
        self.calls += 1

    def measure(self, fn: Any) -> int:
        before = self.calls
        fn()
        return self.calls - before


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1376)
    args = parser.parse_args()
    runs = args.runs or 9
    device, dtype = setup(args)
    stage = small_stage(device, dtype, args)
    tokenizer, boi = stage.c.tokenizer, stage.ids["boi"]
    prefix = tokenizer(GENERATION_PREFIXES["en"], add_special_tokens=False)["input_ids"] + [boi]
    encoded = [stage.encode([generation_prompt(p, "en")]) for p in PROMPTS]
    batch8 = stage.encode([generation_prompt(p, "en") for p in PROMPTS])
    one_pass = lambda enc: stage.image_embeddings(enc, [prefix] * len(enc.ids))  # noqa: E731
    stepwise = lambda enc: stepwise_image_embeddings(stage, enc, prefix)  # noqa: E731

    # 1. forward passes and equivalence at batch 1
    counter = ForwardCounter(stage.lm)
    passes_step, passes_one = (
        counter.measure(lambda: stepwise(encoded[0])),
        counter.measure(lambda: one_pass(encoded[0])),
    )
    ref, new = stepwise(encoded[0]).float(), one_pass(encoded[0]).float()
    max_abs = float((ref - new).abs().max())
    min_cos = float(torch.nn.functional.cosine_similarity(ref, new, dim=-1).min())

    # 2. wall and CPU time, interleaved (warm-up once each)
    step_t: list[tuple[float, float]] = []
    one_t: list[tuple[float, float]] = []
    stepwise(encoded[1]), one_pass(encoded[1])
    for i in range(runs):
        enc = encoded[i % len(encoded)]
        step_t.append(timed(lambda: stepwise(enc), device)[:2])  # noqa: B023
        one_t.append(timed(lambda: one_pass(enc), device)[:2])  # noqa: B023

    # 3. one-pass throughput: 8 samples one at a time vs one batch of 8, interleaved
    b1_t: list[tuple[float, float]] = []
    b8_t: list[tuple[float, float]] = []
    one_pass(batch8)
    for _ in range(max(3, runs // 3)):
        b1_t.append(timed(lambda: [one_pass(e) for e in encoded], device)[:2])
        b8_t.append(timed(lambda: one_pass(batch8), device)[:2])

    n = len(PROMPTS)
    stats = {name: summarize(t) for name, t in (("step", step_t), ("one", one_t), ("b1", b1_t), ("b8", b8_t))}
    speedup = {k: stats["step"][k] / stats["one"][k] for k in ("wall_median_s", "wall_min_s", "cpu_median_s")}
    rate = {
        k: {b: n / stats[b][k] for b in ("b1", "b8")} for k in ("wall_median_s", "wall_min_s", "cpu_median_s")
    }

    print(
        f"image-token stage, AR hidden {args.hidden}, {args.layers} layers, {device} ({dtype}), {runs} runs"
    )
    rows = [
        ["reference step-by-step (batch 1)", passes_step, *[stats["step"][k] * 1e3 for k in KEYS]],
        ["one pass (batch 1)", passes_one, *[stats["one"][k] * 1e3 for k in KEYS]],
        ["speed-up", f"{passes_step / passes_one:.0f}x", *[f"{speedup[k]:.2f}x" for k in KEYS]],
    ]
    print(table(rows, ["path", "forward passes", "median wall ms", "min wall ms", "median CPU ms"]))
    print(f"embeddings: max |step - one| = {max_abs:.3g}, min cosine = {min_cos:.6f}")
    rows = [[b, *[rate[k][key] for k in KEYS]] for b, key in ((1, "b1"), (8, "b8"))]
    rows.append(["8 vs 1", *[f"{rate[k]['b8'] / rate[k]['b1']:.2f}x" for k in KEYS]])
    print(table(rows, ["batch", "samples/s (median wall)", "(min wall)", "per CPU-s (median)"]))
    print("CPU = process CPU seconds over all threads: the work, independent of other processes' load")
    write_result(
        "bench_image_tokens",
        {
            "config": {
                k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")
            },
            "runs": runs,
            "environment": environment(device),
            "dtype": str(dtype),
            "forward_passes": {"stepwise": passes_step, "one_pass": passes_one},
            "stepwise": stats["step"],
            "one_pass": stats["one"],
            "speedup_one_pass_vs_stepwise": speedup,
            "embeddings_max_abs_diff": max_abs,
            "embeddings_min_cosine": min_cos,
            "one_pass_throughput_samples_per_s": {
                k: {"batch_1": r["b1"], "batch_8": r["b8"], "ratio_8_vs_1": r["b8"] / r["b1"]}
                for k, r in rate.items()
            },
            "one_pass_times": {"batch_1_x8": stats["b1"], "batch_8": stats["b8"]},
        },
    )


if __name__ == "__main__":
    main()
