"""Per-request step cache of the DiT blocks: a TeaCache port (the reference's `tea_cache_l1_thresh`).

At each step the first block's modulated input is compared with the previous step's; while the
accumulated (rescaled) relative L1 change stays under the threshold, the whole block stack is skipped
and the last computed residual (output - input of the blocks) is reused. The first and last steps
always compute. Unlike the reference (batch size 1) and diffusers' cache hooks (one decision for the
whole batch tensor), the decision is taken per sample, so a request's output never depends on its batch
mates: only the rows that must compute run the blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

# TeaCache4FLUX's polynomial from the input change to the output change of FLUX.1-dev
FLUX_RESCALE = np.poly1d([4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01])


class StepCache:
    """Cache state of one CFG branch of one bucket: per row, the accumulated distance and last residual."""

    def __init__(self, threshold: float, steps: int, batch: int) -> None:
        self.threshold, self.steps = threshold, steps
        self.step = 0
        self.accumulated = np.zeros(batch)
        self.previous_input: torch.Tensor | None = None  # [B, T, D] modulated input of block 0
        self.residual: torch.Tensor | None = None  # [B, T, D]
        self.skipped = np.zeros(batch, dtype=int)  # steps skipped per row
        self.block_evaluations = 0  # rows x blocks actually run
        self.blocks_skipped = 0  # rows x blocks skipped

    def select(self, rows: list[int]) -> None:
        """Keep the state of these rows only (requests canceled mid-loop leave the batch)."""
        index = torch.tensor(rows, dtype=torch.long)
        self.accumulated, self.skipped = self.accumulated[rows], self.skipped[rows]
        if self.previous_input is not None:
            self.previous_input = self.previous_input[index.to(self.previous_input.device)]
        if self.residual is not None:
            self.residual = self.residual[index.to(self.residual.device)]

    def decide(self, modulated: torch.Tensor) -> np.ndarray:
        """[B] bool: which rows compute the blocks at this step (TeaCache rule, per row)."""
        if self.step in (0, self.steps - 1) or self.previous_input is None or self.threshold <= 0:
            compute = np.ones(len(self.accumulated), dtype=bool)
            self.accumulated[:] = 0.0
        else:
            prev = self.previous_input.float()
            change = (modulated.float() - prev).abs().mean(dim=(1, 2)) / prev.abs().mean(dim=(1, 2))
            self.accumulated += FLUX_RESCALE(change.cpu().double().numpy())
            compute = self.accumulated >= self.threshold
            self.accumulated[compute] = 0.0
        self.previous_input = modulated
        self.step += 1
        return compute


class CachedBlocks(nn.Module):
    """Stands in for the DiT's block list during one call: runs every double and single block on the
    rows that compute, and adds the cached residual to the rows that skip."""

    def __init__(self, double: nn.ModuleList, single: nn.ModuleList, cache: StepCache) -> None:
        super().__init__()
        self.double_blocks, self.single_blocks, self.cache = double, single, cache

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: Any = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        modulated = self.double_blocks[0].norm1(hidden_states, emb=temb)[0]
        compute = self.cache.decide(modulated)
        n_blocks, batch = len(self.double_blocks) + len(self.single_blocks), len(compute)
        if self.cache.residual is None:
            compute[:] = True
        rows = np.flatnonzero(compute)
        self.cache.block_evaluations += len(rows) * n_blocks
        self.cache.blocks_skipped += (batch - len(rows)) * n_blocks
        self.cache.skipped += ~compute
        if len(rows) == batch:  # every row computes: the plain block loop on the whole tensors
            out = self._run(
                hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
            )
            self.cache.residual = out - hidden_states
            return encoder_hidden_states, out
        assert self.cache.residual is not None
        out = hidden_states + self.cache.residual
        if len(rows):
            index = torch.from_numpy(rows).to(hidden_states.device)
            computed = self._run(
                hidden_states[index],
                encoder_hidden_states[index],
                temb[index],
                image_rotary_emb,
                joint_attention_kwargs,
            )
            out[index] = computed
            self.cache.residual[index] = computed - hidden_states[index]
        return encoder_hidden_states, out

    def _run(self, hidden, encoder, temb, rotary, kwargs):  # type: ignore[no-untyped-def]
        for block in (*self.double_blocks, *self.single_blocks):
            encoder, hidden = block(
                hidden_states=hidden,
                encoder_hidden_states=encoder,
                temb=temb,
                image_rotary_emb=rotary,
                joint_attention_kwargs=kwargs,
            )
        return hidden


@contextmanager
def cached_blocks(dit: nn.Module, cache: StepCache | None) -> Iterator[None]:
    """During the block, the DiT's forward runs its blocks through `CachedBlocks` (no-op for None)."""
    if cache is None:
        yield
        return
    double, single = dit.transformer_blocks, dit.single_transformer_blocks
    dit.transformer_blocks = nn.ModuleList([CachedBlocks(double, single, cache)])
    dit.single_transformer_blocks = nn.ModuleList()
    try:
        yield
    finally:
        dit.transformer_blocks, dit.single_transformer_blocks = double, single
