"""Whole-model inference on the GPU: qwen3next against transformers (+ flash-linear-attention where
installed) on the same random bf16 weights, in one process.

Variants (from the 80b-a3b preset):
  slice  4 layers (3 Gated DeltaNet + 1 gated attention), 512 experts top-10, vocabulary 151,936
  full   48 layers, 64 experts per layer (so that it fits one GPU)
Rows: prefill of 1 x 8,192 and 1 x 32,768 tokens (logits of the last position only), and one decode step
after a 512-token prompt at batch 1, 32 and 256 (greedy choice included). Each row gives the median
time, the peak of allocated GPU memory, and the floors computed from the config:
  time floor = max(FLOPs / 750 TFLOP/s, bytes / 3.0 TB/s)   (the H100's bf16 matmul rate and copy bandwidth)
  prefill:  FLOPs = 2 T (active params per token - embedding - lm head) + 2 D V (last position)
                    + attention 2 H hd T^2 (causal QK^T and PV) + GDN state math 6 Hv dk dv T per layer;
            bytes = every weight once (all experts are hit at these lengths) + the cache written
  decode:   bytes = all non-expert weights + lm head + expected distinct experts per layer,
                    E (1 - (1 - k/E)^B), x 3 D I x 2 bytes + cache traffic (recurrent states read and
                    written, fp32; conv states; K/V read over the context);
            FLOPs = 2 B (active params + D V) + attention 4 B S H hd
  memory floor = weights + the cache the row needs.
Ours decodes with `qwen3next.decode.StaticDecoder` (the step captured in a CUDA graph) and prefills with
`qwen3next.generate.prefill` (8,192-token chunks); transformers runs `model(...)` with its cache and
`logits_to_keep=1`, experts through its grouped_mm implementation.

    PYTHONUNBUFFERED=1 python benchmarks/e2e_gpu.py [--variants slice,full] [--out DIR] [--profile]
    python benchmarks/e2e_gpu.py --small      # tiny shapes, any device: checks the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import statistics
import time

import torch

from qwen3next import Qwen3NextConfig, Qwen3NextForCausalLM
from qwen3next.cache import HybridCache
from qwen3next.config import LINEAR
from qwen3next.decode import StaticDecoder
from qwen3next.generate import prefill, select_tokens
from qwen3next.model import cache_bytes_per_sequence, count_parameters
from timing import gpu_idle, kernel_profile, sync, time_once

PEAK_FLOPS, PEAK_BW = 750e12, 3.0e12
DECODE_CONTEXT = 512


def variant_config(name: str, small: bool) -> Qwen3NextConfig:
    if small:
        base = Qwen3NextConfig.preset("tiny", vocab_size=4096, max_position_embeddings=1 << 16)
        return Qwen3NextConfig.preset("tiny", vocab_size=4096, max_position_embeddings=1 << 16,
                                      num_hidden_layers=4 if name == "slice" else 8,
                                      num_experts=base.num_experts if name == "slice" else 8)
    if name == "slice":
        return Qwen3NextConfig.preset("80b-a3b", num_hidden_layers=4)
    return Qwen3NextConfig.preset("80b-a3b", num_experts=64)


# ---------------------------------------------------------------------------------------------- floors
def weight_bytes(config: Qwen3NextConfig) -> dict[str, int]:
    """bf16 bytes: all weights, the routed experts alone, and embedding / lm head."""
    counts = count_parameters(config)
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    experts = moe_layers * config.num_experts * per_expert
    vd = config.vocab_size * config.hidden_size
    return {"total": 2 * counts["total"], "experts": 2 * experts, "per_expert": 2 * per_expert,
            "moe_layers": moe_layers, "embed": 2 * vd, "lm_head": 2 * vd,
            "active": 2 * counts["active"]}


def prefill_floor(config, T: int) -> dict:
    w = weight_bytes(config)
    D, V = config.hidden_size, config.vocab_size
    active_body = w["active"] // 2 - 2 * V * D
    n_attn = sum(t != LINEAR for t in config.layer_types)
    n_lin = config.num_hidden_layers - n_attn
    matmul = 2 * T * active_body + 2 * D * V
    attention = n_attn * 2 * config.num_attention_heads * config.head_dim * T * T
    gdn = n_lin * 6 * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * T
    cache = cache_bytes_per_sequence(config)
    cache_bytes = cache["linear_constant"] + T * cache["attention_per_token"]
    flops = matmul + attention + gdn
    nbytes = w["total"] + cache_bytes
    return {"flops": flops, "bytes": nbytes, "ms": 1e3 * max(flops / PEAK_FLOPS, nbytes / PEAK_BW),
            "mem": w["total"] + cache_bytes,
            "parts": f"FLOPs {matmul / 1e12:.2f}T matmul + {attention / 1e12:.2f}T attention + {gdn / 1e12:.3f}T GDN "
                     f"-> {1e3 * flops / PEAK_FLOPS:.2f} ms; bytes {w['total'] / 1e9:.2f} GB weights + "
                     f"{cache_bytes / 1e9:.3f} GB cache -> {1e3 * nbytes / PEAK_BW:.2f} ms"}


def decode_floor(config, B: int, S: int) -> dict:
    w = weight_bytes(config)
    D, V, E, k = config.hidden_size, config.vocab_size, config.num_experts, config.num_experts_per_tok
    distinct = E * (1 - (1 - k / E) ** B) if E else 0
    expert_bytes = w["moe_layers"] * distinct * w["per_expert"]
    other = w["total"] - w["experts"] - w["embed"]  # every non-expert weight, lm head included
    n_attn = sum(t != LINEAR for t in config.layer_types)
    n_lin = config.num_hidden_layers - n_attn
    rec = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    conv = config.linear_conv_dim * (config.linear_conv_kernel_dim - 1) * 2
    kv = 2 * config.num_key_value_heads * config.head_dim * 2
    cache_traffic = B * (n_lin * (2 * rec + 2 * conv) + n_attn * S * kv)
    nbytes = other + expert_bytes + B * D * 2 + cache_traffic
    flops = 2 * B * (w["active"] // 2 - V * D) + n_attn * 4 * B * S * config.num_attention_heads * config.head_dim
    cache = cache_bytes_per_sequence(config)
    return {"flops": flops, "bytes": nbytes, "ms": 1e3 * max(flops / PEAK_FLOPS, nbytes / PEAK_BW),
            "mem": w["total"] + B * (cache["linear_constant"] + S * cache["attention_per_token"]),
            "parts": f"bytes {other / 1e9:.3f} GB non-expert weights (lm head incl.) + {distinct:.1f} distinct "
                     f"experts/layer x {w['moe_layers']} layers = {expert_bytes / 1e9:.3f} GB + cache traffic "
                     f"{cache_traffic / 1e9:.3f} GB -> {1e3 * nbytes / PEAK_BW:.3f} ms; "
                     f"FLOPs {flops / 1e12:.3f}T -> {1e3 * flops / PEAK_FLOPS:.3f} ms"}


# ---------------------------------------------------------------------------------------------- timing
def timed(fn, device, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(reps))


@contextlib.contextmanager
def peak_memory(device, into: dict):
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    into["peak"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")


# ---------------------------------------------------------------------------------------------- models
def build_ours(config, device, dtype):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3NextForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def build_hf(ours, device):
    """transformers' model holding our very tensors (no copy), experts through grouped_mm."""
    import transformers

    d = ours.config.to_dict()
    d.pop("architectures"), d.pop("model_type")
    config = transformers.Qwen3NextConfig(**d)
    config._experts_implementation = "grouped_mm"
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.Qwen3NextForCausalLM(config)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False, assign=True)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    rotary = hf.model.rotary_emb
    hf.model.rotary_emb = type(rotary)(config=config).to(device)
    leftovers = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    assert not leftovers, leftovers
    return hf.eval().requires_grad_(False)


def hf_kernels(hf) -> str:
    """Which implementations transformers resolved for its linear-attention layer."""
    layer = next(l.linear_attn for l in hf.model.layers if hasattr(l, "linear_attn"))
    names = []
    for attr in ("chunk_gated_delta_rule", "recurrent_gated_delta_rule", "causal_conv1d_fn", "causal_conv1d_update"):
        fn = getattr(layer, attr, None)
        if fn is not None:
            fn = getattr(fn, "__wrapped__", fn)
            names.append(f"{attr}={getattr(fn, '__module__', '?')}")
    try:
        from transformers.utils.import_utils import is_flash_linear_attention_available

        names.append(f"flash-linear-attention available: {is_flash_linear_attention_available()}")
    except ImportError:
        pass
    return ", ".join(names) or "unknown"


# ---------------------------------------------------------------------------------------------- rows
def run_prefill(label, fn, device, T, reps, results, floor):
    row = {"impl": label, "work": f"prefill 1 x {T:,}"}
    try:
        with peak_memory(device, row):
            row["ms"] = timed(fn, device, reps)
    except torch.OutOfMemoryError as exc:
        row["error"] = f"OOM: {str(exc)[:80]}"
    row.update(floor=floor["ms"], mem_floor=floor["mem"], tok_s=T / row["ms"] * 1e3 if "ms" in row else None)
    results.append(row)
    return row


def ours_decode(model, B, steps, device, graphs: bool):
    """A StaticDecoder over a 512-token prompt at batch B; returns the step function (bucket B)."""
    L = DECODE_CONTEXT + steps + 8
    eos = torch.tensor([], dtype=torch.long, device=device)
    choose = functools.partial(select_tokens, greedy=True)
    decoder = StaticDecoder(model, B, L, choose, eos, 0, use_graphs=graphs, sizes=[B])
    ids = torch.randint(0, model.config.vocab_size, (B, DECODE_CONTEXT), device=device)
    logits = prefill(model, ids, None, decoder.cache)
    decoder.start(ids, None, logits)
    return decoder, (lambda: decoder.step(B))


def hf_decode(hf, B, device):
    ids = torch.randint(0, hf.config.vocab_size, (B, DECODE_CONTEXT), device=device)
    out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
    state = {"pkv": out.past_key_values, "tok": out.logits[:, -1].argmax(-1, keepdim=True)}

    def step():
        o = hf(input_ids=state["tok"], past_key_values=state["pkv"], use_cache=True, logits_to_keep=1)
        state["pkv"], state["tok"] = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)

    return state, step


def profile_step(model, device, B, log):
    """Kernel-time breakdown of the static step run eagerly (what the graph replays)."""
    decoder, _ = ours_decode(model, B, 8, device, graphs=False)
    kernel_profile(lambda: decoder.step(B), device, f"static step, batch {B}", log)
    del decoder


def bench_variant(name, args, device, dtype, log):
    config = variant_config(name, args.small)
    results = []
    t0 = time.perf_counter()
    model = build_ours(config, device, dtype)
    counts = count_parameters(config)
    log(f"\n== {name}: {config.num_hidden_layers} layers, {config.num_experts} experts top-{config.num_experts_per_tok}, "
        f"vocab {config.vocab_size}: {counts['total'] / 1e9:.2f} B parameters ({counts['active'] / 1e9:.2f} B active); "
        f"built in {time.perf_counter() - t0:.1f} s")
    hf = None
    if not args.no_hf:
        try:
            hf = build_hf(model, device)
            log(f"transformers kernels: {hf_kernels(hf)}")
        except Exception as exc:  # report and go on with ours
            log(f"transformers model not built: {type(exc).__name__}: {exc}")
    lengths = [int(x) for x in args.prefill.split(",")]
    batches = [int(x) for x in args.batches.split(",") if x]  # "" for none

    # agreement on the same weights: ours in 3 chunks vs ours in one piece gives the spread that low
    # precision alone causes (random routers: bf16 rounding flips near-tied expert choices)
    ids = torch.randint(0, config.vocab_size, (1, 1000), device=device)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    last = {n: prefill(model, ids, None, HybridCache(config, 1, 1000, dtype=dtype, device=device), chunk_size=n)
            for n in (384, 1000)}
    msg = f"check: last-position logits, ours 3 chunks vs ours 1 chunk rel L2 {rel(last[384], last[1000]):.2e}"
    if hf is not None:
        msg += f"; ours vs transformers {rel(last[1000], hf(input_ids=ids, logits_to_keep=1).logits[:, -1]):.2e}"
    log(msg)

    for T in lengths:
        floor = prefill_floor(config, T)
        log(f"floor prefill {T}: {floor['ms']:.2f} ms ({floor['parts']}); memory floor {floor['mem'] / 2**30:.2f} GiB")
        ids = torch.randint(0, config.vocab_size, (1, T), device=device)

        def ours_prefill():
            cache = HybridCache(config, 1, T + 1, dtype=dtype, device=device)
            prefill(model, ids, None, cache, chunk_size=args.chunk)

        log(fmt(run_prefill("qwen3next", ours_prefill, device, T, args.reps, results, floor)))
        if args.profile and device.type == "cuda" and T == lengths[0]:
            kernel_profile(ours_prefill, device, f"prefill 1 x {T}", log, reps=1)
            gpu_idle(ours_prefill, device, f"prefill 1 x {T}", log)
        if hf is not None:
            log(fmt(run_prefill("transformers", lambda: hf(input_ids=ids, use_cache=True, logits_to_keep=1),
                                device, T, args.reps, results, floor)))

    for B in batches:
        floor = decode_floor(config, B, DECODE_CONTEXT)
        log(f"floor decode batch {B}: {floor['ms']:.3f} ms ({floor['parts']}); memory floor {floor['mem'] / 2**30:.2f} GiB")
        for label in ("qwen3next", "qwen3next no graph", "transformers"):
            if label == "transformers" and hf is None or label == "qwen3next no graph" and B != 1:
                continue
            row = {"impl": label, "work": f"decode step, batch {B}"}
            try:
                with peak_memory(device, row):
                    if label == "transformers":
                        holder, step = hf_decode(hf, B, device)
                    else:
                        holder, step = ours_decode(model, B, args.steps + 4, device,
                                                   graphs=device.type == "cuda" and label == "qwen3next")
                    row["ms"] = timed(step, device, args.steps, warmup=3)
                del holder, step
            except torch.OutOfMemoryError as exc:
                row["error"] = f"OOM: {str(exc)[:80]}"
            row.update(floor=floor["ms"], mem_floor=floor["mem"], tok_s=B / row["ms"] * 1e3 if "ms" in row else None)
            results.append(row)
            log(fmt(row))
            torch.cuda.empty_cache() if device.type == "cuda" else None
    if args.profile and device.type == "cuda":
        for B in (1, 32):
            profile_step(model, device, B, log)
    del hf, model
    return config, results


def fmt(row) -> str:
    if "error" in row:
        return f"| {row['work']} | {row['impl']} | {row['error']} |"
    peak = row["peak"] / 2**30 if row["peak"] == row["peak"] else float("nan")
    return (f"| {row['work']} | {row['impl']} | {row['ms']:.3f} ms | {row['tok_s']:,.0f} tok/s | "
            f"{row['ms'] / row['floor']:.1f}x floor ({row['floor']:.3f} ms) | {peak:.2f} GiB "
            f"(floor {row['mem_floor'] / 2**30:.2f}) |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="slice,full")
    parser.add_argument("--prefill", default="8192,32768")
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps")
    parser.add_argument("--reps", type=int, default=3, help="timed prefills")
    parser.add_argument("--chunk", type=int, default=8192, help="our prefill chunk")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="kernel breakdown of our first prefill (and where the GPU waits in it) and decode step")
    parser.add_argument("--small", action="store_true", help="tiny shapes (script check, any device)")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    if args.small:
        args.prefill, args.batches, args.steps, args.reps, args.chunk = "300,700", "1,3", 3, 1, 256
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)
        if args.out:
            with open(os.path.join(args.out, "e2e_gpu.log"), "w") as f:
                f.write("\n".join(lines) + "\n")

    import transformers

    try:
        import fla
        fla_version = fla.__version__
    except ImportError:
        fla_version = "absent"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"{datetime.date.today()} {name}; torch {torch.__version__}, triton "
        f"{__import__('triton').__version__ if device.type == 'cuda' else '-'}, transformers "
        f"{transformers.__version__}, fla {fla_version}; bf16 on the GPU")
    with torch.inference_mode():
        for variant in args.variants.split(","):
            bench_variant(variant, args, device, dtype, log)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
