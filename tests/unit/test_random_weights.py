"""minicpmv.devtools.random_weights: random tensors by rule, and checkpoints written shard by shard.

The checkpoints are checked the way a real one would be used (load_model, greedy generation, the
pre-quantized int4 path) and against the tiny int4 checkpoint, whose layout comes from bitsandbytes' own
``Linear4bit.state_dict()``; the memory check runs the writer in a fresh process and reads its peak RSS.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.utils import unpack_tensor_to_dict
from safetensors import safe_open
from safetensors.torch import save_file

from minicpmv.devtools.random_weights import random_tensors, write_random_checkpoint
from minicpmv.devtools.reference_config import tiny_config
from minicpmv.loading import load_model
from minicpmv.tokenizer import load_tokenizer

# Per-weight relative L2 error of nf4 (blocksize 64) on Gaussian weights is ~9.2% (tests/unit/test_loading.py);
# a weight closer than the minimum was not quantized at all.
NF4_WEIGHT_ERROR_MAX = 0.12
NF4_WEIGHT_ERROR_MIN = 0.05
SMALL_SHARD = 16 << 20  # the tiny model is ~160 MB, mostly its two 78 MB vocab matrices
QUANT_STATE_BLOB = ".weight.quant_state.bitsandbytes__nf4"


def read_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of ``directory``'s safetensors files, and which file holds it."""
    state, where = {}, {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert key not in state, f"{key} is in two files"
                state[key], where[key] = f.get_tensor(key), file.name
    return state, where


def tiny_live_ids(directory: Path) -> torch.Tensor:
    return torch.tensor(sorted(load_tokenizer(directory).get_vocab().values()))


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("random_bf16"), tiny_config(), shard_bytes=SMALL_SHARD)


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("random_int4")
    return write_random_checkpoint(out, tiny_config(), int4=True, shard_bytes=SMALL_SHARD, seed=3)


def test_random_tensors_follow_their_rules():
    live = torch.tensor([0, 5, 128244, 151665])
    tensors = dict(random_tensors(tiny_config(), seed=1, live_ids=live))
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors.values())
    for name in ("llm.model.norm.weight", "llm.model.layers.0.input_layernorm.weight",
                 "vpm.encoder.layers.1.layer_norm1.weight", "vpm.post_layernorm.weight", "resampler.ln_q.weight"):  # fmt: skip
        assert (tensors[name] == 1).all(), name
    biases = [name for name in tensors if name.endswith("bias")]
    assert "resampler.attn.in_proj_bias" in biases and all((tensors[name] == 0).all() for name in biases)
    for name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
        dead = torch.ones(tensors[name].shape[0], dtype=torch.bool)
        dead[live] = False
        assert (tensors[name][dead] == 0).all() and (tensors[name][live] != 0).any(dim=1).all()
    down = tensors["llm.model.layers.0.mlp.down_proj.weight"].float()  # fan_in = intermediate_size 512
    assert down.mean().abs() < 0.01 and abs(down.std().item() * 512**0.5 - 1) < 0.05
    patches = tensors["vpm.embeddings.patch_embedding.weight"].float()  # fan_in = 3 * 14 * 14
    assert abs(patches.std().item() * (3 * 14 * 14) ** 0.5 - 1) < 0.05


def test_random_tensors_are_deterministic_per_seed():
    def some(seed: int, live_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        wanted = ("resampler.query", "llm.model.layers.1.mlp.up_proj.weight", "vpm.encoder.layers.0.mlp.fc1.weight")
        return {k: v for k, v in random_tensors(tiny_config(), seed=seed, live_ids=live_ids) if k in wanted}

    first = some(0, None)
    same = some(0, torch.arange(10))  # which vocab rows are drawn does not move the other tensors
    other = some(1, None)
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def test_bf16_checkpoint_is_sharded_and_indexed(bf16_checkpoint):
    state, where = read_checkpoint(bf16_checkpoint)
    index = json.loads((bf16_checkpoint / "model.safetensors.index.json").read_text())
    files = sorted(set(where.values()))
    assert len(files) >= 3
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert index["weight_map"] == where
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for file in files:
        sizes = [t.numel() * t.element_size() for k, t in state.items() if where[k] == file]
        assert sum(sizes) <= SMALL_SHARD or len(sizes) == 1, file
    assert not list(bf16_checkpoint.glob("*.partial"))
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        assert (bf16_checkpoint / name).is_file(), name
    assert json.loads((bf16_checkpoint / "config.json").read_text()) == tiny_config()


def test_bf16_checkpoint_holds_the_random_tensors(bf16_checkpoint):
    state, _ = read_checkpoint(bf16_checkpoint)
    expected = random_tensors(tiny_config(), seed=0, live_ids=tiny_live_ids(bf16_checkpoint))
    names = []
    for name, tensor in expected:
        assert torch.equal(state[name], tensor), name
        names.append(name)
    assert sorted(names) == sorted(state)


def test_bf16_checkpoint_loads_and_generates_text(bf16_checkpoint):
    model = load_model(bf16_checkpoint, dtype="bfloat16")
    tokenizer = load_tokenizer(bf16_checkpoint)
    inputs = tokenizer(["Total amount due?"], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate_greedy(inputs.input_ids, inputs.attention_mask, max_new_tokens=6)[0]
    assert len(generated) == 6
    assert set(generated) <= set(tiny_live_ids(bf16_checkpoint).tolist())  # dead ids have logit 0, live ones win
    assert tokenizer.decode(generated, skip_special_tokens=True).strip()


def test_int4_checkpoint_has_the_layout_of_the_tiny_int4_one(int4_checkpoint, tiny_int4):
    ours, _ = read_checkpoint(int4_checkpoint)
    theirs, _ = read_checkpoint(tiny_int4)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        if name.endswith(QUANT_STATE_BLOB):
            # A JSON blob: its length depends on the digits of the float offset of double quantization.
            mine, reference = unpack_tensor_to_dict(tensor), unpack_tensor_to_dict(theirs[name])
            assert mine.pop("nested_offset") != 0 and reference.pop("nested_offset") != 0
            assert mine == reference, name
        else:
            assert tensor.shape == theirs[name].shape, name
    config, reference = (json.loads((d / "config.json").read_text()) for d in (int4_checkpoint, tiny_int4))
    assert config == reference
    assert config["_name_or_path"] == "openbmb/MiniCPM-V-2_6-int4"


def test_int4_checkpoint_loads_prequantized_within_nf4_error_of_the_bf16_weights(int4_checkpoint):
    model = load_model(int4_checkpoint, dtype="bfloat16")
    assert model.quantization is not None  # the pre-quantized path: config.json's quantization_config
    expected = dict(random_tensors(tiny_config(), seed=3, live_ids=tiny_live_ids(int4_checkpoint)))
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 24
    for name, module in quantized.items():
        module.state_dict()  # undoes bitsandbytes' CPU-kernel repacking, should a forward have happened
        weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        reference = expected[f"{name}.weight"].float()
        error = ((weight - reference).norm() / reference.norm()).item()
        assert NF4_WEIGHT_ERROR_MIN < error < NF4_WEIGHT_ERROR_MAX, (name, error)
    params = dict(model.named_parameters())
    for name in ("llm.lm_head.weight", "resampler.kv_proj.weight", "vpm.encoder.layers.0.self_attn.out_proj.weight",
                 "llm.model.embed_tokens.weight", "llm.model.layers.0.self_attn.q_proj.bias"):  # fmt: skip
        assert torch.equal(params[name], expected[name]), name  # unquantized tensors are stored as drawn
    inputs = load_tokenizer(int4_checkpoint)(["Hello"], return_tensors="pt")
    with torch.no_grad():
        assert len(model.generate_greedy(inputs.input_ids, inputs.attention_mask, max_new_tokens=3)[0]) == 3


def test_a_failed_write_leaves_no_loadable_checkpoint(tmp_path, monkeypatch):
    from minicpmv.devtools import random_weights

    saved = []

    def save_twice_then_fail(tensors, filename, metadata=None):
        if len(saved) == 2:
            Path(filename).write_bytes(b"half a shard")
            raise OSError("disk full")
        saved.append(filename)
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(random_weights, "save_file", save_twice_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_random_checkpoint(tmp_path, tiny_config(), shard_bytes=SMALL_SHARD)
    assert len(saved) == 2
    assert not list(tmp_path.glob("model*")) and not (tmp_path / "config.json").exists()


# In a fresh process: imports and a warm-up first (tokenizer, meta model, safetensors), then the peak RSS is
# reset to the RSS now and read after the write. The peak is the process's own VmHWM, not ru_maxrss: after
# exec, ru_maxrss also counts the parent's peak (here the pytest process, models loaded and all). Should the
# reset be refused, the peak can only overstate the write's growth, never understate it.
MEMORY_SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from minicpmv.config import MiniCPMVConfig
from minicpmv.devtools.random_weights import write_random_checkpoint
from minicpmv.devtools.tiny_tokenizer import write_tiny_tokenizer
from minicpmv.modeling.minicpmv import MiniCPMV
from minicpmv.tokenizer import load_tokenizer


def status_bytes(field):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


out, config, shard_bytes = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
with tempfile.TemporaryDirectory() as tmp:
    write_tiny_tokenizer(Path(tmp))
    load_tokenizer(Path(tmp))
    with torch.device("meta"):
        MiniCPMV(MiniCPMVConfig.from_dict(config))
    save_file({"x": torch.empty(1024, dtype=torch.bfloat16).normal_()}, str(Path(tmp) / "x.safetensors"))
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
except OSError:
    pass
rss_before = status_bytes("VmRSS")
write_random_checkpoint(out, config, shard_bytes=shard_bytes)
print(json.dumps({"growth": status_bytes("VmHWM") - rss_before}))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak RSS from /proc (Linux)")
def test_writing_holds_about_one_shard_not_the_model(tmp_path):
    """A ~570 MB checkpoint in 32 MB shards: the writer's peak RSS grows by well under the model's size.

    Expected: about one shard plus the largest tensor (a 78 MB vocab matrix) plus the allocator's slack,
    measured 120-130 MB; the former all-in-RAM writer (benchmarks/serving.py) grew by 1.1 GB here.
    """
    config = tiny_config()
    config.update(intermediate_size=16384, num_hidden_layers=16, max_window_layers=16)
    out = tmp_path / "checkpoint"
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(out), json.dumps(config), str(32 << 20)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    growth = json.loads(run.stdout.strip().splitlines()[-1])["growth"]
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert 500e6 < total < 650e6
    assert growth < 0.4 * total, f"peak RSS grew by {growth / 1e6:.0f} MB writing {total / 1e6:.0f} MB"
