"""Full-size architecture (meta device), the resampler's conventions, and config parsing."""

from __future__ import annotations

import json

import pytest
import torch

from minicpmv.config import ConfigError, MiniCPMVConfig
from minicpmv.devtools.reference_config import full_config
from minicpmv.loading import quantized_linear_names
from minicpmv.modeling.minicpmv import MiniCPMV
from minicpmv.modeling.resampler import Resampler, sincos_2d


def expected_full_size_shapes() -> dict[str, tuple[int, ...]]:
    """MODEL_FACTS §2.2, written out independently of the model code."""
    d, v, inter, vinter, vocab = 3584, 1152, 18944, 4304, 151666
    shapes: dict[str, tuple[int, ...]] = {
        "llm.model.embed_tokens.weight": (vocab, d),
        "llm.model.norm.weight": (d,),
        "llm.lm_head.weight": (vocab, d),
    }
    for layer in range(28):
        p = f"llm.model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
            p + "self_attn.k_proj.weight": (512, d), p + "self_attn.k_proj.bias": (512,),
            p + "self_attn.v_proj.weight": (512, d), p + "self_attn.v_proj.bias": (512,),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })  # fmt: skip
    shapes.update({
        "vpm.embeddings.patch_embedding.weight": (v, 3, 14, 14), "vpm.embeddings.patch_embedding.bias": (v,),
        "vpm.embeddings.position_embedding.weight": (4900, v),
        "vpm.post_layernorm.weight": (v,), "vpm.post_layernorm.bias": (v,),
    })  # fmt: skip
    for layer in range(27):
        p = f"vpm.encoder.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (v, v)
            shapes[p + f"self_attn.{proj}.bias"] = (v,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{norm}.weight"] = (v,)
            shapes[p + f"{norm}.bias"] = (v,)
        shapes.update({p + "mlp.fc1.weight": (vinter, v), p + "mlp.fc1.bias": (vinter,),
                       p + "mlp.fc2.weight": (v, vinter), p + "mlp.fc2.bias": (v,)})  # fmt: skip
    shapes.update({
        "resampler.query": (64, d), "resampler.kv_proj.weight": (d, v),
        "resampler.ln_q.weight": (d,), "resampler.ln_q.bias": (d,),
        "resampler.ln_kv.weight": (d,), "resampler.ln_kv.bias": (d,),
        "resampler.attn.in_proj_weight": (3 * d, d), "resampler.attn.in_proj_bias": (3 * d,),
        "resampler.attn.out_proj.weight": (d, d), "resampler.attn.out_proj.bias": (d,),
        "resampler.ln_post.weight": (d,), "resampler.ln_post.bias": (d,),
        "resampler.proj": (d, d),
    })  # fmt: skip
    return shapes


@pytest.fixture(scope="module")
def full_meta_model() -> MiniCPMV:
    with torch.device("meta"):
        return MiniCPMV(MiniCPMVConfig.from_dict(full_config()))


def test_full_size_parameter_names_shapes_and_count(full_meta_model):
    ours = {name: tuple(p.shape) for name, p in full_meta_model.named_parameters()}
    assert ours == expected_full_size_shapes()
    assert sum(p.numel() for p in full_meta_model.parameters()) == 8_099_175_152
    # No persistent buffers: the checkpoint holds parameters only (pos_embed is non-persistent there).
    assert set(full_meta_model.state_dict()) == set(ours)


def test_full_size_int4_quantized_set(full_meta_model):
    """MODEL_FACTS §2.4: 28x7 LLM linears and 27x5 vision linears; out_proj, kv_proj, lm_head skipped."""
    names = set(quantized_linear_names(full_meta_model, ("out_proj", "kv_proj", "lm_head")))
    expected = {
        f"llm.model.layers.{i}.self_attn.{p}"
        for i in range(28)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    expected |= {
        f"llm.model.layers.{i}.mlp.{p}" for i in range(28) for p in ("gate_proj", "up_proj", "down_proj")
    }
    expected |= {
        f"vpm.encoder.layers.{i}.self_attn.{p}" for i in range(27) for p in ("q_proj", "k_proj", "v_proj")
    }
    expected |= {f"vpm.encoder.layers.{i}.mlp.{p}" for i in range(27) for p in ("fc1", "fc2")}
    assert names == expected
    assert len(names) == 331


def test_sincos_first_half_is_column_second_half_is_row():
    table = sincos_2d(256, 4, 6)
    # First half varies with the column only, second half with the row only.
    assert torch.equal(torch.from_numpy(table[0, :, :128]), torch.from_numpy(table[3, :, :128]))
    assert torch.equal(torch.from_numpy(table[:, 0, 128:]), torch.from_numpy(table[:, 5, 128:]))
    assert not torch.equal(torch.from_numpy(table[0, 0, :128]), torch.from_numpy(table[0, 1, :128]))
    # sin(c * omega_0) with omega_0 = 1: column 2, first entry.
    assert table[1, 2, 0] == pytest.approx(float(torch.sin(torch.tensor(2.0))), abs=1e-6)
    assert table[2, 1, 128] == pytest.approx(float(torch.sin(torch.tensor(2.0))), abs=1e-6)


def _random_resampler(seed: int = 0) -> Resampler:
    torch.manual_seed(seed)
    r = Resampler(num_queries=8, embed_dim=256, num_heads=2, kv_dim=32)
    for p in r.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return r.eval()


def test_resampler_positions_go_into_keys_only():
    """With zero key weights the keys carry nothing, so a keys-only position embedding has no
    effect: the same features laid out as a 2x3 or a 3x2 grid give the same output. Positions
    added to the values (or queries) would change it."""
    r = _random_resampler()
    features = torch.randn(1, 6, 32)
    with torch.no_grad():
        assert not torch.allclose(r(features, torch.tensor([[2, 3]])), r(features, torch.tensor([[3, 2]])))
        w_k = r.attn.in_proj_weight[256:512]
        w_k.zero_()
        r.attn.in_proj_bias[256:512].zero_()
        torch.testing.assert_close(r(features, torch.tensor([[2, 3]])), r(features, torch.tensor([[3, 2]])))


def test_resampler_padding_does_not_change_valid_outputs():
    r = _random_resampler()
    a, b = torch.randn(1, 6, 32), torch.randn(1, 12, 32)
    with torch.no_grad():
        alone = r(a, torch.tensor([[2, 3]]))
        padded = torch.cat([a, torch.full((1, 6, 32), 7.0)], dim=1)
        together = r(torch.cat([padded, b]), torch.tensor([[2, 3], [3, 4]]))
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=0)


def test_config_parses_real_config_and_implicit_fields():
    cfg = MiniCPMVConfig.from_dict(full_config())
    assert cfg.use_image_id and cfg.vision_batch_size == 16 and cfg.slice.scale_resolution == 448
    assert cfg.num_vision_layers_used == 27 and cfg.vision.hidden_act == "gelu_pytorch_tanh"
    assert cfg.resampler_num_heads == 28 and cfg.head_dim == 128
    missing = full_config()
    del missing["drop_vision_last_layer"]
    # The original config class defaults to dropping the last vision layer.
    assert MiniCPMVConfig.from_dict(missing).num_vision_layers_used == 26


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "qwen2"}, "not a MiniCPM-V"),
        ({"version": 2.5}, "expected 2.6"),
        ({"version": None}, "expected 2.6"),
        ({"vision_config": None}, "vision_config"),
        ({"quantization_config": {"quant_method": "gptq"}}, "bitsandbytes"),
        ({"use_sliding_window": True}, "sliding"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ],
)
def test_config_rejects_other_models(change, message):
    d = full_config()
    d.update(change)
    with pytest.raises(ConfigError, match=message):
        MiniCPMVConfig.from_dict(d)


def test_config_from_directory_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        MiniCPMVConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MiniCPMVConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(full_config()))
    assert MiniCPMVConfig.from_pretrained(tmp_path).hidden_size == 3584
