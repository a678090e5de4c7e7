"""Triton kernels of the engine (attention over the paged KV pool, the LoRA matmuls of a packed step, the NF4
matmul of the int4 model's linears), proven on the CPU by Triton's interpreter and compiled ahead of time for
sm_90/sm_80 in the suite (aot.py)."""

from __future__ import annotations

from minicpmv.engine.kernels.spec import LaunchSpec


def launch_configs() -> list[LaunchSpec]:
    """Every kernel configuration the engine can launch (what the AOT test compiles)."""
    from minicpmv.engine.kernels import lora, nf4, paged_attention

    return paged_attention.launch_configs() + lora.launch_configs() + nf4.launch_configs()
