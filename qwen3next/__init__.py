"""qwen3next: the Qwen3-Next hybrid language model in plain PyTorch, with Triton kernels on the GPU."""

from .config import ConfigError, Qwen3NextConfig
from .model import CausalLMOutput, Qwen3NextForCausalLM, Qwen3NextModel

__all__ = ["ConfigError", "Qwen3NextConfig", "Qwen3NextForCausalLM", "Qwen3NextModel", "CausalLMOutput"]
__version__ = "0.1.0"
