"""Loading tiny checkpoints: the int4 layout (MODEL_FACTS §1.2, §2.4), the 4-bit paths, dtypes and errors.

The tiny checkpoints (tests/conftest.py) have the real architecture at 2 LLM and 2 vision layers;
``tiny_int4`` holds exactly the weights of ``tiny_full`` (same seed), quantized to nf4.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import weakref
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from safetensors.torch import load_file, save_file
from torch import nn

from minicpmv.config import ConfigError, MiniCPMVConfig
from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint
from minicpmv.loading import CheckpointError, build_model, checkpoint_files, iter_tensors, load_model, parse_dtype
from minicpmv.modeling.minicpmv import MiniCPMV

UNK_ID = 128244  # the image placeholder token
IMAGE_BOUND = (8, 72)  # half-open, query_num = 64 positions
PROMPT_LENGTH = 80
TGT_SIZE = (2, 3)  # patches (h, w) of the one image chunk
# Serialized tensors of one bitsandbytes nf4 weight with double quantization (MODEL_FACTS §2.4).
QUANT_WEIGHT_SUFFIXES = (
    ".weight",
    ".weight.absmax",
    ".weight.quant_map",
    ".weight.nested_absmax",
    ".weight.nested_quant_map",
    ".weight.quant_state.bitsandbytes__nf4",
)
# Per-weight relative L2 error of nf4 (blocksize 64) on Gaussian weights is ~9.2% (measured 0.0907-0.0928
# over the 24 tiny modules, alike under every ISA variant); 0.12 catches a wrong blocksize, absmax or code book.
NF4_WEIGHT_ERROR_MAX = 0.12
# Any 4-bit code is that coarse: a weight that comes back closer than this was not quantized.
NF4_WEIGHT_ERROR_MIN = 0.05


def expected_quantized_modules() -> set[str]:
    """MODEL_FACTS §2.4 at the tiny size, written out independently of the loader."""
    names = {
        f"llm.model.layers.{i}.{p}"
        for i in range(2)
        for p in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        )
    }  # fmt: skip
    names |= {
        f"vpm.encoder.layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1", "mlp.fc2")
    }
    return names


def read_state(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def write_single_file(src: Path, dst: Path, state: dict[str, torch.Tensor]) -> Path:
    """``src``'s config.json plus ``state`` as one model.safetensors (no index)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    return dst


def load_modified(src: Path, dst: Path, state: dict[str, torch.Tensor], **kwargs) -> MiniCPMV:
    """Load ``state`` under ``src``'s config.json; bf16, the cheapest load on the CPU."""
    return load_model(write_single_file(src, dst, state), dtype="bfloat16", **kwargs)


def prompt(with_image: bool) -> dict:
    """One sample: random known ids (0..999 is the tiny tokenizer's vocabulary) around a run of 64 <unk>."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, PROMPT_LENGTH), generator=gen)
    start, end = IMAGE_BOUND
    ids[0, start:end] = UNK_ID
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if with_image:
        h, w = TGT_SIZE
        inputs["pixel_values"] = [[torch.randn(3, 14, 14 * h * w, generator=gen)]]
        inputs["tgt_sizes"] = [torch.tensor([[h, w]])]
        inputs["image_bounds"] = [torch.tensor([[start, end]])]
    return inputs


def rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def standard_weight(module: bnb.nn.Linear4bit) -> bnb.nn.Params4bit:
    """The 4-bit weight in its serialized layout.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel at the first
    forward; ``state_dict()`` converts it back (for good), so tests see the same layout in any order.
    """
    module.state_dict()
    return module.weight


def dequantized(module: bnb.nn.Linear4bit) -> torch.Tensor:
    weight = standard_weight(module)
    return dequantize_4bit(weight.data, weight.quant_state).float()


def linear4bit_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.fixture(scope="module")
def full_model(tiny_full) -> MiniCPMV:
    """float32, as the other models here: the comparisons below are about loading, not bf16 rounding."""
    return load_model(tiny_full, dtype="float32")


@pytest.fixture(scope="module")
def int4_model(tiny_int4) -> MiniCPMV:
    return load_model(tiny_int4, dtype="float32")


@pytest.fixture(scope="module")
def nf4_model(tiny_full) -> MiniCPMV:
    """The full checkpoint quantized while loading."""
    return load_model(tiny_full, dtype="float32", quantization="nf4")


@pytest.fixture(scope="module")
def unrelated_model(tmp_path_factory) -> MiniCPMV:
    """Same architecture, other random weights: the scale of 'completely wrong' logits."""
    return load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_seed1"), seed=1), dtype="float32")


@pytest.fixture(scope="module")
def dequantized_model(tiny_full, int4_model) -> MiniCPMV:
    """The full architecture in float32 with the int4 model's dequantized weights."""
    model = load_model(tiny_full, dtype="float32")
    with torch.no_grad():
        for name in expected_quantized_modules():
            model.get_submodule(name).weight.copy_(dequantized(int4_model.get_submodule(name)))
    return model


@pytest.fixture(scope="module")
def full_state(tiny_full) -> dict[str, torch.Tensor]:
    return read_state(tiny_full)


@pytest.fixture(scope="module")
def int4_state(tiny_int4) -> dict[str, torch.Tensor]:
    return read_state(tiny_int4)


@pytest.fixture(scope="module")
def logits_of():
    """Logits of (model, with_image), computed once per module."""
    memo: dict[tuple[int, bool], torch.Tensor] = {}

    def run(model: MiniCPMV, with_image: bool) -> torch.Tensor:
        key = (id(model), with_image)
        if key not in memo:
            with torch.inference_mode():
                memo[key] = model(**prompt(with_image)).logits
        return memo[key]

    return run


# --- the int4 layout -----------------------------------------------------------------------------


def test_int4_checkpoint_loads_linear4bit_exactly_at_the_quantized_names(int4_model):
    assert linear4bit_names(int4_model) == expected_quantized_modules()
    for name in expected_quantized_modules():
        module = int4_model.get_submodule(name)
        state = standard_weight(module).quant_state
        assert module.weight.dtype == torch.uint8, name
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True), name
        assert tuple(state.shape) == (module.out_features, module.in_features), name
        assert module.compute_dtype == torch.bfloat16, name
    # The skipped linears and the non-linear weights stay plain modules with float weights.
    plain = {
        "llm.lm_head": nn.Linear,
        "llm.model.embed_tokens": nn.Embedding,
        "vpm.encoder.layers.0.self_attn.out_proj": nn.Linear,
        "vpm.encoder.layers.1.self_attn.out_proj": nn.Linear,
        "vpm.embeddings.patch_embedding": nn.Conv2d,
        "vpm.embeddings.position_embedding": nn.Embedding,
        "resampler.kv_proj": nn.Linear,
    }
    for name, cls in plain.items():
        module = int4_model.get_submodule(name)
        assert type(module) is cls, name
        assert module.weight.dtype == torch.float32, name
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in int4_model.resampler.modules())
    packed = {f"{name}.weight" for name in expected_quantized_modules()}
    for name, param in int4_model.named_parameters():
        if name not in packed:
            assert param.dtype.is_floating_point, name


def test_int4_safetensors_hold_the_serialized_names_of_section_2_4(int4_state, full_state):
    quantized = expected_quantized_modules()
    expected_keys = set(full_state) - {f"{name}.weight" for name in quantized}
    expected_keys |= {name + suffix for name in quantized for suffix in QUANT_WEIGHT_SUFFIXES}
    assert set(int4_state) == expected_keys

    for name in quantized:
        out_features, in_features = full_state[f"{name}.weight"].shape
        assert int4_state[f"{name}.weight"].dtype == torch.uint8, name
        assert int4_state[f"{name}.weight"].numel() == out_features * in_features // 2, name
        assert int4_state[f"{name}.weight.absmax"].dtype == torch.uint8, name  # double quantization
        blob = int4_state[f"{name}.weight.quant_state.bitsandbytes__nf4"]
        assert blob.dtype == torch.uint8, name
        state = json.loads(bytes(blob.tolist()))
        assert state["quant_type"] == "nf4" and state["blocksize"] == 64, name
        assert state["dtype"] == "bfloat16" and state["shape"] == [out_features, in_features], name
    # Everything not quantized (biases of quantized layers included) is the full checkpoint's bf16 tensor.
    for key in set(full_state) & set(int4_state) - {f"{name}.weight" for name in quantized}:
        assert int4_state[key].dtype == torch.bfloat16, key
        assert torch.equal(int4_state[key], full_state[key]), key


def test_int4_config_carries_the_quantization_block(tiny_int4):
    config = json.loads((tiny_int4 / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes"
    assert quant["load_in_4bit"] is True and quant["_load_in_4bit"] is True
    assert quant["load_in_8bit"] is False and quant["_load_in_8bit"] is False
    assert quant["bnb_4bit_quant_type"] == "nf4"
    assert quant["bnb_4bit_compute_dtype"] == "bfloat16"
    assert quant["bnb_4bit_use_double_quant"] is True
    assert quant["bnb_4bit_quant_storage"] == "uint8"
    assert quant["llm_int8_skip_modules"] == ["out_proj", "kv_proj", "lm_head"]
    assert quant["llm_int8_threshold"] == 6.0
    assert quant["llm_int8_has_fp16_weight"] is False
    assert quant["llm_int8_enable_fp32_cpu_offload"] is False


# --- reload path: pre-quantized == quantized at load time --------------------------------------------


def test_the_tiny_int4_checkpoint_is_quantized_without_the_loader_on_the_int4_repository_modules(
    tiny_int4, tmp_path, monkeypatch
):
    """The fixture quantizes with bitsandbytes directly (tiny_checkpoint.INT4_QUANTIZED, from MODEL_FACTS),
    so the comparisons below test the loader against an independent checkpoint, not against its own output."""
    import minicpmv.loading as loading
    from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("the int4 fixture must not be made by the loader it tests")

    for name in ("load_model", "build_model", "quantized_linear_names"):
        monkeypatch.setattr(loading, name, refuse)
    state = read_state(write_tiny_checkpoint(tmp_path / "int4", int4=True, seed=0))
    packed = {name.removesuffix(".weight") for name, t in state.items() if name.endswith(".weight") and
              t.dtype == torch.uint8}  # fmt: skip
    assert packed == set(expected_quantized_modules())
    assert state.keys() == read_state(tiny_int4).keys()


def test_prequantized_state_equals_quantizing_at_load(int4_model, nf4_model):
    assert linear4bit_names(nf4_model) == expected_quantized_modules()
    for name in expected_quantized_modules():
        reloaded, fresh = int4_model.get_submodule(name), nf4_model.get_submodule(name)
        assert torch.equal(standard_weight(reloaded).data, standard_weight(fresh).data), name
        assert torch.equal(dequantized(reloaded), dequantized(fresh)), name
    reloaded_state, fresh_state = int4_model.state_dict(), nf4_model.state_dict()
    assert reloaded_state.keys() == fresh_state.keys()
    for key, tensor in reloaded_state.items():
        assert torch.equal(tensor, fresh_state[key]), key


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_prequantized_logits_bit_identical_to_quantizing_at_load(
    int4_model, nf4_model, logits_of, with_image
):
    assert torch.equal(logits_of(int4_model, with_image), logits_of(nf4_model, with_image))


# --- int4 against full precision ------------------------------------------------------------------


def test_every_quantized_weight_is_within_nf4_error(int4_model, full_state):
    """nf4, blocksize 64: relative L2 error ~9% per Gaussian-like weight, bound 0.12 (see the constants)."""
    for name in expected_quantized_modules():
        error = rel_error(dequantized(int4_model.get_submodule(name)), full_state[f"{name}.weight"])
        assert NF4_WEIGHT_ERROR_MIN < error < NF4_WEIGHT_ERROR_MAX, (name, error)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_int4_logits_far_closer_to_full_than_an_unrelated_model(
    full_model, int4_model, unrelated_model, logits_of, with_image
):
    """Relative L2 error of the logits, float32 activations on the CPU.

    Measured: int4 vs full 0.30 (text) / 0.49 (image), unrelated (seed 1) vs full 1.41 / 1.41
    (~sqrt(2), uncorrelated logits). The tiny random model amplifies weight noise about 4x; a float32
    model with the dequantized weights gives the same 0.30 / 0.49 and 9% Gaussian weight noise 0.41 /
    0.57, so this is quantization error, not a loading fault. The bound: at most half the unrelated
    model's error (ratios measured 0.21 / 0.35, the same to 0.1% under every scripts/isa_matrix.sh variant).
    """
    reference = logits_of(full_model, with_image)
    int4_error = rel_error(logits_of(int4_model, with_image), reference)
    unrelated_error = rel_error(logits_of(unrelated_model, with_image), reference)
    assert int4_error <= 0.5 * unrelated_error, (int4_error, unrelated_error)
    if with_image:  # the image really reaches the logits, so the vision tower's 4-bit weights are tested
        assert not torch.allclose(reference, logits_of(full_model, False), atol=1e-3)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_int4_forward_equals_float_forward_with_dequantized_weights(
    dequantized_model, int4_model, logits_of, with_image
):
    """The 4-bit layers compute with their stored weights; what is left is bf16 compute rounding.

    Measured: int4 vs float32 with the dequantized weights 0.014 (text) / 0.027 (image) with bitsandbytes'
    AVX512-BF16 kernel, 0.008 / 0.014 without it (AVX2, AVX512 without BF16), the size of the full
    model in bf16 vs float32 (0.014 / 0.024); the bound is 3.7x the largest (margin for AMX's kernels), and
    weights other than the stored ones give the 4-bit error itself, 0.30 / 0.49.
    """
    error = rel_error(logits_of(int4_model, with_image), logits_of(dequantized_model, with_image))
    assert error < 0.1, error


# --- errors ----------------------------------------------------------------------------------------


def test_missing_tensor_is_named(tiny_full, full_state, tmp_path):
    state = dict(full_state)
    del state["vpm.post_layernorm.bias"]
    with pytest.raises(CheckpointError, match=r"missing \['vpm\.post_layernorm\.bias'\]"):
        load_modified(tiny_full, tmp_path, state)


def test_missing_weight_of_a_quantized_linear_is_named(tiny_full, full_state, tmp_path):
    state = dict(full_state)
    del state["llm.model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="missing") as info:
        load_modified(tiny_full, tmp_path, state, quantization="nf4")
    assert "llm.model.layers.1.mlp.up_proj.weight" in str(info.value)


def test_unexpected_tensor_is_named(tiny_full, full_state, tmp_path):
    state = dict(full_state)
    state["vpm.encoder.layers.0.extra.weight"] = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"unexpected \['vpm\.encoder\.layers\.0\.extra\.weight'\]"):
        load_modified(tiny_full, tmp_path, state)


def test_wrong_shape_names_the_key_and_both_shapes(tiny_full, full_state, tmp_path):
    state = dict(full_state)
    state["llm.model.norm.weight"] = torch.ones(255, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError) as info:
        load_modified(tiny_full, tmp_path, state)
    message = str(info.value)
    assert "llm.model.norm.weight" in message
    assert "(255,)" in message and "(256,)" in message


def test_directory_without_safetensors(tiny_full, tmp_path):
    shutil.copy(tiny_full / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_model(tmp_path)


def test_directory_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path)


def test_full_weights_under_an_int4_config_are_rejected(tiny_int4, full_state, tmp_path):
    with pytest.raises(CheckpointError, match="expected a packed 4-bit"):
        load_modified(tiny_int4, tmp_path, full_state)


def test_unknown_quantization_is_rejected(tiny_full):
    with pytest.raises(ValueError, match="unsupported quantization 'int8'"):
        load_model(tiny_full, quantization="int8")


def test_unknown_dtype_is_rejected(tiny_full):
    with pytest.raises(ValueError, match="unsupported dtype 'float8'"):
        load_model(tiny_full, dtype="float8")


def test_prequantized_weight_of_another_shape_is_rejected(tiny_int4, int4_state, tmp_path):
    """q_proj [256, 256] given k_proj's packed weight and state ([128, 256]) must not load."""
    state = dict(int4_state)
    for suffix in QUANT_WEIGHT_SUFFIXES:
        state["llm.model.layers.0.self_attn.q_proj" + suffix] = int4_state[
            "llm.model.layers.0.self_attn.k_proj" + suffix
        ].clone()
    with pytest.raises(CheckpointError, match=r"llm\.model\.layers\.0\.self_attn\.q_proj"):
        load_modified(tiny_int4, tmp_path, state)


def test_wrong_bias_shape_of_a_quantized_linear_is_rejected(tiny_full, full_state, tmp_path):
    state = dict(full_state)
    state["llm.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(255, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"q_proj\.bias"):
        load_modified(tiny_full, tmp_path, state, quantization="nf4")


def test_missing_quant_state_tensor_is_a_checkpoint_error(tiny_int4, int4_state, tmp_path):
    state = dict(int4_state)
    del state["llm.model.layers.0.self_attn.q_proj.weight.absmax"]
    with pytest.raises(CheckpointError, match=r"llm\.model\.layers\.0\.self_attn\.q_proj"):
        load_modified(tiny_int4, tmp_path, state)


# --- dtypes ----------------------------------------------------------------------------------------


def float_parameter_dtypes(model: MiniCPMV) -> set[torch.dtype]:
    """dtypes of all parameters but the 4-bit linears' (packed uint8 weight, compute-dtype bias)."""
    four_bit = {f"{name}.{leaf}" for name in linear4bit_names(model) for leaf in ("weight", "bias")}
    return {p.dtype for name, p in model.named_parameters() if name not in four_bit}


@pytest.mark.parametrize("checkpoint", ["tiny_full", "tiny_int4"])  # int4 + bf16: the GPU configuration
def test_bfloat16_load_gives_bfloat16_parameters_and_finite_logits(request, checkpoint):
    model = load_model(request.getfixturevalue(checkpoint), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert float_parameter_dtypes(model) == {torch.bfloat16}
    with torch.inference_mode():
        logits = model(**prompt(with_image=True)).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()


def test_auto_dtype_is_the_checkpoints_own_dtype(tiny_full, tiny_int4):
    """As transformers' dtype="auto": config.json's torch_dtype (bf16 for MiniCPM-V 2.6), on the CPU too."""
    for checkpoint in (tiny_full, tiny_int4):
        config = MiniCPMVConfig.from_pretrained(checkpoint)
        assert config.torch_dtype == "bfloat16"
        assert parse_dtype("auto", config) == parse_dtype(None, config) == torch.bfloat16
    config = MiniCPMVConfig.from_pretrained(tiny_full)
    assert parse_dtype("auto", dataclasses.replace(config, torch_dtype="float32")) == torch.float32
    assert parse_dtype("float32", config) == parse_dtype(torch.float32, config) == torch.float32
    with pytest.raises(ValueError, match="torch_dtype 'float64'"):
        parse_dtype("auto", dataclasses.replace(config, torch_dtype="float64"))


@pytest.mark.parametrize("checkpoint", ["tiny_full", "tiny_int4"])
def test_default_dtype_load_on_the_cpu_is_bfloat16(request, checkpoint):
    model = load_model(request.getfixturevalue(checkpoint))
    assert model.device.type == "cpu"
    assert model.dtype == torch.bfloat16
    assert float_parameter_dtypes(model) == {torch.bfloat16}
    with torch.inference_mode():
        assert torch.isfinite(model(**prompt(with_image=True)).logits).all()


# --- build_model -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("checkpoint", "loaded"), [("tiny_full", "full_model"), ("tiny_int4", "int4_model")])
def test_build_model_from_a_checkpoints_tensors_equals_load_model(request, logits_of, checkpoint, loaded):
    directory = request.getfixturevalue(checkpoint)
    model = build_model(
        MiniCPMVConfig.from_pretrained(directory), iter_tensors(checkpoint_files(directory)), dtype="float32"
    )
    assert torch.equal(logits_of(model, True), logits_of(request.getfixturevalue(loaded), True))


def test_build_model_quantizing_drops_each_full_weight_once_quantized(tiny_full, nf4_model, logits_of):
    """A caller may generate full-size weights one by one: with nf4, no full weight outlives its quantization.

    Counted when each tensor is handed over: the full weights of the 4-bit linears handed over so far
    that are still alive. The new one and the caller's last make at most 2 (all 24 if build_model kept
    them until the end).
    """
    quantized = {f"{name}.weight" for name in expected_quantized_modules()}
    alive: list[weakref.ref] = []
    most = 0

    def tensors():
        nonlocal most
        for name, tensor in iter_tensors(checkpoint_files(tiny_full)):
            tensor = tensor.clone()  # the caller's own memory, like a freshly generated weight
            if name in quantized:
                alive.append(weakref.ref(tensor))
                most = max(most, sum(ref() is not None for ref in alive))
            yield name, tensor
            del tensor

    model = build_model(MiniCPMVConfig.from_pretrained(tiny_full), tensors(), dtype="float32", quantization="nf4")
    assert len(alive) == len(quantized) and most <= 2, (len(alive), most)
    assert torch.equal(logits_of(model, False), logits_of(nf4_model, False))


def test_build_model_checks_the_tensors_like_load_model(tiny_full):
    config = MiniCPMVConfig.from_pretrained(tiny_full)
    tensors = ((k, t) for k, t in iter_tensors(checkpoint_files(tiny_full)) if k != "vpm.post_layernorm.bias")
    with pytest.raises(CheckpointError, match=r"missing \['vpm\.post_layernorm\.bias'\]"):
        build_model(config, tensors)
    with pytest.raises(CheckpointError, match=r"llm\.model\.norm\.weight: checkpoint shape \(255,\)"):
        build_model(config, [("llm.model.norm.weight", torch.ones(255))])
