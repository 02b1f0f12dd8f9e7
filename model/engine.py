"""Inference engines for the loaded stack: plain torch and DeepSpeed tensor parallel.

Offloading, fp8 DiTs and compilation are speed options of either engine (`model.speed`).

`apply_engine(components, engine, device)` is what `model.pipeline` calls after `load_components`. The
modules it returns are plain `nn.Module`s (the DeepSpeed wrapper's `.module`, sharded in place), so the
pipeline reads attributes such as `ar.model.language_model` or `ar.lm_head` the same way for every engine.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
from typing import Any

import torch
from torch import nn

from model.components import Components

ENGINES = ("torch", "deepspeed")


def apply_engine(components: Components, engine: str, device: str) -> Components:
    """Return the components prepared for `engine` ("torch" or "deepspeed") on `device`."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    if engine == "deepspeed":
        components = apply_deepspeed(components, device)
    return components


# ---- DeepSpeed tensor parallel --------------------------------------------------------------------------
def tensor_parallel_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed if initialised, else RANK / WORLD_SIZE (0, 1)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_process_group(device: str | torch.device) -> None:
    """Initialise torch.distributed + deepspeed.comm once per process (gloo on CPU, nccl on CUDA).

    Defaults: RANK 0, WORLD_SIZE 1, MASTER_ADDR 127.0.0.1, MASTER_PORT 29500 for several ranks and a free
    port for a lone rank (so that several single-rank workers on one host do not collide).
    """
    import deepspeed
    import torch.distributed as tdist

    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if not tdist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # ranks of one job must agree: torchrun's default port
            lone = int(os.environ["WORLD_SIZE"]) == 1
            os.environ["MASTER_PORT"] = str(_free_port()) if lone else "29500"
        tdist.init_process_group(backend=backend, init_method="env://")
    if backend == "gloo":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a C++ extension: ~2.5 min of
        # g++ on first use) and, unless LOCAL_SIZE equals the world size (the `deepspeed` launcher sets
        # it), never sets it up yet still calls it: the first TP all-reduce segfaults. CPU runs are for
        # tests and development, so use gloo's own all-reduce instead (DeepSpeed falls back to it).
        # (deepspeed.comm re-exports the `torch` package under the same name, so look the module up)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _init_inference(module: nn.Module, injection_policy: dict[type, tuple[str, ...]] | None) -> Any:
    import deepspeed

    world = tensor_parallel_world()[1]
    dtype = _module_dtype(module)  # keep the precision the stack was loaded in (bf16 GPU / fp32 CPU)
    # init_inference casts the whole module (`module.bfloat16()`), buffers included; keep buffers that were
    # deliberately left in another precision (e.g. rotary inv_freq in fp32) as the torch engine has them.
    kept = {n: b for n, b in module.named_buffers() if b.is_floating_point() and b.dtype != dtype}
    ds_engine = deepspeed.init_inference(
        module,
        tensor_parallel={"tp_size": world},
        dtype=dtype,
        replace_with_kernel_inject=False,
        injection_policy=injection_policy if world > 1 else None,
    )
    for name, buffer in kept.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = ds_engine.module.get_submodule(owner_name) if owner_name else ds_engine.module
        owner._buffers[leaf] = buffer.to(owner._buffers[leaf].device)
    return ds_engine


def apply_deepspeed(components: Components, device: str) -> Components:
    """Wrap the AR model and both DiTs with `deepspeed.init_inference`, tensor parallel over all ranks.

    With one rank DeepSpeed only keeps dtype and device (outputs equal the torch engine's). The vision
    encoder, heads, adapter, merger, text encoders and VAE stay replicated: they are small next to the
    7B language model and the two 12B DiTs.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", dev.index or 0))
        torch.cuda.set_device(local_rank)
    init_process_group(dev)
    check_tensor_parallel_size(components, tensor_parallel_world()[1])
    return dataclasses.replace(
        components,
        ar=shard_ar(components.ar),
        gen_dit=None if components.gen_dit is None else shard_dit(components.gen_dit),
        edit_dit=None if components.edit_dit is None else shard_dit(components.edit_dit),
    )


def check_tensor_parallel_size(components: Components, world: int) -> None:
    """Every rank needs whole KV heads (AR) and attention heads (DiTs); the 7B has 4 KV heads: TP <= 4."""
    kv_heads = components.ar.config.text_config.num_key_value_heads
    if kv_heads % world:
        raise ValueError(f"tensor parallel size {world} must divide the AR's {kv_heads} key/value heads")
    for name in ("gen_dit", "edit_dit"):
        if getattr(components, name) is None:
            continue
        heads = getattr(components, name).config.num_attention_heads
        if heads % world:
            raise ValueError(f"tensor parallel size {world} must divide the {name}'s {heads} attention heads")


def shard_ar(ar: nn.Module) -> nn.Module:
    """Tensor-parallel Qwen2.5-VL decoder layers (AutoTP policy: q/k/v/gate/up column, o/down row).

    `set_lm_head` inside DeepSpeed also makes `lm_head` row parallel (full logits after its all-reduce).
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

    policy = {Qwen2_5_VLDecoderLayer: ("self_attn.o_proj", "mlp.down_proj")}
    ar = _init_inference(ar, policy).module
    if type(ar.lm_head).__name__ == "LmHeadLinearAllreduce":
        ar.lm_head = LmHeadAnyRank(ar.lm_head)
    return ar


class LmHeadAnyRank(nn.Module):
    """DeepSpeed's row-parallel lm_head slices `input[:, :, shard]`, i.e. takes [B, L, D] only; the
    pipeline also calls it on the last position alone ([B, D]), so lift 2-D inputs to 3-D and back."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() == 2:
            return self.inner(hidden[:, None])[:, 0]
        return self.inner(hidden)


def shard_dit(dit: nn.Module) -> nn.Module:
    """Tensor-parallel FluxTransformer2DModel following diffusers' `_tp_plan` for Flux.

    DeepSpeed's injection policy replaces EVERY Linear inside a client module, column parallel unless
    named as row parallel. Whole blocks cannot be clients: their AdaLN modulation Linears
    (`norm1.linear`, `norm.linear`) must stay replicated because their output is chunked over the full
    hidden size. So the clients are the attention and feed-forward modules only:
    FluxAttention: to_q/k/v, add_q/k/v_proj column; to_out.0, to_add_out row (double blocks; single
    blocks are `pre_only`, with no output projection, so their attention output stays head-sharded);
    FeedForward: net.0.proj column, net.2 row. The single blocks' own Linears are sharded by
    `_shard_single_block`. Attention reshapes with `unflatten(-1, (-1, head_dim))`, so the heads a rank
    holds follow from its shard; QK-RMSNorm and RoPE act per head and stay replicated.
    """
    from diffusers.models.attention import FeedForward
    from diffusers.models.transformers.transformer_flux import FluxAttention

    # names as DeepSpeed's AutoTP builds them: "<parent>.<child>", "" parent -> leading dot
    policy = {FluxAttention: ("to_out.0", ".to_add_out"), FeedForward: ("net.2",)}
    ds_engine = _init_inference(dit, policy)
    dit = ds_engine.module
    if ds_engine.mp_group is not None and tensor_parallel_world()[1] > 1:
        for block in dit.single_transformer_blocks:
            _shard_single_block(block, ds_engine.mp_group)
        _check_head_shards(dit)
    return dit


def _shard_single_block(block: nn.Module, group: Any) -> None:
    """Shard a FluxSingleTransformerBlock: proj_mlp column parallel, proj_out packed row parallel."""
    from deepspeed.module_inject.layers import LinearLayer

    attn_sizes = list(block.attn.to_v._partition_sizes)  # the attention output has to_v's (head) sharding
    block.proj_mlp = LinearLayer(block.proj_mlp, group, name="proj_mlp")
    mlp_sizes = list(block.proj_mlp._partition_sizes)
    rank = block.proj_mlp.tp_index
    block.proj_out = PackedRowParallelLinear(block.proj_out, group, [attn_sizes, mlp_sizes], rank)


class PackedRowParallelLinear(nn.Module):
    """Row-parallel Linear whose input is a concat of independently column-sharded blocks.

    The single block computes `proj_out(cat([attn, mlp], -1))` with attn [.., inner] and mlp [.., 4·inner].
    Under TP each rank holds `cat([attn_r, mlp_r])`, i.e. its own slice of EACH block, not a contiguous
    slice of the concat. A plain row-parallel split (DeepSpeed's LinearAllreduce: columns
    [r·(5·inner)/tp, (r+1)·(5·inner)/tp)) would pair rank 0's input with attention columns of other heads
    and part of the MLP columns: silently wrong outputs (on a small Flux over 2 CPU ranks: max error 0.19
    on outputs of scale 2, against 5e-7 with this layer). So rank r keeps the weight columns
    `W[:, attn_r] ‖ W[:, inner + mlp_r]`, matching its local input, and the partial products are summed
    by an all-reduce; the bias is added once, after it.
    """

    def __init__(self, linear: nn.Linear, group: Any, block_partitions: list[list[int]], rank: int) -> None:
        super().__init__()
        self.group = group
        pieces, offset = [], 0
        for sizes in block_partitions:  # per block: the width of every rank's shard
            start = offset + sum(sizes[:rank])
            pieces.append(linear.weight[:, start : start + sizes[rank]])
            offset += sum(sizes)
        if offset != linear.in_features:
            raise ValueError(f"packed blocks cover {offset} of {linear.in_features} input features")
        self.weight = nn.Parameter(torch.cat(pieces, dim=1).contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        import deepspeed.comm as dist

        out = torch.matmul(hidden, self.weight.transpose(0, 1))
        dist.inference_all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


def _check_head_shards(dit: nn.Module) -> None:
    """Every rank must hold whole attention heads, or attention silently mixes half-heads."""
    for name, module in dit.named_modules():
        if hasattr(module, "to_q") and hasattr(module, "head_dim"):
            width = module.to_q.weight.shape[0]
            if width % module.head_dim:
                raise ValueError(
                    f"{name}: shard width {width} is not a whole number of {module.head_dim}-d heads"
                )
