"""The KV cache: one key and one value tensor per layer, allocated once at start-up and never resized.

Layout per layer: ``[num_blocks * block_size, num_kv_heads, head_dim]``, i.e. token slots; block ``b`` holds
slots ``b * block_size ... (b + 1) * block_size - 1``. A token's K/V are written into the slot its sequence's
block table gives (``slot_mapping``) and stay there until the sequence leaves: joins, retirements,
preemptions and cancellations only change block tables, never these tensors (CUDA graphs can capture them).

Size: on CUDA ``gpu_memory_utilization`` of the GPU's memory less the weights (vLLM's knob, ``pool_bytes``),
unless ``kv_cache_memory_mb`` is set; on the CPU ``kv_cache_memory_mb`` (default 1024). What is allocated is exactly
what the budget says, rounded down to whole blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_MB = 1024
FP8 = torch.float8_e4m3fn  # kv_cache_dtype "fp8"
FP8_MAX = float(torch.finfo(FP8).max)  # 448


@dataclass(frozen=True)
class PoolShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size


def pool_bytes(device: torch.device, kv_cache_memory_mb: int | None, gpu_memory_utilization: float) -> int:
    """The KV budget in bytes: explicit megabytes if given; else on CUDA, as vLLM, the share of the GPU's total
    memory this instance may use (``gpu_memory_utilization``) less what this process already holds (the
    weights), and never more than 95% of what is free now (another instance or process on the same GPU keeps
    its memory: two models at 0.45 each share a GPU, and a second model at the default 0.9 gets what is left
    instead of failing)."""
    if kv_cache_memory_mb is not None:
        return int(kv_cache_memory_mb) << 20
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return cuda_kv_budget(free, total, torch.cuda.memory_reserved(device), gpu_memory_utilization)
    return DEFAULT_CPU_KV_MB << 20


def cuda_kv_budget(free: int, total: int, own: int, gpu_memory_utilization: float) -> int:
    """``pool_bytes``' arithmetic on a GPU, in bytes: ``total * gpu_memory_utilization - own``, at most 95% of
    ``free``, never negative. ``free``/``total``: ``torch.cuda.mem_get_info``; ``own``: what this process holds
    (its weights; ``torch.cuda.memory_reserved``)."""
    return max(0, int(min(total * gpu_memory_utilization - own, free * 0.95)))


def fp8_kv_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The FP8 pool's dtype for a model of ``dtype`` on ``device``. On CUDA e4m3 needs sm_89 or later (Triton has
    no e4m3 before Ada) and a bf16/fp16 model (the kernel's float32 tiles over FP8 spill registers: not
    compiled); on the CPU (Triton's interpreter, tests) any dtype."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 9):
            name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
            raise ValueError(f"kv_cache_dtype 'fp8' (e4m3) needs a GPU of compute capability 8.9 or later; "
                             f"{name} has {capability}")  # fmt: skip
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"kv_cache_dtype 'fp8' needs a bfloat16 or float16 model on CUDA, not {dtype}")
    return FP8


class KVPool:
    """``num_blocks`` blocks for sequences, plus with ``scratch_block`` one more (index ``num_blocks``, never given
    to a sequence) where the padding rows of a CUDA-graph decode step write their K/V."""

    def __init__(self, shape: PoolShape, num_blocks: int, device: torch.device, scratch_block: bool = False):
        if num_blocks < 1:
            raise ValueError(
                f"the KV cache budget holds no block of {shape.bytes_per_block} bytes; raise kv_cache_memory_mb "
                "or gpu_memory_utilization"
            )
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = shape.block_size
        self.scratch_block = num_blocks if scratch_block else None
        slots = (num_blocks + int(scratch_block)) * shape.block_size
        size = (slots, shape.num_kv_heads, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        logger.info("KV pool: %d blocks of %d tokens (%d tokens, %.1f MiB) on %s", num_blocks, shape.block_size,
                    self.num_slots, self.nbytes / 2**20, device)  # fmt: skip

    @classmethod
    def from_budget(cls, shape: PoolShape, budget_bytes: int, device: torch.device,
                    scratch_block: bool = False) -> KVPool:  # fmt: skip
        return cls(shape, budget_bytes // shape.bytes_per_block - int(scratch_block), device, scratch_block)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return (self.num_blocks + int(self.scratch_block is not None)) * self.shape.bytes_per_block

    def store(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys``/``values`` [T, H, D] of new tokens into ``slots`` [T] of ``layer``; into an FP8 pool
        clamped to the format's range first (a cast past it gives NaN) and cast, scale 1 (vLLM's default)."""
        if self.shape.dtype == FP8:  # index_copy_ has no FP8 kernel (CPU, CUDA): copied as the bytes they are
            keys, values = (x.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8) for x in (keys, values))
            self.keys[layer].view(torch.uint8).index_copy_(0, slots, keys)
            self.values[layer].view(torch.uint8).index_copy_(0, slots, values)
            return
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)
