"""PEFT LoRA adapters on the tiny checkpoints, made as MiniCPM-V's recipe saves them, for the engine's tests and the
stack's (tests/conftest.py serves two from the session's tritonserver). ``peft`` is imported by the maker only."""

from __future__ import annotations

from pathlib import Path

ATTENTION = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
ALL_LINEAR = r"llm\..*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


def make_adapter(checkpoint: Path, out: Path, rank: int, targets: str, seed: int, vision: bool = False,
                 **lora) -> Path:  # fmt: skip
    """A PEFT adapter on the tiny model with random A and B (peft's init would make B zero: no effect), and
    with ``vision`` a vpm_resampler_embedtokens.pt as the recipe's --tune_vision saves it (every vision, resampler
    and embedding parameter, here the base's moved a little)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from minicpmv.loading import load_model

    torch.manual_seed(seed)
    model = load_model(checkpoint, dtype="float32")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, **lora)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # B of a trained adapter is not tiny: make its effect visible on the tiny model
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5 / rank**0.5)
    peft_model.save_pretrained(out)
    if vision:
        generator = torch.Generator().manual_seed(seed)
        state = {name: (p.detach() + 0.05 * torch.randn(p.shape, generator=generator)).contiguous()
                 for name, p in model.named_parameters()
                 if name.startswith(("vpm.", "resampler.", "llm.model.embed_tokens.")) and "lora" not in name}  # fmt: skip
        torch.save(state, out / "vpm_resampler_embedtokens.pt")
    return out
