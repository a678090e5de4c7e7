"""The 2.6 resampler: 64 learned queries cross-attend to one slice's vision features.

Parameter names follow the checkpoint (torch MultiheadAttention layout for ``attn``):
``query``, ``kv_proj``, ``attn.in_proj_weight/bias`` (packed q|k|v), ``attn.out_proj``,
``ln_q``, ``ln_kv``, ``ln_post`` and the raw matrix ``proj`` (applied as ``x @ proj``).
The 2-D sin-cos positions go into the keys only; they are computed on the fly (the original
keeps them in a non-persistent buffer, which a meta-device load would leave empty).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(embed_dim: int, height: int, width: int) -> np.ndarray:
    """float32 [height, width, embed_dim] table; first half encodes the column, second half the row.

    Computed in float32 numpy like the original, so values match it to the last bit.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = np.arange(quarter, dtype=np.float32)
    omega /= embed_dim / 4.0
    omega = 1.0 / 10000**omega
    rows, cols = np.meshgrid(
        np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij"
    )

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    return table.reshape(height, width, embed_dim).astype(np.float32)


class ResamplerAttention(nn.Module):
    """Multi-head cross-attention with torch MultiheadAttention's parameter layout."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None
    ) -> torch.Tensor:
        """``query`` [Q, D] (shared), ``key``/``value`` [B, L, D], ``key_valid`` [B, L] bool -> [B, Q, D]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        batch, length, _ = key.shape
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads
        q = F.linear(query, w_q, b_q).view(1, -1, heads, head_dim).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(batch, length, heads, head_dim).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(batch, length, heads, head_dim).transpose(1, 2)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q.expand(batch, -1, -1, -1), k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, -1, self.embed_dim)
        return self.out_proj(out)


class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int, eps: float = 1e-6):
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_post = nn.LayerNorm(embed_dim, eps=eps)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self._pos_cache: dict[torch.device, torch.Tensor] = {}

    def _positions(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """float32 sin-cos table of at least [height, width, D] on ``device``; grows, never shrinks."""
        table = self._pos_cache.get(device)
        if table is None or table.shape[0] < height or table.shape[1] < width:
            h = max(height, 70 if table is None else table.shape[0])
            w = max(width, 70 if table is None else table.shape[1])
            table = torch.from_numpy(sincos_2d(self.embed_dim, h, w)).to(device)
            self._pos_cache[device] = table
        return table

    def forward(self, features: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Vision features [B, L_max, kv_dim] and (h, w) [B, 2] -> [B, num_queries, D]."""
        batch, max_len, _ = features.shape
        sizes = [(int(h), int(w)) for h, w in tgt_sizes.tolist()]
        table = self._positions(max(h for h, _ in sizes), max(w for _, w in sizes), features.device)
        pos = torch.zeros(batch, max_len, self.embed_dim, dtype=torch.float32, device=features.device)
        for b, (h, w) in enumerate(sizes):
            pos[b, : h * w] = table[:h, :w].reshape(h * w, -1)
        lengths = torch.tensor([h * w for h, w in sizes], device=features.device)
        key_valid = torch.arange(max_len, device=features.device)[None, :] < lengths[:, None]
        if bool(key_valid.all()):
            key_valid = None

        x = self.ln_kv(self.kv_proj(features))
        q = self.ln_q(self.query)
        out = self.attn(q, x + pos.to(x.dtype), x, key_valid)
        return self.ln_post(out) @ self.proj
