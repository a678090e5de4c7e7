"""4-bit loads on the CPU at sizes of the full model: bitsandbytes' CPU repacking and the checkpoint's file mapping.

The awkward tiny config (``tiny_config(awkward=True)``) keeps the real vision MLP size 4304, which
bitsandbytes' CPU repacking of 4-bit weights can't handle; everything else is tiny.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import re
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16
from safetensors.torch import save_file

from minicpmv.config import MiniCPMVConfig, QuantizationConfig
from minicpmv.devtools.reference_config import full_config, tiny_config
from minicpmv.loading import load_model, quantized_linear_names
from minicpmv.modeling.minicpmv import MiniCPMV
from tests.unit.test_loading import prompt  # random known ids around one image chunk's placeholders

AVX512_BF16 = bool(has_avx512bf16())


def write_random_checkpoint(directory: Path, config_dict: dict, seed: int = 0) -> Path:
    """config.json and one bf16 model.safetensors of seeded random weights, scaled to keep activations O(1)."""
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = MiniCPMV(MiniCPMVConfig.from_dict(config_dict), attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.named_parameters():
        value = torch.randn(param.shape, generator=gen)
        if param.dim() > 1:
            value *= math.prod(param.shape[1:]) ** -0.5
        elif "norm" in name and name.endswith("weight"):
            value = 1 + 0.1 * value
        else:
            value *= 0.1
        state[name] = value.to(torch.bfloat16)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def linear4bit_modules(model: torch.nn.Module) -> dict[str, bnb.nn.Linear4bit]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def repackable(module: bnb.nn.Linear4bit) -> bool:
    """Whether bitsandbytes' CPU repacking takes this weight (tried on copies; the module is unchanged)."""
    try:
        _convert_weight_packed_for_cpu(module.weight.data.clone(), copy.deepcopy(module.weight.quant_state))
    except (AssertionError, RuntimeError):
        return False
    return True


def size_pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


@pytest.fixture(scope="module")
def awkward_checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny_awkward"), tiny_config(awkward=True))


@pytest.fixture(scope="module")
def awkward_nf4(awkward_checkpoint) -> MiniCPMV:
    """Quantized to nf4 while loading, bf16 as on a server, and left as bitsandbytes sets it up on this CPU."""
    return load_model(awkward_checkpoint, quantization="nf4")


@pytest.fixture(scope="module")
def awkward_nf4_forced(awkward_checkpoint) -> MiniCPMV:
    """As ``awkward_nf4``, but built as on a CPU with AVX512-BF16, whatever this one has."""
    with pytest.MonkeyPatch.context() as patch:
        # Linear4bit.__init__ sets support_avx512bf16_for_cpu from this function, the name it imported.
        patch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
        return load_model(awkward_checkpoint, quantization="nf4")


# --- bitsandbytes' CPU repacking -------------------------------------------------------------------------


def test_the_awkward_config_has_the_full_models_unrepackable_linears():
    """The sizes bitsandbytes can't repack (out % 32, in % 64) are in the same linears, full and awkward tiny."""

    def unrepackable(config_dict: dict) -> set[str]:
        with torch.device("meta"):
            model = MiniCPMV(MiniCPMVConfig.from_dict(config_dict))
        names = quantized_linear_names(model, QuantizationConfig().skip_modules)
        modules = {name: model.get_submodule(name) for name in names}
        return {size_pattern(n) for n, m in modules.items() if m.out_features % 32 or m.in_features % 64}

    full = unrepackable(full_config())
    assert full == {"vpm.encoder.layers.N.mlp.fc1", "vpm.encoder.layers.N.mlp.fc2"}
    assert unrepackable(tiny_config(awkward=True)) == full
    assert unrepackable(tiny_config()) == set()


def test_cpu_repacking_stays_on_exactly_where_bitsandbytes_can_repack(awkward_nf4_forced):
    """Meaningful on any CPU: the modules are built as on one with AVX512-BF16 (repacking on)."""
    modules = linear4bit_modules(awkward_nf4_forced)
    flags = {name: m.support_avx512bf16_for_cpu for name, m in modules.items()}
    assert flags == {name: repackable(m) for name, m in modules.items()}
    off = {size_pattern(name) for name, flag in flags.items() if not flag}
    assert off == {"vpm.encoder.layers.N.mlp.fc1", "vpm.encoder.layers.N.mlp.fc2"}


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_nf4_model_with_the_real_vision_mlp_size_runs_on_this_cpu(awkward_nf4, with_image):
    """An image through the vision tower and the resampler, then the LLM; and text alone.

    Without the loader's fix this fails only on CPUs with AVX512-BF16: bitsandbytes repacks only
    there, and its kernel for the repacked layout is registered only there (forced elsewhere, the
    repacked weights would go to a generic kernel that misreads them), so this forward can't be made
    to take that path on other CPUs; test_cpu_repacking_stays_on_exactly_where_bitsandbytes_can_repack
    checks the loader's choice of modules on any CPU. On AVX512-BF16 CPUs the other 4-bit linears
    must have been repacked (the fast path is kept).
    """
    with torch.inference_mode():
        logits = awkward_nf4(**prompt(with_image)).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    if AVX512_BF16:
        modules = linear4bit_modules(awkward_nf4)
        packed = {name for name, m in modules.items() if getattr(m.weight.quant_state, "packing_format_for_cpu", 0)}
        used = {name for name in modules if with_image or not name.startswith("vpm.")}
        expected = {name for name in used if not name.endswith(("mlp.fc1", "mlp.fc2"))}
        assert expected <= packed and not packed & {n for n in modules if n.endswith(("mlp.fc1", "mlp.fc2"))}


# --- the checkpoint's file mapping -----------------------------------------------------------------------


def mapped_files(directory: Path) -> list[str]:
    """Lines of /proc/self/maps that map a file under ``directory``."""
    prefix = str(directory.resolve())
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if prefix in line]


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")


@needs_proc
@pytest.mark.parametrize("kind", ["quantize_on_load", "prequantized"])
def test_4bit_load_on_the_cpu_keeps_no_checkpoint_file_mapped(kind, tiny_full, tiny_int4, tmp_path):
    """Every tensor of a 4-bit model owns its memory: a view would keep the whole (bf16) file mapped and resident.

    The checkpoint is copied first so that no other model in this process maps the same files.
    """
    source, quantization = (tiny_full, "nf4") if kind == "quantize_on_load" else (tiny_int4, None)
    directory = Path(shutil.copytree(source, tmp_path / "checkpoint"))
    model = load_model(directory, quantization=quantization)
    gc.collect()
    assert mapped_files(directory) == []
    with torch.inference_mode():
        assert torch.isfinite(model(**prompt(with_image=True)).logits).all()


@needs_proc
def test_full_bf16_load_on_the_cpu_stays_memory_mapped(tiny_full, tmp_path):
    """By design (instant load, reclaimable pages), and the check above would see a mapping."""
    directory = Path(shutil.copytree(tiny_full, tmp_path / "checkpoint"))
    model = load_model(directory, dtype="bfloat16")
    gc.collect()
    assert len({line.split()[-1] for line in mapped_files(directory)}) == 2  # both shards
    del model
    gc.collect()
    assert mapped_files(directory) == []
