"""What a kernel launch is, for ahead-of-time compilation: the kernel, its argument types and its constants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LaunchSpec:
    """One configuration the engine can launch. ``signature``: Triton's argument types by name ("*bf16",
    "*i64", "i32", "fp32", ...; constexpr arguments are left out); ``constexprs``: the compile-time constants;
    ``divisible_by_16``: the arguments the runtime specialises as multiples of 16 (pointers from torch's
    allocator, strides of 128-wide heads), so that AOT compiles what the JIT would. ``archs``: the compute
    capabilities it is launched on (an FP8-e4m3 KV cache needs sm_89 or later: Hopper only here)."""

    name: str
    kernel: Any  # triton.runtime.jit.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    divisible_by_16: tuple[str, ...] = ()
    archs: tuple[int, ...] = (90, 80)
