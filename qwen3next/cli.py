"""The `qwen3next` command line: inspect (and, as they land, generate, train, demo)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import FULL, PRESETS, Qwen3NextConfig
from .model import cache_bytes_per_sequence, count_parameters


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return str(n)


def _bytes(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or suffix == "TiB":
            return f"{n:.1f} {suffix}" if suffix != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


def load_config(name_or_path: str) -> Qwen3NextConfig:
    """A preset name or a checkpoint directory / config.json path."""
    if name_or_path.lower() in PRESETS:
        return Qwen3NextConfig.preset(name_or_path)
    if os.path.exists(name_or_path):
        return Qwen3NextConfig.from_pretrained(name_or_path)
    raise SystemExit(f"error: {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint path")


def layer_pattern(config: Qwen3NextConfig) -> str:
    """e.g. '12 x [L L L A]' (L linear, A attention; lower case: dense MLP instead of MoE)."""
    symbols = []
    for i, t in enumerate(config.layer_types):
        s = "A" if t == FULL else "L"
        symbols.append(s if config.is_moe_layer(i) else s.lower())
    for period in range(1, len(symbols) + 1):
        if len(symbols) % period == 0 and symbols == symbols[:period] * (len(symbols) // period):
            return f"{len(symbols) // period} x [{' '.join(symbols[:period])}]"
    return " ".join(symbols)


def cmd_inspect(args) -> int:
    config = load_config(args.model)
    counts = count_parameters(config)
    dtype_bytes = 2
    cache = cache_bytes_per_sequence(config, dtype_bytes)
    rows = [
        ("layers", f"{config.num_hidden_layers}  pattern {layer_pattern(config)}  (L GDN, A gated attention; lower case: dense MLP)"),
        ("hidden / vocab", f"{config.hidden_size} / {config.vocab_size}"),
        ("attention", f"{config.num_attention_heads} q heads, {config.num_key_value_heads} kv heads, head dim {config.head_dim}, "
                      f"rope on {config.rotary_dim} dims (theta {config.rope_theta:g})"),
        ("gated deltanet", f"{config.linear_num_key_heads} qk heads x {config.linear_key_head_dim}, "
                           f"{config.linear_num_value_heads} v heads x {config.linear_value_head_dim}, conv {config.linear_conv_kernel_dim}"),
        ("moe", f"{config.num_experts} experts, top-{config.num_experts_per_tok}, expert {config.moe_intermediate_size}, "
                f"shared {config.shared_expert_intermediate_size}" if config.num_experts else "none"),
        ("parameters", f"{_human(counts['total'])} total, {_human(counts['active'])} active per token "
                       f"({_bytes(counts['total'] * dtype_bytes)} in bf16)"),
        ("cache / sequence", f"{_bytes(cache['linear_constant'])} constant (linear layers: conv + fp32 state) "
                             f"+ {_bytes(cache['attention_per_token'])} per token (attention K/V, bf16)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{args.model}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    for tokens in (4096, 32768, 262144):
        total = cache["linear_constant"] + tokens * cache["attention_per_token"]
        print(f"  {'':<{width}}  at {tokens:>6} tokens: {_bytes(total)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3next", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="config, parameter counts, layer pattern and cache size of a preset or checkpoint")
    p.add_argument("model", help="preset name (80b-a3b, tiny) or checkpoint directory")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
