"""The MiniCPM-V 2.6 model: ``llm`` (Qwen2), ``vpm`` (vision tower) and ``resampler``.

Module names and parameter shapes equal the original checkpoint's, so its safetensors load
with no renaming. Image placeholders (64 ``<unk>`` per slice) are embedded as text and then
overwritten with the resampler's outputs; everything after the embedding step is a plain
Qwen2 forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn
from transformers import Qwen2ForCausalLM

from minicpmv.config import MiniCPMVConfig
from minicpmv.modeling.resampler import Resampler
from minicpmv.modeling.vision import NavitVisionTransformer

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; the GPU image has an older 5.x.
_CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(Qwen2ForCausalLM.forward).parameters else "past_key_values"
)


def output_cache(output):
    """The KV cache returned by an LLM forward, whatever this transformers version calls it."""
    return getattr(output, _CACHE_KWARG, None)


class MiniCPMV(nn.Module):
    def __init__(self, config: MiniCPMVConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.llm = Qwen2ForCausalLM(config.to_qwen2_config(attn_implementation))
        self.vpm = NavitVisionTransformer(config.vision, config.to_vision_config(attn_implementation))
        self.resampler = Resampler(
            num_queries=config.query_num,
            embed_dim=config.hidden_size,
            num_heads=config.resampler_num_heads,
            kv_dim=config.vision.hidden_size,
        )

    @property
    def device(self) -> torch.device:
        return self.llm.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    def encode_images(self, pixel_values: Sequence[torch.Tensor], tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Slices -> LLM-space embeddings.

        Args:
            pixel_values: K float tensors [3, p, p*h_k*w_k] (one overview or slice each).
            tgt_sizes: int [K, 2], (h_k, w_k) in patches.
        Returns:
            [K, query_num, hidden_size] in the model dtype.
        """
        if len(pixel_values) != tgt_sizes.shape[0]:
            raise ValueError(f"{len(pixel_values)} pixel chunks but {tgt_sizes.shape[0]} tgt_sizes")
        if len(pixel_values) == 0:
            return torch.empty(0, self.config.query_num, self.config.hidden_size, dtype=self.dtype)
        device, dtype = self.device, self.dtype
        tgt_sizes = tgt_sizes.to(torch.int64).cpu()
        max_width = max(int(p.shape[-1]) for p in pixel_values)
        features = []
        step = self.config.vision_batch_size
        for start in range(0, len(pixel_values), step):
            chunk = pixel_values[start : start + step]
            batch = torch.zeros(len(chunk), *chunk[0].shape[:-1], max_width, dtype=dtype, device=device)
            for i, pixels in enumerate(chunk):
                batch[i, ..., : pixels.shape[-1]] = pixels.to(device=device, dtype=dtype)
            features.append(self.vpm(batch, tgt_sizes[start : start + step]))
        return self.resampler(torch.cat(features), tgt_sizes)

    def embed(
        self,
        input_ids: torch.Tensor,
        image_embeds: Sequence[torch.Tensor | None] | None = None,
        image_bounds: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] with each sample's image placeholder rows replaced.

        ``image_embeds[b]`` is [k_b, query_num, D] and ``image_bounds[b]`` [k_b, 2] half-open
        ranges, each ``query_num`` long, in chunk order.
        """
        embeds = self.llm.model.embed_tokens(input_ids)
        if image_embeds is None:
            return embeds
        for b, (vision, bounds) in enumerate(zip(image_embeds, image_bounds or [], strict=True)):
            if vision is None or len(bounds) == 0:
                continue
            if vision.shape[0] != len(bounds):
                raise ValueError(f"sample {b}: {vision.shape[0]} image chunks but {len(bounds)} image bounds")
            index = torch.cat([torch.arange(int(s), int(e)) for s, e in bounds.tolist()]).to(embeds.device)
            embeds[b, index] = vision.reshape(-1, vision.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: Sequence[Sequence[torch.Tensor]] | None = None,
        tgt_sizes: Sequence[torch.Tensor] | None = None,
        image_bounds: Sequence[torch.Tensor] | None = None,
        image_embeds: Sequence[torch.Tensor | None] | None = None,
        cache=None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ):
        """One LLM forward over ``input_ids`` [B, T] with images merged in.

        Either pass ``pixel_values`` (per sample, per chunk) with ``tgt_sizes`` (per sample
        [k, 2]), or precomputed ``image_embeds`` (per sample [k, Q, D]). Position ids default
        to ``cumsum(attention_mask) - 1``, so left padding is handled. Returns the transformers
        ``CausalLMOutputWithPast`` of the LLM (read its cache with ``output_cache``).
        """
        if pixel_values is not None:
            if tgt_sizes is None:
                raise ValueError("pixel_values given without tgt_sizes")
            image_embeds = self.encode_per_sample(pixel_values, tgt_sizes)
        embeds = self.embed(input_ids, image_embeds, image_bounds)
        if attention_mask is not None and position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{_CACHE_KWARG: cache},
        )

    def encode_per_sample(
        self, pixel_values: Sequence[Sequence[torch.Tensor]], tgt_sizes: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        """All samples' chunks go through the vision tower as one batch, then are split back."""
        flat = [p for sample in pixel_values for p in sample]
        counts = [len(sample) for sample in pixel_values]
        if not flat:
            return [None] * len(counts)
        sizes = torch.cat(
            [torch.as_tensor(t).reshape(-1, 2) for t, n in zip(tgt_sizes, counts, strict=True) if n]
        )
        encoded = self.encode_images(flat, sizes)
        return [part if len(part) else None for part in encoded.split(counts)]

    @torch.inference_mode()
    def generate_greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        **image_inputs,
    ) -> list[list[int]]:
        """Plain greedy decoding of a (left-padded) batch, one request at a time style.

        This is the reference loop (no batching across requests, no sampling) used by tests and
        as the benchmark baseline; serving goes through the engine. ``image_inputs`` are
        forwarded to ``forward`` (pixel_values, tgt_sizes, image_bounds or image_embeds).
        Returns the new tokens of each sample, cut after the first stop token.
        """
        from transformers import DynamicCache

        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        cache = DynamicCache()
        out = self(
            input_ids,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **image_inputs,
        )
        batch = input_ids.shape[0]
        results: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        positions = attention_mask.long().sum(-1, keepdim=True) - 1
        for _ in range(max_new_tokens):
            next_ids = out.logits[:, -1].argmax(-1)
            for b, token in enumerate(next_ids.tolist()):
                if not done[b]:
                    results[b].append(token)
                    done[b] = token in stop_token_ids
            if all(done):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            positions = positions + 1
            out = self(
                next_ids[:, None],
                attention_mask=attention_mask,
                position_ids=positions,
                cache=output_cache(out),
                use_cache=True,
            )
        return results
