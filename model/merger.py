"""ImageEmbeddingMerger of the editing decoder: one bidirectional Qwen2.5-VL layer + projector.

See docs/model.md#editing-merger.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import MergerConfig


class RMSNorm(nn.Module):
    """Qwen RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hs = hidden_states.to(torch.float32)
        hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hs.to(input_dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MergerAttention(nn.Module):
    """Full (unmasked) GQA self-attention with multimodal rotary embeddings."""

    def __init__(self, config: MergerConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, N, hd]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MergerMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MergerDecoderLayer(nn.Module):
    """A Qwen2.5-VL decoder layer (pre-norm attention + pre-norm MLP), run without a mask."""

    def __init__(self, config: MergerConfig) -> None:
        super().__init__()
        self.self_attn = MergerAttention(config)
        self.mlp = MergerMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def grid_position_ids(num_tokens: int, base_grid: int) -> torch.Tensor:
    """(t, h, w) positions [3, N] of a square merged-token grid spread over a base_grid² grid.

    See docs/model.md#editing-merger.
    """
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"merger input has {num_tokens} tokens, not a square grid")
    step = base_grid / (2 * side)  # ViT grid = 2 * side; 18 -> 4, 36 -> 2 on the 72 grid
    rows = torch.arange(side, dtype=torch.float32).repeat_interleave(side) * step
    cols = torch.arange(side, dtype=torch.float32).repeat(side) * step
    return torch.stack([torch.zeros_like(rows), rows, cols])


class ImageEmbeddingMerger(nn.Module):
    """Merge the 81 AR image embeddings with 324 reference ViT embeddings into DiT conditioning tokens."""

    def __init__(self, config: MergerConfig) -> None:
        super().__init__()
        self.config = config
        d, out = config.hidden_size, config.out_channels
        wide = out * config.expand_ratio  # 4 x 4096 = 16384 (not 4 x D)
        self.layers = nn.ModuleList([MergerDecoderLayer(config)])
        self.projector = nn.Sequential(
            RMSNorm(d, config.rms_norm_eps),
            nn.Linear(d, wide),
            RMSNorm(wide, config.rms_norm_eps),
            nn.SiLU(),
            nn.Linear(wide, out),
            RMSNorm(out, config.rms_norm_eps),
        )
        # A buffer on purpose: the reference casts the merger with `.to(bf16)` (and trained it under DeepSpeed
        # bf16), which rounds inv_freq too; `module.to(dtype)` reproduces that, fp32 stays exact.
        hd = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def position_ids(self, num_target: int, num_ref: int) -> torch.Tensor:
        """Positions [3, num_target + num_ref]: target (0, 4r, 4c) then ref (0, 2r, 2c); no offset between."""
        parts = [grid_position_ids(num_target, self.config.base_grid)]
        if num_ref:
            parts.append(grid_position_ids(num_ref, self.config.base_grid))
        return torch.cat(parts, dim=1)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, head_dim] with mrope sections over (t, h, w), computed in fp32 from the buffer."""
        positions = position_ids.to(self.inv_freq.device, torch.float32)
        freqs = positions[..., None] * self.inv_freq.float()  # [3, N, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [3, N, hd]
        sections = list(self.config.mrope_section) * 2
        cos = torch.cat([c[i % 3] for i, c in enumerate(emb.cos().split(sections, dim=-1))], dim=-1)
        sin = torch.cat([s[i % 3] for i, s in enumerate(emb.sin().split(sections, dim=-1))], dim=-1)
        return cos.to(dtype), sin.to(dtype)

    def forward(self, embeds: torch.Tensor, ref_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [B, 81, D], ref_embeds [B, 324, D] or None -> prompt embeds [B, 405 or 81, J]."""
        if ref_embeds is not None and ref_embeds.shape[0] != embeds.shape[0]:
            raise ValueError(f"batch mismatch: embeds {embeds.shape[0]} vs ref_embeds {ref_embeds.shape[0]}")
        hidden = embeds if ref_embeds is None else torch.cat([embeds, ref_embeds.to(embeds.dtype)], dim=1)
        num_ref = 0 if ref_embeds is None else ref_embeds.shape[1]
        positions = self.position_ids(embeds.shape[1], num_ref).to(hidden.device)
        cos, sin = self.rotary(positions, hidden.dtype)
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin)
        return self.projector(hidden)
