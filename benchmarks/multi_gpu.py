"""The scale-out layer on several GPUs (NCCL): parity, scaling, the 80B-A3B, long context. Launched with
torchrun on 2 processes; rank 0 prints a table per step and appends its rows to OUT/multi_gpu.jsonl.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1     # NVLink multicast off
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py parity scaling long model80b [--out DIR]
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --small parity scaling long model80b   # CPU, gloo

Steps:
  parity    tp=2, ep=2, cp=2 (plain rows, and packed documents across the split), dp_shard=2, and ep=2
            inside dp_shard=2 (ep_in_dp: the ep ranks each take their own rows) against one
            GPU on the same global batch, in fp32 and under bf16 autocast (fp32 weights, as training runs),
            our Triton kernels in the path: logits, loss, aux loss and every gradient (router weights 20x
            wider: see ROUTER_SCALE). fp32: max |a - b| / max |b| (gradients: floor 1% of the model's largest
            gradient entry), as tests/test_distributed.py, bound 1e-4. bf16: every run takes the expert
            choices of the one-GPU bf16 run (`FixedRouting`: rounding would otherwise flip near-tied
            choices, and each flip swaps a whole expert's output); relative L2 ||a - b|| / ||b|| (gradients:
            floor 1% of the largest gradient norm), bound 1e-2 or, where larger, the distance of one GPU's
            bf16 result from its own fp32 result ("bf16 noise"). No NaN/inf.
  scaling   training tokens/s (forward, backward, clipping, AdamW; fp32 weights, bf16 autocast; FSDP2
            computes in bf16) of a 2.0B-parameter MoE (80B-A3B shapes, 8 layers, 64 experts, 32K vocabulary)
            at 4096 tokens per row: one GPU with R rows per step against two GPUs with 2R rows per step under
            dp_shard=2, ep=2, tp=2 and ep=2 inside dp_shard=2, for each R of --rows. Efficiency = tokens/s on
            2 / (2 x tokens/s on 1). (Plain ep and tp ranks process the same tokens: they split the model, not
            the batch. ep_in_dp splits both, as Megatron-core and torchtitan do.)
  model80b  Qwen3NextConfig.preset("80b-a3b") with random weights, built on the meta device, ep=2, bf16,
            each rank drawing its own shards on its GPU (`fill_random`): prefill tokens/s of a 4k and a 32k
            prompt (generation's chunked prefill), decode tokens/s at batch 1 and 64 (the eager loop: CUDA
            graphs run on one device), peak memory per GPU; decode against the HBM floor, the bytes a step
            must read (weights of the experts it uses, the recurrent states read and written) over both
            GPUs' measured copy bandwidth.
  long      forward + backward of a small config on one sequence, one GPU against cp=2: time and peak
            memory at 128k tokens, and the longest of 128k, 256k, ... 1M that fits. One GPU: tried until
            one runs out of memory. cp=2: a rank that ran out of memory mid-forward would leave the other
            waiting in a collective, so a length runs only where a line through the peaks of the two
            shortest predicts it fits (under 90% of the GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qwen3next import Qwen3NextConfig, Qwen3NextForCausalLM, ops  # noqa: E402
from qwen3next.cache import HybridCache  # noqa: E402
from qwen3next.distributed import ParallelDims, parallelize  # noqa: E402
from qwen3next.distributed.checkpoint import whole_tensor  # noqa: E402
from qwen3next.distributed.comm import collective_device  # noqa: E402
from qwen3next.distributed.materialize import build_sharded, fill_random, local_shard  # noqa: E402
from qwen3next.distributed.tensor_parallel import local  # noqa: E402
from qwen3next.distributed.training import clip_grad_norm_  # noqa: E402
from qwen3next.generate import prefill  # noqa: E402
from qwen3next.model import count_parameters  # noqa: E402
from qwen3next.train.loop import TrainSettings, build_optimizer  # noqa: E402
from timing import sync  # noqa: E402  (benchmarks/ is on the path: the script's own folder)

PARITY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
              linear_key_head_dim=64, linear_value_head_dim=64, num_experts=16, num_experts_per_tok=4,
              moe_intermediate_size=128, shared_expert_intermediate_size=128, router_aux_loss_coef=0.01)
SCALING = dict(num_hidden_layers=8, num_experts=64, vocab_size=32768)  # on the 80b-a3b preset: 2.03B parameters
LONG = dict(vocab_size=2048, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=128, linear_num_key_heads=4, linear_num_value_heads=8,
            linear_key_head_dim=128, linear_value_head_dim=128, num_experts=16, num_experts_per_tok=4,
            moe_intermediate_size=512, shared_expert_intermediate_size=512)
TINY = dict(vocab_size=257, linear_attention_chunk_size=8)
# parity: router weights drawn 20x wider, so that top-k choices are rarely near-ties. At the default
# initialisation bf16 rounding alone flips many of them: one GPU's bf16 logits then differ from its own fp32
# logits by ~5% (relative L2), and any reordering of the sums (tp, cp) differs from it by as much.
ROUTER_SCALE = 20.0  # --small: everything on the tiny preset
K = 1024


def rank0() -> bool:
    return dist.get_rank() == 0


def report(args, step: str, rows: list[dict]) -> None:
    """Rank 0 prints `rows` as a table and appends them to OUT/multi_gpu.jsonl."""
    if not rank0() or not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    print(f"\n## {step}\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |")
    with open(os.path.join(args.out, "multi_gpu.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **row}) + "\n")


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def worst(value: float) -> float:
    """The largest of `value` over the ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# --------------------------------------------------------------------------------------------- parity
def error(a: torch.Tensor, b: torch.Tensor, relative_l2: bool, floor: float = 0.0) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:  # an empty shard (FSDP's of a one-row tensor on the last rank)
        return 0.0
    if not bool(torch.isfinite(a).all()):
        return math.inf
    if relative_l2:
        return ((a - b).norm() / max(b.norm().item(), floor, 1e-30)).item()
    return (a - b).abs().max().item() / max(b.abs().max().item(), floor, 1e-30)


class FixedRouting:
    """Expert choices recorded from one run and replayed in others, so that bf16 comparisons measure
    rounding, not near-tied choices that rounding flips (each flip swaps a whole expert's output).
    `record(B, T)`: while active, `ops.route` runs as usual and its ids, as [B, T, k] of the global batch,
    are kept per call (one per MoE layer). `replay(locate)`: `ops.route` returns the recorded ids of the
    tokens `locate([B, T, k]) -> [..., k]` picks (this call's tokens, in order) and, for weights, the
    logits' softmax at those ids (renormalised as the model does): the function the model computes, at
    fixed choices."""

    def __init__(self):
        self.table: list[torch.Tensor] = []

    @contextlib.contextmanager
    def _patched(self, route):
        original = ops.route
        ops.route = route
        try:
            yield
        finally:
            ops.route = original

    def record(self, B: int, T: int):
        original = ops.route

        def route(logits, top_k, norm_topk_prob):
            weights, ids = original(logits, top_k, norm_topk_prob)
            self.table.append(ids.detach().view(B, T, top_k))
            return weights, ids

        return self._patched(route)

    def replay(self, locate):
        calls = iter(self.table)

        def route(logits, top_k, norm_topk_prob):
            ids = locate(next(calls)).reshape(-1, top_k)
            weights = F.softmax(logits, dim=-1, dtype=torch.float32).gather(1, ids)
            if norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return weights.to(logits.dtype), ids

        return self._patched(route)


def local_tokens(model, dims):
    """`FixedRouting.replay`'s `locate` for a parallelized model: the rank's rows and sequence part,
    and its sequence-parallel piece of it when tp runs the residual stream sequence-parallel."""
    def locate(table):
        mine = dims.local_batch(table)
        tp = model.parallel.tp
        return mine.tensor_split(tp.size, dim=1)[tp.rank] if tp.sp else mine

    return locate


def parity_case(config, dims, bf16: bool, device, batch, cu_seqlens) -> dict:
    """Worst errors of logits, loss, aux loss and gradients of the model under `dims` against the same
    model whole on this rank's device, on the global `batch` (ids [B, T]); gradients compared shard by
    shard (this rank's part of the whole model's gradient against its own); fp32 weights, the forward in
    fp32 or under bf16 autocast (training's mixed precision). In bf16 every run takes the one-GPU bf16
    run's expert choices (`FixedRouting`), and "bf16 noise" is the one-GPU bf16 logits and gradients
    against its fp32 ones (the size of bf16 rounding itself)."""
    torch.manual_seed(0)
    with torch.device(device):
        ref = Qwen3NextForCausalLM(config)
    with torch.no_grad():
        for layer in ref.model.layers:
            if layer.is_moe:
                layer.mlp.gate.weight.mul_(ROUTER_SCALE)
    model = parallelize(copy.deepcopy(ref), dims, param_dtype=None, reduce_dtype=None)
    ids = batch.to(device)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=device)
    routing = FixedRouting()
    same = contextlib.nullcontext
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        with routing.record(*ids.shape) if bf16 else same():
            want = ref(ids, labels=ids, cu_seqlens=cu)
        with routing.replay(local_tokens(model, dims)) if bf16 else same():
            got = model(dims.local_batch(ids), labels=dims.local_batch(ids), cu_seqlens=cu)
    want.loss.backward()
    got.loss.backward()
    grads = dict(ref.named_parameters())
    top = max((p.grad.norm() if bf16 else p.grad.abs().max()).item() for p in grads.values())
    out = {
        "logits": worst(error(whole_tensor("logits", got.logits), dims.local_batch(want.logits), bf16)),
        "loss": worst(error(got.loss, want.loss, bf16)),
        "aux": worst(error(got.aux_loss, want.aux_loss, bf16)),
    }
    errors = {n: error(local(p.grad), local_shard(grads[n].grad, p.grad), bf16, 0.01 * top)
              for n, p in model.named_parameters()}
    name = max(errors, key=errors.get)
    out["grads"] = worst(errors[name])
    out["worst gradient (rank 0)"] = name.removeprefix("model.")
    if bf16:  # the same model whole in fp32: how far bf16 itself moves logits and gradients
        exact = copy.deepcopy(ref)
        exact.zero_grad(set_to_none=True)
        with routing.replay(lambda table: table):
            fp32 = exact(ids, labels=ids, cu_seqlens=cu)
        fp32.loss.backward()
        exact_grads = dict(exact.named_parameters())
        out["bf16 noise: logits"] = error(want.logits, fp32.logits, True)
        out["bf16 noise: grads"] = max(error(grads[n].grad, exact_grads[n].grad, True, 0.01 * top) for n in grads)
    return out


def parity(args, device) -> None:
    config = Qwen3NextConfig.preset("tiny", **TINY) if args.small else Qwen3NextConfig.preset("tiny", **PARITY)
    B, T = (4, 22) if args.small else (4, 300)  # cp=2: slices of 150 tokens, not a multiple of the chunk (64)
    batch = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    split = T // 2
    cases = {"tp": (dict(tp=2), None), "ep": (dict(ep=2), None), "cp": (dict(cp=2), None),
             "dp_shard": (dict(dp_shard=2), None),
             "ep_in_dp": (dict(dp_shard=2, ep=2, ep_in_dp=True), None),
             # one row of packed documents: one crosses the cp split starting 2 tokens before it
             "cp_packed": (dict(cp=2), [0, split // 3, split - 2, split + 9, T])}
    rows = []
    for precision, bound in (("fp32", 1e-4), ("bf16", 1e-2)):
        for name, (layout, cu) in cases.items():
            dims = ParallelDims(**layout)
            out = parity_case(config, dims, precision == "bf16", device, batch[:1] if cu else batch, cu)
            # bf16: within the bound, or within what bf16 itself moves the one-GPU result
            ok = all(out[k] < max(bound, out.get(f"bf16 noise: {k}", 0.0)) for k in ("logits", "loss", "aux", "grads"))
            rows.append({"layout": name, "precision": precision, **out, "bound": bound, "pass": ok})
            reset_memory(device)
    report(args, "parity (worst over ranks; fp32 max-abs relative, bf16 relative L2)", rows)
    failed = [f"{r['layout']}/{r['precision']}" for r in rows if not r["pass"]]
    if failed:
        raise SystemExit(f"parity failed: {failed}")


# --------------------------------------------------------------------------------------------- scaling
def train_rate(model, dims, config, rows, seq, device, steps, warmup) -> tuple[float, float | None]:
    """(training tokens/s over `rows` x `seq` tokens per step, peak GiB) of `model` (dims None: one GPU)."""
    optimizer = build_optimizer(model, TrainSettings(), device)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (rows, seq), generator=g).to(device)
    mine = ids if dims is None else dims.local_batch(ids)
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            if dims is not None:
                dist.barrier()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(mine, labels=mine).loss
        loss.backward()
        if dims is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - start
    return rows * seq * steps / seconds, peak_gib(device)


def scaling(args, device) -> None:
    if args.small:
        config, row_counts, seq, steps, warmup = Qwen3NextConfig.preset("tiny", **TINY), [2], 64, 2, 1
    else:
        config, row_counts, seq, steps, warmup = Qwen3NextConfig.preset("80b-a3b", **SCALING), args.rows, 4096, 8, 3
    params = count_parameters(config)["total"]
    for rows in row_counts:
        results = []
        if rank0():  # the one-GPU baseline; rank 1 waits
            torch.manual_seed(0)
            with torch.device(device):
                model = Qwen3NextForCausalLM(config).train()
            rate, peak = train_rate(model, None, config, rows, seq, device, steps, warmup)
            results.append({"layout": "1 GPU", "rows/step": rows, "tokens/s": rate, "efficiency": 1.0, "peak GiB": peak})
            del model
        reset_memory(device)  # before NCCL's barrier allocates outside torch's cache
        dist.barrier()
        single = results[0]["tokens/s"] if results else None
        for layout in (dict(dp_shard=2), dict(ep=2), dict(tp=2), dict(dp_shard=2, ep=2, ep_in_dp=True)):
            dims = ParallelDims(**layout)
            torch.manual_seed(0)
            with torch.device(device):
                model = Qwen3NextForCausalLM(config).train()
            model = parallelize(model, dims, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            rate, peak = train_rate(model, dims, config, 2 * rows, seq, device, steps, warmup)
            peak = worst(peak or 0.0) or None
            if rank0():
                name = " ".join(f"{k}={v}" for k, v in layout.items() if k != "ep_in_dp")
                results.append({"layout": name + (" (ep in dp)" if dims.ep_in_dp else ""), "rows/step": 2 * rows,
                                "tokens/s": rate, "efficiency": rate / (2 * single), "peak GiB": peak})
            del model
            reset_memory(device)
        report(args, f"scaling: training, {params / 1e9:.2f}B parameters, {seq} tokens per row, {rows} rows per GPU",
               results)


# --------------------------------------------------------------------------------------------- long context
def long_step(model, ids, device) -> tuple[float, float | None]:
    """(seconds, peak GiB) of one forward + backward on ids [1, T] (this rank's part under cp)."""
    reset_memory(device)
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start, peak_gib(device)


def long_context(args, device) -> None:
    config = Qwen3NextConfig.preset("tiny", **TINY) if args.small else Qwen3NextConfig.preset("tiny", **LONG)
    lengths = [1 * K, 2 * K, 4 * K] if args.small else [128 * K, 256 * K, 512 * K, 1024 * K]
    capacity = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 24.0
    ids = torch.randint(0, config.vocab_size, (1, lengths[-1]), generator=torch.Generator().manual_seed(3)).to(device)
    rows = []
    if rank0():  # one GPU; rank 1 waits
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen3NextForCausalLM(config).train()
        long_step(model, ids[:, : lengths[0] // 8], device)  # compile / autotune
        for T in lengths:
            try:
                seconds, peak = long_step(model, ids[:, :T], device)
                rows.append({"layout": "1 GPU", "tokens": T, "seconds": seconds, "peak GiB": peak, "fits": True})
            except torch.OutOfMemoryError:
                rows.append({"layout": "1 GPU", "tokens": T, "fits": False})
                break
        del model
    reset_memory(device)
    dist.barrier()
    dims = ParallelDims(cp=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = parallelize(Qwen3NextForCausalLM(config).train(), dims, param_dtype=torch.bfloat16,
                            reduce_dtype=torch.float32)
    long_step(model, dims.local_batch(ids[:, : lengths[0] // 8]), device)
    peaks = []
    for T in lengths:
        if len(peaks) >= 2:
            (t0, p0), (t1, p1) = peaks[:2]
            predicted = p0 + (p1 - p0) * (T - t0) / (t1 - t0)
            if predicted > 0.9 * capacity:
                if rank0():
                    rows.append({"layout": "cp=2", "tokens": T, "fits": f"no (predicted {predicted:.0f} GiB, not run)"})
                break
        seconds, peak = long_step(model, dims.local_batch(ids[:, :T]), device)
        seconds, peak = worst(seconds), worst(peak or 0.0)
        peaks.append((T, peak))
        if rank0():
            rows.append({"layout": "cp=2", "tokens": T, "seconds": seconds, "peak GiB": peak or None, "fits": True})
    report(args, f"long context: forward + backward, {count_parameters(config)['total'] / 1e6:.0f}M parameters", rows)


# --------------------------------------------------------------------------------------------- 80B-A3B
def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy of 2 GiB (read + write counted)."""
    if device.type != "cuda":
        return math.nan
    a = torch.empty(2**30, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 10 * 2 * a.numel() * a.element_size() / (time.perf_counter() - start)


def decode_bytes(config, batch: int, state_bytes: int) -> float:
    """Bytes one decode step must move: the weights of the tokens' experts (the expected number of distinct
    experts per layer for `batch` tokens of uniform routing) and the rest of the model's active weights
    (bf16), plus every row's recurrent states read and written."""
    active = count_parameters(config)["active"]
    layers = sum(1 for i in range(config.num_hidden_layers) if i not in config.mlp_only_layers)
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    E, k = config.num_experts, config.num_experts_per_tok
    distinct = E * (1 - (1 - k / E) ** batch)
    weights = active - layers * k * expert + layers * distinct * expert
    return 2 * weights + 2 * state_bytes


def model80b(args, device) -> None:
    config = (Qwen3NextConfig.preset("tiny", **TINY) if args.small
              else Qwen3NextConfig.preset("80b-a3b"))
    dims = ParallelDims(ep=2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    model = build_sharded(config, dims, device, dtype, param_dtype=None, reduce_dtype=None).eval()
    fill_random(model, 0)
    sync(device)
    built = worst(time.perf_counter() - start)
    weights = worst(torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
    prompts = [64, 128] if args.small else [4 * K, 32 * K]
    rows = [{"what": "build + fill (meta -> ep=2 shards)", "seconds": built, "weights GiB/GPU": weights}]
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        for T in prompts:
            ids = torch.randint(0, config.vocab_size, (1, T), generator=g).to(device)
            cache = HybridCache(config, 1, T + 1, dtype=dtype, device=device)
            prefill(model, ids[:, :256], None, HybridCache(config, 1, 257, dtype=dtype, device=device))  # warm-up
            sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            prefill(model, ids, None, cache)
            sync(device)
            seconds = worst(time.perf_counter() - t0)
            rows.append({"what": f"prefill {T} tokens", "seconds": seconds, "tokens/s": T / seconds,
                         "peak GiB/GPU": worst(peak_gib(device) or 0.0)})
            del cache
        bandwidth = -2 * worst(-copy_bandwidth(device))  # the slower GPU's, twice
        for batch in (1, 4) if args.small else (1, 64):
            prompt, steps = 32, 3 if args.small else 16
            ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=g).to(device)
            cache = HybridCache(config, batch, prompt + steps + 2, dtype=dtype, device=device)
            logits = prefill(model, ids, None, cache)
            token = logits.argmax(-1, keepdim=True)
            token = model(token, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)  # warm-up
            sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                token = model(token, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            step = worst(time.perf_counter() - t0) / steps
            floor = decode_bytes(config, batch, cache.nbytes()["linear"]) / bandwidth
            rows.append({"what": f"decode batch {batch}", "ms/step": step * 1e3, "tokens/s": batch / step,
                         "floor ms": floor * 1e3, "x floor": step / floor, "peak GiB/GPU": worst(peak_gib(device) or 0.0)})
            del cache
    report(args, f"80B-A3B ({count_parameters(config)['total'] / 1e9:.1f}B parameters), ep=2, "
                 f"{str(dtype).removeprefix('torch.')}, random weights; copy bandwidth of the 2 GPUs "
                 f"{bandwidth / 1e12:.2f} TB/s", rows)


STEPS = {"parity": parity, "scaling": scaling, "long": long_context, "model80b": model80b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="+", choices=sorted(STEPS))
    parser.add_argument("--small", action="store_true", help="tiny sizes (checks the script, e.g. on the CPU)")
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 4],
                        help="scaling: rows of 4096 tokens per GPU per step, one table each [2 4]")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="where multi_gpu.jsonl goes [$OUT or .]")
    args = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) != 2:
        raise SystemExit("launch with torchrun --nproc-per-node 2")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=15))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if rank0():
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else "-"
        print(f"{torch.cuda.get_device_name(device) if cuda else 'CPU'} x 2, torch {torch.__version__}, "
              f"NCCL {nccl}, {time.strftime('%Y-%m-%d')}", flush=True)
    try:
        for name in args.steps:
            t0 = time.perf_counter()
            STEPS[name](args, device)
            reset_memory(device)
            if rank0():
                print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
