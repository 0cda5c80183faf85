"""Shared test helpers: tiny configs and the transformers oracle built on the same weights."""

import os

import pytest
import torch

# Triton kernels run in Triton's interpreter on a machine without CUDA. This must be set before anything
# imports triton (importing the model does, through torch), so it lives here rather than in the tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qwen3next.config import Qwen3NextConfig
from qwen3next.model import Qwen3NextForCausalLM


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def tiny_config(**overrides) -> Qwen3NextConfig:
    return Qwen3NextConfig.preset("tiny", **{"vocab_size": 257, "num_hidden_layers": 4, **overrides})


def hf_config(config: Qwen3NextConfig):
    transformers = pytest.importorskip("transformers")
    d = config.to_dict()
    d.pop("architectures"), d.pop("model_type")
    return transformers.Qwen3NextConfig(**d)


def hf_twin(model: Qwen3NextForCausalLM):
    """transformers' Qwen3NextForCausalLM holding exactly our model's weights (same state-dict names)."""
    transformers = pytest.importorskip("transformers")
    config = hf_config(model.config)
    config._experts_implementation = "eager"  # its grouped_mm path refuses fp64
    hf = transformers.Qwen3NextForCausalLM(config).to(next(model.parameters()).dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf.train(model.training)


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
    yield
