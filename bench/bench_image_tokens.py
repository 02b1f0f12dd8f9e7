"""Image-token stage: reference-style 81 KV-cache decode steps at batch 1 vs one forward.
See docs/model.md#reference-decoding, #one-pass-image-embeddings.

A "small" random Qwen2.5-VL (default hidden 256, 4 layers) with the tiny checkpoint's tokenizer. The
step-by-step baseline is timed next to transformers `generate` (greedy, KV cache, 81 tokens) to show it
is as fast as the reference's own loop. Reports median wall and CPU time of every path (interleaved
runs), the ratios at batch 1 and 8, the load, and the embedding differences.
Run: `python -m bench.bench_image_tokens [--threads 2]`.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import KEYS, base_parser, environment, setup, summarize, table, timed, write_result
from model.ar import ARStage, Encoded, generation_prompt
from model.config import GENERATION_PREFIXES, NUM_IMAGE_TOKENS

REFERENCE_MEDIAN_S = 0.20  # the reference's 81 steps at batch 1, this preset, a quiet machine of this kind
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
    """Reference-style at batch 1: prefill up to BOI, then 81 decode steps with a KV cache.
    See docs/model.md#reference-decoding.

    Step k feeds BOI (k = 0) or image_prefill_embeds[k-1] at its M-RoPE position, appends
    vision_head(h) and computes the logits like the reference does (their argmax is forced anyway).
    The reference runs one more step for IMG_80, whose output it drops; it is not counted here.
    """
    if len(enc.ids) != 1:
        raise ValueError("the reference path runs at batch size 1 only (docs/model.md#reference-limits)")
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


def generate_baseline(stage: ARStage, enc: Encoded, prefix: list[int]) -> Any:
    """transformers `generate`: greedy, KV cache, 81 new tokens after [prompt, prefix..BOI] at batch 1.

    The reference's own loop is a `generate` override; this is the speed its per-step machinery has.
    """
    ids = torch.tensor([enc.ids[0] + prefix], device=stage.device)
    return stage.c.ar.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NUM_IMAGE_TOKENS,
        min_new_tokens=NUM_IMAGE_TOKENS,
        do_sample=False,
        use_cache=True,
        pad_token_id=stage.ids["pad"],
    )


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=688)
    args = parser.parse_args()
    runs = args.runs or 9
    device, dtype = setup(args)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    stage = small_stage(device, dtype, args)
    tokenizer, boi = stage.c.tokenizer, stage.ids["boi"]
    prefix = tokenizer(GENERATION_PREFIXES["en"], add_special_tokens=False)["input_ids"] + [boi]
    encoded = [stage.encode([generation_prompt(p, "en")]) for p in PROMPTS]
    batch8 = stage.encode([generation_prompt(p, "en") for p in PROMPTS])
    one_pass = lambda enc: stage.image_embeddings(enc, [prefix] * len(enc.ids))  # noqa: E731
    full_pass = lambda enc: stage.image_embeddings(enc, [prefix] * len(enc.ids), reuse_head=False)  # noqa: E731
    stepwise = lambda enc: stepwise_image_embeddings(stage, enc, prefix)  # noqa: E731
    generate = lambda enc: generate_baseline(stage, enc, prefix)  # noqa: E731

    # 1. forward passes and equivalence at batch 1
    counter = ForwardCounter(stage.lm)
    passes_step, passes_one = (
        counter.measure(lambda: stepwise(encoded[0])),
        counter.measure(lambda: full_pass(encoded[0])),
    )
    ref, new = stepwise(encoded[0]).float(), one_pass(encoded[0]).float()
    max_abs = float((ref - new).abs().max())
    min_cos = float(torch.nn.functional.cosine_similarity(ref, new, dim=-1).min())
    b8_rows = one_pass(batch8).float()
    b8_max_abs = max(float((one_pass(e).float()[0] - b8_rows[i]).abs().max()) for i, e in enumerate(encoded))

    # 2. wall and CPU time, interleaved so that load drift hits every path alike (warm-up once each)
    paths: dict[str, Any] = {
        "generate": lambda i: generate(encoded[i]),
        "stepwise": lambda i: stepwise(encoded[i]),
        "full_pass": lambda i: full_pass(encoded[i]),
        "one_pass": lambda i: one_pass(encoded[i]),
        "one_pass_b8": lambda i: one_pass(batch8),
    }
    for fn in paths.values():
        fn(1)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for run in range(runs):
        for name, fn in paths.items():
            times[name].append(timed(lambda: fn(run % len(PROMPTS)), device)[:2])  # noqa: B023
    load_end = Path("/proc/loadavg").read_text().split()[:3]

    n = len(PROMPTS)
    stats = {name: summarize(t) for name, t in times.items()}
    per_step = {k: stats["stepwise"][k] / NUM_IMAGE_TOKENS for k in KEYS}
    gen_step = {k: stats["generate"][k] / NUM_IMAGE_TOKENS for k in KEYS}
    ratio_b1 = {k: stats["stepwise"][k] / stats["one_pass"][k] for k in KEYS}
    ratio_full = {k: stats["stepwise"][k] / stats["full_pass"][k] for k in KEYS}
    ratio_b8 = {k: n * stats["stepwise"][k] / stats["one_pass_b8"][k] for k in KEYS}
    vs_reference = {
        "batch_1": REFERENCE_MEDIAN_S / stats["one_pass"]["wall_median_s"],
        "batch_8": n * REFERENCE_MEDIAN_S / stats["one_pass_b8"]["wall_median_s"],
    }

    print(
        f"image-token stage, AR hidden {args.hidden}, {args.layers} layers, {device} ({dtype}), "
        f"{args.threads} threads, {runs} interleaved runs, load {' '.join(load_start)} -> "
        f"{' '.join(load_end)}"
    )
    ms = lambda d: [d[k] * 1e3 for k in KEYS]  # noqa: E731
    rows = [
        ["transformers generate, 81 steps (batch 1)", NUM_IMAGE_TOKENS + 1, *ms(stats["generate"])],
        ["  per step", "", *ms(gen_step)],
        ["reference step-by-step (batch 1)", passes_step, *ms(stats["stepwise"])],
        ["  per step", "", *ms(per_step)],
        ["one pass, whole prompt (batch 1)", passes_one, *ms(stats["full_pass"])],
        ["one pass, cached template head (batch 1)", passes_one, *ms(stats["one_pass"])],
        ["one pass, cached template head (batch 8)", passes_one, *ms(stats["one_pass_b8"])],
        ["ratio step-by-step / one pass, batch 1", "", *[f"{ratio_b1[k]:.1f}x" for k in KEYS]],
        ["  (whole prompt recomputed)", "", *[f"{ratio_full[k]:.1f}x" for k in KEYS]],
        ["ratio 8 x step-by-step / one pass, batch 8", "", *[f"{ratio_b8[k]:.1f}x" for k in KEYS]],
    ]
    print(table(rows, ["path", "forward passes", "median wall ms", "min wall ms", "median CPU ms"]))
    print(
        f"vs the reference's quiet-machine median ({REFERENCE_MEDIAN_S} s per sample): "
        f"batch 1 {vs_reference['batch_1']:.1f}x, batch 8 {vs_reference['batch_8']:.1f}x (our median wall)"
    )
    print(f"embeddings: max |step - one| = {max_abs:.3g}, min cosine = {min_cos:.6f}; ")
    print(f"batch 8 vs alone: max |diff| = {b8_max_abs:.3g}")
    print(
        "CPU = process CPU seconds over all threads (includes OpenMP spinning when threads wait for a core)"
    )
    write_result(
        "bench_image_tokens",
        {
            "config": {
                k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")
            },
            "runs": runs,
            "environment": environment(device),
            "load_average_start_end": [load_start, load_end],
            "dtype": str(dtype),
            "forward_passes": {"stepwise": passes_step, "one_pass": passes_one},
            **stats,
            "per_step": {"stepwise": per_step, "generate": gen_step},
            "ratio_batch_1": ratio_b1,
            "ratio_batch_1_whole_prompt": ratio_full,
            "ratio_batch_8": ratio_b8,
            "ratio_vs_reference_median": vs_reference,
            "embeddings_max_abs_diff": max_abs,
            "embeddings_min_cosine": min_cos,
            "batch_8_vs_alone_max_abs_diff": b8_max_abs,
        },
    )


if __name__ == "__main__":
    main()
