"""Which attention kernels this torch can run here, found by running them (features are detected, not assumed:
the GPU machine has torch 2.11, our CPU machines 2.13, and kernels differ by version, device and dtype).

Each probe runs a small bf16 (CUDA) or float32 (CPU) attention of MiniCPM-V's LLM shape (28 query heads, 4 KV
heads, head_dim 128) and reports "yes", or "no: <reason>".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128


def _try(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (the reason is the answer)
        text = str(e).splitlines()[0] if str(e) else ""
        if "No viable backend" in text:  # torch's words when the forced kernel can't take these inputs
            return "no: not for these inputs (device, dtype, mask or head layout)"
        return f"no: {type(e).__name__}: {text[:160]}"
    return "yes"


def probe_attention(device: str) -> dict[str, str]:
    """One entry per kernel: SDPA backends (causal, GQA), SDPA with a boolean mask, varlen, FlexAttention."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(2, HEADS, 64, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(2, KV_HEADS, 64, HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn_like(k)
    mask = torch.ones(2, 1, 64, 64, dtype=torch.bool, device=device).tril()
    out: dict[str, str] = {"torch": torch.__version__}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        return out | {"sdpa_kernel": f"no: {e}"}
    backends = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                "math": "MATH"}  # fmt: skip
    for name, attr in backends.items():
        backend = getattr(SDPBackend, attr, None)
        if backend is None:
            out[f"sdpa_{name}"] = "no: not in this torch"
            continue

        def causal(backend=backend):
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def masked(backend=backend):
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        out[f"sdpa_{name}_causal_gqa"] = _try(causal)
        out[f"sdpa_{name}_bool_mask_gqa"] = _try(masked)
    out["varlen_attn"] = _probe_varlen(device, dtype)
    out["flex_attention_eager"] = _probe_flex(device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    return out


def _probe_varlen(device: str, dtype: torch.dtype) -> str:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        return f"no: {e}"

    def run():
        total = 96
        q = torch.randn(total, HEADS, HEAD_DIM, device=device, dtype=dtype)
        k = torch.randn(total, HEADS, HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn_like(k)
        cu = torch.tensor([0, 32, 96], dtype=torch.int32, device=device)
        varlen_attn(q, k, v, cu, cu, 64, 64)

    return _try(run)


def _probe_flex(device: str, dtype: torch.dtype) -> str:
    """FlexAttention, eager only: compiling it (torch.compile, 30-90 s cold on a GPU) measured a kernel that
    nothing here uses."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return f"no: {e}"

    def run():
        q = torch.randn(1, HEADS, 128, HEAD_DIM, device=device, dtype=dtype)
        k = torch.randn(1, KV_HEADS, 128, HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn_like(k)
        block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, 128, 128, device=device)
        flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is slow; that is the point of the probe
        return _try(run)
