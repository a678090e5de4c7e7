"""The limits and knobs of one engine (one model instance), validated once.

Every field is also a config.pbtxt parameter of the same name (minicpmv_triton/parameters.py reads them from
here), so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

# LoRA targets (lora_target_modules) and adapter lists (lora_modules): parsed here, where the engine's settings
# are, for the engine (engine/lora.py) and the launcher (scripts/launch_triton.py) alike.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_TARGETS = (*ATTENTION_TARGETS, "gate_proj", "up_proj", "down_proj")


def parse_targets(text: str) -> tuple[str, ...]:
    """``lora_target_modules``: "attention" (q/k/v/o, the recipe's), "all" (+ gate/up/down) or a comma list."""
    text = text.strip()
    if text in ("attention", ""):
        return ATTENTION_TARGETS
    if text == "all":
        return ALL_TARGETS
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown:
        raise ValueError(f"lora_target_modules: unknown {unknown}; use attention, all, or of {', '.join(ALL_TARGETS)}")
    return names


def parse_modules(text: str | None, label: str = "lora_modules") -> dict[str, str]:
    """``lora_modules``: "name=path,name2=path2" (vLLM's ``--lora-modules`` spelling) -> {name: path}; errors
    (ValueError) start with ``label`` (scripts/launch_triton.py checks ``--lora-modules`` with it too)."""
    modules: dict[str, str] = {}
    for item in (text or "").replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, path = (part.strip() for part in item.partition("="))
        if not sep or not name or not path:
            raise ValueError(f"{label}: {item!r} is not name=path")
        if name in modules:
            raise ValueError(f"{label}: {name!r} is given twice")
        modules[name] = path
    return modules

@dataclass
class EngineConfig:
    """Limits of one engine (one model instance).

    ``max_num_seqs``: sequences running together. ``max_num_batched_tokens``: tokens computed in one step
    (a decoding sequence takes one, prefill chunks the rest: a long prompt is prefilled over several steps).
    ``max_prefill_attention_pairs``: query-key pairs prefill attention may take in one step (a chunk of q tokens
    at context c takes about q * c); unset: no limit. It keeps long-context chunks short where attention is
    the cost of a step (the CPU); see scheduler.py.
    ``max_waiting``: requests queued before ``submit`` raises QueueFullError. ``max_model_len``: context limit
    (default: the model's max_position_embeddings). ``block_size``: tokens per KV block. KV pool size:
    ``kv_cache_memory_mb`` if set, else on CUDA ``gpu_memory_utilization`` of the GPU's total memory less this
    process's weights, at most 95% of what is free (``kv_pool.cuda_kv_budget``; two engines on one GPU at 0.45
    each), on the CPU 1024 MB; ``num_kv_blocks`` overrides both with an exact block count
    (tests, exact sizing). ``enable_prefix_caching``: share the KV of identical
    prompt prefixes (images included) between requests. ``max_encoder_slices_per_step``: image slices
    encoded per step while other sequences decode (all at once when none does); unset: a prefill chunk's
    worth, ``max_num_batched_tokens // 64`` (each slice becomes 64 positions). ``attention_backend``:
    "auto", "reference", "varlen" or "triton" (attention.py; "auto" on CUDA: the Triton paged kernel if it passes
    its self-test). ``cuda_graphs``: on CUDA, capture decode steps as CUDA graphs at start-up and replay them
    (cuda_graphs.py; vLLM's ``enforce_eager`` is its opposite): with the paged kernel one graph per batch size
    for any context up to ``max_model_len``; without it (gathered keys) graphs per context bucket up to
    ``cuda_graph_max_len`` tokens (longer ones decode eagerly); no effect on the CPU. ``kv_cache_dtype``:
    "auto" (the model's dtype) or "fp8" (e4m3, scale 1, values clamped to +-448 as they are stored: half the KV
    bytes, twice the tokens; read only by the Triton paged kernel, so it needs that backend, and sm_89 or later
    on CUDA; off by default until measured on a GPU).
    ``json_any_whitespace``: JSON mode, JSON schemas and tool envelopes allow whitespace between JSON tokens
    (at most 16 characters each: xgrammar's permissive form); default off: compact JSON (structured.py).
    LoRA adapters (engine/lora.py, minicpmv/lora.py): on with ``enable_lora`` or when ``lora_modules`` lists some
    ("name=path,name2=path2", registered at start-up); ``max_loras`` resident on the device at once (the slots
    are allocated before the KV cache, so the cache budget leaves room for them), ranks up to ``max_lora_rank``,
    on the LLM layers ``lora_target_modules`` names ("attention": q/k/v/o, the official recipe's; "all": + the
    MLP; or a comma list); ``lora_dir``: the directory adapters may be loaded from at runtime (unset: no
    runtime loading).
    ``int4_kernel``: what computes the 4-bit (NF4) linears of an int4 model's LLM (nf4_linear.py): "auto" (on CUDA
    the fused Triton NF4 kernel, kernels/nf4.py, if it passes a start-up self-test on one of the model's layers,
    else bitsandbytes with a warning; bitsandbytes on the CPU), "triton" (the kernel; on the CPU through Triton's
    interpreter, for tests) or "bitsandbytes". The vision tower's 4-bit linears always stay with bitsandbytes.
    """

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_prefill_attention_pairs: int | None = None
    max_waiting: int = 256
    max_model_len: int | None = None
    default_max_tokens: int = 2048
    vision_cache_size: int = 64
    default_max_slice_nums: int | None = None
    block_size: int = 16
    kv_cache_memory_mb: int | None = None
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    max_encoder_slices_per_step: int | None = None
    attention_backend: str = "auto"
    cuda_graphs: bool = True
    cuda_graph_max_len: int = 8192
    kv_cache_dtype: str = "auto"
    json_any_whitespace: bool = False
    enable_lora: bool = False
    lora_modules: str | None = None
    max_loras: int = 4
    max_lora_rank: int = 64
    lora_target_modules: str = "attention"
    lora_dir: str | None = None
    int4_kernel: str = "auto"

    @property
    def lora_enabled(self) -> bool:
        return bool(self.enable_lora or (self.lora_modules or "").strip())

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "default_max_tokens", "block_size",
                     "cuda_graph_max_len"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        for name in ("kv_cache_memory_mb", "num_kv_blocks", "max_prefill_attention_pairs",
                     "max_encoder_slices_per_step"):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1 (or unset)")
        if self.max_loras < 1 or not 1 <= self.max_lora_rank <= 512:
            raise ValueError("EngineConfig.max_loras must be >= 1 and max_lora_rank in 1..512")
        if self.int4_kernel not in ("auto", "triton", "bitsandbytes"):
            raise ValueError(f"EngineConfig.int4_kernel must be 'auto', 'triton' or 'bitsandbytes', got "
                             f"{self.int4_kernel!r}")  # fmt: skip
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"EngineConfig.kv_cache_dtype must be 'auto' or 'fp8', got {self.kv_cache_dtype!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("EngineConfig.gpu_memory_utilization must be in (0, 1]")
