"""The 2.6 vision tower (``vpm``): SigLIP encoder layers with NaViT-style position bucketing.

The encoder layers and post-LayerNorm are transformers' Idefics2 (= SigLIP) modules, whose
parameter names match the checkpoint. The embeddings are ours: the original takes each
slice as a one-patch-high strip ``[3, p, p*h*w]`` plus its ``tgt_size`` ``(h, w)`` and maps
patch ``(r, c)`` to a cell of the 70x70 learned position grid by bucketing fractional
coordinates. Those coordinates come from float32 ``arange`` calls whose rounding makes some
sizes (n = 25, 49, 50, 55, 58, ...) differ from the exact ``floor(70 i / n)``; we reproduce
the original's arithmetic, on the CPU, so that the same checkpoint gives the same numbers.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn
from transformers.models.idefics2.modeling_idefics2 import Idefics2Encoder

from minicpmv.config import VisionConfig


@lru_cache(maxsize=1024)
def _bucket_1d(n: int, grid: int) -> torch.Tensor:
    # Kept bit-compatible with the original: default float32, CPU, the same two arange calls
    # and a right-closed bucketize. The original's step is ``1 / tgt_size`` with tgt_size an
    # int32 tensor, i.e. a float32 step, not the double 1/n: that is where the quirks come from.
    # Do not rewrite this as integer arithmetic (see the module docstring).
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid, dtype=torch.float32, device="cpu")
    step = 1 / torch.tensor(n, dtype=torch.int32)
    fractional = torch.arange(0, 1 - 1e-6, step, dtype=torch.float32, device="cpu")
    return torch.bucketize(fractional, boundaries, right=True)


@lru_cache(maxsize=1024)
def position_ids_for(h: int, w: int, grid: int = 70) -> torch.Tensor:
    """Learned-position ids (int64, CPU) of an ``h`` x ``w`` patch grid, row-major, length ``h*w``."""
    if h < 1 or w < 1:
        raise ValueError(f"tgt_size must be positive, got ({h}, {w})")
    rows = _bucket_1d(h, grid)
    cols = _bucket_1d(w, grid)
    return (rows[:, None] * grid + cols[None, :]).reshape(-1)


class NavitVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.num_patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            padding="valid",
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` [B, C, p, p*L] strips, ``tgt_sizes`` [B, 2] (h, w) -> embeddings [B, L, D].

        Positions past ``h*w`` (right padding) get id 0; their outputs are never used.
        """
        batch, _, _, width = pixel_values.shape
        max_len = width // self.patch_size
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)
        position_ids = torch.zeros(batch, max_len, dtype=torch.long)
        for b, (h, w) in enumerate(tgt_sizes.tolist()):
            position_ids[b, : h * w] = position_ids_for(int(h), int(w), self.num_patches_per_side)
        position_ids = position_ids.to(embeddings.device)
        return embeddings + self.position_embedding(position_ids)


class NavitVisionTransformer(nn.Module):
    """Parameters ``embeddings.*``, ``encoder.layers.N.*``, ``post_layernorm.*`` (``vpm.*`` on disk)."""

    def __init__(self, config: VisionConfig, hf_config):
        super().__init__()
        self.patch_size = config.patch_size
        self.embeddings = NavitVisionEmbeddings(config)
        self.encoder = Idefics2Encoder(hf_config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Strips [B, C, p, p*L_max] and their (h, w) [B, 2] -> last hidden state [B, L_max, D].

        Slices shorter than ``L_max`` are right-padded; padded keys are masked out, padded
        query rows still compute (on valid keys) and are discarded by the caller.
        """
        hidden = self.embeddings(pixel_values, tgt_sizes)
        batch, max_len, _ = hidden.shape
        lengths = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(hidden.device)
        mask = None
        if bool((lengths < max_len).any()):
            valid = torch.arange(max_len, device=hidden.device)[None, :] < lengths[:, None]
            mask = torch.zeros(batch, 1, 1, max_len, dtype=hidden.dtype, device=hidden.device)
            mask.masked_fill_(~valid[:, None, None, :], torch.finfo(hidden.dtype).min)
        hidden = self.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        return self.post_layernorm(hidden)
