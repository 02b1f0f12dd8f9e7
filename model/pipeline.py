"""`NexusGen`: batched generate / edit / understand over the loaded stack; one call = one bucket."""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import torch
from PIL import Image

from model.ar import (
    ARPrompt,
    ARStage,
    Encoded,
    editing_prompt,
    generation_prompt,
    smart_resize,
    understanding_prompt,
)
from model.components import Components
from model.config import EDIT_PREFIXES, GENERATION_PREFIXES, SIZE_MULTIPLE, SPECIAL_TOKENS
from model.decoders import (
    DenoiseJob,
    EditingDecoder,
    GenerationDecoder,
    TextEncoders,
    denoise,
    vae_decode,
    vae_scale_factor,
)
from model.engine import ENGINES
from model.requests import (
    DECODERS,
    LANGUAGES,
    MAX_CACHE_THRESHOLD,
    MAX_PROMPT_CHARS,
    MAX_SCALE,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MAX_UNDERSTAND_TOKENS,
    MIN_SIZE,
    TASKS,
    CancelCallback,
    EditRequest,
    GenerateRequest,
    ProgressCallback,
    Request,
    RequestError,
    Result,
    UnderstandRequest,
)
from model.speed import SpeedOptions, release

log = logging.getLogger(__name__)

PREFIX_MODES = ("natural", "forced")
# what each decoder path needs beyond the AR and its ViT (model.plan component names)
DECODER_NEEDS = {
    "generation": ("ar_heads", "gen_dit", "adapter", "vae", "clip", "t5"),
    "edit": ("ar_heads", "edit_dit", "merger", "vae", "clip", "t5"),
}
SPECIAL_TOKEN_TEXT = re.compile(r"<\|[A-Za-z_]+\|>")


def validate_request(req: Request) -> None:
    """Raise ValueError naming the first invalid field of a request; the model never fixes input silently.

    Limits (model/requests.py): non-empty text of at most 4000 characters without `<|...|>` special-token
    markup; width and height multiples of 16 in 64..2048; steps 1..100; cfg_scale 1..30; guidance 0..30;
    cache_threshold 0..1; seed 0..2**63-1; language en|zh; decoder edit|generation; images non-empty,
    decodable, aspect ratio at most 200; understanding max_new_tokens 1..4096.
    """
    text = req.prompt if isinstance(req, GenerateRequest) else getattr(req, "instruction", None)
    name = "prompt" if isinstance(req, GenerateRequest) else "instruction"
    if not isinstance(req, GenerateRequest | EditRequest | UnderstandRequest):
        raise ValueError(f"unknown request type {type(req).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is longer than {MAX_PROMPT_CHARS} characters")
    if markup := SPECIAL_TOKEN_TEXT.search(text):
        raise ValueError(f"{name} must not contain special-token markup like {markup[0]}")
    if isinstance(req, EditRequest | UnderstandRequest):
        _validate_image(req.image)
    if isinstance(req, UnderstandRequest):
        if not 1 <= req.max_new_tokens <= MAX_UNDERSTAND_TOKENS:
            raise ValueError(
                f"max_new_tokens must be in 1..{MAX_UNDERSTAND_TOKENS}, got {req.max_new_tokens}"
            )
        return
    for field, value in (("width", req.width), ("height", req.height)):
        if not isinstance(value, int) or not MIN_SIZE <= value <= MAX_SIZE or value % SIZE_MULTIPLE:
            raise ValueError(
                f"{field} must be a multiple of {SIZE_MULTIPLE} in {MIN_SIZE}..{MAX_SIZE}, got {value}"
            )
    if not isinstance(req.steps, int) or not 1 <= req.steps <= MAX_STEPS:
        raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {req.steps}")
    for field, number in (
        ("cfg_scale", req.cfg_scale),
        ("guidance", req.guidance),
        ("cache_threshold", req.cache_threshold),
    ):
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ValueError(f"{field} must be a number, got {number!r}")
    if not 1.0 <= req.cfg_scale <= MAX_SCALE:
        raise ValueError(f"cfg_scale must be in 1..{MAX_SCALE}, got {req.cfg_scale}")
    if not 0.0 <= req.guidance <= MAX_SCALE:
        raise ValueError(f"guidance must be in 0..{MAX_SCALE}, got {req.guidance}")
    if not 0.0 <= req.cache_threshold <= MAX_CACHE_THRESHOLD:
        raise ValueError(f"cache_threshold must be in 0..{MAX_CACHE_THRESHOLD}, got {req.cache_threshold}")
    if req.seed is not None and not (isinstance(req.seed, int) and 0 <= req.seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer in 0..{MAX_SEED}, got {req.seed!r}")
    if req.language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {req.language!r}")
    if isinstance(req, EditRequest) and req.decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {req.decoder!r}")
    if SPECIAL_TOKEN_TEXT.search(req.negative_prompt):
        raise ValueError("negative_prompt must not contain special-token markup")


def _validate_image(image: Any) -> None:
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has zero size ({image.width}x{image.height})")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"image is corrupt or truncated: {exc}") from exc
    smart_resize(image.height, image.width)  # raises on an extreme aspect ratio


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DTYPES |= {"fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """A torch dtype from a name ("bf16", "bfloat16", "fp32", ...); None: bf16 on cuda, fp32 on cpu."""
    if dtype is None or dtype == "":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype.removeprefix("torch.") not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype.removeprefix("torch.")]


def bucket_of(req: GenerateRequest | EditRequest) -> tuple[Any, ...]:
    """Requests sharing this key run as one batch: size, steps, cfg, guidance, decoder, cache threshold."""
    decoder = req.decoder if isinstance(req, EditRequest) else "generation"
    return (
        req.width,
        req.height,
        req.steps,
        float(req.cfg_scale),
        float(req.guidance),
        decoder,
        float(req.cache_threshold),
    )


class NexusGen:
    """The Nexus-Gen V2 stack; one call = one bucket, results in request order.

    A request's output does not depend on its batch mates: its noise comes from its own seeded generator
    and its AR positions from its own unpadded sequence. Batch shape changes only float rounding (GEMM
    blocking, padded attention), which can move a few pixels by one LSB.
    """

    def __init__(
        self,
        components: Components,
        device: str | torch.device = "cpu",
        prefix_mode: str = "natural",
        engine: str = "torch",
        max_prefix_tokens: int = 1024,
        options: SpeedOptions | None = None,
        offload_hooks: list[Any] | None = None,
        resident_text_encoders: bool = False,
    ) -> None:
        if prefix_mode not in PREFIX_MODES:
            raise ValueError(f"prefix_mode must be one of {PREFIX_MODES}, got {prefix_mode!r}")
        self.components = components
        self.device = torch.device(device)
        self.dtype = components.dtype
        self.prefix_mode, self.engine = prefix_mode, engine
        self.options = options or SpeedOptions()
        self.offload_hooks = offload_hooks
        self.max_prefix_tokens = max_prefix_tokens
        self.checkpoint_hash = components.checkpoint_hash
        self.loaded = components.loaded()
        self.tp_size = 1
        if engine == "deepspeed":
            from model.engine import tensor_parallel_world

            self.tp_size = tensor_parallel_world()[1]
        self.ar = ARStage(components, self.device)
        # module offloading moves the encoders itself; otherwise "" is encoded now and they leave the device
        offloaded = self.options.offload != "none"
        self.text = TextEncoders(components, self.device, resident=resident_text_encoders or offloaded)
        self.gen_decoder = GenerationDecoder(components, self.text)
        self.edit_decoder = EditingDecoder(components, self.text, self.ar.vit_features)
        self._compiled_buckets: set[tuple[Any, ...]] = set()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        engine: str = "torch",
        prefix_mode: str = "natural",
        max_prefix_tokens: int = 1024,
        compile: str = "off",  # noqa: A002 - the public option name (NEXUSGEN_COMPILE)
        dit_precision: str = "bf16",
        offload: str = "none",
        tasks: Sequence[str] = TASKS,
        edit_decoders: Sequence[str] = DECODERS,
        resident_text_encoders: bool = False,
    ) -> NexusGen:
        """Load a checkpoint in the official layout (bf16 on cuda, fp32 on cpu unless dtype is given).

        `compile`, `dit_precision` and `offload` are the speed options (`model.speed`); an option the
        device cannot serve (fp8 on CPU) is refused here, before any weight is read. Only what `tasks`
        need is loaded (model.plan.components_for); the generation DiT serves edits only when
        `edit_decoders` includes "generation". CLIP and T5 encode "" once at load and then wait in host
        memory for a non-empty negative prompt, unless `resident_text_encoders`.
        """
        from model.checkpoint import load_components
        from model.plan import components_for
        from model.speed import apply_speed_options, check_options

        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if prefix_mode not in PREFIX_MODES:
            raise ValueError(f"prefix_mode must be one of {PREFIX_MODES}, got {prefix_mode!r}")
        options = SpeedOptions(compile=compile, dit_precision=dit_precision, offload=offload)
        check_options(options, device, engine)
        dtype = parse_dtype(dtype, device)
        parts = components_for(tasks, edit_decoders)
        offloaded = options.offload != "none"
        components = load_components(path, "cpu" if offloaded else device, dtype, parts)
        if offloaded:  # the small heads live on the device; the offload hooks move the big modules
            heads = (components.vision_head, components.image_prefill_embeds, components.adapter)
            for head in (*heads, components.merger):
                if head is not None:
                    head.to(device)
        if engine != "torch":
            from model.engine import apply_engine

            components = apply_engine(components, engine, device)
        hooks = apply_speed_options(components, options, device)
        return cls(
            components, device, prefix_mode, engine, max_prefix_tokens, options, hooks,
            resident_text_encoders=resident_text_encoders,
        )  # fmt: skip

    # ---- public calls ----------------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[GenerateRequest],
        progress: ProgressCallback | None = None,
        should_cancel: CancelCallback | None = None,
    ) -> list[Result]:
        """Text-to-image for one bucket of requests."""
        prompts = [generation_prompt(r.prompt, r.language) for r in self._check(requests, GenerateRequest)]
        prefixes = [GENERATION_PREFIXES[r.language] for r in requests]
        try:
            return self._images("generate", requests, prompts, prefixes, progress, should_cancel)
        finally:
            release(self.offload_hooks)

    def edit(
        self,
        requests: Sequence[EditRequest],
        progress: ProgressCallback | None = None,
        should_cancel: CancelCallback | None = None,
    ) -> list[Result]:
        """Image editing for one bucket of requests (decoder "edit" or "generation")."""
        prompts = [editing_prompt(r.instruction, r.image) for r in self._check(requests, EditRequest)]
        prefixes = [EDIT_PREFIXES[r.language] for r in requests]
        try:
            return self._images("edit", requests, prompts, prefixes, progress, should_cancel)
        finally:
            release(self.offload_hooks)

    def understand(
        self,
        requests: Sequence[UnderstandRequest],
        progress: ProgressCallback | None = None,
        should_cancel: CancelCallback | None = None,
    ) -> list[Result]:
        """Free text about an image: batched greedy decoding, special tokens skipped."""
        if not requests:
            raise ValueError("no requests")
        for req in requests:
            if not isinstance(req, UnderstandRequest):
                raise ValueError(f"understand() takes UnderstandRequest, got {type(req).__name__}")
            validate_request(req)
        results = [Result() for _ in requests]
        live = [i for i in range(len(requests)) if not (should_cancel and should_cancel(i))]
        for i in set(range(len(requests))) - set(live):
            results[i].error = RequestError("canceled", "canceled before it started")
        if not live:
            return results
        for i in live:
            _notify(progress, i, "encoding")
        timings: dict[str, float] = {}
        with _timer(timings, "ar_decode_s", self.device):
            enc = self.ar.encode(
                [understanding_prompt(requests[i].instruction, requests[i].image) for i in live]
            )
            stop = {self.ar.ids["eos"], self.ar.ids["pad"], self.ar.ids["im_end"]}
            try:
                decoded = self.ar.greedy(enc, [requests[i].max_new_tokens for i in live], set(), stop)
            finally:
                release(self.offload_hooks)
        for k, (i, out) in enumerate(zip(live, decoded, strict=True)):
            results[i].text = self.components.tokenizer.decode(out.tokens, skip_special_tokens=True)
            results[i].provenance = self._provenance(
                requests[i], len(live), timings, task="understand", new_tokens=len(out.tokens),
                input_tokens=len(enc.ids[k]), output_tokens=len(out.tokens),
            )  # fmt: skip
        return results

    # ---- the image path --------------------------------------------------------------------------------
    def _check(self, requests: Sequence[Any], kind: type) -> Sequence[Any]:
        if not requests:
            raise ValueError("no requests")
        for req in requests:
            if not isinstance(req, kind):
                raise ValueError(f"expected {kind.__name__}, got {type(req).__name__}")
            validate_request(req)
        buckets = {bucket_of(r) for r in requests}
        if len(buckets) > 1:
            raise ValueError(
                f"requests of one call must share size, steps, cfg, guidance, decoder and cache threshold: "
                f"{buckets}"
            )
        return requests

    def _images(
        self,
        task: str,
        requests: Sequence[GenerateRequest | EditRequest],
        prompts: list[ARPrompt],
        forced_prefixes: list[str],
        progress: ProgressCallback | None,
        should_cancel: CancelCallback | None,
    ) -> list[Result]:
        """Steps 1 (the AR prefix) here, 2 to 5 in `_render`, then each request's provenance."""
        first = requests[0]
        decoder = first.decoder if isinstance(first, EditRequest) else "generation"
        if missing := [c for c in DECODER_NEEDS[decoder] if c not in self.loaded]:
            message = (
                f"this worker did not load the {decoder} decoder ({', '.join(missing)} missing); "
                "send the job to a worker whose NEXUSGEN_TASKS include it"
            )
            return [Result(error=RequestError("task_not_loaded", message)) for _ in requests]
        seeds = [r.seed if r.seed is not None else secrets.randbelow(2**32) for r in requests]
        results = [Result() for _ in requests]
        timings: dict[str, float] = {}
        for i in range(len(requests)):
            _notify(progress, i, "encoding")

        # 1. AR: prompts, text prefix up to BOI (a request without BOI fails alone)
        with _timer(timings, "ar_prefix_s", self.device):
            enc, prefixes, prefix_texts = self._prefixes(prompts, forced_prefixes)
        ok = [i for i, p in enumerate(prefixes) if p is not None]
        for i in sorted(set(range(len(requests))) - set(ok)):
            results[i].error = RequestError(
                "no_image_token",
                f"no image token in {self.max_prefix_tokens} tokens (the model wrote {prefix_texts[i]!r})",
            )
        image_tokens, cache_stats = 0, {}
        if ok:
            image_tokens, cache_stats = self._render(
                decoder, requests, ok, enc, prefixes, seeds, results, timings, progress, should_cancel
            )
        for i, req in enumerate(requests):
            written = len(prefixes[i] or []) + (image_tokens if prefixes[i] is not None else 0)
            results[i].provenance = self._provenance(
                req, len(requests), timings, task=task, seed=seeds[i], decoder=decoder,
                prefix_mode=self.prefix_mode, prefix_text=prefix_texts[i],
                input_tokens=len(enc.ids[i]), output_tokens=written,
            )  # fmt: skip
            if cache_stats:
                results[i].provenance["step_cache"] = {
                    "skipped_steps": cache_stats["skipped_steps"].get(i, 0),
                    "batch_block_evaluations": cache_stats["block_evaluations"],
                    "batch_blocks_skipped": cache_stats["blocks_skipped"],
                }
        return results

    def _render(
        self,
        decoder: str,
        requests: Sequence[GenerateRequest | EditRequest],
        ok: list[int],
        enc: Encoded,
        prefixes: list[list[int] | None],
        seeds: list[int],
        results: list[Result],
        timings: dict[str, float],
        progress: ProgressCallback | None,
        should_cancel: CancelCallback | None,
    ) -> tuple[int, dict[str, Any]]:
        """Steps 2 to 5 for the rows `ok` (those with a prefix): images or errors into `results`.

        Returns the number of image tokens per row and the step cache's statistics of the bucket.
        """
        first = requests[0]
        # 2. the one-pass 81 image embeddings of the whole batch
        with _timer(timings, "ar_image_tokens_s", self.device):
            embeds = self.ar.image_embeddings(_select(enc, ok), [prefixes[i] for i in ok])  # [B', 81, D]
        # 3. decoder conditioning
        dit = self.components.gen_dit if decoder == "generation" else self.components.edit_dit
        vae_scale = vae_scale_factor(self.components.vae)
        with _timer(timings, "conditioning_s", self.device):
            positive, negative = self._conditioning(decoder, embeds, [requests[i] for i in ok], vae_scale)
        # 4. denoise the bucket (canceled requests leave at a step boundary)
        job = DenoiseJob(
            ok, [seeds[i] for i in ok], positive, negative,
            first.width, first.height, first.steps, float(first.cfg_scale), float(first.guidance),
            float(first.cache_threshold),
        )  # fmt: skip
        on_step = None if progress is None else lambda i, s, n: progress(i, "denoising", s, n)
        channels = self.components.vae.config.latent_channels
        self._log_first_compile(first, len(ok))
        with _timer(timings, "denoise_s", self.device):
            latents, kept = denoise(dit, job, vae_scale, channels, self.device, on_step, should_cancel)
        # 5. VAE decode
        for i in kept:
            _notify(progress, i, "decoding")
        with _timer(timings, "decode_s", self.device):
            images = vae_decode(self.components.vae, latents, self.device)
        for i, image in zip(kept, images, strict=True):
            results[i].image = image
        for i in sorted(set(ok) - set(kept)):
            results[i].error = RequestError("canceled", "canceled during denoising")
        return int(embeds.shape[1]), job.stats

    def _log_first_compile(self, first: GenerateRequest | EditRequest, batch: int) -> None:
        """With regional compilation, the first call of a shape bucket compiles its blocks: say so."""
        key = (*bucket_of(first), batch)
        if self.options.compile == "regional" and key not in self._compiled_buckets:
            self._compiled_buckets.add(key)
            log.info(
                "compiling the repeated DiT blocks for bucket %s at batch %d (first use)", key[:-1], batch
            )

    def _prefixes(
        self, prompts: list[ARPrompt], forced: list[str]
    ) -> tuple[Encoded, list[list[int] | None], list[str]]:
        """Prompt ids + input-image features, and each sample's prefix ids ending with BOI (None: no BOI)."""
        boi = self.ar.ids["boi"]
        enc = self.ar.encode(prompts)
        if self.prefix_mode == "forced":
            tokenizer = self.components.tokenizer
            prefixes: list[list[int] | None] = []
            for ids, prompt, text in zip(enc.ids, prompts, forced, strict=True):
                full = tokenizer(
                    prompt.text + text + SPECIAL_TOKENS["boi"], add_special_tokens=False
                ).input_ids
                if full[: len(ids)] != ids:  # tokenization merged across the boundary: tokenize apart
                    full = ids + tokenizer(text, add_special_tokens=False)["input_ids"] + [boi]
                prefixes.append(full[len(ids) :])
            return enc, prefixes, list(forced)
        stop = {self.ar.ids["eos"], self.ar.ids["pad"], self.ar.ids["im_end"]}
        decoded = self.ar.greedy(enc, [self.max_prefix_tokens] * len(prompts), {boi}, stop)
        texts = [self._decode_prefix(d.tokens[:-1] if d.ok else d.tokens) for d in decoded]
        return enc, [d.tokens if d.ok else None for d in decoded], texts

    def _decode_prefix(self, tokens: list[int]) -> str:
        return self.components.tokenizer.decode(tokens, skip_special_tokens=False)

    def _conditioning(self, decoder: str, embeds: torch.Tensor, requests: list[Any], vae_scale: int):  # type: ignore[no-untyped-def]
        first, negatives = requests[0], [r.negative_prompt for r in requests]
        if decoder == "generation":
            return self.gen_decoder.conditioning(embeds, first.cfg_scale, negatives)
        images = [r.image for r in requests]
        positive = self.edit_decoder.conditioning(embeds, images, first.width, first.height, vae_scale)
        return positive, None if first.cfg_scale == 1.0 else self.text.negative(negatives)

    def _provenance(
        self, req: Request, batch_size: int, timings: dict[str, float], **extra: Any
    ) -> dict[str, Any]:
        params = {k: v for k, v in asdict(req).items() if k != "image"}
        if isinstance(req, EditRequest | UnderstandRequest):
            params["image_size"] = [req.image.width, req.image.height]
        if "seed" in extra:
            params["seed"] = extra["seed"]
        return {
            "params": params,
            "checkpoint_hash": self.checkpoint_hash,
            "batch_size": batch_size,
            "engine": self.engine,
            "tp_size": self.tp_size,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "speed_options": self.options.describe(),
            "timings": dict(timings),
            **extra,
        }


def _select(enc: Encoded, rows: list[int]) -> Encoded:
    return Encoded([enc.ids[i] for i in rows], [enc.features[i] for i in rows], [enc.grids[i] for i in rows])


def _notify(progress: ProgressCallback | None, index: int, stage: str) -> None:
    if progress is not None:
        progress(index, stage, None, None)


@contextlib.contextmanager
def _timer(timings: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 4)
