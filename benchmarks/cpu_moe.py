"""Routed experts on the CPU: ours (`ops.moe_experts`, torch backend) against transformers' experts module.

Same weights, same routing, forward and forward+backward, median wall time over several interleaved repeats.
transformers' experts implementations: `grouped_mm` (its default for a loaded model) and `eager`
(its Python loop over experts). Prints a markdown table.

    python benchmarks/cpu_moe.py [--tokens 1 64 512] [--experts 64] [--dtype float32]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from qwen3next import ops


def _interleaved_medians(fns, repeats: int) -> list[float]:
    """Median wall ms of each fn, the fns taking turns in every round (so background load hits all alike)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import transformers
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextExperts

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    D, I, E, k = args.hidden, args.intermediate, args.experts, args.top_k
    config = transformers.Qwen3NextConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E,
                                          num_experts_per_tok=k, hidden_act="silu")
    theirs = Qwen3NextExperts(config).to(dtype)
    with torch.no_grad():
        theirs.gate_up_proj.normal_(0, D**-0.5)
        theirs.down_proj.normal_(0, I**-0.5)
    gate_up, down = theirs.gate_up_proj, theirs.down_proj

    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}, transformers {transformers.__version__}; D={D} E={E} k={k} I={I} {args.dtype}")
    print("| tokens | pass | ours (ms) | transformers grouped_mm (ms) | transformers eager (ms) | max rel diff |")
    print("|---|---|---|---|---|---|")
    for n in args.tokens:
        x = torch.randn(n, D, dtype=dtype, requires_grad=True)
        weights, ids = ops.route(torch.randn(n, E, dtype=dtype), k, True)
        weights.requires_grad_(True)
        grad = torch.randn(n, D, dtype=dtype)

        def ours():
            return ops.moe_experts(x, gate_up, down, weights, ids)

        def transformers_impl(name):
            def run():
                config._experts_implementation = name
                return theirs(x, ids, weights)
            return run

        impls = [ours, transformers_impl("grouped_mm"), transformers_impl("eager")]
        diff = max((ours() - impl()).abs().max().item() for impl in impls[1:]) / ours().abs().max().item()
        for label, backward in (("fwd", False), ("fwd+bwd", True)):
            steps = []
            for impl in impls[: 2 if backward else 3]:  # eager's backward takes minutes here: left out
                if backward:
                    def step(impl=impl):
                        torch.autograd.backward(impl(), grad)
                        for p in (x, weights, gate_up, down):
                            p.grad = None
                else:
                    def step(impl=impl):
                        with torch.no_grad():
                            impl()
                steps.append(step)
            cells = _interleaved_medians(steps, args.repeats) + [float("nan")] * (3 - len(steps))
            print(f"| {n} | {label} | {cells[0]:.2f} | {cells[1]:.2f} | {cells[2]:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
