"""Shared by the CPU benchmarks: our model and transformers' on the same random weights."""

import torch
import transformers

from qwen3next import Qwen3NextConfig, Qwen3NextForCausalLM


def model_pair(preset: str, seed: int = 0, **overrides):
    """(config, ours, theirs): both in eval mode, transformers' holding exactly our weights; `overrides`
    change the preset's config fields."""
    torch.manual_seed(seed)
    config = Qwen3NextConfig.preset(preset, **overrides)
    ours = Qwen3NextForCausalLM(config).eval()
    d = config.to_dict()
    d.pop("architectures"), d.pop("model_type")
    theirs = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**d)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return config, ours, theirs
