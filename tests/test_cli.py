"""The command line and the config-only arithmetic it prints."""

import pytest
import torch

from conftest import tiny_config
from qwen3next.cli import layer_pattern, main
from qwen3next.model import Qwen3NextForCausalLM, cache_bytes_per_sequence, count_parameters


@pytest.mark.parametrize("overrides", [{}, dict(mlp_only_layers=[1], tie_word_embeddings=True), dict(decoder_sparse_step=2)])
def test_parameter_counts_match_a_built_model(overrides):
    config = tiny_config(**overrides)
    model = Qwen3NextForCausalLM(config)
    counts = count_parameters(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    unused = moe_layers * (config.num_experts - config.num_experts_per_tok) * 3 * config.hidden_size * config.moe_intermediate_size
    assert counts["active"] == counts["total"] - unused


def test_cache_bytes_formula():
    config = tiny_config()
    c = cache_bytes_per_sequence(config, dtype_bytes=2)
    assert c["per_linear_layer"] == config.linear_conv_dim * 3 * 2 + 4 * 32 * 32 * 4
    assert c["attention_per_token"] == 1 * 2 * 2 * 32 * 2


def test_layer_pattern():
    assert layer_pattern(tiny_config(num_hidden_layers=8)) == "2 x [L L L A]"
    assert layer_pattern(tiny_config(mlp_only_layers=[0])) == "1 x [l L L A]"


def test_inspect_preset_and_checkpoint(tmp_path, capsys):
    assert main(["inspect", "80b-a3b"]) == 0
    out = capsys.readouterr().out
    assert "12 x [L L L A]" in out and "512 experts, top-10" in out
    tiny_config().save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "1 x [L L L A]" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither a preset"):
        main(["inspect", "no-such-model"])


def test_bad_token_ids_and_shapes_are_explained():
    model = Qwen3NextForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 257\)"):
        model(torch.tensor([[1, 2, 257]]))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="labels must match"):
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2]]))
