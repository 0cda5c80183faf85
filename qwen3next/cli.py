"""The `qwen3next` command line: inspect, generate, train, demo."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .config import FULL, PRESETS, Qwen3NextConfig
from .distributed.launch import add_generation_arguments, generation_dims, load_for_generation
from .distributed.plan import add_inspect_arguments, print_plan_if_asked
from .model import cache_bytes_per_sequence, count_parameters
from .train.cli import add_commands as add_train_commands


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
    print_plan_if_asked(config, args)
    return 0


def _peak_memory(device) -> str:
    import torch

    if device.type == "cuda":
        return _bytes(torch.cuda.max_memory_allocated(device))
    import resource

    return _bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) + " (process RSS)"


def cmd_generate(args) -> int:
    import torch

    from .checkpoint import CheckpointError
    from .tokenizer import TextStreamer, Tokenizer

    if not os.path.isdir(args.model) or not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"error: {args.model!r} is not a checkpoint directory (no config.json)")
    if args.max_new_tokens < 1:
        raise SystemExit(f"error: --max-new-tokens must be >= 1, got {args.max_new_tokens}")
    tokenizer = Tokenizer.from_pretrained(args.model) if Tokenizer.exists(args.model) else None
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise SystemExit(f"error: --prompt-ids must be integers, got {args.prompt_ids!r}") from None
    elif args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"error: {args.model} has no tokenizer.json: pass --prompt-ids instead of --prompt")
        text = args.prompt
        if args.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        ids = tokenizer.encode(text)
    else:
        raise SystemExit("error: give --prompt TEXT or --prompt-ids IDS")
    if not ids:
        raise SystemExit("error: the prompt is empty")
    dims = generation_dims(args)  # --tp/--ep under torchrun (sets this rank's CUDA device)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model = load_for_generation(args.model, dims, args, device)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    if args.seed is not None:
        torch.manual_seed(args.seed)
    eos = model.config.eos_token_id
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = sorted({*([] if eos is None else [eos] if isinstance(eos, int) else eos), tokenizer.eos_token_id})
    input_ids = torch.tensor([ids], device=device)

    printer = TextStreamer(tokenizer, sys.stdout) if tokenizer is not None else None
    marks = []

    def stream(tokens):
        marks.append(time.perf_counter())
        if not dims.is_rank0:
            return
        if printer is not None:
            printer(tokens)
        else:
            print(int(tokens[0]), end=" ", flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        out = model.generate(
            input_ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            eos_token_id=eos, streamer=stream, decode=args.decode,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    new = out.shape[1] - len(ids)
    prefill = marks[0] - start
    decode = marks[-1] - marks[0]
    if not dims.is_rank0:
        return 0
    print()
    print(
        f"[prefill {len(ids)} tokens: {len(ids) / prefill:,.1f} tok/s | decode {new - 1} tokens: "
        f"{(new - 1) / decode if decode > 0 else float('nan'):,.1f} tok/s | peak memory {_peak_memory(device)}]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3next", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="config, parameter counts, layer pattern and cache size of a preset or checkpoint")
    p.add_argument("model", help="preset name (80b-a3b, tiny) or checkpoint directory")
    add_inspect_arguments(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="stream a completion from a checkpoint directory")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    p.add_argument("--prompt-ids", help="prompt as token ids, e.g. '1 2 3' (no tokenizer needed; ids are printed)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", help="float32, bfloat16, ... (default: the checkpoint's)")
    p.add_argument("--decode", choices=["auto", "graph", "static", "eager"], default="auto",
                   help="decode loop: auto (default) = CUDA graphs on CUDA, eager on the CPU; 'static' or "
                        "'eager' turn the graphs off")
    add_generation_arguments(p)
    p.set_defaults(func=cmd_generate)
    add_train_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
