"""Qwen3NextConfig: the model's hyper-parameters, presets, and Hugging Face `config.json` in/out.

Field names follow Hugging Face `transformers` (`Qwen3NextConfig`), so a published `config.json`
loads as is. Also accepted on input:
  * flat `rope_theta` / `partial_rotary_factor` (published checkpoints) or nested `rope_parameters`
    (newer transformers);
  * `full_attention_interval` when `layer_types` is absent;
  * NeMo/Megatron aliases: layer types "linear"/"full", `linear_attention_chunk_size`,
    `linear_attention_use_recurrent`, `attention_head_type` ("MQA" means one KV head, "GQA" the
    configured count), and `linear_attention_clip_val`.

`linear_attention_clip_val` (off by default, as in the published checkpoints and transformers): when
set to c, the beta logits b of every Gated DeltaNet layer are clamped to [-c, c] before the sigmoid.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .files import atomic_open

LINEAR = "linear_attention"
FULL = "full_attention"
_LAYER_TYPE_ALIASES = {"linear": LINEAR, "full": FULL, LINEAR: LINEAR, FULL: FULL}


class ConfigError(ValueError):
    """A configuration that cannot describe a valid Qwen3-Next model."""


@dataclass
class Qwen3NextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 48
    layer_types: list[str] | None = None
    # gated (softmax) attention
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # gated DeltaNet (linear attention)
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    linear_attention_chunk_size: int = 64
    linear_attention_use_recurrent: bool = False
    linear_attention_clip_val: float | None = None
    # mixture of experts
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # the rest
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    dtype: str | None = None  # the checkpoint's dtype name ("bfloat16", ...), as `config.json` gives it

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers, 4)
        self.layer_types = [_canonical_layer_type(t) for t in self.layer_types]
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        self.validate()

    # ----------------------------------------------------------------------------- derived sizes
    @property
    def linear_key_dim(self) -> int:
        """Hk * dk: width of q (and of k) in a Gated DeltaNet layer."""
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        """Hv * dv: width of v (and of z) in a Gated DeltaNet layer."""
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the causal conv: concat(q, k, v)."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has a sparse-MoE FFN (else a dense SwiGLU MLP), as transformers decides."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    # ----------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError naming every field that cannot work."""
        errors = []
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
            "linear_value_head_dim", "linear_conv_kernel_dim", "linear_attention_chunk_size",
            "max_position_embeddings", "decoder_sparse_step",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.layer_types) != self.num_hidden_layers:
            errors.append(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        if self.num_key_value_heads >= 1 and self.num_attention_heads % self.num_key_value_heads:
            errors.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_key_heads >= 1 and self.linear_num_value_heads % self.linear_num_key_heads:
            errors.append(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if not 0.0 <= self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            errors.append(
                f"partial_rotary_factor ({self.partial_rotary_factor}) must give an even rotary dim in "
                f"[0, head_dim]; got {self.head_dim} * {self.partial_rotary_factor}"
            )
        if self.num_experts < 0 or self.num_experts_per_tok < 0:
            errors.append("num_experts and num_experts_per_tok must be >= 0")
        if self.num_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            errors.append(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts ({self.num_experts})"
            )
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad_layers:
            errors.append(f"mlp_only_layers names layers outside [0, {self.num_hidden_layers}): {bad_layers}")
        if self.hidden_act != "silu":
            errors.append(f"hidden_act must be 'silu' (the only activation Qwen3-Next uses), got {self.hidden_act!r}")
        if self.linear_attention_clip_val is not None and self.linear_attention_clip_val <= 0:
            errors.append(f"linear_attention_clip_val must be > 0 when set, got {self.linear_attention_clip_val}")
        if errors:
            raise ConfigError("invalid Qwen3NextConfig:\n  - " + "\n  - ".join(errors))

    # ----------------------------------------------------------------------------- dict / json
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Qwen3NextConfig":
        """Build from a Hugging Face `config.json` dict (or our own `to_dict`), accepting the aliases above."""
        d = dict(d)
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope type {rope_type!r} is not supported (only the default RoPE Qwen3-Next uses)")
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope and key not in d:
                d[key] = rope[key]
        interval = d.pop("full_attention_interval", None)
        if d.get("layer_types") is None and interval is not None:
            d["layer_types"] = default_layer_types(d.get("num_hidden_layers", cls.num_hidden_layers), interval)
        head_type = d.pop("attention_head_type", None)
        if head_type is not None:
            if head_type.upper() == "MQA":
                if d.setdefault("num_key_value_heads", 1) != 1:
                    raise ConfigError("attention_head_type 'MQA' needs num_key_value_heads == 1")
            elif head_type.upper() != "GQA":
                raise ConfigError(f"attention_head_type must be 'MQA' or 'GQA', got {head_type!r}")
        if "torch_dtype" in d and "dtype" not in d:
            d["dtype"] = d.pop("torch_dtype")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` form (what transformers' Qwen3NextConfig reads)."""
        d = dataclasses.asdict(self)
        d.update(
            model_type="qwen3_next",
            architectures=["Qwen3NextForCausalLM"],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
        )
        if d["dtype"] is None:
            del d["dtype"]
        return d

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Qwen3NextConfig":
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json at {path!r}: not a checkpoint directory")
        with open(file) as f:
            return cls.from_dict(json.load(f))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` into `directory` atomically."""
        os.makedirs(directory, exist_ok=True)
        with atomic_open(os.path.join(directory, "config.json")) as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Qwen3NextConfig":
        """A named configuration: "80b-a3b" (the published model) or "tiny" (a laptop-CPU model)."""
        try:
            base = PRESETS[name.lower()]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
        return cls(**{**base, **overrides})


def default_layer_types(num_layers: int, full_attention_interval: int) -> list[str]:
    """Every `full_attention_interval`-th layer is full attention, the rest linear (transformers' rule)."""
    return [FULL if (i + 1) % full_attention_interval == 0 else LINEAR for i in range(num_layers)]


def _canonical_layer_type(t: str) -> str:
    try:
        return _LAYER_TYPE_ALIASES[t]
    except KeyError:
        raise ConfigError(f"unknown layer type {t!r}; expected one of {sorted(_LAYER_TYPE_ALIASES)}") from None


PRESETS: dict[str, dict[str, Any]] = {
    "80b-a3b": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, rope_theta=10_000_000.0,
        partial_rotary_factor=0.25, max_position_embeddings=262144,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, norm_topk_prob=True, rms_norm_eps=1e-6, router_aux_loss_coef=0.001,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, dtype="bfloat16",
    ),
    # Small enough that a 2k-token forward takes about a second on a laptop CPU; same structure as 80B-A3B.
    "tiny": dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10_000.0,
        partial_rotary_factor=0.25, max_position_embeddings=8192,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
        shared_expert_intermediate_size=64, norm_topk_prob=True, rms_norm_eps=1e-6, router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
    ),
}
