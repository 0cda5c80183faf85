"""Qwen3NextConfig: presets, Hugging Face config.json in/out, aliases, and the errors for bad configs."""

import json

import pytest

from conftest import hf_config, tiny_config
from qwen3next.config import ConfigError, Qwen3NextConfig


def test_80b_preset_matches_spec():
    c = Qwen3NextConfig.preset("80b-a3b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_experts, c.num_experts_per_tok) == (2048, 48, 512, 10)
    assert c.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert c.layer_types.count("full_attention") == 12
    assert c.rotary_dim == 64 and c.linear_conv_dim == 2 * 2048 + 4096


def test_round_trip_and_transformers_reads_ours(tmp_path):
    c = tiny_config(mlp_only_layers=[2], partial_rotary_factor=0.5)
    c.save_pretrained(tmp_path)
    assert Qwen3NextConfig.from_pretrained(tmp_path) == c
    hf = hf_config(c)
    assert hf.rope_parameters["partial_rotary_factor"] == 0.5
    assert hf.layer_types == c.layer_types and hf.mlp_only_layers == [2]


def test_reads_transformers_written_config(tmp_path):
    c = tiny_config(num_key_value_heads=1)
    hf_config(c).save_pretrained(tmp_path)
    assert Qwen3NextConfig.from_pretrained(tmp_path) == c


def test_published_style_flat_rope_and_interval():
    d = {"rope_theta": 5e6, "partial_rotary_factor": 0.5, "full_attention_interval": 2, "num_hidden_layers": 4,
         "torch_dtype": "bfloat16"}
    c = Qwen3NextConfig.from_dict(d)
    assert c.rope_theta == 5e6 and c.partial_rotary_factor == 0.5 and c.dtype == "bfloat16"
    assert c.layer_types == ["linear_attention", "full_attention"] * 2


def test_nemo_aliases():
    c = Qwen3NextConfig.from_dict({"num_hidden_layers": 2, "layer_types": ["linear", "full"],
                                   "attention_head_type": "MQA", "linear_attention_chunk_size": 32,
                                   "linear_attention_clip_val": 5.0, "linear_attention_use_recurrent": True})
    assert c.layer_types == ["linear_attention", "full_attention"]
    assert c.num_key_value_heads == 1 and c.linear_attention_chunk_size == 32
    assert c.linear_attention_clip_val == 5.0 and c.linear_attention_use_recurrent


@pytest.mark.parametrize("overrides,message", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of num_key_value_heads"),
    (dict(linear_num_key_heads=3, linear_num_value_heads=4), "multiple of linear_num_key_heads"),
    (dict(layer_types=["linear_attention"] * 3), "layer_types has 3 entries"),
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(layer_types=["linear", "mamba", "linear", "full"]), "unknown layer type 'mamba'"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(mlp_only_layers=[9]), "mlp_only_layers"),
])
def test_bad_configs_are_explained(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_bad_aliases_and_presets():
    with pytest.raises(ConfigError, match="MQA"):
        Qwen3NextConfig.from_dict({"attention_head_type": "MQA", "num_key_value_heads": 2})
    with pytest.raises(ConfigError, match="rope type"):
        Qwen3NextConfig.from_dict({"rope_scaling": {"rope_type": "yarn", "factor": 4}})
    with pytest.raises(ConfigError, match="unknown preset"):
        Qwen3NextConfig.preset("7b")


def test_to_dict_is_json():
    json.dumps(Qwen3NextConfig.preset("80b-a3b").to_dict())
