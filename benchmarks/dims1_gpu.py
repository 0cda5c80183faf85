"""Does the one-GPU layout (every parallel dim 1) cost anything? A model's forward + backward, plain and
after `parallelize(model, ParallelDims())`, in one process.

1. Checks: the dims-of-1 model has no DTensor parameter, no installed forward on any module and no
   `parallel` runtime; on the same batch its logits, loss and gradients equal the plain model's
   (bitwise, or as closely as the plain model's own second run, should a kernel add in varying order).
2. Times: forward + backward (loss = CE + coef * aux, bf16 autocast on CUDA, fp32 weights), both models
   in interleaved rounds (so drift of clocks or of other load hits both alike), median of CUDA-event
   timings per model, and the ratio.

Config: 4 layers (3 Gated DeltaNet + 1 gated attention) of the 80B-A3B shapes (hidden 2048, GDN 16/32
heads of 128, attention 16/2 heads of 256, experts of 512, top-10, shared expert 512) with 64 experts
instead of 512 and a 32K vocabulary; batch 2 x 4096 tokens.

    PYTHONUNBUFFERED=1 python benchmarks/dims1_gpu.py [--rounds 20] [--batch 2] [--seq-len 4096]
    python benchmarks/dims1_gpu.py --device cpu --small      # checks the script on the CPU
No process group is needed (dims of 1); under `torchrun --nproc-per-node 1` it runs the same.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from qwen3next import Qwen3NextConfig, Qwen3NextForCausalLM
from qwen3next.distributed import ParallelDims, parallelize
from timing import time_once

MID = dict(num_hidden_layers=4, num_experts=64, vocab_size=32768)
SMALL = dict(num_hidden_layers=4, vocab_size=257)


def build(args) -> tuple[Qwen3NextForCausalLM, Qwen3NextForCausalLM]:
    """(plain model, the same weights after parallelize(..., ParallelDims()))."""
    config = Qwen3NextConfig.preset("tiny", **SMALL) if args.small else Qwen3NextConfig.preset("80b-a3b", **MID)
    torch.manual_seed(0)
    plain = Qwen3NextForCausalLM(config).to(args.device).train()
    dims = ParallelDims()
    assert not dims.enabled and dims.mesh is None
    return plain, parallelize(copy.deepcopy(plain), dims)


def check_untouched(model) -> None:
    from torch.distributed.tensor import DTensor

    assert getattr(model, "parallel", None) is None, "a parallel runtime was attached"
    assert not any(isinstance(p, DTensor) for p in model.parameters()), "DTensor parameters"
    wrapped = [name or "<root>" for name, m in model.named_modules() if "forward" in vars(m)]
    assert not wrapped, f"forwards installed on {wrapped[:5]}"
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules()), "FSDP wrappers"


def step(model, ids, autocast: bool):
    """Forward + backward; returns (logits, loss, {name: gradient}) detached; gradients reset."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), grads


def differences(a, b) -> tuple[float, float]:
    """(max |logits and loss difference|, worst relative gradient difference) of two `step` results."""
    out = max((x.double() - y.double()).abs().max().item() for x, y in zip(a[:2], b[:2]))
    grad = max(((a[2][n].double() - b[2][n].double()).norm() / b[2][n].double().norm().clamp_min(1e-30)).item()
               for n in b[2])
    return out, grad


def check_outputs(plain, ours, ids, autocast: bool) -> str:
    """The dims-of-1 model's outputs differ from the plain model's no more than the plain model's differ from
    themselves on a second run (0 with deterministic kernels: bitwise equal); its gradients agree to rounding
    (some CPU backward ops accumulate in a thread-dependent order, so reruns differ by ~1e-5 there)."""
    first = step(plain, ids, autocast)
    out_noise, grad_noise = differences(step(plain, ids, autocast), first)
    out_diff, grad_diff = differences(step(ours, ids, autocast), first)
    assert out_diff <= out_noise, f"logits/loss differ by {out_diff:.3e} (the plain model's own rerun: {out_noise:.3e})"
    tol = 2e-2 if autocast else 1e-4
    assert grad_diff <= max(2 * grad_noise, tol), f"gradients differ by {grad_diff:.2e} (rerun: {grad_noise:.2e})"
    if out_diff == 0 and grad_diff == 0:
        return "logits, loss and gradients bitwise equal"
    return (f"logits/loss within {out_diff:.1e}, gradients {grad_diff:.1e} (the plain model's own rerun: "
            f"{out_noise:.1e}, {grad_noise:.1e})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="the tiny preset and short rows (a check of the script)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds, each one step of every model")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096)
    args = p.parse_args()
    args.device = torch.device(args.device)
    if args.small:
        args.seq_len = min(args.seq_len, 64)
        args.rounds = min(args.rounds, 5)
    autocast = args.device.type == "cuda"
    plain, ours = build(args)
    check_untouched(ours)
    config = plain.config
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    equal = check_outputs(plain, ours, ids, autocast)

    def run(model):
        step(model, ids, autocast)

    models = {"plain": plain, "parallelize(dims of 1)": ours}
    for model in models.values():  # warm-up (kernel compilation, autotuning, allocator)
        run(model)
    times = {name: [] for name in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(time_once(lambda: run(models[name]), args.device))

    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    print(f"# dims-of-1 cost: {device}, torch {torch.__version__}, {config.num_hidden_layers} layers "
          f"(hidden {config.hidden_size}, {config.num_experts} experts, vocab {config.vocab_size}), "
          f"batch {args.batch} x {args.seq_len}, {'bf16 autocast' if autocast else 'fp32'}, {args.rounds} rounds")
    print(f"checks: no DTensor, no wrapper; {equal}")
    base = statistics.median(times["plain"])
    print("| model | forward+backward median (ms) | min | max | / plain |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {min(ts):.2f} | {max(ts):.2f} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
