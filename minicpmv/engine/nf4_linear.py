"""Which kernel computes the int4 model's LLM linears: bitsandbytes' or ours (kernels/nf4.py), chosen at start-up.

``EngineConfig.int4_kernel``: "bitsandbytes" keeps ``bnb.nn.Linear4bit.forward`` (on CUDA it dequantizes the
whole weight and then matmuls for more than a few rows); "triton" computes every 4-bit linear of the LLM with the
fused NF4 kernel (on the CPU under Triton's interpreter: how tests run the engine through it); "auto" takes the
kernel on CUDA if it agrees with ``dequantize_4bit`` + matmul on one of the model's own layers at a few row counts
(``self_test``), else bitsandbytes with a warning; on the CPU always bitsandbytes.

Only the LLM's ``Linear4bit`` modules (``model.llm``) are switched, never the vision tower's. The switch is an
instance attribute ``forward`` (an ``NF4Forward``) on the module: the module, its parameters and its state dict
stay as loaded, ``isinstance(module, Linear4bit)`` still holds, and removing the attribute restores bitsandbytes'
forward. The ``NF4Forward`` keeps views of the module's tensors (``NF4Weight``), built once per layer here.

Differences from bitsandbytes' own forward, all in the rounding: the kernel computes in the activations' dtype
(bitsandbytes casts fp16 inputs to the layer's ``compute_dtype``), rounds the dequantized weight once to that
dtype (bitsandbytes to the checkpoint's dtype first, bf16 for the int4 repository), and accumulates in float32.
On the CPU bitsandbytes computes in bf16 whatever the activations (its AVX512-BF16 kernel) or in float32.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

MODES = ("auto", "triton", "bitsandbytes")
SELF_TEST_ROWS = (1, 3, 8, 24)  # the GEMV kernel (with its split on a GPU) at 1, 3 and 8 rows, the tiled one at 24
SELF_TEST_TOLERANCE = 1e-2  # |kernel - reference| <= this x (max |reference| + |reference|), elementwise


class NF4Forward:
    """A ``Linear4bit``'s forward through the NF4 kernel: ``x @ W^T + bias`` in ``x``'s dtype. Holds the weight's
    views and the module's bias, not the module (no module -> forward -> module cycle). The bias is converted to
    the activations' dtype once per dtype (the int4 loader stores it in the compute dtype): for ``dtype`` (the
    model's) here, before any CUDA graph is captured."""

    def __init__(self, module, dtype: torch.dtype | None = None) -> None:
        from minicpmv.engine.kernels.nf4 import NF4Weight  # imports triton: only where the kernel is wanted

        self.weight = NF4Weight.from_module(module)
        self.bias = module.bias
        self._bias_as: dict[torch.dtype, torch.Tensor] = {}
        if dtype is not None:
            self._bias(dtype)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.bias is None:
            return None
        converted = self._bias_as.get(dtype)
        if converted is None:
            converted = self._bias_as[dtype] = self.bias.detach().to(dtype).contiguous()
        return converted

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.matmul(x, self._bias(x.dtype))


def llm_linear4bit(model) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every ``bnb.nn.Linear4bit`` of the model's LLM, in module order (none for a model
    loaded without quantization: bitsandbytes is not even imported then)."""
    if getattr(model, "quantization", None) is None:
        return []
    from minicpmv.offline import import_bitsandbytes

    bnb = import_bitsandbytes()
    return [(name, m) for name, m in model.llm.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def _restore(layers) -> None:
    for _, module in layers:
        if isinstance(module.__dict__.get("forward"), NF4Forward):
            del module.forward


def self_test(module, dtype: torch.dtype, device: torch.device, rows=SELF_TEST_ROWS) -> str | None:
    """None if the kernel agrees with ``dequantize_4bit`` (in the activations' dtype) + a float32 matmul (+ bias)
    on ``module`` (a ``Linear4bit``) for each row count of ``rows``, random activations; else what differs.
    Leaves the module as it is."""
    from minicpmv.offline import import_bitsandbytes

    functional = import_bitsandbytes().functional
    try:
        forward = NF4Forward(module)
        weight = functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype).float()
        bias = None if module.bias is None else module.bias.detach().to(dtype).float()
        generator = torch.Generator().manual_seed(0)
        for count in rows:
            x = torch.randn(count, module.in_features, generator=generator).to(device=device, dtype=dtype)
            expected = x.float() @ weight.T + (0 if bias is None else bias)
            got = forward(x)
            scale = float(expected.abs().max())
            if got.shape != expected.shape or got.dtype != dtype:
                return f"{count} rows: {got.dtype} {tuple(got.shape)} instead of {dtype} {tuple(expected.shape)}"
            diff = (got.float() - expected).abs()
            bound = SELF_TEST_TOLERANCE * (scale + expected.abs())
            if not bool(torch.isfinite(got).all()) or bool((diff > bound).any()):
                return (f"{count} rows: differs from dequantize_4bit + matmul by up to {float(diff.max()):.3g} "
                        f"(values up to {scale:.3g})")  # fmt: skip
    except Exception as e:  # noqa: BLE001 (any failure means: not usable here)
        return f"{type(e).__name__}: {e}"
    return None


def select_int4_kernel(model, mode: str = "auto", device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> str:  # fmt: skip
    """Set the kernel of the model's LLM 4-bit linears by ``mode`` (``MODES``) and return what was chosen and why
    (also logged: INFO, WARNING when "auto" falls back). "triton" raises RuntimeError where the kernel cannot take
    a layer (e.g. a blocksize other than 64). Run it before anything is captured in a CUDA graph."""
    if mode not in MODES:
        raise ValueError(f"unknown int4_kernel {mode!r}; choose {', '.join(MODES)}")
    layers = llm_linear4bit(model)
    if not layers:
        return "no 4-bit linears"
    device = torch.device(device if device is not None else model.device)
    dtype = dtype or model.dtype
    if mode == "bitsandbytes" or (mode == "auto" and device.type != "cuda"):
        _restore(layers)
        selection = "bitsandbytes (asked for)" if mode == "bitsandbytes" else f"bitsandbytes (auto on {device.type})"
        logger.info("int4 linears: %s", selection)
        return selection
    error = None
    if mode == "auto":
        probe = next((m for _, m in layers if m.bias is not None), layers[0][1])
        error = self_test(probe, dtype, device)
    forwards = {}
    if error is None:
        try:
            forwards = {name: NF4Forward(module, dtype) for name, module in layers}
        except Exception as e:  # noqa: BLE001 (a layer the kernel cannot take: all stay with bitsandbytes)
            error = f"{type(e).__name__}: {e}"
    if error is not None:
        _restore(layers)
        if mode == "triton":
            raise RuntimeError(f"int4_kernel 'triton' is not usable here: {error}")
        selection = f"bitsandbytes: the Triton NF4 kernel is not usable here ({error})"
        logger.warning("int4 linears: %s", selection)
        return selection
    for name, module in layers:
        module.forward = forwards[name]
    where = "under Triton's interpreter" if device.type != "cuda" else "compiled"
    reason = "asked for" if mode == "triton" else "passed the self-test"
    selection = f"triton NF4 kernel, {where} ({reason}; {len(layers)} LLM linears)"
    logger.info("int4 linears: %s", selection)
    return selection
