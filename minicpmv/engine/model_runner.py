"""Runs the LLM over one packed step: the scheduled tokens of every sequence, K/V into the pool, logits out.

The decoder layers are transformers' Qwen2 modules (so their weights, including 4-bit ones, are used as
loaded), but the layer loop is ours: projections, RoPE and the MLP run on the packed tokens ``[T, hidden]``
(no padding across sequences), K/V go into the pool's slots, and attention is the selected backend
(``attention.py``). The arithmetic is Qwen2's: RMSNorm, RoPE (rotate-half), GQA attention, SiLU MLP.
Image placeholder positions take the request's vision embeddings (MiniCPM-V's merge) as they are embedded.

An eager step's integers (token ids, positions, slots, rows to sample, image rows) go to the device in one
copy (``AttentionMetadata.build``, staging.py). Start-up work (the pool, the attention self-test and timing,
graph capture) runs with this runner's GPU current, so nothing lands on, or creates a context on, GPU 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from minicpmv.engine.attention import AttentionMetadata, select_backend
from minicpmv.engine.cuda_graphs import DecodeGraphs, StaticDecodeAttention, StaticPagedMetadata
from minicpmv.engine.kv_pool import KVPool, PoolShape, fp8_kv_dtype, pool_bytes
from minicpmv.engine.lora import LoRAStacks, LoRAStep
from minicpmv.engine.nf4_linear import select_int4_kernel
from minicpmv.engine.request import Sequence
from minicpmv.engine.staging import device_scope
from minicpmv.modeling.minicpmv import MiniCPMV


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class ScheduledSeq:
    """``num_tokens`` new tokens of ``seq``, from its ``num_computed_tokens`` (at scheduling) on; ``sample``:
    this chunk reaches the sequence's last token, so the step yields its next token."""

    seq: Sequence
    num_tokens: int
    sample: bool = field(init=False)

    def __post_init__(self) -> None:
        self.sample = self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class ModelRunner:
    def __init__(self, model: MiniCPMV, *, block_size: int = 16, kv_cache_memory_mb: int | None = None,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 attention_backend: str = "auto", cuda_graphs: bool = True, max_num_seqs: int = 16,
                 cuda_graph_max_len: int = 8192, max_model_len: int | None = None,
                 static_decode: bool | None = None, kv_cache_dtype: str = "auto",
                 lora: tuple[int, int, tuple[str, ...]] | None = None, lora_kernel: bool | None = None,
                 int4_kernel: str = "auto"):  # fmt: skip
        """``cuda_graphs``: replay pure decode steps as CUDA graphs (cuda_graphs.py; CUDA only) for batches up to
        ``max_num_seqs`` and contexts up to ``max_model_len`` with the paged kernel (one graph per batch size),
        else up to ``cuda_graph_max_len`` (gathered keys, a graph per context bucket). ``static_decode`` runs
        those steps through the graphs' static-shape forward without capture (default: where graphs are
        captured); on the CPU that is how tests check the arithmetic the graphs replay. ``kv_cache_dtype``
        "fp8": an e4m3 pool, read by the paged kernel only (the backend must be it). ``lora``: (slots, rank,
        target modules) of the LoRA stacks (engine/lora.py), allocated before the pool; None: no LoRA.
        ``lora_kernel``: the Triton LoRA kernels (default: on CUDA if they pass their self-test; True on the CPU
        runs them under Triton's interpreter, for tests). ``int4_kernel``: what computes the LLM's 4-bit linears
        (nf4_linear.py: "auto", "triton", "bitsandbytes"), set before anything is captured; ``int4_selection``
        says what was chosen."""
        with device_scope(model.device):  # the pool, the backend's self-test and timing, the capture
            self.model = model
            cfg = model.config
            self.num_layers = cfg.num_hidden_layers
            self.num_heads = cfg.num_attention_heads
            self.num_kv_heads = cfg.num_key_value_heads
            self.head_dim = cfg.head_dim
            self.device = model.device
            self.dtype = model.dtype
            self.int4_selection = select_int4_kernel(model, int4_kernel, self.device, self.dtype)
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            self.inv_freq = (1.0 / (cfg.rope_theta**exponent)).to(self.device)
            self.lora = LoRAStacks(model, *lora, self.device, self.dtype, kernel=lora_kernel) if lora else None
            # The rows' own token embeddings, by LoRA slot, for adapters that bring a table (engine.py sets it).
            self.lora_embeddings: Callable[[int], torch.Tensor | None] = lambda slot: None
            kv_dtype = fp8_kv_dtype(self.device, self.dtype) if kv_cache_dtype == "fp8" else self.dtype
            shape = PoolShape(self.num_layers, self.num_kv_heads, self.head_dim, block_size, kv_dtype)
            capture = cuda_graphs and self.device.type == "cuda"
            static = capture if static_decode is None else static_decode
            if num_kv_blocks is not None:
                self.pool = KVPool(shape, num_kv_blocks, self.device, scratch_block=static)
            else:
                budget = pool_bytes(self.device, kv_cache_memory_mb, gpu_memory_utilization)
                self.pool = KVPool.from_budget(shape, budget, self.device, scratch_block=static)
            heads = (self.num_heads, self.num_kv_heads, self.head_dim)
            self.attention = select_backend(attention_backend, self.device, self.dtype, heads, kv_dtype)
            self._tiling = getattr(self.attention, "tiling", None)  # the paged kernel's (None: gathers)
            if kv_dtype != self.dtype and self._tiling is None:
                raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is read by the Triton paged kernel only; the "
                                 f"attention backend here is {self.attention.name!r} "
                                 f"({self.attention.selection})")  # fmt: skip
            self.decode_graphs: DecodeGraphs | None = None
            if static:
                paged = self.attention if self._tiling is not None else None
                max_context = max(cuda_graph_max_len, max_model_len or 0) if paged else cuda_graph_max_len
                # A bound method: DecodeGraphs holds it weakly (no runner <-> graphs reference cycle).
                self.decode_graphs = DecodeGraphs(self._forward_static, block_size=block_size,
                                                  scratch_block=self.pool.scratch_block, max_num_seqs=max_num_seqs,
                                                  max_context=max_context, device=self.device, capture=capture,
                                                  paged=paged)  # fmt: skip

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq  # [T, D/2], float32 as in transformers
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """One forward over ``batch``; returns float32 logits [S, V] for the entries with ``sample`` set, in
        batch order. K/V of every scheduled token are in the pool afterwards. Runs with this runner's GPU
        current: Triton launches its kernels on the current device's current stream."""
        with device_scope(self.device):
            return self._execute(batch)

    def _execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        ids, query_lens, context_lens, tables, sample_rows, slots = [], [], [], [], [], []
        vision_rows: list[np.ndarray] = []  # packed rows of image placeholder positions (host integers)
        vision_embeds: list[torch.Tensor] = []  # their embeddings
        total = 0
        for entry in batch:
            seq, start, length = entry.seq, entry.seq.num_computed_tokens, entry.num_tokens
            ids.extend(seq.token_ids_range(start, start + length))
            slots.append(-1 if seq.lora_slot is None else seq.lora_slot)
            query_lens.append(length)
            context_lens.append(start + length)
            tables.append(seq.block_table)
            state = seq.request
            if state.vision_positions is not None and start < state.vision_end:
                # Positions ascend (encoder.finish: spans in prompt order), so this chunk's are one range of them,
                # found on the host: a slice of the embeddings, no boolean mask on the device (no sync).
                where = state.vision_positions.numpy()
                first, end = np.searchsorted(where, (start, start + length)).tolist()
                if end > first:
                    vision_rows.append(where[first:end] + (total - start))
                    vision_embeds.append(state.vision_embeds[first:end])
            total += length
            if entry.sample:
                sample_rows.append(total - 1)
        lora = self.lora is not None and any(slot >= 0 for slot in slots)
        tables_of = {slot: self.lora_embeddings(slot) for slot in set(slots) if slot >= 0} if lora else {}
        own_embeddings = {slot for slot, table in tables_of.items() if table is not None}
        if (self.decode_graphs is not None and not vision_rows and not own_embeddings
                and all(e.sample and e.num_tokens == 1 for e in batch)):  # fmt: skip
            logits = self.decode_graphs.run(ids, [ctx - 1 for ctx in context_lens], tables, slots)
            if logits is not None:
                return logits
        device = self.device
        row_slots = np.repeat(np.asarray(slots, dtype=np.int64), query_lens) if lora else None
        lora_tiles = None
        if lora and self.lora.kernel:  # the kernels' segments of rows, built here with the step's other integers
            from minicpmv.engine.kernels.lora import segment_tiles

            lora_tiles = segment_tiles(row_slots)
        meta = AttentionMetadata.build(query_lens, context_lens, tables, self.pool.block_size, device, input_ids=ids,
                                       sample_rows=sample_rows,
                                       vision_rows=np.concatenate(vision_rows) if vision_rows else None,
                                       tiling=self._tiling, lora_slots=row_slots, lora_tiles=lora_tiles)  # fmt: skip
        embeds = self.model.llm.model.embed_tokens(meta.input_ids)
        for slot in own_embeddings:  # an adapter's own token embeddings, for its rows
            rows = np.flatnonzero(row_slots == slot)
            index = torch.from_numpy(rows).to(device)
            embeds.index_copy_(0, index, tables_of[slot].index_select(0, meta.input_ids.index_select(0, index)))
        if vision_rows:
            rows = torch.cat(vision_embeds).to(device=device, dtype=embeds.dtype)
            embeds.index_copy_(0, meta.vision_rows, rows)
        step = self.lora.step(meta.lora_slots, meta.lora_tiles) if lora else None
        hidden = self._layers(embeds, meta.positions, meta, self.attention, step)
        return self._logits(self.model.llm.model.norm(hidden.index_select(0, meta.sample_rows)))

    def _forward_static(self, ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """The decode forward of cuda_graphs.py: one token per row, every row sampled; device work only."""
        attention = self.attention if isinstance(meta, StaticPagedMetadata) else self._static_attention
        # Rows of no adapter (-1, padding rows too) add nothing: a zero mask, or no-op tiles.
        step = self.lora.step(meta.lora_slots) if self.lora is not None else None
        hidden = self._layers(self.model.llm.model.embed_tokens(ids), positions, meta, attention, step)
        return self._logits(self.model.llm.model.norm(hidden))

    _static_attention = StaticDecodeAttention()

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, meta, attention,
                lora: LoRAStep | None = None) -> torch.Tensor:  # fmt: skip
        """The decoder layers over the packed rows; with ``lora`` (LoRAStacks.step of the rows' slots) each
        target projection adds its rows' LoRA term."""
        total = hidden.shape[0]
        cos, sin = self._rope(positions)
        for index, layer in enumerate(self.model.llm.model.layers):
            attn = layer.self_attn
            project = functools.partial(self._project, index, lora)
            x = layer.input_layernorm(hidden)
            q = project("q_proj", x, attn.q_proj).view(total, self.num_heads, self.head_dim)
            k = project("k_proj", x, attn.k_proj).view(total, self.num_kv_heads, self.head_dim)
            v = project("v_proj", x, attn.v_proj).view(total, self.num_kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.pool.store(index, meta.slot_mapping, k, v)
            out = attention(q, k, v, self.pool.keys[index], self.pool.values[index], meta)
            hidden = hidden + project("o_proj", out.reshape(total, -1), attn.o_proj)
            x = layer.post_attention_layernorm(hidden)
            if lora is None or not {"gate_proj", "up_proj", "down_proj"} & set(self.lora.targets):
                hidden = hidden + layer.mlp(x)
            else:  # Qwen2MLP's arithmetic, with the LoRA terms of its projections
                mlp = layer.mlp
                gated = mlp.act_fn(project("gate_proj", x, mlp.gate_proj)) * project("up_proj", x, mlp.up_proj)
                hidden = hidden + project("down_proj", gated, mlp.down_proj)
        return hidden

    def _project(self, index: int, lora: LoRAStep | None, name: str, x: torch.Tensor, module) -> torch.Tensor:
        """Layer ``index``'s projection ``name`` (``module``) of ``x``, plus its rows' LoRA terms with ``lora``."""
        y = module(x)
        if lora is not None and name in self.lora.targets:
            y = self.lora.add(f"layers.{index}.{name}", x, y, lora)
        return y

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head over the vocabulary, float32 [B, V]. On the CPU as W @ h^T: for this tall weight (151,666
        rows) that is 2-3x faster than F.linear at batch 4-16 (measured: 10.8 vs 37.4 ms at 4, 25.9 vs 47.5 ms at
        16 on the tiny model), and it is most of a decode step there."""
        head = self.model.llm.lm_head
        if hidden.device.type == "cpu" and type(head) is torch.nn.Linear and head.bias is None:
            # Made contiguous: row-wise work on the transposed view (the sampler's argmax, top-k, softmax over
            # [B, V]) strides by B and was 5-7x slower at batch 64 than the copy costs.
            return torch.mm(head.weight, hidden.T).T.float().contiguous()
        return head(hidden).float()
