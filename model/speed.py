"""Speed options from the field's libraries: regional torch.compile, fp8 DiTs (torchao), offloading.

`apply_speed_options(components, options, device)` runs once at load, after the engine. Every option is
off by default and leaves the modules' interfaces unchanged, so the pipeline code is the same either way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.components import Components

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "regional")
DIT_PRECISIONS = ("bf16", "fp8")
OFFLOAD_MODES = ("none", "model", "group")
FP8_ERROR = "fp8 DiTs need a CUDA GPU with fp8 tensor cores (compute capability 8.9+, e.g. L4, H100, H200)"
# execution order of the big modules: accelerate's model offload moves the previous one off when the next
# one starts (the small heads, adapter and merger stay on the device)
OFFLOAD_ORDER = ("ar", "clip", "t5", "gen_dit", "edit_dit", "vae")
RECOMPILE_LIMIT = 64  # one graph per shape bucket and block class; torch's default (8) is too few


@dataclass(frozen=True)
class SpeedOptions:
    """NEXUSGEN_COMPILE, NEXUSGEN_DIT_PRECISION and NEXUSGEN_OFFLOAD, checked."""

    compile: str = "off"
    dit_precision: str = "bf16"
    offload: str = "none"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("compile", self.compile, COMPILE_MODES),
            ("dit_precision", self.dit_precision, DIT_PRECISIONS),
            ("offload", self.offload, OFFLOAD_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def describe(self) -> dict[str, str]:
        return {"compile": self.compile, "dit_precision": self.dit_precision, "offload": self.offload}


def check_options(options: SpeedOptions, device: str | torch.device, engine: str) -> None:
    """Refuse, before any weight is loaded, what this device or engine cannot do."""
    if options.dit_precision == "fp8":
        check_fp8_support(device)
    if options.offload != "none" and engine != "torch":
        raise ValueError("offloading works with the torch engine only (tensor parallelism shards instead)")


def check_fp8_support(device: str | torch.device) -> None:
    """Raise unless `device` is a CUDA device with fp8 matmuls (sm 8.9+) and torchao is installed."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"{FP8_ERROR}; the device is {dev}")
    if torch.cuda.get_device_capability(dev) < (8, 9):
        name = torch.cuda.get_device_name(dev)
        raise ValueError(
            f"{FP8_ERROR}; {name} has compute capability {torch.cuda.get_device_capability(dev)}"
        )
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"{FP8_ERROR}; torchao is not installed") from exc


def apply_speed_options(components: Components, options: SpeedOptions, device: str | torch.device) -> Any:
    """Quantize, then offload, then compile (compiling last sees the final modules). In place.

    Returns the model-offload hooks (None unless offload is "model"), for `release`.
    """
    hooks = None
    if options.dit_precision == "fp8":
        for dit in (components.gen_dit, components.edit_dit):
            if dit is not None:  # a worker loads only the DiTs its tasks need
                quantize_dit_fp8(dit)
    if options.offload == "model":
        hooks = model_offload(components, device)
    elif options.offload == "group":
        group_offload(components, device)
    if options.compile == "regional":
        compile_regional(components)
    return hooks


# ---- fp8 -------------------------------------------------------------------------------------------------
def _in_blocks(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith(
        ("transformer_blocks.", "single_transformer_blocks.")
    )


def quantize_dit_fp8(dit: nn.Module) -> None:
    """torchao float8 dynamic quantization (per-row scales) of the Linears inside the DiT blocks.

    Weights are stored in float8_e4m3fn and activations quantized per step, so the matmuls run on fp8
    tensor cores; the embedders, norms and output projection stay in bf16.
    """
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(dit, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=_in_blocks)


# ---- offload ---------------------------------------------------------------------------------------------
def _offloaded(components: Components) -> Iterator[tuple[str, nn.Module]]:
    for name in OFFLOAD_ORDER:
        if getattr(components, name) is not None:
            yield name, getattr(components, name)


def model_offload(components: Components, device: str | torch.device) -> list[Any]:
    """accelerate's model offload: each big module moves to `device` when called, its predecessor off.

    Returns the hooks; `release(hooks)` moves everything back to the CPU (the pipeline does it per batch,
    as diffusers' `maybe_free_model_hooks`).
    """
    from accelerate import cpu_offload_with_hook

    hooks: list[Any] = []
    previous = None
    for _name, module in _offloaded(components):
        module.to("cpu")
        _, previous = cpu_offload_with_hook(module, torch.device(device), prev_module_hook=previous)
        hooks.append(previous)
    return hooks


def group_offload(components: Components, device: str | torch.device) -> None:
    """diffusers' group offloading at leaf level: each layer's weights reach `device` just before it runs
    (prefetched on a side CUDA stream), so only a few layers are resident at a time."""
    from diffusers.hooks import apply_group_offloading

    dev = torch.device(device)
    for _name, module in _offloaded(components):
        module.to("cpu")
        apply_group_offloading(
            module, onload_device=dev, offload_type="leaf_level", use_stream=dev.type == "cuda"
        )


def onload(module: nn.Module) -> None:
    """Run an accelerate offload hook before calling a module's submodules directly (not its forward),
    as diffusers' `apply_forward_hook` does for `vae.decode`."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


def release(hooks: list[Any] | None) -> None:
    """Move every model-offloaded module back to the CPU."""
    for hook in hooks or []:
        hook.offload()


# ---- compile ---------------------------------------------------------------------------------------------
def compile_regional(components: Components) -> None:
    """torch.compile of the repeated blocks only: the DiTs' double/single blocks (diffusers'
    `compile_repeated_blocks`) and the AR's decoder layers. One graph per block class and shape is
    compiled on first use of a shape and reused by every block of that class."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 16 * RECOMPILE_LIMIT
    )
    for dit in (components.gen_dit, components.edit_dit):
        if dit is not None:
            dit.compile_repeated_blocks(fullgraph=True)
    for layer in components.ar.model.language_model.layers:
        layer.compile()
